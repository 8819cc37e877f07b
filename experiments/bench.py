"""Measure training throughput: our jitted step, and PyTorch's beside it (--torch).

    python -m experiments.bench                           # every network, its recipe
    python -m experiments.bench --arch lenet_bn resnet18 --torch
    python -m experiments.bench --arch resnet18 --batch-size 256 --dtype bfloat16 --torch
    python -m experiments.bench --arch lenet_bn googlenet --both-layer-sets   # on a CPU

For each network, at its recipe's input size and batch size unless overridden:
steady-state training images/sec (compilation excluded; the median of --windows
timed windows of --steps steps each; the on-device data pipeline of gathering,
scaling and resizing the batch included), the compile time, the FLOPs of one step
(XLA's cost analysis of the step before optimization) and, on a GPU or TPU whose peak
is known, the achieved fraction of it (MFU). With --torch, the PyTorch version of the
same network, recipe and input size (experiments/torch_reference.py) is timed in the
same run, in a child process of its own (so that it runs as its users run it, not
with the settings `cnnjax.runtime.configure()` gives this process): the book's eager
loop that resizes on the CPU, and on a GPU also a tuned one (channels-last, bf16
autocast, torch.compile). With --both-layer-sets, the same step built from the plain
layers (--no-cpu-kernels) is timed too. All timed windows alternate, so that a
machine whose speed drifts slows each alike.

Prints one JSON line per network (arch, jax_img_per_s, ..., the layer set and the
start-up settings of cnnjax.runtime; with --torch torch_img_per_s and ratio = jax /
torch; with --both-layer-sets jax_plain_img_per_s and kernels_speedup = jax /
plain), then a Markdown table. --jsonl FILE
also appends the lines to FILE. Ctrl-C or SIGTERM stops it with one line (exit 130
or 143); the rows measured before it stay in FILE.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import multiprocessing
import signal
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from cnnjax import data, models, runtime
from cnnjax.config import TrainConfig
from cnnjax.prepared import Prepared, SettingsError, check_settings, describe_device
from cnnjax.steps import layer_set, train_step
from experiments.cli import (
    ArgumentParser,
    UsageError,
    add_config_flags,
    config_overrides,
    fail,
    parser_for,
    positive_int,
)

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets. MFU is reported
# against this peak whatever --dtype is (float32 on a GPU runs as TF32 at best).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12,
    "V100": 125e12, "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 137.5e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def build_parser() -> ArgumentParser:
    parser = parser_for("experiments.bench", __doc__)
    parser.add_argument("--arch", nargs="+", metavar="NAME",
                        help=f"networks to time (default: all): {', '.join(models.list_models())}")
    parser.add_argument("--devices", type=positive_int, metavar="N",
                        help="split each batch over the first N devices (default: all)")
    parser.add_argument("--windows", type=positive_int, default=5,
                        help="timed windows per measurement; the median is reported (default 5); "
                             "with --torch, PyTorch's windows alternate with JAX's")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="training steps per timed window (default 10)")
    parser.add_argument("--steps-per-dispatch", type=positive_int, default=1, metavar="K",
                        help="run K training steps per call to the device, in a "
                             "lax.scan, unrolled (default 1: one call per step, as training "
                             "does)")
    parser.add_argument("--both-layer-sets", action="store_true",
                        help="also time each step built from the plain layers "
                             "(--no-cpu-kernels), windows alternating, and report the CPU "
                             "kernels' speed-up over them (on a GPU or TPU both are plain)")
    parser.add_argument("--torch", nargs="*", choices=("book", "tuned"), metavar="FLAVOUR",
                        help="also time the PyTorch version in the same run (needs torch): "
                             "book (the book's eager float32 loop) and, on a GPU, tuned "
                             "(channels-last, bf16 autocast, torch.compile); name one to "
                             "time only that one")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="TFDS data_dir with Fashion-MNIST (default: TFDS's); with no "
                             "data, random images of the same shape are used, and said so")
    parser.add_argument("--jsonl", metavar="FILE", help="also append the JSON lines to FILE")
    add_config_flags(parser, exclude=("arch",),
                     title="settings (default: each network's recipe; PyTorch's book flavour "
                           "always computes in float32, its tuned one in bfloat16)")
    return parser


def load_data(data_dir: str | None, max_train: int | None = None, max_test: int | None = None):
    """The real Fashion-MNIST (its first `max_train` / `max_test` images) if it is
    there, else random uint8 images (throughput does not depend on the pixel values)."""
    try:
        return data.load_fashion_mnist(data_dir, max_train=max_train,
                                       max_test=max_test), "fashion_mnist"
    except data.DataUnavailableError:
        rng = np.random.default_rng(0)
        images = lambda n: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)  # noqa: E731
        labels = lambda n: rng.integers(0, 10, n).astype(np.int32)  # noqa: E731
        num_train, num_test = max_train or 60_000, max_test or 10_000
        return data.FashionMNIST(images(num_train), labels(num_train), images(num_test),
                                 labels(num_test)), "random"


def jax_timer(config, dataset, num_devices: int | None, steps_per_dispatch: int = 1
              ) -> tuple[Callable[[int], float], dict]:
    """`cnnjax.prepared.Prepared`'s compiled train step, as training runs it (same arrays, same
    dispatch), compiled and warmed up: returns `window` and `info`. `window(steps)`
    runs `steps` steps and returns their images per second, timed between device
    syncs; `info` holds the compile time, the FLOPs of one step and the devices.
    With `steps_per_dispatch` K > 1, K steps run inside one compiled call instead."""
    run = Prepared.create(config, dataset, num_devices)
    state, totals = run.state, run.totals
    batches = run.epoch_batches(0)
    if steps_per_dispatch == 1:
        step = run.train_step
    else:
        # The data are arguments, not closed over: a jitted function bakes closed-over
        # arrays into the program as constants.
        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def scan_steps(state, totals, images, labels, batches, rng_key):
            def one_step(carry, _):
                return train_step(*carry, images, labels, batches, rng_key,
                                  resize=config.resize, augment=config.augment), None

            # Unrolled: the K steps as one straight program, as K calls would run them.
            return jax.lax.scan(one_step, (state, totals), length=steps_per_dispatch,
                                unroll=True)[0]

        a = run.arrays

        def step(state, totals, batches):
            return scan_steps(state, totals, a["train_images"], a["train_labels"], batches,
                              a["rng_key"])

    for _ in range(2):  # warm-up: compiles `scan_steps`; first executions allocate
        state, totals = step(state, totals, batches)
    jax.block_until_ready(totals)

    def window(steps: int) -> float:
        nonlocal state, totals
        calls = max(1, steps // steps_per_dispatch)
        started = time.perf_counter()
        for _ in range(calls):
            state, totals = step(state, totals, batches)
        jax.block_until_ready(totals)
        return calls * steps_per_dispatch * config.batch_size / (time.perf_counter() - started)

    info = {"compile_s": run.compile_seconds,
            "flops_per_step": run.train_flops,
            "device": describe_device(), "device_count": run.parallel.num_devices,
            "jax_version": jax.__version__}
    return window, info


def torch_timers(config, dataset, flavours: list[str], stack: contextlib.ExitStack
                 ) -> dict[str, tuple]:
    """PyTorch's timers (`bench_torch.training_timer`) for `flavours` ([] means book,
    and tuned on a GPU), keyed "torch" (book) and "torch_tuned", as (window, info)
    like `jax_timer`'s. They run in a child process (`bench_torch.serve_timers`),
    which `stack` ends; each window is one request to it through a pipe. PyTorch is
    imported there only."""
    settings = dict(batch_size=config.batch_size, resize=config.resize, lr=config.lr,
                    images=dataset.train_images, labels=dataset.train_labels)
    spawn = multiprocessing.get_context("spawn")  # a fresh process, not a copy of this one
    conn, child_conn = spawn.Pipe()
    child = spawn.Process(target=_serve_torch_timers, daemon=True,
                          args=(child_conn, config.arch, flavours), kwargs=settings)
    child.start()
    child_conn.close()
    stack.push(_stopper(child, conn))

    def reply():
        try:
            status, value = conn.recv()
        except EOFError:
            child.join(5)
            raise RuntimeError(f"PyTorch's timing process ended (exit code "
                               f"{child.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"PyTorch's timing process failed:\n{value}")
        return value

    def window_of(flavour: str) -> Callable[[int], float]:
        def window(steps: int) -> float:
            conn.send((flavour, steps))
            return reply()
        return window

    infos = reply()
    names = {"book": "torch", "tuned": "torch_tuned"}
    return {names[f]: (window_of(f), info) for f, info in infos.items()}


def _serve_torch_timers(*args, **kwargs) -> None:
    """The body of PyTorch's timing process: `bench_torch.serve_timers`."""
    from experiments import bench_torch

    bench_torch.serve_timers(*args, **kwargs)


def _stopper(child, conn) -> Callable:
    """The exit callback that ends the timing process `child`: asked to stop when
    the bench goes on, killed at once when it stops on an error or a signal."""
    def stop(exc_type, exc, tb) -> bool:
        if exc_type is None:
            with contextlib.suppress(OSError):
                conn.send(None)
            child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
        conn.close()
        return False
    return stop


class Terminated(Exception):
    """SIGTERM (what Colab, a cloud VM or `experiments.accelerator` sends to stop it)."""


def _terminate(signum, frame):
    raise Terminated


def time_interleaved(windows: dict[str, Callable[[int], float]], rounds: int,
                     steps: int) -> dict[str, list[float]]:
    """Each timer's rates (images/sec) over `rounds` rounds in which every timer runs
    one window of `steps` steps, in the reverse order each round. On a machine whose
    speed drifts (a shared VM can change by 40% within minutes), the timers then
    see the same machine, and their ratio compares the code, not the moment.

    Each timer first runs one untimed window of `steps` steps: with several steps in
    flight, JAX's first window takes fresh memory from the kernel (40,000 to 60,000
    page faults at batch 64, half the speed of the next ones), which the timer's
    single warm-up steps do not."""
    for window in windows.values():
        window(steps)
    rates = {name: [] for name in windows}
    order = list(windows)
    for _ in range(rounds):
        for name in order:
            rates[name].append(windows[name](steps))
        order.reverse()
    return rates


def measure(config, dataset, num_devices: int | None, windows: int, steps: int,
            steps_per_dispatch: int = 1, torch_flavours: list[str] | None = None,
            both_layer_sets: bool = False) -> dict:
    """One bench row's measurements for `config`: JAX's images/sec (the median of
    `windows` windows of `steps` steps) with its compile time, FLOPs and MFU; with
    `both_layer_sets`, the same step built from the plain layers too; with
    `torch_flavours` (not None) PyTorch's. Their windows are interleaved."""
    with contextlib.ExitStack() as stack:
        timers = {"jax": jax_timer(config, dataset, num_devices, steps_per_dispatch)}
        if both_layer_sets:
            timers["jax_plain"] = jax_timer(config.replace(cpu_kernels=False), dataset,
                                            num_devices, steps_per_dispatch)
        if torch_flavours is not None:
            timers.update(torch_timers(config, dataset, torch_flavours, stack))
        rates = time_interleaved({name: w for name, (w, _) in timers.items()}, windows,
                                 steps)
    info = timers["jax"][1]
    img_per_s = statistics.median(rates["jax"])
    row = {"jax_img_per_s": round(img_per_s, 1),
           "jax_window_img_per_s": [round(r, 1) for r in rates["jax"]], **info}
    if "jax_plain" in timers:
        row.update(jax_plain_img_per_s=round(statistics.median(rates["jax_plain"]), 1),
                   jax_plain_window_img_per_s=[round(r, 1) for r in rates["jax_plain"]],
                   plain_compile_s=timers["jax_plain"][1]["compile_s"])
        row["kernels_speedup"] = round(img_per_s / row["jax_plain_img_per_s"], 3)
    peak = peak_flops(jax.devices()[0].device_kind)
    if peak and info["flops_per_step"]:
        steps_per_s = img_per_s / config.batch_size
        row["mfu"] = round(info["flops_per_step"] * steps_per_s
                           / (peak * info["device_count"]), 4)
    if "torch" in timers:
        torch_info = timers["torch"][1]
        row.update(torch_device=torch_info["device"], torch_version=torch_info["torch_version"],
                   torch_threads=torch_info["threads"],
                   torch_img_per_s=round(statistics.median(rates["torch"]), 1),
                   torch_window_img_per_s=[round(r, 1) for r in rates["torch"]])
        row["ratio"] = round(img_per_s / row["torch_img_per_s"], 3)
    if "torch_tuned" in timers:
        tuned_info = timers["torch_tuned"][1]
        row.update(torch_device=tuned_info["device"], torch_version=tuned_info["torch_version"],
                   torch_tuned_img_per_s=round(statistics.median(rates["torch_tuned"]), 1),
                   torch_tuned_compiled=tuned_info["compiled"])
        row["ratio_tuned"] = round(img_per_s / row["torch_tuned_img_per_s"], 3)
    return row


def markdown_table(rows: list[dict]) -> str:
    has_torch = any("torch_img_per_s" in r for r in rows)
    has_tuned = any("torch_tuned_img_per_s" in r for r in rows)
    has_mfu = any("mfu" in r for r in rows)
    has_plain = any("jax_plain_img_per_s" in r for r in rows)
    head = ["arch", "batch", "input", "dtype", "devices", "JAX img/s", "compile s", "GFLOP/step"]
    head += ["MFU"] if has_mfu else []
    head += ["plain layers img/s", "CPU kernels / plain"] if has_plain else []
    head += ["PyTorch img/s", "JAX / PyTorch"] if has_torch else []
    head += ["tuned PyTorch img/s", "JAX / tuned"] if has_tuned else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arch"], str(r["batch_size"]), f"{r['resize']}x{r['resize']}", r["dtype"],
                 str(r["device_count"]), f"{r['jax_img_per_s']:,.0f}", f"{r['compile_s']:.1f}",
                 f"{r['flops_per_step'] / 1e9:,.1f}"]
        cells += [f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"] if has_mfu else []
        if has_plain:
            cells += ([f"{r['jax_plain_img_per_s']:,.0f}", f"{r['kernels_speedup']:.2f}x"]
                      if "jax_plain_img_per_s" in r else ["-", "-"])
        if has_torch:
            cells += ([f"{r['torch_img_per_s']:,.0f}", f"{r['ratio']:.2f}x"]
                      if "torch_img_per_s" in r else ["-", "-"])
        if has_tuned:
            cells += ([f"{r['torch_tuned_img_per_s']:,.0f}", f"{r['ratio_tuned']:.2f}x"]
                      if "torch_tuned_img_per_s" in r else ["-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_row(config: TrainConfig, dataset, source: str, args) -> dict:
    """Measure `config` (`measure`), print its JSON line and append it to --jsonl."""
    row = {"arch": config.arch, "batch_size": config.batch_size, "resize": config.resize,
           "dtype": config.dtype, "data": source, "date": time.strftime("%Y-%m-%d"),
           "layers": layer_set(config), "runtime": runtime.settings()}
    row.update(measure(config, dataset, args.devices, args.windows, args.steps,
                       args.steps_per_dispatch, args.torch, args.both_layer_sets))
    if args.steps_per_dispatch > 1:
        row["steps_per_dispatch"] = args.steps_per_dispatch
    line = json.dumps(row)
    print(line, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        archs = args.arch or models.list_models()
        unknown = [a for a in archs if a not in models.list_models()]
        if unknown:
            raise UsageError(f"unknown --arch {', '.join(unknown)}; valid names: "
                             + ", ".join(models.list_models()))
        if args.torch is not None and importlib.util.find_spec("torch") is None:
            raise UsageError("--torch needs PyTorch: pip install torch")
        runtime.configure()

        overrides = {"epochs": 1, **config_overrides(args, exclude=("arch",))}
        recipe = overrides.pop("recipe", "classic")
        configs = [TrainConfig.from_recipe(arch, recipe, **overrides) for arch in archs]
        dataset, source = load_data(args.data_dir, args.max_train, args.max_test)
        for config in configs:
            check_settings(config, len(dataset.train_labels), args.devices)
    except (UsageError, SettingsError) as err:
        return fail(prog, str(err))
    if source == "random":
        print("no Fashion-MNIST found: timing on random images of the same shape",
              file=sys.stderr)
    rows = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for config in configs:
            rows.append(bench_row(config, dataset, source, args))
    except (KeyboardInterrupt, Terminated) as err:
        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        kept = f"; the rows measured before it are in {args.jsonl}" if rows and args.jsonl else ""
        print(f"{prog}: interrupted by {signum.name} while timing {config.arch}{kept}",
              file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
