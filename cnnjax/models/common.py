"""Layers shared by every network, written to read like the book's PyTorch.

The book builds its networks from `nn.Conv2d(..., kernel_size, stride, padding)`,
`nn.Linear`, `nn.MaxPool2d`, `nn.AvgPool2d` and `nn.AdaptiveAvgPool2d(1)`. These
helpers give the same layers in Flax, channels-last (NHWC), with the explicit
symmetric paddings the book uses (never `'SAME'`), and with Xavier-uniform kernels
as the book's `train_ch6` initialises every `nn.Conv2d` and `nn.Linear`.

Mixed precision follows Flax's ImageNet example: every network and block has a
`dtype` field (the computation dtype, float32 by default) passed to each
`nn.Conv`/`nn.Dense`/`nn.BatchNorm` as `dtype`; parameters stay float32 (the
default `param_dtype`), batch-norm statistics are float32, and a network casts its
input to `dtype` and returns float32 logits.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ModuleDef = Any
Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()


def _pair(value: int) -> tuple[int, int]:
    return (value, value)


def _pads(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((padding, padding), (padding, padding))


def conv(features: int, kernel_size: int, strides: int = 1, padding: int = 0,
         **kwargs: Any) -> nn.Conv:
    """The book's `nn.Conv2d(in, features, kernel_size, stride, padding)`.

    A square kernel, the same stride along both axes and `padding` rows/columns
    of zeros on every side. Biases start at zero (Flax's default). The convolution
    is `conv_general_dilated` below: XLA's, except for one case on the CPU.
    """
    return nn.Conv(features, _pair(kernel_size), strides=_pair(strides),
                   padding=_pads(padding), kernel_init=xavier_uniform,
                   conv_general_dilated=conv_general_dilated, **kwargs)


def _nhwc_conv(x: jnp.ndarray, kernel: jnp.ndarray, padding) -> jnp.ndarray:
    return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
@functools.partial(jax.jit, static_argnums=(2,))  # called eagerly: one compile, not 75
def shifted_conv(x: jnp.ndarray, kernel: jnp.ndarray, padding) -> jnp.ndarray:
    """A stride-1 convolution of a one-channel input x (N, H, W, 1) with a kernel
    (kh, kw, 1, C), computed as the book's `corr2d` (d2l §6.2) computes it: the sum,
    over the kh * kw kernel offsets, of the shifted input times that offset's C
    weights. `padding` is ((top, bottom), (left, right)).

    Same result as `lax.conv_general_dilated`; on a CPU, XLA fuses the sum into one
    loop that runs several times faster than its convolution for the networks'
    first layers (docs/benchmarks.md, section 9). Gradients use XLA's convolutions.
    """
    kh, kw = kernel.shape[:2]
    out_dtype = jnp.result_type(x, kernel)
    sum_dtype = jnp.promote_types(out_dtype, jnp.float32)  # bfloat16 sums in float32
    x = jnp.pad(x, ((0, 0), *padding, (0, 0))).astype(sum_dtype)
    weights = kernel[:, :, 0, :].astype(sum_dtype)
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = sum(x[:, a:a + out_h, b:b + out_w, :] * weights[a, b]
              for a in range(kh) for b in range(kw))
    return out.astype(out_dtype)


def _shifted_conv_forward(x, kernel, padding):
    return shifted_conv(x, kernel, padding), (x, kernel)


def _shifted_conv_backward(padding, saved, grad_out):
    x, kernel = saved
    grad_x, = jax.linear_transpose(lambda x_: _nhwc_conv(x_, kernel, padding), x)(grad_out)
    grad_kernel, = jax.linear_transpose(lambda k: _nhwc_conv(x, k, padding), kernel)(grad_out)
    return grad_x, grad_kernel


shifted_conv.defvjp(_shifted_conv_forward, _shifted_conv_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, as `nn.Conv` calls it, except that on a CPU a
    stride-1 convolution of a one-channel input (the first layer of LeNet and
    VGG on Fashion-MNIST) runs as `shifted_conv`."""
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if (jax.default_backend() == "cpu" and lhs.ndim == 4 and rhs.shape[2] == 1
            and tuple(window_strides) == (1, 1) and undilated and feature_group_count == 1
            and not isinstance(padding, str) and precision is None
            and preferred_element_type is None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))):
        return shifted_conv(lhs, rhs, tuple(map(tuple, padding)))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)


def dense(features: int, **kwargs: Any) -> nn.Dense:
    """The book's `nn.Linear(in, features)` with a Xavier-uniform kernel."""
    return nn.Dense(features, kernel_init=xavier_uniform, **kwargs)


class MaxPool(nn.Module):
    """`nn.MaxPool2d(kernel_size=window, stride=strides, padding=padding)`.

    Padding counts as -inf, so it never wins the max (as in PyTorch). `strides`
    defaults to the window, as in PyTorch.
    """

    window: int
    strides: int | None = None
    padding: int = 0

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        strides = self.window if self.strides is None else self.strides
        return nn.max_pool(x, _pair(self.window), _pair(strides), _pads(self.padding))


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
