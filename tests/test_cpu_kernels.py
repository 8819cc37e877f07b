"""The faster layers of `cnnjax.cpu_kernels` compute what the plain layers compute: values and
both gradients against `lax.conv_general_dilated`, the max pool and its gradient
against Flax's, and whole networks built with them against the same networks built
from the plain layers."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from cnnjax import cpu_kernels, models, steps
from cnnjax.config import TrainConfig
from cnnjax.scratch import BatchNorm as ScratchBatchNorm
from cnnjax.models.layers import batch_norm, conv2d

NHWC = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0))):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def assert_same_values_and_gradients(fast, plain, x, kernel, atol=1e-5):
    chex.assert_trees_all_close(jax.jit(fast)(x, kernel), plain(x, kernel), atol=atol)
    weights = jax.random.normal(jax.random.key(2), plain(x, kernel).shape)
    grads = [jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * weights), argnums=(0, 1)))(
        x, kernel) for f in (fast, plain)]
    chex.assert_trees_all_close(grads[0], grads[1], atol=20 * atol)


@pytest.mark.parametrize("kernel_size, padding", [(5, 2), (5, 0), (3, 1)])
def test_one_channel_conv_matches_xla_convolution_and_its_gradients(kernel_size, padding):
    x = jax.random.normal(jax.random.key(0), (4, 12, 12, 1))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 1, 6))
    pads = ((padding, padding), (padding, padding))
    assert_same_values_and_gradients(lambda x, k: cpu_kernels.one_channel_conv(x, k, pads),
                                     lambda x, k: xla_conv(x, k, padding=pads), x, kernel)


@pytest.mark.parametrize("channels, strides, one_channel", [(1, 1, True), (3, 1, False),
                                                            (1, 2, False)])
def test_cpu_conv_takes_the_one_channel_path_only_for_one_channel_at_stride_1(
        channels, strides, one_channel):
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, channels))
    kernel = jax.random.normal(jax.random.key(1), (5, 5, channels, 6))
    pads = ((2, 2), (2, 2))

    def cpu(x, k):
        return cpu_kernels.cpu_conv_general_dilated(x, k, (strides, strides), pads,
                                            dimension_numbers=NHWC)

    primitives = str(jax.make_jaxpr(cpu)(x, kernel))
    assert ("name=one_channel_conv" in primitives) == one_channel
    assert_same_values_and_gradients(cpu, lambda x, k: xla_conv(x, k, (strides, strides), pads),
                                     x, kernel)


@pytest.mark.parametrize("size, channels, kernel_size, strides, padding", [
    (2, 8, 3, 1, 1), (4, 8, 3, 2, 1), (3, 8, 3, 2, 1), (4, 8, 1, 2, 0), (1, 8, 3, 1, 1),
    (5, 3, 2, 1, 0)])
def test_im2col_conv_matches_xla_convolution_and_its_gradients(size, channels, kernel_size,
                                                               strides, padding):
    x = jax.random.normal(jax.random.key(0), (3, size, size, channels))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, channels, 5))
    pads, stride2 = ((padding, padding), (padding, padding)), (strides, strides)
    assert_same_values_and_gradients(lambda x, k: cpu_kernels.im2col_conv(x, k, stride2, pads),
                                     lambda x, k: xla_conv(x, k, stride2, pads), x, kernel)


@pytest.mark.parametrize("size, kernel_size, strides, padding", [
    (9, 3, 2, 1),    # ResNet's and RegNet's 3x3 stride-2 convolutions, odd size
    (10, 3, 2, 1),
    (11, 7, 2, 3),   # ResNet's and GoogLeNet's stem
    (23, 11, 4, 1),  # AlexNet's first layer
    (10, 3, 2, 0),   # windows that miss the last row
    (9, 2, 3, 0),    # a kernel smaller than the stride: some rows get no gradient
])
def test_strided_conv_matches_xla_convolution_and_its_gradients(size, kernel_size, strides,
                                                                padding):
    x = jax.random.normal(jax.random.key(0), (3, size, size, 4))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 5))
    pads, stride2 = ((padding, padding), (padding + 1, padding)), (strides, strides)
    assert_same_values_and_gradients(lambda x, k: cpu_kernels.strided_conv(x, k, stride2, pads),
                                     lambda x, k: xla_conv(x, k, stride2, pads), x, kernel)


def test_cpu_conv_takes_the_strided_path_for_strided_convolutions_on_larger_maps():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))

    def cpu(x, k):
        return cpu_kernels.cpu_conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=NHWC)

    assert "name=strided_conv" in str(jax.make_jaxpr(cpu)(x, kernel))
    assert_same_values_and_gradients(cpu, lambda x, k: xla_conv(x, k, (2, 2), ((1, 1), (1, 1))),
                                     x, kernel)


@pytest.mark.parametrize("size, kernel_size, strides, im2col", [
    (2, 3, 1, True),    # 2x2 output
    (4, 3, 1, False),   # 4x4 output at stride 1: XLA's convolution
    (4, 5, 1, True),    # 4x4 output, 5x5 kernel
    (8, 3, 2, True),    # 4x4 output at stride 2
    (16, 3, 2, False),  # 8x8 output
    (16, 1, 1, True),   # 1x1 kernel
])
def test_cpu_conv_takes_the_im2col_path_for_1x1_kernels_and_small_outputs(
        size, kernel_size, strides, im2col):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 4))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 6))
    pads = ((kernel_size // 2,) * 2,) * 2

    def cpu(x, k):
        return cpu_kernels.cpu_conv_general_dilated(x, k, (strides, strides), pads,
                                            dimension_numbers=NHWC)

    primitives = str(jax.make_jaxpr(cpu)(x, kernel))
    assert ("conv_general_dilated" not in primitives) == im2col
    assert_same_values_and_gradients(cpu, lambda x, k: xla_conv(x, k, (strides, strides), pads),
                                     x, kernel)


@pytest.mark.parametrize("size, strides", [(6, 1), (6, 2), (2, 1)])
def test_cpu_conv_splits_grouped_convolutions_into_one_per_group(size, strides):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 9))  # 3 groups of 2 -> 3
    pads = ((1, 1), (1, 1))

    def cpu(x, k):
        return cpu_kernels.cpu_conv_general_dilated(x, k, (strides, strides), pads,
                                            dimension_numbers=NHWC, feature_group_count=3)

    def grouped(x, k):
        return jax.lax.conv_general_dilated(x, k, (strides, strides), pads,
                                            dimension_numbers=NHWC, feature_group_count=3)

    assert "feature_group_count=3" not in str(jax.make_jaxpr(cpu)(x, kernel))
    assert_same_values_and_gradients(cpu, grouped, x, kernel)


@pytest.mark.parametrize("shape, window, strides, padding", [
    ((3, 8, 8, 5), 3, 2, 1),   # GoogLeNet's and ResNet's pools: overlapping windows
    ((3, 6, 6, 5), 3, 1, 1),   # the Inception block's pool
    ((3, 8, 8, 5), 2, 2, 0),   # VGG's
    ((3, 9, 9, 5), 3, 2, 0),   # AlexNet's and NiN's
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_matches_flax_and_its_gradient_ties_included(shape, window, strides,
                                                              padding, dtype):
    # Small integers after a ReLU: most windows hold their max more than once, so
    # the gradient must go to the first of them, as XLA's select-and-scatter does.
    x = jax.nn.relu(jnp.round(2 * jax.random.normal(jax.random.key(0), shape))).astype(dtype)
    args = ((window, window), (strides, strides), ((padding, padding), (padding, padding)))

    def fast(x):
        return cpu_kernels.max_pool(x, *args)

    def plain(x):
        return nn.max_pool(x, *args)

    chex.assert_trees_all_equal(jax.jit(fast)(x), plain(x))
    # All below zero: a padded border must not win a window.
    chex.assert_trees_all_equal(jax.jit(fast)(-x - 1), plain(-x - 1))
    weights = jax.random.normal(jax.random.key(1), plain(x).shape, dtype)
    grads = [jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) * weights).astype(jnp.float32)))(x)
             for f in (fast, plain)]
    assert "select_and_scatter" not in str(jax.make_jaxpr(jax.grad(
        lambda x: jnp.sum(fast(x) * weights).astype(jnp.float32)))(x))
    # Equal but for the order in which overlapping windows' gradients are summed.
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5 if dtype == jnp.float32 else 0.1)


@pytest.mark.parametrize("shape", [(4, 6, 6, 5), (4, 2, 2, 3), (6, 7), (2, 64, 64, 8)])
def test_channel_sums_sum_both_arrays_over_every_axis_but_the_last(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    axes = tuple(range(len(shape) - 1))
    chex.assert_trees_all_close(cpu_kernels.channel_sums(x, x * x),
                                (jnp.sum(x, axis=axes), jnp.sum(x * x, axis=axes)),
                                atol=1e-4, rtol=1e-5)


def reference_batch_norm(x, scale, bias, epsilon=1e-5):
    """Batch norm as the book writes it (§7.5.3), with the batch's mean and variance."""
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
    return (x - mean) / jnp.sqrt(var + epsilon) * scale + bias, mean, var


def test_batch_norm_train_gradients_include_what_flows_back_from_mean_and_var():
    x = 2 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) + 1
    scale, bias = jax.random.uniform(jax.random.key(1), (6,)), jnp.arange(6.0)
    w, a, b = (jax.random.normal(jax.random.key(k), s) for k, s in ((2, x.shape), (3, (6,)), (4, (6,))))

    def loss(f, x, scale, bias):
        y, mean, var = f(x, scale, bias)
        return jnp.sum(y * w) + jnp.sum(mean * a) + jnp.sum(var * b)

    fast = jax.jit(jax.value_and_grad(lambda *args: loss(
        lambda *v: cpu_kernels.batch_norm_train(*v, 1e-5), *args), argnums=(0, 1, 2)))
    plain = jax.value_and_grad(lambda *args: loss(reference_batch_norm, *args), argnums=(0, 1, 2))
    chex.assert_trees_all_close(fast(x, scale, bias), plain(x, scale, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape, dtype", [((8, 6, 6, 40), jnp.float32), ((8, 48), jnp.float32),
                                          ((8, 6, 6, 40), jnp.bfloat16), ((8, 6, 6, 5), jnp.float32)])
def test_batch_norm_matches_flax_in_both_modes_with_gradients_and_statistics(shape, dtype):
    x = (3 * jax.random.normal(jax.random.key(0), shape) + 1).astype(dtype)
    plain = batch_norm(dtype=dtype)
    fast = cpu_kernels.layers_for("cpu")["norm"](dtype=dtype)
    variables = plain.init(jax.random.key(1), x, use_running_average=False)
    chex.assert_trees_all_equal(fast.init(jax.random.key(1), x, use_running_average=False),
                                variables)  # same names, shapes and starting values
    params = {"scale": jax.random.uniform(jax.random.key(2), shape[-1:]),
              "bias": jax.random.normal(jax.random.key(3), shape[-1:])}
    weights = jax.random.normal(jax.random.key(4), shape)

    def loss(params, layer):
        y, updates = layer.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * weights), (y, updates)

    (_, (y, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params, plain)
    (_, (fast_y, fast_stats)), fast_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, fast), has_aux=True))(params)
    assert fast_y.dtype == y.dtype == dtype
    atol = 1e-5 if dtype == jnp.float32 else 0.05
    chex.assert_trees_all_close((fast_y.astype(jnp.float32), fast_stats, fast_grads),
                                (y.astype(jnp.float32), stats, grads), atol=atol)
    trained = {"params": params, "batch_stats": stats["batch_stats"]}
    chex.assert_trees_all_close(fast.apply(trained, x, use_running_average=True),
                                plain.apply(trained, x, use_running_average=True), atol=atol)


def test_get_model_applies_only_the_layers_a_network_has_and_does_not_fix():
    layers = cpu_kernels.layers_for("cpu")
    assert models.get_model("lenet", layers=layers).conv is layers["conv"]  # no max pool, no norm
    assert models.get_model("googlenet", layers=layers).max_pool is layers["max_pool"]
    assert models.get_model("lenet_bn_scratch", layers=layers).norm is ScratchBatchNorm


def test_networks_take_one_channel_conv_for_a_stride_1_first_layer():
    x = jnp.ones((2, 32, 32, 1))

    def takes_one_channel_conv(arch: str) -> bool:
        model = steps.build_model(TrainConfig(arch=arch, resize=32), backend="cpu")
        variables = model.init(jax.random.key(0), x)
        return "one_channel_conv" in str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))

    # LeNet's 5x5 and VGG's 3x3 first layers have stride 1; ResNet's 7x7 has stride 2.
    assert takes_one_channel_conv("lenet") and takes_one_channel_conv("lenet_bn")
    assert takes_one_channel_conv("vgg11") and not takes_one_channel_conv("resnet18")


def test_layers_for_each_backend():
    assert set(cpu_kernels.layers_for("cpu")) == {"conv", "max_pool", "norm"}
    assert cpu_kernels.layers_for("gpu") == {} and cpu_kernels.layers_for("tpu") == {}


# LeNet's first layer is one_channel_conv's case, ResNet-18's last two stages at 32x32
# im2col_conv's, RegNetX-32's 3x3 convs the grouped case, ResNet-18's and VGG's max
# pools `max_pool`'s.
@pytest.mark.parametrize("name, resize", [("lenet", 28), ("lenet_bn", 28), ("resnet18", 32),
                                          ("regnetx32", 32), ("vgg11", 32)])
def test_networks_built_with_the_cpu_layers_compute_the_same(name, resize):
    plain, fast = models.get_model(name), models.get_model(name, layers=cpu_kernels.layers_for("cpu"))
    x = jax.random.uniform(jax.random.key(0), (4, resize, resize, 1))
    variables = plain.init({"params": jax.random.key(1)}, x)
    labels = jnp.arange(4) % 10

    def loss(params, model):
        # Eval mode: batch norm over 4 images in train mode would amplify float32
        # rounding in the first layer's gradient to ~3e-4, hiding what is compared.
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits

    (_, plain_logits), plain_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, plain), has_aux=True))(variables["params"])
    (_, fast_logits), fast_grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, fast), has_aux=True))(variables["params"])
    chex.assert_trees_all_close(fast_logits, plain_logits, atol=1e-5)
    chex.assert_trees_all_close(fast_grads, plain_grads, atol=1e-5)


def test_one_channel_conv_in_bfloat16_sums_in_float32():
    layer = cpu_kernels.layers_for("cpu")["conv"](6, 5, padding=2, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    variables = layer.init(jax.random.key(1), x)
    out = layer.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    reference_out = conv2d(6, 5, padding=2).apply(variables, x)
    chex.assert_trees_all_close(out.astype(jnp.float32), reference_out, atol=0.05, rtol=0.02)

