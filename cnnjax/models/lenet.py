"""LeNet (d2l §6.6) and LeNet with batch normalization (d2l §7.5.4-7.5.5)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import AvgPool, Dtype, ModuleDef, flatten


class LeNet(nn.Module):
    """LeNet-5 as the book trains it on 28x28 Fashion-MNIST (§6.6).

    Two 5x5 conv layers (6 and 16 channels; the first padded by 2 so 28x28 keeps
    its size), each followed by a sigmoid and 2x2 average pooling, then dense
    layers of 120, 84 and `num_classes` units with sigmoids between them.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No batch norm or dropout: both modes compute the same.
        conv = functools.partial(self.conv, dtype=self.dtype)
        dense = functools.partial(self.dense, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = AvgPool(2, 2)(nn.sigmoid(conv(6, 5, padding=2)(x)))
        x = AvgPool(2, 2)(nn.sigmoid(conv(16, 5)(x)))
        x = flatten(x)
        x = nn.sigmoid(dense(120)(x))
        x = nn.sigmoid(dense(84)(x))
        return jnp.asarray(dense(self.num_classes)(x), jnp.float32)


class LeNetBN(nn.Module):
    """LeNet with batch normalization after every conv and hidden dense layer (§7.5.4).

    BN sits between the affine map and the sigmoid. The first conv is unpadded
    here, as in the book's BN version, so the flattened features are 16x4x4.
    `norm` is the batch norm: flax's (§7.5.5) by default, or the from-scratch
    `cnnjax.scratch.BatchNorm` (§7.5.3), which takes the same fields.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv2d
    dense: ModuleDef = layers.dense
    norm: ModuleDef = layers.batch_norm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(self.conv, dtype=self.dtype)
        dense = functools.partial(self.dense, dtype=self.dtype)
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = AvgPool(2, 2)(nn.sigmoid(norm()(conv(6, 5)(x))))
        x = AvgPool(2, 2)(nn.sigmoid(norm()(conv(16, 5)(x))))
        x = flatten(x)
        x = nn.sigmoid(norm()(dense(120)(x)))
        x = nn.sigmoid(norm()(dense(84)(x)))
        return jnp.asarray(dense(self.num_classes)(x), jnp.float32)
