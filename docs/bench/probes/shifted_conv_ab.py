"""Interleaved A/B in one process: XLA's convolution vs `shifted_conv` for the
one-channel, stride-1 first layers (cnnjax.models.common.conv_general_dilated).

Run from the repository root, e.g. (arch, batch size, steps per window, windows):
    python docs/bench/probes/shifted_conv_ab.py lenet_bn 256 10 8
Both train steps are compiled first, then timed in alternating windows; one JSON line.
"""
import sys, time, statistics, json, os
import jax
from jax import lax
import cnnjax.models.common as common
from experiments.bench import load_data
from cnnjax.train import TrainConfig
from cnnjax.trainer import Prepared
arch = sys.argv[1]; bs = int(sys.argv[2]); steps = int(sys.argv[3]); windows = int(sys.argv[4])
ds, _ = load_data(None)
cfg = TrainConfig.from_recipe(arch, batch_size=bs)
runs = {"shifted": Prepared.create(cfg, ds, 1)}
common.conv_general_dilated = lax.conv_general_dilated
runs["xla"] = Prepared.create(cfg, ds, 1)
st = {k: [r.state, r.totals, r.epoch_batches(0)] for k, r in runs.items()}
rates = {k: [] for k in runs}
for w in range(windows + 1):
    for k, r in runs.items():
        s, t, b = st[k]
        jax.block_until_ready(t); start = time.perf_counter()
        for _ in range(steps): s, t = r.train_step(s, t, b)
        jax.block_until_ready(t); el = time.perf_counter() - start
        st[k][:2] = s, t
        if w: rates[k].append(round(steps * bs / el, 1))
print(json.dumps({"probe": "shifted_conv_ab", "arch": arch, "batch_size": bs, "jax_version": jax.__version__,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  **{f"{k}_img_per_s": statistics.median(v) for k, v in rates.items()},
                  "windows_img_per_s": rates,
                  "train_loss": {k: round(float(st[k][1]["loss_sum"] / st[k][1]["count"]), 6) for k in runs}}), flush=True)
