"""Single 3x3 convolutions on small feature maps, XLA:CPU: forward, kernel- and input-gradient.

Run from the repository root: python docs/bench/probes/conv_2x2.py (prints JSON lines).
"""
import time, json, jax, jax.numpy as jnp
def timeit(f, *a, n=3):
    jax.block_until_ready(f(*a)); t = time.perf_counter()
    for _ in range(n): out = f(*a)
    jax.block_until_ready(out); return (time.perf_counter() - t) / n
dn = ("NHWC", "HWIO", "NHWC")
for hw, cin, cout, stride in [(2, 512, 512, 1), (3, 512, 512, 1), (4, 512, 512, 1), (4, 256, 512, 2), (6, 256, 512, 2), (2, 256, 256, 1), (2, 64, 64, 1)]:
    x = jnp.ones((64, hw, hw, cin)); w = jnp.ones((3, 3, cin, cout)) * 0.01
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn)
    fwd = jax.jit(conv)
    dw = jax.jit(jax.grad(lambda w, x: conv(x, w).sum()))
    dx = jax.jit(jax.grad(lambda x, w: conv(x, w).sum()))
    print(json.dumps({"in": f"64x{hw}x{hw}x{cin}", "out_c": cout, "stride": stride,
                      "fwd_ms": round(1e3 * timeit(fwd, x, w), 2), "dkernel_ms": round(1e3 * timeit(dw, w, x), 2),
                      "dinput_ms": round(1e3 * timeit(dx, x, w), 2)}), flush=True)
