"""Interleaved A/B in one process: the full train step with XLA's convolution vs im2col_conv.

    python experiments/ab_im2col.py lenet_bn 256 28 20     # arch, batch, resize, steps per window
"""
import sys, time, statistics, json
import numpy as np, jax
from cnnjax import data
from cnnjax.models import common
from cnnjax.train import TrainConfig
from cnnjax.trainer import Prepared
arch, bs, resize, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
ds = data.FashionMNIST(rng.integers(0,256,(max(bs*steps, 10000),28,28,1),dtype=np.uint8), rng.integers(0,10,max(bs*steps,10000)).astype(np.int32), rng.integers(0,256,(bs,28,28,1),dtype=np.uint8), rng.integers(0,10,bs).astype(np.int32))
cfg = TrainConfig(arch=arch, epochs=1, lr=0.01, batch_size=bs, resize=resize)
runs = {}
for name, limit in (("xla", 0), ("im2col", 256 * 2**20)):
    common.IM2COL_MAX_BYTES = limit
    r = Prepared.create(cfg, ds)
    b = r.epoch_batches(0)
    s, t = r.train_step(r.state, r.totals, b); s, t = r.train_step(s, t, b); jax.block_until_ready(t)
    runs[name] = [r, s, t, b, []]
for _ in range(6):
    for name, st in runs.items():
        r, s, t, b, rates = st
        t0 = time.perf_counter()
        for _ in range(steps): s, t = r.train_step(s, t, b)
        jax.block_until_ready(t)
        rates.append(steps * bs / (time.perf_counter() - t0))
        st[1], st[2] = s, t
print(json.dumps({"arch": arch, "batch": bs, **{k: round(statistics.median(v[4]), 1) for k, v in runs.items()}, "windows": {k: [round(x) for x in v[4]] for k, v in runs.items()}}))
