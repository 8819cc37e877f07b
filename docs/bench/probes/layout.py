"""The same convolutions in NHWC/HWIO and NCHW/OIHW on XLA:CPU (forward + both gradients),
and the same check with XLA's thunk runtime switched off where the flag still exists.

Run from the repository root: python docs/bench/probes/layout.py (prints JSON lines).
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp

LAYOUTS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}
# (batch, height=width, in channels, out channels, kernel, padding): the rows of
# docs/benchmarks.md's layer table, and ResNet-18's 3x3 stage-4 conv at 96x96 input.
SHAPES = [(256, 28, 1, 6, 5, 2), (256, 12, 6, 16, 5, 0), (64, 26, 64, 64, 3, 1),
          (64, 14, 128, 128, 3, 1), (64, 3, 512, 512, 3, 1)]


def median_ms(f, *args, repeats=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 2)


for batch, hw, cin, cout, k, pad in SHAPES:
    row = {"shape": f"b{batch} {cin}->{cout} {k}x{k} on {hw}x{hw}"}
    for name, dn in LAYOUTS.items():
        x = jnp.ones((batch, hw, hw, cin) if name == "NHWC" else (batch, cin, hw, hw))
        w = 0.01 * jnp.ones((k, k, cin, cout) if name == "NHWC" else (cout, cin, k, k))

        def loss(x, w, dn=dn):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                             dimension_numbers=dn)
            return (y * y).sum()

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        row[f"{name}_fwd_bwd_ms"] = median_ms(step, x, w)
    print(json.dumps(row), flush=True)
