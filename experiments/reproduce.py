"""Reproduce the notes' results table: train each network with its recipe and compare.

    python -m experiments.reproduce                     # every network, the notes' recipes
    python -m experiments.reproduce --quick             # a version that fits a 2-core CPU
    python -m experiments.reproduce --archs lenet lenet_bn lenet_bn_scratch

Writes results/<device-kind>/REPORT.md: per network the settings, the notes' loss,
train acc, test acc and examples/sec (cnnjax/d2l_reference.json, copied from the
notes), ours, and the difference in test accuracy; one figure with every network's
test-accuracy curve (test_acc.png); the device, date and command. Each run's own
directory (metrics.json, curves.png, log) sits beside the report. Rows of a --quick
run say so, in the header and in every row.

--quick trains the LeNet family with the full recipe and the larger networks for 2
epochs on 2,048 training and 1,000 test images at a smaller input size. Those rows
show that the pipeline runs and learns, not the notes' accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from experiments.cli import ArgumentParser, UsageError, fail, positive_int

# The notes' table, in its order, then the two LeNets it leaves out.
ARCHS = ("alexnet", "vgg11", "nin", "googlenet", "lenet_bn_scratch", "resnet18", "densenet",
         "lenet", "lenet_bn")
LENET_FAMILY = ("lenet", "lenet_bn", "lenet_bn_scratch")
# --quick for the larger networks: their smallest comfortable input, 2 epochs, a subset.
QUICK_RESIZE = {"alexnet": 96, "vgg11": 64, "nin": 96, "googlenet": 64, "resnet18": 64,
                "densenet": 64}
QUICK_SUBSET = {"epochs": 2, "max_train": 2048, "max_test": 1000}
_REFERENCE_NAMES = {"vgg11": "vgg11 (ratio 4)"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.reproduce",
                            description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", metavar="NAME", default=list(ARCHS),
                        help=f"networks to train (default: all of {', '.join(ARCHS)})")
    parser.add_argument("--quick", action="store_true",
                        help="full recipe for the LeNets; 2 epochs on 2,048 images at a "
                             "smaller input size for the others")
    parser.add_argument("--epochs", type=positive_int,
                        help="override every network's epochs (smoke tests; the report says so)")
    parser.add_argument("--max-train", type=positive_int, metavar="N",
                        help="override: train on the first N images (the report says so)")
    parser.add_argument("--max-test", type=positive_int, metavar="N",
                        help="override: test on the first N images (the report says so)")
    parser.add_argument("--out", metavar="DIR", default="results",
                        help="where results/<device-kind>/ goes (default: results)")
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data_dir (default: TFDS's)")
    return parser


def notes_row(arch: str) -> dict | None:
    """The notes' figures for `arch`: note 001's (the book chapter) where two notes
    report one."""
    from cnnjax import reference

    name = _REFERENCE_NAMES.get(arch, arch)
    rows = [r for r in reference.load()["runs"] if r["arch"] == name]
    rows.sort(key=lambda r: r["source"] != "001")
    return rows[0] if rows else None


def configs_for(args) -> list:
    from cnnjax.train import TrainConfig

    configs = []
    for arch in args.archs:
        overrides = {}
        if args.quick and arch not in LENET_FAMILY:
            overrides = {**QUICK_SUBSET, "resize": QUICK_RESIZE[arch]}
        for key in ("epochs", "max_train", "max_test"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        configs.append(TrainConfig.from_recipe(arch, **overrides))
    return configs


def is_full_recipe(config) -> bool:
    from cnnjax import models

    recipe = models.recipe(config.arch)
    return (all(getattr(config, k) == v for k, v in recipe.items())
            and config.max_train is None and config.max_test is None)


def settings(config) -> str:
    text = (f"{config.epochs} ep, lr {config.lr}, batch {config.batch_size}, "
            f"{config.resize}x{config.resize}")
    if config.max_train or config.max_test:
        text += f", {config.max_train or 'all'} train / {config.max_test or 'all'} test images"
    return text


def device_kind() -> str:
    import jax

    kind = jax.devices()[0].device_kind
    return "cpu" if jax.default_backend() == "cpu" else kind.lower().replace(" ", "-")


def write_report(path: Path, rows: list[tuple], header: list[str]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = header + ["", "| network | kind | settings | notes: loss / train / test / ex/s | "
                          "ours: loss / train / test / ex/s | test acc, ours - notes (points) |",
                      "|---|---|---|---|---|---:|"]
    for config, metrics, ref in rows:
        last = metrics["epochs"][-1]
        rate = (sum(e["train_examples"] for e in metrics["epochs"])
                / sum(e["train_seconds"] for e in metrics["epochs"]))
        theirs = ("-" if ref is None else
                  f"{ref['loss']:.3f} / {ref['train_acc']:.3f} / {ref['test_acc']:.3f} / "
                  f"{ref['examples_per_sec']:,.0f} (note {ref['source']})")
        ours = (f"{last['train_loss']:.3f} / {last['train_acc']:.3f} / {last['test_acc']:.3f} / "
                f"{rate:,.0f}")
        diff = None if ref is None else 100 * (last["test_acc"] - ref["test_acc"])
        kind = "full" if is_full_recipe(config) else "**quick**"
        lines.append(f"| [`{config.arch}`]({config.arch}/) | {kind} | {settings(config)} | "
                     f"{theirs} | {ours} | {fmt(diff, '+.1f')} |")
    lines += ["", "The notes measured examples/sec on CUDA GPUs they do not name; ours are on "
                  "the device above, so compare those only between runs on one device.",
              "", "![test accuracy of every network](test_acc.png)", ""]
    path.write_text("\n".join(lines))


def plot_test_accuracy(rows: list[tuple], path: Path, title: str) -> None:
    from cnnjax.plots import plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for config, metrics, _ in rows:
        epochs = metrics["epochs"]
        label = config.arch + ("" if is_full_recipe(config) else " (quick)")
        ax.plot([e["epoch"] for e in epochs], [e["test_acc"] for e in epochs], "-o", ms=3,
                label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    from cnnjax import models

    try:
        unknown = [a for a in args.archs if a not in models.list_models()]
        if unknown:
            raise UsageError(f"unknown --archs {', '.join(unknown)}; valid names: "
                             + ", ".join(models.list_models()))
        configs = configs_for(args)
    except UsageError as err:
        return fail(prog, str(err))

    from cnnjax.data import DataUnavailableError, load_fashion_mnist
    from cnnjax.parallel import setup_devices
    from cnnjax.trainer import describe_device, fit, write_json

    setup_devices()
    out = Path(args.out) / device_kind()
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.reproduce " + shlex.join(argv if argv is not None
                                                              else sys.argv[1:])
    rows = []
    for config in configs:
        try:
            data = load_fashion_mnist(args.data_dir, max_train=config.max_train,
                                      max_test=config.max_test)
        except DataUnavailableError as err:
            return fail(prog, str(err))
        run_dir = out / config.arch
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_json(run_dir / "config.json", config.to_dict())
        print(f"== {config.arch}: {settings(config)}", flush=True)
        log_lines = []

        def log(line: str) -> None:
            print(line, flush=True)
            log_lines.append(line)

        metrics = fit(config, data, run_dir, log=log)
        (run_dir / "log.txt").write_text("\n".join(log_lines) + "\n")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # reports keep numbers only
        rows.append((config, metrics, notes_row(config.arch)))

    quick = [c.arch for c, _, _ in rows if not is_full_recipe(c)]
    full = [c.arch for c, _, _ in rows if is_full_recipe(c)]
    kinds = ([f"the notes' full recipe for {', '.join(full)}"] if full else []) + (
        [f"**quick** (not the notes' recipe; settings in each row) for {', '.join(quick)}"]
        if quick else [])
    header = [f"# Reproducing the notes' results on {describe_device()}", "",
              f"- date: {time.strftime('%Y-%m-%d')}",
              f"- command: `{command}`",
              "- rows: " + "; ".join(kinds),
              "- each row's directory holds its metrics.json, curves.png, config.json and log"]
    write_report(out / "REPORT.md", rows, header)
    plot_test_accuracy(rows, out / "test_acc.png", f"test accuracy, {describe_device()}")
    write_json(out / "summary.json", [{"config": dataclasses.asdict(c), "final": m["epochs"][-1],
                                       "notes": r} for c, m, r in rows])
    print(f"wrote {out}/REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
