"""XLA:CPU in jaxlib 0.11.2 computes NaN for a bfloat16 max-pool followed by three
dense layers with ReLU (VGG's and AlexNet's head), under jit only.

    python docs/bench/probes/ynn_bf16_nan.py
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python docs/bench/probes/ynn_bf16_nan.py

Found on 2026-11-22 when the test suite ran under JAX 0.11.2 (Python 3.12): the
jitted bf16 VGG-11 returned NaN logits, eager mode did not. The optimized HLO puts
the pool, the dots and the ReLUs into one `__ynn_fusion`; with YNNPACK fusions
switched off (the second command) the result is finite and matches eager mode.
JAX 0.10.2 (this project's CI) and float32 are not affected.
"""

import jax
import jax.numpy as jnp
import numpy as np


def head(h, w1, w2, w3, dtype):
    h = jax.lax.reduce_window(h.astype(dtype), jnp.array(-jnp.inf, dtype), jax.lax.max,
                              (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ w1.astype(dtype))
    h = jax.nn.relu(h @ w2.astype(dtype))
    return h @ w3.astype(dtype)


def main() -> None:
    rng = np.random.default_rng(0)
    h = rng.uniform(-1, 1, (2, 32, 32, 16)).astype(np.float32)
    ws = [rng.uniform(-0.03, 0.03, s).astype(np.float32)
          for s in [(4096, 4096), (4096, 4096), (4096, 10)]]
    for dtype in (jnp.bfloat16, jnp.float32):
        jitted = np.asarray(jax.jit(head, static_argnums=4)(h, *ws, dtype), np.float32)
        eager = np.asarray(head(h, *ws, dtype), np.float32)
        print(f"jax {jax.__version__}, {jnp.dtype(dtype).name}: NaNs under jit "
              f"{int(np.isnan(jitted).sum())}/{jitted.size}, eager {int(np.isnan(eager).sum())}")


if __name__ == "__main__":
    main()
