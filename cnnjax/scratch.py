"""The from-scratch building blocks of d2l's convolutional chapters, in JAX.

Each piece re-derives a library operation the way "Dive into Deep Learning"
does, so that it can be read next to the book:

* §6.2 Convolutions for Images: `corr2d`, `Conv2D`
* §6.3 Padding and Stride: `conv_output_size`
* §6.5 Pooling: `pool2d`
* §7.5 Batch Normalization: `batch_norm`, `BatchNorm`

The book loops over output pixels; here the loops run only over the few kernel
offsets, and all pixels are handled at once with `jax.numpy`. Layouts are
channels-last (NHWC) throughout, as in Flax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array

__all__ = [
    "corr2d",
    "Conv2D",
    "pool2d",
    "conv_output_size",
    "batch_norm",
    "BatchNorm",
]


def _windows(X: Array, window: tuple[int, int]) -> Array:
    """All (kh, kw) windows of a 2-D X, stride 1, as an array (kh, kw, oh, ow).

    Entry [a, b, i, j] is X[i + a, j + b]: the book's window X[i:i+kh, j:j+kw]
    read out for every output position (i, j) at once.
    """
    kh, kw = window
    oh, ow = X.shape[0] - kh + 1, X.shape[1] - kw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"window {window} does not fit in an input of shape {X.shape}")
    return jnp.stack(
        [jnp.stack([X[a:a + oh, b:b + ow] for b in range(kw)]) for a in range(kh)]
    )


def corr2d(X: Array, K: Array) -> Array:
    """2-D cross-correlation of X (h, w) with kernel K (kh, kw) (d2l §6.2).

    Y[i, j] = sum_{a, b} X[i + a, j + b] * K[a, b], output (h - kh + 1, w - kw + 1).
    As in the book (and in every deep-learning "convolution"), K is not flipped.
    """
    return jnp.einsum("abij,ab->ij", _windows(X, K.shape), K)


class Conv2D(nn.Module):
    """The book's teaching convolution layer (d2l §6.2): corr2d plus a scalar bias.

    Works on a single 2-D input (no batch, no channels). The weight is drawn
    uniformly from [0, 1), like `torch.rand` in the book; the bias starts at 0.
    """

    kernel_size: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.uniform(scale=1.0), tuple(self.kernel_size))
        bias = self.param("bias", nn.initializers.zeros, (1,))
        return corr2d(x, weight) + bias


def pool2d(X: Array, pool_size: tuple[int, int], mode: str = "max") -> Array:
    """Max or average pooling of a 2-D X, stride 1, no padding (d2l §6.5).

    Output (h - ph + 1, w - pw + 1); `mode` is 'max' or 'avg'.
    """
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    windows = _windows(X, pool_size)
    if mode == "max":
        return windows.max(axis=(0, 1))
    return windows.mean(axis=(0, 1))


def conv_output_size(n: int, k: int, p: int = 0, s: int = 1) -> int:
    """Output length of a convolution or pooling along one dimension (d2l §6.3).

    floor((n - k + p + s) / s) for input length n, kernel length k, TOTAL
    padding p (both sides together) and stride s.
    """
    if s < 1:
        raise ValueError(f"stride must be at least 1, got {s}")
    if k > n + p:
        raise ValueError(f"kernel length {k} exceeds the padded input length {n + p}")
    return (n - k + p + s) // s


def batch_norm(
    X: Array,
    gamma: Array,
    beta: Array,
    moving_mean: Array,
    moving_var: Array,
    eps: float,
    momentum: float,
    train: bool,
) -> tuple[Array, Array, Array]:
    """Batch normalization as a pure function (d2l §7.5.3).

    X is (N, C) after a dense layer or (N, H, W, C) after a convolution; the
    statistics are per channel, over all axes but the last. gamma, beta and the
    moving statistics have shape (C,).

    train=True: normalise with the batch mean and biased variance, and return
    the moving statistics updated as momentum * moving + (1 - momentum) * batch.
    train=False: normalise with the moving statistics and return them unchanged.

    Returns (Y, moving_mean, moving_var).
    """
    assert X.ndim in (2, 4), f"expected (N, C) or (N, H, W, C) input, got shape {X.shape}"
    if not train:
        X_hat = (X - moving_mean) / jnp.sqrt(moving_var + eps)
    else:
        axes = tuple(range(X.ndim - 1))
        mean = X.mean(axis=axes)
        # Biased variance (divide by the element count, not count - 1), as the
        # book and Flax use it both to normalise and for the moving average.
        var = ((X - mean) ** 2).mean(axis=axes)
        X_hat = (X - mean) / jnp.sqrt(var + eps)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta
    return Y, moving_mean, moving_var


class BatchNorm(nn.Module):
    """Batch normalization layer on top of `batch_norm` (d2l §7.5.3).

    A drop-in stand-in for `flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5)`
    on channels-last input: learnable `gamma` (ones) and `beta` (zeros) in
    `params`, and `moving_mean` (zeros) and `moving_var` (ones) in the
    `batch_stats` collection, all of shape (C,) with C = x.shape[-1].

    Train with `use_running_average=False` and `mutable=['batch_stats']`;
    evaluate with `use_running_average=True`. The flag can be set on the
    module or at call time, not both (as in Flax).

    For mixed precision (e.g. bfloat16 input), the statistics are computed and
    stored in (at least) float32, like Flax's; the output has `dtype`, or the
    input's dtype when `dtype` is None.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        out_dtype = x.dtype if self.dtype is None else self.dtype
        x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        num_channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (num_channels,))
        beta = self.param("beta", nn.initializers.zeros, (num_channels,))
        moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, (num_channels,))
        moving_var = self.variable("batch_stats", "moving_var", jnp.ones, (num_channels,))
        y, new_mean, new_var = batch_norm(
            x,
            gamma,
            beta,
            moving_mean.value,
            moving_var.value,
            eps=self.epsilon,
            momentum=self.momentum,
            train=not use_running_average,
        )
        # As in Flax, `init` creates the statistics but does not update them, so
        # a freshly initialised layer holds mean 0 / variance 1 whatever the
        # example input was.
        if not use_running_average and not self.is_initializing():
            moving_mean.value = new_mean
            moving_var.value = new_var
        return jnp.asarray(y, out_dtype)
