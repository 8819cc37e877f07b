"""LeNet (d2l §6.6) and LeNet with batch normalization (d2l §7.5.4-7.5.5)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cnnjax.models.common import AvgPool, Dtype, ModuleDef, conv, dense, flatten


class LeNet(nn.Module):
    """LeNet-5 as the book trains it on 28x28 Fashion-MNIST (§6.6).

    Two 5x5 conv layers (6 and 16 channels; the first padded by 2 so 28x28 keeps
    its size), each followed by a sigmoid and 2x2 average pooling, then dense
    layers of 120, 84 and `num_classes` units with sigmoids between them.
    `dtype` is the computation dtype; params stay float32, logits are float32.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No batch norm or dropout: both modes compute the same.
        x = jnp.asarray(x, self.dtype)
        x = nn.sigmoid(conv(6, 5, padding=2, dtype=self.dtype)(x))
        x = AvgPool(2, 2)(x)
        x = nn.sigmoid(conv(16, 5, dtype=self.dtype)(x))
        x = AvgPool(2, 2)(x)
        x = flatten(x)
        x = nn.sigmoid(dense(120, dtype=self.dtype)(x))
        x = nn.sigmoid(dense(84, dtype=self.dtype)(x))
        x = dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)


class LeNetBN(nn.Module):
    """LeNet with batch normalization after every conv and hidden dense layer (§7.5.4).

    BN sits between the affine map and the sigmoid. The first conv is unpadded
    here, as in the book's BN version, so the flattened features are 16x4x4.
    `norm` is the batch-norm module: the from-scratch `cnnjax.layers.BatchNorm`
    (§7.5.3) or `flax.linen.BatchNorm` (§7.5.5); both take the same fields
    (`dtype` included: the output dtype; their statistics stay float32).
    `dtype` is the computation dtype; params stay float32, logits are float32.
    """

    num_classes: int = 10
    norm: ModuleDef = nn.BatchNorm
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        def norm():
            return self.norm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)

        x = jnp.asarray(x, self.dtype)
        x = nn.sigmoid(norm()(conv(6, 5, dtype=self.dtype)(x)))
        x = AvgPool(2, 2)(x)
        x = nn.sigmoid(norm()(conv(16, 5, dtype=self.dtype)(x)))
        x = AvgPool(2, 2)(x)
        x = flatten(x)
        x = nn.sigmoid(norm()(dense(120, dtype=self.dtype)(x)))
        x = nn.sigmoid(norm()(dense(84, dtype=self.dtype)(x)))
        x = dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)
