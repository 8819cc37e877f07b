"""Reproduce the notes' results table: train each network with its recipe and compare.

    python -m experiments.reproduce                     # every network, the notes' recipes
    python -m experiments.reproduce --quick             # a version that fits a 2-core CPU
    python -m experiments.reproduce --archs lenet lenet_bn lenet_bn_scratch
    python -m experiments.reproduce --archs resnet18 --recipe classic modern

Each run goes into its own directory under results/<device-kind>/ (metrics.json,
curves.png, config.json, log.txt, run.json), named <arch>[-modern][-quick], and
replaces an earlier run of that name (with --continue, after a Ctrl-C: keeps a
finished one and continues an interrupted one). REPORT.md is then rebuilt from every run
there, this invocation's and earlier ones': per run the recipe and settings, the
notes' loss, train acc, test acc and examples/sec (cnnjax/d2l_reference.json,
copied from the notes), ours, and the difference in test accuracy; one figure with
every run's test-accuracy curve (test_acc.png); the device, dates and commands.
Every row says whether it is the full recipe or a quick version. A run whose loss
diverges gets no row; the command names it and exits with 3.

--recipe modern (beyond the notes): momentum 0.9, weight decay 5e-4, a cosine
schedule after one epoch of warm-up, random crops and flips (cnnjax.models.recipe).

--quick trains the LeNet family with the full recipe and the larger networks for 2
epochs on 2,048 training and 1,000 test images, most at a smaller input size. Those rows
show that the pipeline runs, not the notes' accuracy (see QUICK_CAVEAT).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from experiments.cli import (EXIT_DIVERGED, ArgumentParser, UsageError, fail, parser_for,
                             positive_int)
from experiments.experiment import add_continue_flag

# The notes' table, in its order, then the two LeNets it leaves out.
ARCHS = ("alexnet", "vgg11", "nin", "googlenet", "lenet_bn_scratch", "resnet18", "densenet",
         "lenet", "lenet_bn")
LENET_FAMILY = ("lenet", "lenet_bn", "lenet_bn_scratch")
# --quick for the larger networks: their smallest comfortable input, 2 epochs, a subset.
# ResNet-18 keeps its 96x96: at 64x64 its last stage works on 2x2 maps, where XLA:CPU's
# convolutions are about 25x slower than on 3x3 ones (docs/benchmarks.md).
QUICK_RESIZE = {"alexnet": 96, "vgg11": 64, "nin": 96, "googlenet": 64, "resnet18": 96,
                "densenet": 64}
QUICK_SUBSET = {"epochs": 2, "max_train": 2048, "max_test": 1000}
_REFERENCE_NAMES = {"vgg11": "vgg11 (ratio 4)"}
QUICK_CAVEAT = (
    "Quick rows take a few dozen SGD steps. That is too few for the plain-SGD recipes "
    "of the networks without batch norm to leave the initial plateau (loss 2.30, "
    "chance accuracy). The networks with batch norm fit the training subset, but "
    "their test accuracy uses the moving statistics: after 16 steps these still hold "
    "19% of their initial values (mean 0, variance 1; Flax's momentum 0.9 keeps 0.9^16 "
    "of them), and the rest comes from batches seen while the weights changed fast. "
    "So the test accuracy can be far below the train accuracy; "
    "docs/runs/probes/quick_bn_stats.py scores the test set with each batch's own "
    "statistics instead.")


def build_parser() -> ArgumentParser:
    parser = parser_for("experiments.reproduce", __doc__)
    parser.add_argument("--archs", nargs="+", metavar="NAME", default=list(ARCHS),
                        help=f"networks to train (default: all of {', '.join(ARCHS)})")
    parser.add_argument("--recipe", nargs="+", choices=("classic", "modern"), default=["classic"],
                        help="classic: the notes' recipe (default); modern: momentum, weight "
                             "decay, cosine schedule with warm-up, crops and flips; both: "
                             "--recipe classic modern")
    parser.add_argument("--quick", action="store_true",
                        help="full recipe for the LeNets; 2 epochs on 2,048 images, most "
                             "at a smaller input size, for the others")
    parser.add_argument("--epochs", type=positive_int,
                        help="override every network's epochs (smoke tests; the report says so)")
    parser.add_argument("--max-train", type=positive_int, metavar="N",
                        help="override: train on the first N images (the report says so)")
    parser.add_argument("--max-test", type=positive_int, metavar="N",
                        help="override: test on the first N images (the report says so)")
    add_continue_flag(parser)
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
    for recipe in args.recipe:
        for arch in args.archs:
            overrides = {}
            if args.quick and arch not in LENET_FAMILY:
                overrides = {**QUICK_SUBSET, "resize": QUICK_RESIZE[arch]}
            for key in ("epochs", "max_train", "max_test"):
                if getattr(args, key) is not None:
                    overrides[key] = getattr(args, key)
            configs.append(TrainConfig.from_recipe(arch, recipe, **overrides))
    return configs


def is_full_recipe(config) -> bool:
    from cnnjax import models

    recipe = models.recipe(config.arch, config.recipe)
    return (all(getattr(config, k) == v for k, v in recipe.items())
            and config.max_train is None and config.max_test is None)


def run_name(config) -> str:
    return (config.arch + ("-modern" if config.recipe == "modern" else "")
            + ("" if is_full_recipe(config) else "-quick"))


def settings(config) -> str:
    text = (f"{config.epochs} ep, lr {config.lr}, batch {config.batch_size}, "
            f"{config.resize}x{config.resize}")
    if config.recipe == "modern":
        text += (f", momentum {config.momentum}, wd {config.weight_decay:g}, "
                 f"{config.schedule} ({config.warmup_epochs:g} ep warm-up)"
                 + (", crop+flip" if config.augment else ""))
    if config.max_train or config.max_test:
        text += f", {config.max_train or 'all'} train / {config.max_test or 'all'} test images"
    return text


def _sort_key(run: dict):
    config = run["config"]
    return (ARCHS.index(config.arch), config.recipe != "classic", not is_full_recipe(config))


def write_report(path: Path, runs: list[dict], header: list[str]) -> None:
    from cnnjax.trainer import examples_per_sec

    lines = header + ["", "| network | recipe | kind | settings | notes: loss / train / test / "
                          "ex/s | ours: loss / train / test / ex/s | test acc, ours - notes "
                          "(points) |",
                      "|---|---|---|---|---|---|---:|"]
    for run in runs:
        config, metrics, ref = run["config"], run["metrics"], notes_row(run["config"].arch)
        last = metrics["epochs"][-1]
        theirs = ("-" if ref is None else
                  f"{ref['loss']:.3f} / {ref['train_acc']:.3f} / {ref['test_acc']:.3f} / "
                  f"{ref['examples_per_sec']:,.0f} (note {ref['source']})")
        ours = (f"{last['train_loss']:.3f} / {last['train_acc']:.3f} / {last['test_acc']:.3f} / "
                f"{examples_per_sec(metrics):,.0f}")
        diff = "-" if ref is None else f"{100 * (last['test_acc'] - ref['test_acc']):+.1f}"
        kind = "full" if is_full_recipe(config) else "**quick**"
        lines.append(f"| [`{config.arch}`]({run['dir'].name}/) | {config.recipe} | {kind} | "
                     f"{settings(config)} | {theirs} | {ours} | {diff} |")
    lines += ["", "The notes measured examples/sec on CUDA GPUs they do not name; ours are on "
                  "the device above, so compare those only between runs on one device. The "
                  "notes' figures are for their (classic) recipe, also in the modern rows.",
              *(["", QUICK_CAVEAT] if any(not is_full_recipe(r["config"]) for r in runs)
                else []),
              "", "![test accuracy of every run](test_acc.png)", ""]
    path.write_text("\n".join(lines))


def plot_test_accuracy(runs: list[dict], path: Path, title: str) -> None:
    from cnnjax.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run in runs:
        config, epochs = run["config"], run["metrics"]["epochs"]
        label = (config.arch + (", modern" if config.recipe == "modern" else "")
                 + ("" if is_full_recipe(config) else " (quick)"))
        ax.plot([e["epoch"] for e in epochs], [e["test_acc"] for e in epochs],
                "--o" if config.recipe == "modern" else "-o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    if runs:  # none yet after a Ctrl-C in the first run
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(out: Path) -> None:
    """REPORT.md, test_acc.png and summary.json from every run in `out`."""
    from cnnjax.trainer import write_json
    from experiments.experiment import load_runs

    runs = sorted((r for r in load_runs(out) if r["config"].arch in ARCHS), key=_sort_key)
    full = [run_name(r["config"]) for r in runs if is_full_recipe(r["config"])]
    quick = [run_name(r["config"]) for r in runs if not is_full_recipe(r["config"])]
    kinds = ([f"full recipe: {', '.join(full)}"] if full else []) + (
        [f"**quick** (not the full recipe; settings in each row): {', '.join(quick)}"]
        if quick else [])
    devices = sorted({r["metrics"]["device"] for r in runs})
    dates = sorted({r["run"].get("date", "?") for r in runs})
    commands = sorted({r["run"].get("command", "?") for r in runs})
    header = [f"# Reproducing the notes' results on {', '.join(devices)}", "",
              f"- dates: {', '.join(dates)}",
              "- commands: " + "; ".join(f"`{c}`" for c in commands),
              "- rows: " + "; ".join(kinds),
              "- each row's directory holds its metrics.json, curves.png, config.json, log "
              "and run.json (date, command)"]
    write_report(out / "REPORT.md", runs, header)
    plot_test_accuracy(runs, out / "test_acc.png", f"test accuracy, {', '.join(devices)}")
    write_json(out / "summary.json", [
        {"run": r["dir"].name, "config": dataclasses.asdict(r["config"]),
         "full_recipe": is_full_recipe(r["config"]), "final": r["metrics"]["epochs"][-1],
         "notes": notes_row(r["config"].arch), **r["run"]} for r in runs])


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
    from cnnjax.trainer import Diverged, Interrupted
    from experiments.experiment import command_line, device_kind, interrupted, train_run

    setup_devices()
    out = Path(args.out) / device_kind()
    out.mkdir(parents=True, exist_ok=True)
    command = command_line("experiments.reproduce", argv)
    diverged = []
    try:
        for config in configs:
            try:
                data = load_fashion_mnist(args.data_dir, max_train=config.max_train,
                                          max_test=config.max_test)
            except DataUnavailableError as err:
                return fail(prog, str(err))
            print(f"== {run_name(config)}: {settings(config)}", flush=True)
            try:
                train_run(config, data, out / run_name(config), command,
                          continue_=args.continue_)
            except Diverged as err:  # keep going; the other networks' rows still count
                shutil.rmtree(out / run_name(config), ignore_errors=True)
                diverged.append(f"{run_name(config)} ({err})")
    except (Interrupted, KeyboardInterrupt) as err:
        build_report(out)  # with the runs finished so far
        return interrupted(prog, err, command)
    build_report(out)
    print(f"wrote {out}/REPORT.md")
    if diverged:
        return fail(prog, f"the loss diverged for {'; '.join(diverged)}; those runs have no "
                          "row in the report", EXIT_DIVERGED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
