"""Mixed precision: every network with `dtype=jnp.bfloat16` computes its convs and
matmuls in bfloat16 but keeps float32 parameters, float32 batch-norm statistics and
float32 logits, and stays close to the float32 network with the same parameters."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models, scratch
from cnnjax.models.layers import GlobalAvgPool

ALL = models.list_models()
BF16, F32 = jnp.bfloat16, jnp.float32
# Small inputs every layer still accepts (AlexNet and NiN need at least 65x65).
SMALL_RESIZE = {"lenet": 28, "lenet_bn_scratch": 28, "lenet_bn": 28, "alexnet": 67,
                "vgg11": 32, "nin": 67, "googlenet": 32, "resnet18": 32, "resnet34": 32,
                "densenet": 32, "regnetx32": 32}
# bfloat16 keeps 8 significant bits: one rounding is off by up to 2**-8 (~0.4%), and
# the errors of the many layers add up. Measured on these networks (several seeds,
# fresh inits and the random variables below), the bf16 logits differ from the
# float32 ones by at most ~1.4% of the largest float32 logit, so 5% (about 6 bf16
# epsilons) holds with a 3x margin. The tolerance is relative to the logits' scale,
# not to 1 + that scale: the deep networks' logits are ~1e-3 to ~0.3 here, where an
# absolute tolerance of 0.05 would hardly test anything.
RTOL_LOGITS = 0.05


def test_small_resize_is_valid():
    # Cheap (abstract) check of the sizes below, run once for all networks.
    assert set(SMALL_RESIZE) == set(ALL)
    for name in ALL:
        assert models.accepts_input(name, SMALL_RESIZE[name]), name


def batch(name: str) -> jnp.ndarray:
    r = SMALL_RESIZE[name]
    return jax.random.uniform(jax.random.key(2), (2, r, r, 1))  # float32, as trained


def abstract_init(model: nn.Module, x: jnp.ndarray):
    """The variables' shapes and dtypes, traced only (nothing is compiled or run)."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(rngs, x, train=False))


def random_variables(shapes, seed: int = 0):
    """float32 values for a variables tree of ShapeDtypeStructs, drawn with NumPy.

    Kernels are Xavier-uniform as in the models; biases, BN scales/shifts and the
    moving statistics get small random values (not the 0/1 of a fresh init), so the
    eval-mode comparison exercises every term. Drawing them here avoids compiling
    each network's initialiser, which is most of the cost of a real `init`.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        key = path[-1].key
        if len(s.shape) >= 2:  # (..., fan_in, fan_out)
            receptive = int(np.prod(s.shape[:-2]))
            bound = np.sqrt(6.0 / (receptive * (s.shape[-2] + s.shape[-1])))
            value = rng.uniform(-bound, bound, s.shape)
        elif key in ("scale", "gamma"):
            value = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif key in ("var", "moving_var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:  # biases, shifts, moving means
            value = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def assert_all_float32(tree) -> None:
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)}
    assert dtypes == {jnp.dtype(F32)}, dtypes


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_init_keeps_float32_variables(name):
    model = models.get_model(name, dtype=BF16)
    assert model.dtype == BF16
    x = batch(name)
    v16 = abstract_init(model, x)
    v32 = abstract_init(models.get_model(name), x)
    assert_all_float32(v16)  # params and batch_stats
    # Same collections, names and shapes as the float32 network.
    chex.assert_trees_all_equal_shapes_and_dtypes(v16, v32)


@pytest.mark.parametrize("name", ["lenet_bn_scratch", "lenet_bn"])
def test_bfloat16_init_values_equal_float32_init(name):
    # The initialisers draw in param_dtype (float32) whatever `dtype` is.
    x = batch(name)
    rngs = {"params": jax.random.key(0)}
    v16, v32 = jax.jit(lambda x: (models.get_model(name, dtype=BF16).init(rngs, x),
                                  models.get_model(name).init(rngs, x)))(x)
    chex.assert_trees_all_equal(v16, v32)


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_forward_matches_float32(name):
    m16, m32 = models.get_model(name, dtype=BF16), models.get_model(name)
    x = batch(name)
    variables = random_variables(abstract_init(m32, x))  # the SAME float32 variables

    @jax.jit
    def forward(variables, x):
        y32 = m32.apply(variables, x, train=False)
        y16 = m16.apply(variables, x, train=False)
        y_train, updates = m16.apply(variables, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(3)})
        return y32, y16, y_train, updates

    y32, y16, y_train, updates = forward(variables, x)
    for y in (y16, y_train):
        chex.assert_shape(y, (2, 10))
        chex.assert_type(y, F32)
        chex.assert_tree_all_finite(y)
    if "batch_stats" in variables:
        assert_all_float32(updates["batch_stats"])
        chex.assert_trees_all_equal_structs(updates["batch_stats"], variables["batch_stats"])
    else:
        assert not updates
    # Eval mode only: in train mode, batch norm over 2 images at 1x1 resolution (the
    # last ResNet stage at 32x32) divides by a near-zero variance, which amplifies any
    # rounding, float32's included; the comparison there would test the batch, not bf16.
    scale = float(jnp.max(jnp.abs(y32)))
    assert scale > 0
    err = float(jnp.max(jnp.abs(y16 - y32)))
    assert err <= RTOL_LOGITS * scale, (err, scale)


def heavy_ops(model: nn.Module, variables, x) -> list[tuple[str, list, list]]:
    """(primitive, input dtypes, output dtypes) of every convolution and matmul in
    the jaxpr of `model.apply` (eval mode), nested jaxprs included."""
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.append((eqn.primitive.name,
                              [jnp.dtype(v.aval.dtype) for v in eqn.invars],
                              [jnp.dtype(v.aval.dtype) for v in eqn.outvars]))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed.jaxpr)
    assert [jnp.dtype(v.aval.dtype) for v in closed.jaxpr.outvars] == [jnp.dtype(F32)]
    return found


@pytest.mark.parametrize("name", ALL)
def test_convs_and_matmuls_compute_in_bfloat16(name):
    x = batch(name)
    variables = abstract_init(models.get_model(name), x)  # traced only
    ops16 = heavy_ops(models.get_model(name, dtype=BF16), variables, x)
    ops32 = heavy_ops(models.get_model(name), variables, x)
    assert ops16 and len(ops16) == len(ops32)
    if name != "nin":  # NiN has no dense layer
        assert {op for op, _, _ in ops16} == {"conv_general_dilated", "dot_general"}
    bf16 = jnp.dtype(BF16)
    for op, ins, outs in ops16:
        assert ins == [bf16, bf16] and outs == [bf16], (op, ins, outs)
    for op, ins, outs in ops32:
        assert set(ins + outs) == {jnp.dtype(F32)}, (op, ins, outs)


# --- the layers ------------------------------------------------------------------------

def test_scratch_batch_norm_keeps_float32_statistics():
    x32 = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 4))
    x16 = x32.astype(BF16)
    ours = scratch.BatchNorm()
    variables = ours.init(jax.random.key(1), x16, use_running_average=False)
    assert_all_float32(variables)

    y16, upd16 = ours.apply(variables, x16, use_running_average=False, mutable=["batch_stats"])
    chex.assert_type(y16, BF16)  # the output keeps the input's dtype
    assert_all_float32(upd16)
    # The statistics are those of the bf16 values computed in float32: the same as
    # float32 batch norm on the bf16-rounded input.
    y_ref, upd_ref = ours.apply(variables, x16.astype(F32), use_running_average=False,
                                mutable=["batch_stats"])
    chex.assert_trees_all_close(upd16, upd_ref, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(y16.astype(F32), y_ref, atol=2e-2)  # one bf16 rounding
    # ... and agree with Flax's BatchNorm(dtype=bfloat16), which reduces in float32 too.
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=BF16)
    flax_vars = flax_bn.init(jax.random.key(1), x16)
    y_flax, upd_flax = flax_bn.apply(flax_vars, x16, mutable=["batch_stats"])
    chex.assert_type(y_flax, BF16)
    chex.assert_trees_all_close(upd16["batch_stats"]["moving_mean"],
                                upd_flax["batch_stats"]["mean"], rtol=1e-5)
    chex.assert_trees_all_close(upd16["batch_stats"]["moving_var"],
                                upd_flax["batch_stats"]["var"], rtol=1e-5)
    chex.assert_trees_all_close(y16.astype(F32), y_flax.astype(F32), atol=2e-2)

    y_eval = ours.apply(upd16 | {"params": variables["params"]}, x16, use_running_average=True)
    chex.assert_type(y_eval, BF16)
    # The `dtype` field sets the output dtype, as in Flax.
    y_f32 = scratch.BatchNorm(dtype=F32).apply(variables, x16, use_running_average=True)
    chex.assert_type(y_f32, F32)


def test_global_avg_pool_averages_in_float32():
    x = jax.random.uniform(jax.random.key(0), (2, 7, 7, 3)).astype(BF16)
    expected = jnp.mean(x.astype(F32), axis=(1, 2))
    y = GlobalAvgPool().apply({}, x)
    chex.assert_type(y, BF16)  # cast back to the input's dtype
    chex.assert_trees_all_equal(y, expected.astype(BF16))
    y32 = GlobalAvgPool(dtype=F32).apply({}, x)
    chex.assert_type(y32, F32)
    chex.assert_trees_all_close(y32, expected, rtol=1e-6)
