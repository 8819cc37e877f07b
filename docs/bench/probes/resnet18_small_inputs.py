"""resnet18 per-image cost by batch size and input size, and per stage (fwd+bwd).

Run from the repository root: python docs/bench/probes/resnet18_small_inputs.py (prints JSON lines).
"""
import time, json
import jax, jax.numpy as jnp
from cnnjax import models
from cnnjax.models.resnet import Stem, resnet_block

def timeit(f, *a, n=3):
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(n): out = f(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n

model = models.get_model("resnet18")
for b, r in [(64, 64), (128, 64), (256, 64), (64, 96)]:
    x = jnp.ones((b, r, r, 1))
    v = model.init(jax.random.key(0), x[:1])
    def loss(p, x): 
        out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return out.sum()
    g = jax.jit(jax.grad(loss))
    s = timeit(g, v["params"], x, n=2)
    print(json.dumps({"batch": b, "resize": r, "s_per_step": round(s, 3), "img_per_s": round(b / s, 1)}), flush=True)

# per stage at 64x64, batch 64 vs 256
for b in (64, 256):
    shapes = {"b1": (b, 64, 64, 1), "b2": (b, 16, 16, 64), "b3": (b, 16, 16, 64), "b4": (b, 8, 8, 128), "b5": (b, 4, 4, 256)}
    mods = {"b1": Stem(64), "b2": resnet_block(64, 2, first_block=True), "b3": resnet_block(128, 2),
            "b4": resnet_block(256, 2), "b5": resnet_block(512, 2)}
    for name, m in mods.items():
        x = jnp.ones(shapes[name])
        v = m.init(jax.random.key(0), x, True)
        def loss(p, x, m=m, v=v):
            out, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, True, mutable=["batch_stats"])
            return out.sum()
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        s = timeit(g, v["params"], x, n=2)
        print(json.dumps({"batch": b, "stage": name, "ms_per_image": round(1000 * s / b, 3)}), flush=True)
