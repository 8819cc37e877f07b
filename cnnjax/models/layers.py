"""The layers every network is built from, written to read like the book's PyTorch.

The book builds its networks from `nn.Conv2d(..., kernel_size, stride, padding)`,
`nn.Linear`, `nn.BatchNorm2d`, `nn.MaxPool2d`, `nn.AvgPool2d` and
`nn.AdaptiveAvgPool2d(1)`. These give the same layers in Flax, channels-last (NHWC),
with the explicit symmetric paddings the book uses (never `'SAME'`) and Xavier-uniform
kernels, as the book's `train_ch6` initialises every `nn.Conv2d` and `nn.Linear`
(`torch_default_biases` gives the biases PyTorch starts them with).

As in Flax's ImageNet example, a network takes the layers it is built from as
`ModuleDef` fields (`conv`, `dense`, `norm`, `max_pool`) with these as defaults,
and binds its `dtype` (the computation dtype; parameters and batch-norm statistics
stay float32) into them before handing them to its blocks. `cnnjax.cpu_kernels` swaps in faster versions
of the same layers when a model is built for training.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

ModuleDef = Any
Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()


def torch_default_biases(params: Any, key: jax.Array) -> Any:
    """`params` with the bias of every conv and dense layer redrawn as PyTorch draws
    it (the biases the book's `train_ch6` leaves alone): uniform in
    [-1/sqrt(fan_in), 1/sqrt(fan_in)], fan_in = the kernel's size without its output
    axis (in_channels / groups * kh * kw for a conv). Other parameters are kept."""
    flat = traverse_util.flatten_dict(params)
    layers = sorted(path[:-1] for path in flat
                    if path[-1] == "bias" and path[:-1] + ("kernel",) in flat)
    for layer, layer_key in zip(layers, jax.random.split(key, max(len(layers), 1))):
        kernel, bias = flat[layer + ("kernel",)], flat[layer + ("bias",)]
        bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))
        flat[layer + ("bias",)] = jax.random.uniform(layer_key, bias.shape, bias.dtype,
                                                     -bound, bound)
    return traverse_util.unflatten_dict(flat)


def _pair(value: int) -> tuple[int, int]:
    return (value, value)


def _pads(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((padding, padding), (padding, padding))


def conv2d(features: int, kernel_size: int, strides: int = 1, padding: int = 0,
           **kwargs: Any) -> nn.Conv:
    """The book's `nn.Conv2d(in, features, kernel_size, stride, padding)`: a square
    kernel, one stride for both axes and `padding` rows/columns of zeros on every
    side. Biases start at zero (Flax's default)."""
    return nn.Conv(features, _pair(kernel_size), strides=_pair(strides),
                   padding=_pads(padding), kernel_init=xavier_uniform, **kwargs)


def dense(features: int, **kwargs: Any) -> nn.Dense:
    """The book's `nn.Linear(in, features)` with a Xavier-uniform kernel."""
    return nn.Dense(features, kernel_init=xavier_uniform, **kwargs)


# `nn.BatchNorm2d` / `nn.BatchNorm1d` with PyTorch's defaults: PyTorch's momentum 0.1 is
# 0.9 in Flax's convention (the weight of the old moving statistics), eps 1e-5. Flax
# computes and keeps the statistics in float32 whatever `dtype` is.
BATCH_NORM_SETTINGS = {"momentum": 0.9, "epsilon": 1e-5}
batch_norm = functools.partial(nn.BatchNorm, **BATCH_NORM_SETTINGS)


class MaxPool(nn.Module):
    """`nn.MaxPool2d(kernel_size=window, stride=strides, padding=padding)`.

    Padding counts as -inf, so it never wins the max (as in PyTorch). `strides`
    defaults to the window, as in PyTorch. `pool` is the function that computes it,
    with `flax.linen.max_pool`'s arguments (`cnnjax.cpu_kernels` passes a faster one).
    """

    window: int
    strides: int | None = None
    padding: int = 0
    pool: Callable[..., jnp.ndarray] = nn.max_pool

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        strides = self.window if self.strides is None else self.strides
        return self.pool(x, _pair(self.window), _pair(strides), _pads(self.padding))


class AvgPool(nn.Module):
    """`nn.AvgPool2d(kernel_size=window, stride=strides)` (no padding is used in the book)."""

    window: int
    strides: int | None = None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        strides = self.window if self.strides is None else self.strides
        return nn.avg_pool(x, _pair(self.window), _pair(strides))


class GlobalAvgPool(nn.Module):
    """`nn.AdaptiveAvgPool2d(1)` followed by `nn.Flatten()`: (N, H, W, C) -> (N, C).

    The mean is taken in (at least) float32 whatever the input's dtype; the result
    has `dtype`, or the input's dtype when `dtype` is None.
    """

    dtype: Dtype | None = None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_dtype = x.dtype if self.dtype is None else self.dtype
        x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        return jnp.asarray(jnp.mean(x, axis=(1, 2)), out_dtype)


def flatten(x: jnp.ndarray) -> jnp.ndarray:
    """`nn.Flatten()`: keep the batch axis, merge the rest (NHWC order)."""
    return x.reshape((x.shape[0], -1))
