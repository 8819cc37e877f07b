"""VGG, networks using blocks (d2l §7.2)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import Dtype, ModuleDef, flatten

# (number of convs, output channels) of each block of VGG-11.
VGG11_ARCH: tuple[tuple[int, int], ...] = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


class vgg_block(nn.Module):  # noqa: N801 -- named like the book's function.
    """A VGG block (§7.2.1): `num_convs` 3x3 convs (padding 1) with ReLU, then a
    2x2 max pool with stride 2 that halves height and width."""

    num_convs: int
    num_channels: int
    conv: ModuleDef = layers.conv2d
    max_pool: ModuleDef = layers.MaxPool

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for _ in range(self.num_convs):
            x = nn.relu(self.conv(self.num_channels, 3, padding=1)(x))
        return self.max_pool(2, 2)(x)


class VGG(nn.Module):
    """VGG (§7.2.2): one `vgg_block` per entry of `conv_arch`, then two 4096-unit
    dense layers with ReLU and dropout 0.5, and the output layer.

    `ratio` divides every conv width, as the book does to train on Fashion-MNIST
    (§7.2.3: ratio 4); `ratio=1` is the full VGG-11.
    """

    conv_arch: Sequence[tuple[int, int]] = VGG11_ARCH
    ratio: int = 4
    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense
    max_pool: ModuleDef = layers.MaxPool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(self.conv, dtype=self.dtype)
        dense = functools.partial(self.dense, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        for num_convs, num_channels in self.conv_arch:
            x = vgg_block(num_convs, num_channels // self.ratio, conv=conv,
                          max_pool=self.max_pool)(x)
        x = flatten(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(4096)(x)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(4096)(x)))
        return jnp.asarray(dense(self.num_classes)(x), jnp.float32)
