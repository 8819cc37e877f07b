"""Tests for cnnjax.scratch: each from-scratch piece against the library op it re-derives."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cnnjax import scratch

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
TOL = dict(atol=1e-5, rtol=1e-5)


def _lax_corr2d(X: jax.Array, K: jax.Array) -> jax.Array:
    """The library version of corr2d: a one-image, one-channel VALID convolution."""
    Y = jax.lax.conv_general_dilated(
        X[None, :, :, None],
        K[:, :, None, None],
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=DIMENSION_NUMBERS,
        precision=jax.lax.Precision.HIGHEST,
    )
    return Y[0, :, :, 0]


class Corr2dTest(chex.TestCase):
    def test_book_example(self):
        X = jnp.arange(9.0).reshape(3, 3)
        K = jnp.array([[0.0, 1.0], [2.0, 3.0]])
        chex.assert_trees_all_close(scratch.corr2d(X, K), jnp.array([[19.0, 25.0], [37.0, 43.0]]))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        ((6, 8), (3, 3)),
        ((7, 4), (2, 3)),
        ((3, 3), (3, 3)),
    )
    def test_matches_lax_conv(self, x_shape, k_shape):
        kx, kk = jax.random.split(jax.random.key(0))
        X = jax.random.normal(kx, x_shape)
        K = jax.random.normal(kk, k_shape)  # not symmetric, so a flipped kernel would fail
        Y = self.variant(scratch.corr2d)(X, K)
        chex.assert_shape(Y, (x_shape[0] - k_shape[0] + 1, x_shape[1] - k_shape[1] + 1))
        chex.assert_trees_all_close(Y, _lax_corr2d(X, K), **TOL)

    def test_kernel_larger_than_input_raises(self):
        with pytest.raises(ValueError):
            scratch.corr2d(jnp.ones((3, 3)), jnp.ones((4, 2)))


class Conv2DTest(chex.TestCase):
    def test_params_and_output_shape(self):
        X = jax.random.normal(jax.random.key(0), (6, 8))
        variables = scratch.Conv2D(kernel_size=(1, 2)).init(jax.random.key(1), X)
        params = variables["params"]
        self.assertEqual(set(variables), {"params"})
        chex.assert_shape(params["weight"], (1, 2))
        chex.assert_trees_all_equal(params["bias"], jnp.zeros((1,)))
        # Uniform on [0, 1) like torch.rand.
        self.assertTrue(bool(jnp.all((params["weight"] >= 0) & (params["weight"] < 1))))
        Y = scratch.Conv2D(kernel_size=(1, 2)).apply(variables, X)
        chex.assert_shape(Y, (6, 7))

    def test_equals_corr2d_with_its_params(self):
        X = jax.random.normal(jax.random.key(0), (5, 7))
        conv = scratch.Conv2D(kernel_size=(3, 2))
        variables = conv.init(jax.random.key(1), X)
        params = dict(variables["params"], bias=jnp.array([0.7]))  # a non-zero bias too
        Y = conv.apply({"params": params}, X)
        chex.assert_trees_all_close(Y, _lax_corr2d(X, params["weight"]) + 0.7, **TOL)


class Pool2dTest(chex.TestCase):
    def test_book_example(self):
        X = jnp.arange(9.0).reshape(3, 3)
        chex.assert_trees_all_close(scratch.pool2d(X, (2, 2)), jnp.array([[4.0, 5.0], [7.0, 8.0]]))
        chex.assert_trees_all_close(
            scratch.pool2d(X, (2, 2), "avg"), jnp.array([[2.0, 3.0], [5.0, 6.0]])
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        mode=["max", "avg"],
        shapes=[((6, 5), (3, 2)), ((4, 7), (1, 3)), ((3, 3), (3, 3))],
    )
    def test_matches_flax_pool(self, mode, shapes):
        x_shape, pool_size = shapes
        X = jax.random.normal(jax.random.key(0), x_shape)
        flax_pool = nn.max_pool if mode == "max" else nn.avg_pool
        expected = flax_pool(
            X[None, :, :, None], window_shape=pool_size, strides=(1, 1), padding="VALID"
        )[0, :, :, 0]
        Y = self.variant(functools.partial(scratch.pool2d, pool_size=pool_size, mode=mode))(X)
        chex.assert_trees_all_close(Y, expected, **TOL)

    def test_unknown_mode_raises(self):
        with pytest.raises(ValueError):
            scratch.pool2d(jnp.ones((3, 3)), (2, 2), mode="min")


class ConvOutputSizeTest(chex.TestCase):
    @staticmethod
    def _lax_output_shape(h: int, w: int, k: int, p: int, s: int) -> tuple[int, int]:
        """Output (H, W) of a k x k lax convolution with total padding p and stride s."""
        x = jax.ShapeDtypeStruct((1, h, w, 1), jnp.float32)
        kernel = jax.ShapeDtypeStruct((k, k, 1, 1), jnp.float32)
        conv = functools.partial(
            jax.lax.conv_general_dilated,
            window_strides=(s, s),
            padding=[(p // 2, p - p // 2)] * 2,
            dimension_numbers=DIMENSION_NUMBERS,
        )
        return jax.eval_shape(conv, x, kernel).shape[1:3]

    def test_matches_lax_conv_over_grid(self):
        # eval_shape asks lax for the output shape without compiling 600 convolutions.
        checked = 0
        for n in range(5, 13):
            for k in range(1, 6):
                for p in range(0, 5):
                    if k > n + p:
                        continue
                    for s in range(1, 4):
                        expected = self._lax_output_shape(n, n + 1, k, p, s)
                        got = (
                            scratch.conv_output_size(n, k, p, s),
                            scratch.conv_output_size(n + 1, k, p, s),
                        )
                        self.assertEqual(got, expected, msg=f"n={n} k={k} p={p} s={s}")
                        checked += 1
        self.assertGreater(checked, 500)

    @parameterized.parameters((8, 3, 2, 1), (8, 3, 2, 2), (8, 5, 3, 4), (7, 2, 0, 3))
    def test_matches_executed_conv(self, n, k, p, s):
        x = jnp.ones((1, n, n, 1))
        kernel = jnp.ones((k, k, 1, 1))
        Y = jax.lax.conv_general_dilated(
            x, kernel, (s, s), [(p // 2, p - p // 2)] * 2, dimension_numbers=DIMENSION_NUMBERS
        )
        size = scratch.conv_output_size(n, k, p, s)
        chex.assert_shape(Y, (1, size, size, 1))

    def test_invalid_arguments_raise(self):
        with pytest.raises(ValueError):
            scratch.conv_output_size(5, 3, 0, 0)
        with pytest.raises(ValueError):
            scratch.conv_output_size(3, 6, 2, 1)


def _random_stats(key: jax.Array, c: int) -> tuple[jax.Array, ...]:
    kg, kb, km, kv = jax.random.split(key, 4)
    gamma = jax.random.normal(kg, (c,))
    beta = jax.random.normal(kb, (c,))
    moving_mean = jax.random.normal(km, (c,))
    moving_var = jax.random.uniform(kv, (c,), minval=0.5, maxval=2.0)
    # One tiny variance, so that eval mode is sensitive to where eps goes.
    moving_var = moving_var.at[0].set(1e-4)
    return gamma, beta, moving_mean, moving_var


def _flax_bn(momentum: float = 0.9, epsilon: float = 1e-5) -> nn.BatchNorm:
    return nn.BatchNorm(momentum=momentum, epsilon=epsilon)


class BatchNormFunctionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(shape=[(8, 3), (4, 5, 5, 3)], train=[True, False])
    def test_matches_flax_batchnorm(self, shape, train):
        kx, ks = jax.random.split(jax.random.key(0))
        X = 2.0 * jax.random.normal(kx, shape) + 1.0
        # Channel 0 gets a tiny spread, so that train mode is sensitive to eps too.
        X = X.at[..., 0].multiply(0.01)
        gamma, beta, moving_mean, moving_var = _random_stats(ks, shape[-1])

        fn = functools.partial(scratch.batch_norm, eps=1e-5, momentum=0.9, train=train)
        Y, new_mean, new_var = self.variant(fn)(X, gamma, beta, moving_mean, moving_var)

        expected_Y, updates = _flax_bn().apply(
            {
                "params": {"scale": gamma, "bias": beta},
                "batch_stats": {"mean": moving_mean, "var": moving_var},
            },
            X,
            use_running_average=not train,
            mutable=["batch_stats"],
        )
        chex.assert_trees_all_close(Y, expected_Y, **TOL)
        chex.assert_trees_all_close(new_mean, updates["batch_stats"]["mean"], **TOL)
        chex.assert_trees_all_close(new_var, updates["batch_stats"]["var"], **TOL)
        if not train:
            chex.assert_trees_all_equal((new_mean, new_var), (moving_mean, moving_var))

    def test_rejects_other_ranks(self):
        c = 3
        args = _random_stats(jax.random.key(0), c)
        with pytest.raises(AssertionError):
            scratch.batch_norm(jnp.ones((4, 5, c)), *args, eps=1e-5, momentum=0.9, train=True)


class BatchNormModuleTest(chex.TestCase):
    @parameterized.parameters((8, 3), (4, 5, 5, 3))
    def test_matches_flax_batchnorm(self, *shape):
        ours, ref = scratch.BatchNorm(), _flax_bn()
        keys = jax.random.split(jax.random.key(0), 6)
        x0 = 3.0 * jax.random.normal(keys[0], shape) + 5.0

        ours_vars = ours.init(keys[1], x0, use_running_average=False)
        ref_vars = ref.init(keys[1], x0, use_running_average=False)
        # init must not fold the example input into the moving statistics.
        c = shape[-1]
        chex.assert_trees_all_equal(
            ours_vars["batch_stats"], {"moving_mean": jnp.zeros(c), "moving_var": jnp.ones(c)}
        )
        chex.assert_trees_all_equal(ref_vars["batch_stats"], {"mean": jnp.zeros(c), "var": jnp.ones(c)})

        gamma, beta, _, _ = _random_stats(keys[2], c)
        ours_vars = {"params": {"gamma": gamma, "beta": beta}, "batch_stats": ours_vars["batch_stats"]}
        ref_vars = {"params": {"scale": gamma, "bias": beta}, "batch_stats": ref_vars["batch_stats"]}

        def assert_stats_close(ours_stats, ref_stats):
            chex.assert_trees_all_close(ours_stats["moving_mean"], ref_stats["mean"], **TOL)
            chex.assert_trees_all_close(ours_stats["moving_var"], ref_stats["var"], **TOL)

        for step, key in enumerate(jax.random.split(keys[3], 3)):
            x = (step + 1.0) * jax.random.normal(key, shape) + step - 1.0
            y, ours_upd = ours.apply(ours_vars, x, use_running_average=False, mutable=["batch_stats"])
            y_ref, ref_upd = ref.apply(ref_vars, x, use_running_average=False, mutable=["batch_stats"])
            chex.assert_trees_all_close(y, y_ref, **TOL)
            assert_stats_close(ours_upd["batch_stats"], ref_upd["batch_stats"])
            ours_vars = {**ours_vars, **ours_upd}
            ref_vars = {**ref_vars, **ref_upd}

        # The statistics did move, so the eval comparison below is not against 0 / 1.
        self.assertFalse(np.allclose(ours_vars["batch_stats"]["moving_mean"], 0.0))
        self.assertFalse(np.allclose(ours_vars["batch_stats"]["moving_var"], 1.0))

        x = jax.random.normal(keys[4], shape)
        y, ours_upd = ours.apply(ours_vars, x, use_running_average=True, mutable=["batch_stats"])
        y_ref, _ = ref.apply(ref_vars, x, use_running_average=True, mutable=["batch_stats"])
        chex.assert_trees_all_close(y, y_ref, **TOL)
        chex.assert_trees_all_equal(ours_upd["batch_stats"], ours_vars["batch_stats"])

    @parameterized.parameters((8, 3), (2, 4, 4, 6))
    def test_variable_count_matches_flax(self, *shape):
        x = jnp.ones(shape)
        ours = scratch.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
        ref = _flax_bn().init(jax.random.key(0), x, use_running_average=False)
        for collection in ("params", "batch_stats"):
            count = sum(a.size for a in jax.tree_util.tree_leaves(ours[collection]))
            ref_count = sum(a.size for a in jax.tree_util.tree_leaves(ref[collection]))
            self.assertEqual(count, ref_count)
            self.assertEqual(count, 2 * shape[-1])
        self.assertEqual(set(ours["params"]), {"gamma", "beta"})
        self.assertEqual(set(ours["batch_stats"]), {"moving_mean", "moving_var"})

    def test_use_running_average_from_constructor_or_call(self):
        x = jax.random.normal(jax.random.key(0), (4, 3))
        variables = scratch.BatchNorm().init(jax.random.key(1), x, use_running_average=False)
        y_field = scratch.BatchNorm(use_running_average=True).apply(variables, x)
        y_call = scratch.BatchNorm().apply(variables, x, use_running_average=True)
        chex.assert_trees_all_equal(y_field, y_call)
        with pytest.raises(ValueError):
            scratch.BatchNorm().apply(variables, x)
        with pytest.raises(ValueError):
            scratch.BatchNorm(use_running_average=True).apply(
                variables, x, use_running_average=True
            )

    def test_jitted_train_step_matches_eager(self):
        x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
        bn = scratch.BatchNorm()
        variables = bn.init(jax.random.key(1), x, use_running_average=False)

        def step(v, x):
            return bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])

        chex.assert_trees_all_close(jax.jit(step)(variables, x), step(variables, x), **TOL)
