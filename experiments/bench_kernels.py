"""Time each CPU kernel of `cnnjax.cpu_kernels` against the plain layer it replaces.

    python -m experiments.bench_kernels                      # every kernel, batch 64
    python -m experiments.bench_kernels --jsonl kernels.jsonl --windows 7

For each kernel, one layer at a shape of the zoo where cnnjax uses it: the layer
as the models build it from `cnnjax.models.layers` (plain: XLA's convolution,
reduce-window and Flax's batch norm) and from `cnnjax.cpu_kernels.layers_for("cpu")`,
both jitted, each call the forward pass and the gradients with respect to the
input and the parameters (batch norm in training mode). The two alternate window
by window (--windows windows of --calls calls each), and the median milliseconds
per call are reported with their ratio, plain / kernel. The whole networks' gain
is `python -m experiments.bench --both-layer-sets`.

Prints one JSON line per kernel, then a Markdown table; --jsonl FILE also appends
the lines to FILE.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cnnjax import cpu_kernels, runtime
from cnnjax.models import layers
from experiments.cli import parser_for, positive_int

# (kernel, where the zoo uses it, layer, its arguments, input shape at batch 1).
CASES = [
    ("one_channel_conv", "LeNet's first conv: 5x5, 1 -> 6 channels, padding 2, 28x28",
     "conv", dict(features=6, kernel_size=5, padding=2), (28, 28, 1)),
    ("im2col_conv", "a 1x1 conv, 256 -> 64 channels, 16x16 (GoogLeNet's 1x1 convs)",
     "conv", dict(features=64, kernel_size=1), (16, 16, 256)),
    ("im2col_conv", "a 3x3 conv on a 2x2 map, 512 -> 512 (ResNet-18's last stage at 64x64)",
     "conv", dict(features=512, kernel_size=3, padding=1), (2, 2, 512)),
    ("grouped convolution", "a 3x3 conv, 32 -> 32 channels in 2 groups, 16x16 (RegNetX-32)",
     "conv", dict(features=32, kernel_size=3, padding=1, feature_group_count=2), (16, 16, 32)),
    ("strided_conv", "a 3x3 stride-2 conv, 64 -> 128 channels, 32x32 (ResNet's transitions)",
     "conv", dict(features=128, kernel_size=3, strides=2, padding=1), (32, 32, 64)),
    ("max_pool", "a 3x3 stride-2 max pool, padding 1, 32x32x64 (ResNet's stem at 64x64)",
     "max_pool", dict(window=3, strides=2, padding=1), (32, 32, 64)),
    ("batch_norm_train", "batch norm in training, 32x32x64 (ResNet's first stage at 64x64)",
     "norm", dict(use_running_average=False), (32, 32, 64)),
]
PLAIN = {"conv": layers.conv2d, "max_pool": layers.MaxPool, "norm": layers.batch_norm}


def layer_step(layer, shape: tuple[int, ...]) -> Callable[[], jax.Array]:
    """A call of `layer`'s forward pass and its gradients with respect to the input
    and the parameters, jitted, on fixed random inputs; returns a function that runs
    it once and waits for it."""
    x = jax.random.uniform(jax.random.key(0), shape)
    variables = layer.init(jax.random.key(1), x)
    params = variables.get("params", {})
    cotangent = jax.random.normal(jax.random.key(2), jax.eval_shape(
        lambda: layer.apply(variables, x, mutable=["batch_stats"])[0]).shape)

    def loss(params, x):
        out, _ = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(out * cotangent)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def run() -> jax.Array:
        return jax.block_until_ready(step(params, x))

    run()  # compiles
    return run


def time_case(kind: str, arguments: dict, shape: tuple[int, ...], windows: int,
              calls: int) -> dict[str, list[float]]:
    """Milliseconds per call of the plain layer and the CPU kernel, window by window,
    alternating (the first window of each untimed)."""
    runs = {"plain": layer_step(PLAIN[kind](**arguments), shape),
            "kernel": layer_step(cpu_kernels.layers_for("cpu")[kind](**arguments), shape)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for window in range(windows + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(calls):
                run()
            if window:
                times[name].append(1000 * (time.perf_counter() - started) / calls)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("experiments.bench_kernels", __doc__)
    parser.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                        help="examples per call (default 64)")
    parser.add_argument("--windows", type=positive_int, default=5,
                        help="timed windows per layer; the median is reported (default 5)")
    parser.add_argument("--calls", type=positive_int, default=5,
                        help="calls per window (default 5)")
    parser.add_argument("--jsonl", metavar="FILE", help="also append the JSON lines to FILE")
    args = parser.parse_args(argv)
    runtime.configure()
    rows = []
    for kernel, where, kind, arguments, shape in CASES:
        times = time_case(kind, arguments, (args.batch_size, *shape), args.windows, args.calls)
        plain, fast = (statistics.median(times[name]) for name in ("plain", "kernel"))
        row = {"kernel": kernel, "layer": where, "batch_size": args.batch_size,
               "plain_ms": round(plain, 3), "kernel_ms": round(fast, 3),
               "speedup": round(plain / fast, 2), "plain_window_ms": times["plain"],
               "kernel_window_ms": times["kernel"], "date": time.strftime("%Y-%m-%d"),
               "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
               "runtime": runtime.settings()}
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
    print("\n| kernel | layer (forward and gradients) | plain ms | kernel ms | plain / kernel |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['kernel']}` | {r['layer']} | {r['plain_ms']:.2f} | {r['kernel_ms']:.2f} "
              f"| {r['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
