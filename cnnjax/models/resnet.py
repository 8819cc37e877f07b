"""Residual networks (d2l §7.6): ResNet-18 and ResNet-34; and the ResNet paper's
small-image networks, with and without shortcuts, for the degradation experiment."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import Dtype, GlobalAvgPool, ModuleDef


class Residual(nn.Module):
    """The residual block (§7.6.2): two 3x3 convs with batch norm, ReLU between
    them, the input added before the last ReLU.

    With `use_1x1conv`, a 1x1 conv (with the same `strides`) reshapes the input so
    it can be added when the block changes the number of channels or halves the
    resolution. With `shortcut=False` nothing is added: the "plain" block the ResNet
    paper compares against (and `use_1x1conv` has nothing to do).
    """

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1
    shortcut: bool = True
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        norm = functools.partial(self.norm, use_running_average=not train)
        y = self.conv(self.num_channels, 3, strides=self.strides, padding=1)(x)
        y = nn.relu(norm()(y))
        y = norm()(self.conv(self.num_channels, 3, padding=1)(y))
        if not self.shortcut:
            return nn.relu(y)
        if self.use_1x1conv:
            x = self.conv(self.num_channels, 1, strides=self.strides)(x)
        return nn.relu(y + x)


class resnet_block(nn.Module):  # noqa: N801 -- named like the book's function.
    """One ResNet stage (§7.6.3): `num_residuals` residual blocks of `num_channels`.

    Every stage but the first starts with a block that halves height and width
    and changes the channels through a 1x1 conv; the first stage follows a max
    pool that has already halved the resolution, so it keeps the shape.
    """

    num_channels: int
    num_residuals: int
    first_block: bool = False
    shortcut: bool = True  # False: plain blocks (see `Residual`)
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        block = functools.partial(Residual, self.num_channels, shortcut=self.shortcut,
                                  conv=self.conv, norm=self.norm)
        for i in range(self.num_residuals):
            if i == 0 and not self.first_block:
                x = block(use_1x1conv=True, strides=2)(x, train)
            else:
                x = block()(x, train)
        return x


class Stem(nn.Module):
    """b1 of ResNet (§7.6.3) and DenseNet (§7.7.4): GoogLeNet's first block with
    batch norm after the conv. A 7x7 conv (stride 2, padding 3), batch norm, ReLU
    and a 3x3 max pool (stride 2, padding 1): 224x224 becomes 56x56."""

    num_channels: int = 64
    conv: ModuleDef = layers.conv2d
    norm: ModuleDef = layers.batch_norm
    max_pool: ModuleDef = layers.MaxPool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.conv(self.num_channels, 7, strides=2, padding=3)(x)
        x = nn.relu(self.norm(use_running_average=not train)(x))
        return self.max_pool(3, 2, padding=1)(x)


class ResNet(nn.Module):
    """ResNet (§7.6.3): the stem b1, four stages b2..b5 of 64, 128, 256 and 512
    channels with `stage_sizes` residual blocks each, global average pooling and a
    dense output layer. (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
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
        x = Stem(64, conv=conv, norm=norm, max_pool=self.max_pool, name="b1")(x, train)
        for i, num_residuals in enumerate(self.stage_sizes):
            x = resnet_block(64 * 2**i, num_residuals, first_block=(i == 0), conv=conv,
                             norm=norm, name=f"b{i + 2}")(x, train)
        x = GlobalAvgPool()(x)
        x = self.dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)


class CifarResNet(nn.Module):
    """The ResNet paper's networks for small images (He et al. 2016, §4.2), the
    degradation experiment's subjects: a 3x3 conv of 16 channels with batch norm
    and ReLU, three `resnet_block` stages of n blocks with 16, 32 and 64 channels
    (the second and third start by halving the resolution: 28x28 becomes 14x14 and
    7x7), global average pooling and a dense layer; 6n + 2 weighted layers, so
    `depth` 20 has n = 3 and 56 has n = 9. With `residual=False` the same layers
    without shortcuts: the paper's "plain" networks. Shortcuts that change shape
    use the book's 1x1 conv (the paper's option B)."""

    depth: int = 20
    residual: bool = True
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, ...), got {self.depth}")
        blocks_per_stage = (self.depth - 2) // 6
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(self.norm, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv(16, 3, padding=1)(x)
        x = nn.relu(norm(use_running_average=not train)(x))
        for i in range(3):
            x = resnet_block(16 * 2**i, blocks_per_stage, first_block=(i == 0),
                             shortcut=self.residual, conv=conv, norm=norm,
                             name=f"stage{i + 1}")(x, train)
        x = GlobalAvgPool()(x)
        x = self.dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)
