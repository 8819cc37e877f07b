"""AlexNet (d2l §7.1), sized for one-channel 224x224 Fashion-MNIST."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models import layers
from cnnjax.models.layers import Dtype, ModuleDef, flatten


class AlexNet(nn.Module):
    """AlexNet as in the book (§7.1.2): five conv layers with ReLU and three max
    pools, then two 4096-unit dense layers, each followed by dropout 0.5.

    At 224x224 the conv stack ends at 5x5x256, so the first dense layer sees 6400
    features, as in the book.
    """

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
        x = self.max_pool(3, 2)(nn.relu(conv(96, 11, strides=4, padding=1)(x)))
        x = self.max_pool(3, 2)(nn.relu(conv(256, 5, padding=2)(x)))
        x = nn.relu(conv(384, 3, padding=1)(x))
        x = nn.relu(conv(384, 3, padding=1)(x))
        x = self.max_pool(3, 2)(nn.relu(conv(256, 3, padding=1)(x)))
        x = flatten(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(4096)(x)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(4096)(x)))
        return jnp.asarray(dense(self.num_classes)(x), jnp.float32)
