"""GoogLeNet, networks with parallel concatenations (d2l §7.4)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import Dtype, GlobalAvgPool, ModuleDef


class Inception(nn.Module):
    """The Inception block (§7.4.1): four parallel paths concatenated on channels.

    Path 1: 1x1 conv (`c1` channels). Path 2: 1x1 conv to `c2[0]`, then 3x3 conv to
    `c2[1]`. Path 3: 1x1 conv to `c3[0]`, then 5x5 conv to `c3[1]`. Path 4: 3x3 max
    pool (stride 1), then 1x1 conv to `c4`. Paddings keep height and width, so the
    output has c1 + c2[1] + c3[1] + c4 channels. ReLU after every conv.
    """

    c1: int
    c2: tuple[int, int]
    c3: tuple[int, int]
    c4: int
    conv: ModuleDef = layers.conv2d
    max_pool: ModuleDef = layers.MaxPool

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = self.conv
        p1 = nn.relu(conv(self.c1, 1)(x))
        p2 = nn.relu(conv(self.c2[0], 1)(x))
        p2 = nn.relu(conv(self.c2[1], 3, padding=1)(p2))
        p3 = nn.relu(conv(self.c3[0], 1)(x))
        p3 = nn.relu(conv(self.c3[1], 5, padding=2)(p3))
        p4 = self.max_pool(3, 1, padding=1)(x)
        p4 = nn.relu(conv(self.c4, 1)(p4))
        return jnp.concatenate([p1, p2, p3, p4], axis=-1)


class GoogLeNet(nn.Module):
    """GoogLeNet (§7.4.2): five blocks b1..b5 and a dense output layer.

    b1: 7x7 conv (64, stride 2) and 3x3 max pool. b2: 1x1 conv (64) and 3x3 conv
    (192), then a max pool. b3: two Inception blocks (256, 480 channels) and a max
    pool. b4: five Inception blocks (512, 512, 512, 528, 832) and a max pool. b5:
    two Inception blocks (832, 1024) and global average pooling. Every max pool
    between blocks is 3x3 with stride 2 and padding 1, halving height and width.

    No block has batch norm or dropout, so `train` changes nothing and the blocks
    are built in `setup` as `nn.Sequential`, as the book writes them.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense
    max_pool: ModuleDef = layers.MaxPool

    def setup(self) -> None:
        conv = functools.partial(self.conv, dtype=self.dtype)

        def pool():
            return self.max_pool(3, 2, padding=1)

        def inception(*channels):
            return Inception(*channels, conv=conv, max_pool=self.max_pool)

        self.b1 = nn.Sequential([conv(64, 7, strides=2, padding=3), nn.relu, pool()])
        self.b2 = nn.Sequential([conv(64, 1), nn.relu, conv(192, 3, padding=1), nn.relu,
                                 pool()])
        self.b3 = nn.Sequential([inception(64, (96, 128), (16, 32), 32),
                                 inception(128, (128, 192), (32, 96), 64),
                                 pool()])
        self.b4 = nn.Sequential([inception(192, (96, 208), (16, 48), 64),
                                 inception(160, (112, 224), (24, 64), 64),
                                 inception(128, (128, 256), (24, 64), 64),
                                 inception(112, (144, 288), (32, 64), 64),
                                 inception(256, (160, 320), (32, 128), 128),
                                 pool()])
        self.b5 = nn.Sequential([inception(256, (160, 320), (32, 128), 128),
                                 inception(384, (192, 384), (48, 128), 128),
                                 GlobalAvgPool()])
        self.head = self.dense(self.num_classes, dtype=self.dtype)

    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No batch norm or dropout: both modes compute the same.
        x = jnp.asarray(x, self.dtype)
        for block in (self.b1, self.b2, self.b3, self.b4, self.b5):
            x = block(x)
        return jnp.asarray(self.head(x), jnp.float32)
