"""Densely connected networks (d2l §7.7)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import AvgPool, Dtype, GlobalAvgPool, ModuleDef
from cnnjax.models.resnet import Stem


class conv_block(nn.Module):  # noqa: N801 -- named like the book's function.
    """DenseNet's conv block (§7.7.2): batch norm, ReLU, then a 3x3 conv (padding 1)."""

    num_channels: int
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.relu(self.norm(use_running_average=not train)(x))
        return self.conv(self.num_channels, 3, padding=1)(x)


class DenseBlock(nn.Module):
    """A dense block (§7.7.2): `num_convs` conv blocks, each seeing the input and
    every earlier output concatenated on channels. The output has the input's
    channels plus `num_convs * num_channels` (the growth rate)."""

    num_convs: int
    num_channels: int
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for _ in range(self.num_convs):
            y = conv_block(self.num_channels, conv=self.conv, norm=self.norm)(x, train)
            x = jnp.concatenate([x, y], axis=-1)
        return x


class transition_block(nn.Module):  # noqa: N801 -- named like the book's function.
    """A transition layer (§7.7.3): batch norm, ReLU, a 1x1 conv to `num_channels`
    and a 2x2 average pool with stride 2, halving height and width."""

    num_channels: int
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.relu(self.norm(use_running_average=not train)(x))
        return AvgPool(2, 2)(self.conv(self.num_channels, 1)(x))


class DenseNet(nn.Module):
    """DenseNet (§7.7.4): ResNet's stem, dense blocks with transition layers that
    halve the channels between them, then batch norm, ReLU, global average pooling
    and a dense output layer. The book uses 4 blocks of 4 convs, growth rate 32."""

    num_convs_in_dense_blocks: Sequence[int] = (4, 4, 4, 4)
    growth_rate: int = 32
    num_channels: int = 64
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense
    norm: ModuleDef = layers.batch_norm
    max_pool: ModuleDef = layers.MaxPool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(self.norm, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = Stem(self.num_channels, conv=conv, norm=norm, max_pool=self.max_pool,
                 name="b1")(x, train)
        num_channels = self.num_channels
        for i, num_convs in enumerate(self.num_convs_in_dense_blocks):
            x = DenseBlock(num_convs, self.growth_rate, conv=conv, norm=norm)(x, train)
            num_channels += num_convs * self.growth_rate
            if i != len(self.num_convs_in_dense_blocks) - 1:
                num_channels //= 2
                x = transition_block(num_channels, conv=conv, norm=norm)(x, train)
        x = nn.relu(norm(use_running_average=not train)(x))
        x = GlobalAvgPool()(x)
        x = self.dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)
