"""Why is lax.scan over train_step slower on CPU? Compare 1 step/call, scan, scan unroll=True.

Run from the repository root: python docs/bench/probes/scan_unroll.py (prints JSON lines).
"""
import functools, time, json
import jax
from cnnjax.data import load_fashion_mnist
from cnnjax.train import TrainConfig, train_step
from cnnjax.trainer import Prepared

data = load_fashion_mnist()
config = TrainConfig.from_recipe("lenet_bn", epochs=1)
run = Prepared.create(config, data)
a = run.arrays
batches = run.epoch_batches(0)
K = 10

def make(unroll):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def steps(state, totals, images, labels, batches, key):
        def body(carry, _):
            return train_step(*carry, images, labels, batches, key, resize=28), None
        return jax.lax.scan(body, (state, totals), length=K, unroll=unroll)[0]
    return lambda s, t: steps(s, t, a["train_images"], a["train_labels"], batches, a["rng_key"])

variants = {"1/call": lambda s, t: run.train_step(s, t, batches), "scan": make(1), "scan_unrolled": make(True)}
state, totals = run.state, run.totals
for rep in range(2):
    for name, f in variants.items():
        per_call = 1 if name == "1/call" else K
        state, totals = f(state, totals); jax.block_until_ready(totals)
        t = time.perf_counter()
        for _ in range(50 // per_call):
            state, totals = f(state, totals)
        jax.block_until_ready(totals)
        print(json.dumps({"variant": name, "img_per_s": round(50 * 256 / (time.perf_counter() - t))}), flush=True)
