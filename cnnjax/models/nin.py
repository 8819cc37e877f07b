"""Network in Network (d2l §7.3)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import Dtype, GlobalAvgPool, ModuleDef


class nin_block(nn.Module):  # noqa: N801 -- named like the book's function.
    """A NiN block (§7.3.1): one ordinary conv, then two 1x1 convs that act as a
    per-pixel MLP over the channels; ReLU after each."""

    num_channels: int
    kernel_size: int
    strides: int
    padding: int
    conv: ModuleDef = layers.conv2d

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.relu(self.conv(self.num_channels, self.kernel_size, self.strides,
                              self.padding)(x))
        x = nn.relu(self.conv(self.num_channels, 1)(x))
        return nn.relu(self.conv(self.num_channels, 1)(x))


class NiN(nn.Module):
    """NiN (§7.3.2): four NiN blocks with AlexNet's kernel sizes and widths and 3x3
    max pools (stride 2) between them. There is no dense layer: the last block has
    one channel per class and global average pooling turns them into logits.
    Dropout 0.5 precedes the last block.
    """

    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    max_pool: ModuleDef = layers.MaxPool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(self.conv, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = nin_block(96, kernel_size=11, strides=4, padding=0, conv=conv)(x)
        x = self.max_pool(3, 2)(x)
        x = nin_block(256, kernel_size=5, strides=1, padding=2, conv=conv)(x)
        x = self.max_pool(3, 2)(x)
        x = nin_block(384, kernel_size=3, strides=1, padding=1, conv=conv)(x)
        x = self.max_pool(3, 2)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nin_block(self.num_classes, kernel_size=3, strides=1, padding=1, conv=conv)(x)
        # The pooled channels are the logits: average in float32 and keep float32.
        return GlobalAvgPool(dtype=jnp.float32)(x)
