"""ResNeXt blocks (d2l-en §8.6.5) and the AnyNet design space with its RegNetX-32
instance (d2l-en §8.8), from the book's English edition."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import Dtype, GlobalAvgPool, ModuleDef


class ResNeXtBlock(nn.Module):
    """The ResNeXt block (d2l-en §8.6.5): a 1x1 conv to `bot_channels` =
    round(num_channels * bot_mul), a 3x3 grouped conv (stride `strides`, padding 1)
    and a 1x1 conv back to `num_channels`, each with batch norm, ReLU after the first
    two; the input is added before the last ReLU.

    As in the book, `groups` is the width of each group of the 3x3 conv, not their
    number: it has bot_channels // groups groups. With `use_1x1conv`, the input
    goes through a 1x1 conv (with the same `strides`) and batch norm before the
    addition, for blocks that change the channels or halve the resolution.
    """

    num_channels: int
    groups: int
    bot_mul: float
    use_1x1conv: bool = False
    strides: int = 1
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        norm = functools.partial(self.norm, use_running_average=not train)
        bot_channels = int(round(self.num_channels * self.bot_mul))
        y = nn.relu(norm()(self.conv(bot_channels, 1)(x)))
        y = self.conv(bot_channels, 3, strides=self.strides, padding=1,
                      feature_group_count=bot_channels // self.groups)(y)
        y = nn.relu(norm()(y))
        y = norm()(self.conv(self.num_channels, 1)(y))
        if self.use_1x1conv:
            x = norm()(self.conv(self.num_channels, 1, strides=self.strides)(x))
        return nn.relu(y + x)


class AnyNetStem(nn.Module):
    """AnyNet's stem (the book's `AnyNet.stem`, d2l-en §8.8.1): a 3x3 conv with
    stride 2 and padding 1, batch norm and ReLU; it halves height and width."""

    num_channels: int
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.conv(self.num_channels, 3, strides=2, padding=1)(x)
        return nn.relu(self.norm(use_running_average=not train)(x))


class AnyNetStage(nn.Module):
    """One AnyNet stage (the book's `AnyNet.stage`, d2l-en §8.8.1): `depth` ResNeXt
    blocks of `num_channels`, the first with a 1x1-conv shortcut and stride 2, so
    every stage halves height and width."""

    depth: int
    num_channels: int
    groups: int
    bot_mul: float
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        block = functools.partial(ResNeXtBlock, self.num_channels, self.groups, self.bot_mul,
                                  conv=self.conv, norm=self.norm)
        for i in range(self.depth):
            x = (block(use_1x1conv=True, strides=2) if i == 0 else block())(x, train)
        return x


class AnyNet(nn.Module):
    """AnyNet (d2l-en §8.8.1): the stem, one stage per entry of `depths` and
    `widths` (ResNeXt blocks with group width `groups` and bottleneck ratio
    `bot_mul`), global average pooling and a dense output layer. The defaults are
    RegNetX-32 (§8.8.3): a 32-channel stem, stages of 4 and 6 blocks with 32 and 80
    channels, group width 16, no bottleneck."""

    depths: Sequence[int] = (4, 6)
    widths: Sequence[int] = (32, 80)
    groups: int = 16
    bot_mul: float = 1.0
    stem_channels: int = 32
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if len(self.depths) != len(self.widths):
            raise ValueError(f"depths and widths must have one entry per stage, got "
                             f"{tuple(self.depths)} and {tuple(self.widths)}")
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(self.norm, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = AnyNetStem(self.stem_channels, conv=conv, norm=norm, name="stem")(x, train)
        for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
            x = AnyNetStage(depth, width, self.groups, self.bot_mul, conv=conv, norm=norm,
                            name=f"stage{i + 1}")(x, train)
        x = GlobalAvgPool(name="head_pool")(x)
        x = self.dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return jnp.asarray(x, jnp.float32)
