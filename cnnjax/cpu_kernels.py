"""cnnjax's CPU kernels: faster versions of the networks' layers on XLA:CPU, chosen
when a model is built for training.

The model files are written with the plain layers of `cnnjax.models.layers`, the
same on every backend. `layers_for(backend)` gives the layer fields (`conv`,
`max_pool`, `norm`) that replace them there; `cnnjax.steps.build_model` is the one
place that applies them (unless `TrainConfig.cpu_kernels` is off). Each kernel
computes what the plain layer computes, values and gradients (tests/test_cpu_kernels.py
checks both), and exists because it is measurably faster on a CPU; the factors are
in docs/performance.md (`python -m experiments.bench_kernels` measures them). Why each:

- `one_channel_conv` (a stride-1 convolution of a one-channel input, the first layer
  of LeNet and VGG): the book's cross-correlation (§6.2) as a sum of shifted inputs,
  which XLA:CPU fuses into one loop, where its convolution of one input channel is slow;
- `im2col_conv` (1x1 kernels, and small output maps: the last stages of ResNet,
  GoogLeNet and DenseNet at 64x64 and below): one matrix product over the image
  patches, where XLA:CPU's convolution is slow for kernels larger than the map;
- grouped convolutions (ResNeXt's 3x3) as one convolution per group, side by side:
  XLA:CPU's grouped convolution is far slower than the groups one by one;
- `strided_conv` (other convolutions with a stride above 1): its input gradient as
  one stride-1 convolution per phase, where XLA multiplies the zeros of a dilated
  output gradient;
- `max_pool`: the maximum of the window's shifted views, and a gradient built from
  the offsets of the maxima, where XLA:CPU's reduce-window and select-and-scatter
  are slow;
- `BatchNorm` in training (`batch_norm_train`): each pass reads its input once for
  both of its sums (`channel_sums`), where XLA:CPU writes out what a long sum reads.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _nhwc_conv(x: jax.Array, kernel: jax.Array, padding, strides=(1, 1)) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _window_views(padded: jax.Array, window, strides, out) -> list[jax.Array]:
    """For each offset (a, b) of a window, in row-major order, the (N, *out, C) view
    of the padded input that the windows of all `out` positions see there."""
    (kh, kw), (sh, sw), (out_h, out_w) = window, strides, out
    return [padded[:, a:a + sh * (out_h - 1) + 1:sh, b:b + sw * (out_w - 1) + 1:sw, :]
            for a in range(kh) for b in range(kw)]


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding) -> jax.Array:
    """A convolution of x (N, H, W, C) with a kernel (kh, kw, C, O) as one matrix
    product: the kh * kw shifted, strided views of the padded input side by side
    (the patches, (N, Ho, Wo, kh * kw * C)) times the kernel as a (kh * kw * C, O)
    matrix. Equal to `lax.conv_general_dilated`; its gradients are JAX's, through
    the slices and the product."""
    kh, kw, c, o = kernel.shape
    (sh, sw), n = strides, x.shape[0]
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h, out_w = [(x.shape[1 + i] - kernel.shape[i]) // strides[i] + 1 for i in range(2)]
    # The rows' kh views, then the columns' kw views of those: kh + kw slices, not
    # kh * kw (XLA:CPU compiles each slice into a loop of its own).
    rows = jnp.stack([x[:, a:a + sh * (out_h - 1) + 1:sh] for a in range(kh)], axis=3)
    patches = jnp.stack([rows[:, :, b:b + sw * (out_w - 1) + 1:sw] for b in range(kw)], axis=4)
    return jnp.dot(patches.reshape(n, out_h, out_w, kh * kw * c), kernel.reshape(kh * kw * c, o))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
@functools.partial(jax.jit, static_argnums=(2,))  # called eagerly: one compile, not 75
def one_channel_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """A stride-1 convolution of a one-channel input x (N, H, W, 1) with a kernel
    (kh, kw, 1, C): the book's cross-correlation (§6.2), the sum over the kh * kw
    kernel offsets of the shifted input times that offset's C weights, summed in
    float32 for bfloat16 inputs. `padding` is ((top, bottom), (left, right)).
    Equal to `lax.conv_general_dilated`; its gradients are XLA's convolutions."""
    kh, kw = kernel.shape[:2]
    out_dtype = jnp.result_type(x, kernel)
    sum_dtype = jnp.promote_types(out_dtype, jnp.float32)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0))).astype(sum_dtype)
    weights = kernel.reshape(kh * kw, -1).astype(sum_dtype)
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    views = _window_views(x, (kh, kw), (1, 1), (out_h, out_w))
    out = sum(view * weight for view, weight in zip(views, weights))
    # XLA:CPU fuses element-wise sums into each of their consumers and computes them
    # again in each (batch norm's passes, the activation, the pool). It does not fuse
    # a matrix product, so one with the identity makes the sums run once.
    channels = out.shape[-1]
    out = jnp.dot(out.reshape(-1, channels), jnp.eye(channels, dtype=sum_dtype))
    return out.reshape(x.shape[0], out_h, out_w, channels).astype(out_dtype)


def _one_channel_conv_forward(x, kernel, padding):
    return one_channel_conv(x, kernel, padding), (x, kernel)


def _one_channel_conv_backward(padding, saved, grad_out):
    x, kernel = saved
    grad_x, = jax.linear_transpose(lambda x_: _nhwc_conv(x_, kernel, padding), x)(grad_out)
    grad_kernel, = jax.linear_transpose(lambda k: _nhwc_conv(x, k, padding), kernel)(grad_out)
    return grad_x, grad_kernel


one_channel_conv.defvjp(_one_channel_conv_forward, _one_channel_conv_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding) -> jax.Array:
    """A convolution with a stride above 1: XLA's, and XLA's gradient for the
    kernel, but the gradient for x as one stride-1 convolution per phase of the
    padded input. Padded row r + s * m (phase r, stride s) is seen only by kernel
    rows r, r + s, ..., so its gradient is the output gradient correlated with
    those rows, flipped; the s * s phases are then interleaved. XLA:CPU computes
    that gradient as one convolution over the output gradient dilated by the
    stride, most of whose products are with the zeros between its rows."""
    return _nhwc_conv(x, kernel, padding, strides)


def _strided_conv_forward(x, kernel, strides, padding):
    return _nhwc_conv(x, kernel, padding, strides), (x, kernel)


def _strided_conv_backward(strides, padding, saved, grad_out):
    x, kernel = saved
    n, h, w, c = x.shape
    (sh, sw), ((top, bottom), (left, right)) = strides, padding
    # Rows (columns) of the padded input per phase, enough for every output window.
    mh, mw = -(-(h + top + bottom) // sh), -(-(w + left + right) // sw)
    oh, ow = grad_out.shape[1:3]
    rows = []
    for r in range(sh):
        phases = []
        for q in range(sw):
            taps = kernel[r::sh, q::sw]  # (T, U, C, O): kernel rows r, r + sh, ...
            t, u = taps.shape[:2]
            if t == 0 or u == 0:  # a kernel smaller than the stride never sees it
                phases.append(jnp.zeros((n, mh, mw, c), grad_out.dtype))
                continue
            flipped = jnp.flip(taps, (0, 1)).swapaxes(2, 3)
            phases.append(_nhwc_conv(grad_out, flipped, ((t - 1, mh - oh), (u - 1, mw - ow))))
        rows.append(jnp.stack(phases, axis=3))  # (N, mh, mw, sw, C)
    padded = jnp.stack(rows, axis=2).reshape(n, mh * sh, mw * sw, c)
    grad_x = padded[:, top:top + h, left:left + w].astype(x.dtype)
    grad_kernel, = jax.linear_transpose(
        lambda k: _nhwc_conv(x, k, padding, strides), kernel)(grad_out)
    return grad_x, grad_kernel


strided_conv.defvjp(_strided_conv_forward, _strided_conv_backward)


def _output_size(size: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
    return (size + sum(padding) - kernel) // stride + 1


def cpu_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None,
                             feature_group_count=1, precision=None,
                             preferred_element_type=None):
    """`lax.conv_general_dilated` as `nn.Conv` calls it, with a grouped convolution
    split into one convolution per group, the one-channel stride-1 case sent to
    `one_channel_conv`, 1x1 kernels and small output maps to `im2col_conv`, and other
    strided ones to `strided_conv` (see the module docstring). The case is decided
    from static shapes while the model is traced, not at run time."""
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    plain_2d = (lhs.ndim == 4 and undilated and not isinstance(padding, str)
                and precision is None and preferred_element_type is None
                and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
    if plain_2d and feature_group_count > 1:
        groups = zip(jnp.split(lhs, feature_group_count, axis=-1),
                     jnp.split(rhs, feature_group_count, axis=-1))
        return jnp.concatenate([cpu_conv_general_dilated(x, k, window_strides, padding,
                                                         dimension_numbers=NHWC)
                                for x, k in groups], axis=-1)
    if plain_2d:
        pads, strides = tuple(map(tuple, padding)), tuple(window_strides)
        if rhs.shape[2] == 1 and strides == (1, 1):
            return one_channel_conv(lhs, rhs, pads)
        out = [_output_size(lhs.shape[1 + i], rhs.shape[i], strides[i], pads[i])
               for i in range(2)]
        small = math.prod(out) <= 4 or (math.prod(out) <= 16 and (
            strides != (1, 1) or rhs.shape[0] > out[0] or rhs.shape[1] > out[1]))
        if rhs.shape[:2] == (1, 1) or small:
            return im2col_conv(lhs, rhs, strides, pads)
        if strides != (1, 1):
            return strided_conv(lhs, rhs, strides, pads)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)


def _max_pool_views(x, window, strides, padding) -> list[jax.Array]:
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    out = [_output_size(x.shape[1 + i], window[i], strides[i], padding[i]) for i in range(2)]
    return _window_views(padded, window, strides, out)


def _max_pool_forward_pass(x, window, strides, padding):
    """The pool as the maximum of the window's views, which XLA:CPU computes faster
    than its reduce-window."""
    return functools.reduce(jnp.maximum, _max_pool_views(x, window, strides, padding))


# `size`, the input's height and width, is for the backward pass, which gets only
# the offsets from the forward pass (residuals are arrays, not shapes).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, padding, size):
    return _max_pool_forward_pass(x, window, strides, padding)


def _max_pool_forward(x, window, strides, padding, size):
    """The pool, and for each output the offset in its window (row-major) of the
    first input that equals its max: where select-and-scatter sends its gradient.
    XLA computes both in one loop over the window's views."""
    views = _max_pool_views(x, window, strides, padding)
    y = functools.reduce(jnp.maximum, views)
    first = jnp.full(y.shape, len(views), jnp.int8 if len(views) < 128 else jnp.int32)
    for k, view in reversed(list(enumerate(views))):
        first = jnp.where(view == y, jnp.array(k, first.dtype), first)
    return y, first


def _max_pool_backward(window, strides, padding, size, first, grad_out):
    """Each output's gradient goes to the input `_max_pool_forward` found for it.
    The padded input is built a stride-sized tile at a time: row r, column q of
    tile (m, n) takes, from each offset (a, b) with a = r + sh * t and
    b = q + sw * u, the gradient of output (m - t, n - u) if its max sits there.
    Those are windows of the output gradient and offsets padded once, so each tile
    is one loop over them."""
    (kh, kw), (sh, sw) = window, strides
    (top, bottom), (left, right) = padding
    batch, ho, wo, channels = grad_out.shape
    # Enough tiles to cover the padded input.
    mh, mw = -(-(size[0] + top + bottom) // sh), -(-(size[1] + left + right) // sw)
    # Output (m - t, n - u) sits at (m + t_max - t, n + u_max - u) of the padded arrays.
    t_max, u_max = (kh - 1) // sh, (kw - 1) // sw
    pads = ((0, 0), (t_max, mh - ho), (u_max, mw - wo), (0, 0))
    grad_out = jnp.pad(grad_out, pads)
    first = jnp.pad(first, pads, constant_values=-1)
    zero = jnp.zeros((), grad_out.dtype)
    rows = []
    for r in range(sh):
        cols = []
        for q in range(sw):
            tile = jnp.zeros((batch, mh, mw, channels), grad_out.dtype)
            for k in range(kh * kw):
                a, b = divmod(k, kw)
                if a % sh == r and b % sw == q:
                    i, j = t_max - a // sh, u_max - b // sw
                    view = (slice(None), slice(i, i + mh), slice(j, j + mw))
                    tile = tile + jnp.where(first[view] == k, grad_out[view], zero)
            cols.append(tile)
        rows.append(jnp.stack(cols, axis=3))  # (N, mh, mw, sw, C)
    grad = jnp.stack(rows, axis=2).reshape(batch, mh * sh, mw * sw, channels)
    return (grad[:, top:top + size[0], left:left + size[1], :],)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool(x: jax.Array, window_shape, strides, padding) -> jax.Array:
    """`flax.linen.max_pool(x, window_shape, strides, padding)` for x (N, H, W, C)
    and explicit paddings ((top, bottom), (left, right)), with the same values
    computed as the maximum of the window's views instead of XLA's reduce-window, and
    a gradient built from the window offsets of the maxima instead of XLA's
    select-and-scatter (see `_max_pool_backward`). Equal to Flax's pool and its
    gradient, ties included, up to the order in which overlapping windows' gradients
    are summed."""
    return _max_pool(x, tuple(window_shape), tuple(strides), tuple(map(tuple, padding)),
                     x.shape[1:3])


def _sum_pair(a: jax.Array, b: jax.Array, axes: tuple[int, ...]):
    zeros = (jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))
    return lax.reduce((a, b), zeros, lambda p, q: (p[0] + q[0], p[1] + q[1]), axes)


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The sums of a and b (N, ..., C) over every axis but the last, (C,) each: one
    two-operand reduction over each row of each example (the second-to-last axis),
    then the sums of those partial sums.

    XLA:CPU rewrites a one-operand sum over many elements into a reduce-window and
    a reduce, and the reduce-window takes no producers into its loop, so in
    `jnp.sum(x * x, axis=(0, 1, 2))` the squares are written out first. A
    two-operand reduction is left as it is and computes a and b (the squares, say)
    as it reads x, in one pass. It runs over rows (8 to 32 values per channel)
    rather than whole examples (64 to 1,024): a long reduction in XLA:CPU's loop is
    slow."""
    if a.ndim > 2:
        rows = (math.prod(a.shape[:-2]), *a.shape[-2:])
        a, b = _sum_pair(a.reshape(rows), b.reshape(rows), (1,))
    # The partial sums as two plain sums: with the batch split over devices, XLA
    # makes each an all-reduce (a two-operand one would gather them all first).
    return jnp.sum(a, axis=0), jnp.sum(b, axis=0)


def _stats_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 statistics in float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Batch norm of x (N, ..., C) with the statistics of this batch, as
    `flax.linen.BatchNorm` computes it in training: returns y = (x - mean) *
    scale / sqrt(var + epsilon) + bias and the batch's mean and var (C,), float32,
    var the one-pass E[x^2] - mean^2. Forward and backward each read x once for
    their sums (`channel_sums`)."""
    y, mean, var, _ = _batch_norm_forward_pass(x, scale, bias, epsilon)
    return y, mean, var


def _batch_norm_forward_pass(x, scale, bias, epsilon):
    stats = x.astype(_stats_dtype(x))
    count = x.size // x.shape[-1]
    total, total_sq = channel_sums(stats, stats * stats)
    mean = total / count
    var = jnp.maximum(0.0, total_sq / count - mean * mean)
    rstd = lax.rsqrt(var + epsilon)
    y = (stats - mean) * (rstd * scale) + bias
    return y.astype(jnp.result_type(x, scale, bias)), mean, var, rstd


def _batch_norm_forward(x, scale, bias, epsilon):
    y, mean, var, rstd = _batch_norm_forward_pass(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, rstd, scale, bias)


def _batch_norm_backward(epsilon, saved, cotangents):
    """The gradient of y, mean and var with respect to x, scale and bias. With
    xc = x - mean and M examples per channel: d scale = sum(g * xc) * rstd,
    d bias = sum(g), and dx = scale * rstd * (g - sum(g) / M - xc * rstd^2 *
    sum(g * xc) / M), plus what flows back from mean and var themselves."""
    x, mean, rstd, scale, bias = saved
    grad_y, grad_mean, grad_var = cotangents
    count = x.size // x.shape[-1]
    g = grad_y.astype(mean.dtype)
    centred = x.astype(mean.dtype) - mean
    sum_g, sum_g_centred = channel_sums(g, g * centred)
    grad_x = (scale * rstd * (g - sum_g / count - centred * (rstd * rstd * sum_g_centred / count))
              + grad_mean / count + centred * (2 * grad_var / count))
    return (grad_x.astype(x.dtype), (sum_g_centred * rstd).astype(scale.dtype),
            sum_g.astype(bias.dtype))


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` over the last axis (the settings cnnjax uses: default
    scale, bias and initialisers, no `axis_name`), training through
    `batch_norm_train`. Same variables (`scale`, `bias`; `batch_stats` `mean`,
    `var`), same one-pass variance in float32, same outputs, gradients and moving
    statistics up to the order of sums. It keeps flax's class name because flax names
    a layer's variables after its class (BatchNorm_0, ...): a network's variables,
    and so its checkpoints, are the same with either layer set."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        out_dtype = self.dtype or jnp.result_type(x, scale, bias)
        if use_running_average:
            mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
            y = (x.astype(_stats_dtype(x)) - ra_mean.value) * mul + bias
            return y.astype(out_dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(out_dtype)


def layers_for(backend: str) -> dict[str, Any]:
    """The layer fields to build a model with on `backend` ("cpu", "gpu", "tpu"):
    pass them to `cnnjax.models.get_model(..., layers=...)`. Empty where the plain
    layers are best."""
    if backend == "cpu":
        return {"conv": functools.partial(layers.conv2d,
                                          conv_general_dilated=cpu_conv_general_dilated),
                "max_pool": functools.partial(layers.MaxPool, pool=max_pool),
                "norm": functools.partial(BatchNorm, **layers.BATCH_NORM_SETTINGS)}
    return {}
