"""Does batch norm speed up convergence? LeNet without BN, with the from-scratch BN
and with flax's BN, over a sweep of learning rates.

    python -m experiments.bn_ablation                       # 3 networks x 4 lrs x 10 epochs
    python -m experiments.bn_ablation --lrs 1.0 --epochs 3  # a shorter look

The book (§7.5) trains LeNet with batch norm at lr 1.0 and says that batch norm lets
networks converge faster and at larger learning rates. This trains each of lenet
(no BN, the book's sigmoid LeNet), lenet_bn_scratch and lenet_bn with the book's
recipe (plain SGD, batch 256, 28x28, 10 epochs) at every --lrs value, including the
book's 1.0, and picks each network's best lr from the sweep (highest final test
accuracy). Writes results/<device-kind>/bn_ablation/: REPORT.md (a row per run:
final loss, accuracies, the first epoch with test accuracy >= --threshold),
bn_ablation.png (train loss and test accuracy against epoch, a column per lr),
summary.json and one directory per run. A run whose loss stops being finite is
reported as diverged.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnjax.config import TrainConfig
from cnnjax.plots import new_figure, save_figure
from experiments.cli import flag_type, positive_float
from experiments.sweep import Run, RunRecord, Sweep, header, subset, write_summary

NETWORKS = ("lenet", "lenet_bn_scratch", "lenet_bn")
LABELS = {"lenet": "no BN", "lenet_bn_scratch": "from-scratch BN", "lenet_bn": "flax BN"}
BOOK_LR = 1.0
THRESHOLD = 0.80


def run_name(arch: str, lr: float) -> str:
    return f"{arch}-lr{lr:g}"


def first_epoch_reaching(epochs: list[dict], threshold: float) -> int | None:
    return next((e["epoch"] for e in epochs if e["test_acc"] >= threshold), None)


def best_lrs(runs: list[RunRecord]) -> dict[str, float]:
    """Each network's lr with the highest final test accuracy (diverged runs lose)."""
    best: dict[str, tuple[float, float]] = {}
    for run in runs:
        acc = run.epochs[-1]["test_acc"] if run.epochs and not run.diverged else -1.0
        arch = run.config.arch
        if arch not in best or acc > best[arch][1]:
            best[arch] = (run.config.lr, acc)
    return {arch: lr for arch, (lr, _) in best.items()}


class BNAblation(Sweep):
    module = "experiments.bn_ablation"
    doc = __doc__
    folder = "bn_ablation"
    own_settings = ("arch", "lr")
    divergence_fails = False  # diverging at a large lr is a result of the sweep

    def add_flags(self, parser) -> None:
        parser.add_argument("--lrs", nargs="+", type=positive_float, metavar="LR",
                            default=[0.1, 0.3, 1.0, 3.0],
                            help="learning rates to train each network at (default: 0.1 0.3 "
                                 "1.0 3.0; 1.0, the book's lr, is always added)")
        parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                            metavar="NAME",
                            help=f"networks to compare (default: {' '.join(NETWORKS)})")
        parser.add_argument("--threshold", type=flag_type(float, _fraction), default=THRESHOLD,
                            help="report the first epoch whose test accuracy reaches this "
                                 f"(default {THRESHOLD})")

    def runs(self, args, overrides) -> list[Run]:
        lrs = sorted(set(args.lrs) | {BOOK_LR})
        return [Run(run_name(arch, lr), TrainConfig.from_recipe(arch, lr=lr, **overrides))
                for arch in args.networks for lr in lrs]

    def report(self, out: Path, runs: list[RunRecord], args) -> None:
        threshold = args.threshold
        runs = sorted((r for r in runs if r.config.arch in NETWORKS),
                      key=lambda r: (NETWORKS.index(r.config.arch), r.config.lr))
        best = best_lrs(runs)
        recipes = sorted({f"plain SGD, batch {r.config.batch_size}, "
                          f"{r.config.resize}x{r.config.resize}, {r.config.epochs} epochs, "
                          f"seed {r.config.seed}{subset(r.config)}" for r in runs})
        lines = header("Batch norm ablation", runs) + [
            f"- recipe: {'; '.join(recipes)}; the book trains the BN LeNets at lr {BOOK_LR:g}",
            "- each network's best lr: " + ", ".join(f"{a} {lr:g}" for a, lr in best.items()),
            "", f"| network | lr | final train loss | final train acc | final test acc | "
                f"first epoch with test acc >= {threshold:.2f} | |",
            "|---|---:|---:|---:|---:|---:|---|"]
        for run in runs:
            arch, lr = run.config.arch, run.config.lr
            marks = ", ".join(m for m, on in (("the book's lr", lr == BOOK_LR),
                                              ("best of the sweep", best.get(arch) == lr)) if on)
            name = f"[`{arch}`]({run.name}/) ({LABELS[arch]})"
            if run.diverged:
                lines.append(f"| {name} | {lr:g} | diverged: {run.diverged} | | | | {marks} |")
                continue
            last = run.epochs[-1]
            reached = first_epoch_reaching(run.epochs, threshold)
            lines.append(f"| {name} | {lr:g} | {last['train_loss']:.3f} | "
                         f"{last['train_acc']:.3f} | {last['test_acc']:.3f} | "
                         f"{reached or 'not reached'} | {marks} |")
        lines += ["", "![train loss and test accuracy against epoch](bn_ablation.png)", ""]
        (out / "REPORT.md").write_text("\n".join(lines))
        plot(runs, out / "bn_ablation.png")
        write_summary(out / "summary.json", [
            {"arch": r.config.arch, "lr": r.config.lr, "diverged": r.diverged,
             "final": r.epochs[-1] if r.epochs and not r.diverged else None,
             "first_epoch_reaching_threshold": first_epoch_reaching(r.epochs, threshold),
             "threshold": threshold} for r in runs])


def _fraction(value) -> str | None:
    ok = isinstance(value, float) and 0 < value <= 1
    return None if ok else "expected a number in (0, 1]"


def plot(runs: list[RunRecord], path: Path) -> None:
    """A column per lr: train loss (top) and test accuracy (bottom) of each network."""
    lrs = sorted({r.config.lr for r in runs}) or [BOOK_LR]
    fig, axes = new_figure(2, len(lrs), figsize=(3.2 * len(lrs) + 1, 6), sharex=True,
                           sharey="row", squeeze=False)
    # The two BN networks compute the same numbers: the scratch one is drawn wider and
    # dashed so that it shows under flax's.
    styles = {"lenet": dict(color="C0", ls="-", lw=1.5),
              "lenet_bn": dict(color="C2", ls="-", lw=1.5),
              "lenet_bn_scratch": dict(color="C1", ls="--", lw=3.5)}
    for run in runs:
        column = lrs.index(run.config.lr)
        x = [e["epoch"] for e in run.epochs]
        label, style = LABELS[run.config.arch], styles[run.config.arch]
        axes[0, column].plot(x, [e["train_loss"] for e in run.epochs], label=label, **style)
        axes[1, column].plot(x, [e["test_acc"] for e in run.epochs], label=label, **style)
    for column, lr in enumerate(lrs):
        axes[0, column].set_title(f"lr {lr:g}" + (" (the book's)" if lr == BOOK_LR else ""),
                                  fontsize=9)
        axes[1, column].set_xlabel("epoch")
    axes[0, 0].set(ylabel="train loss", yscale="log")
    axes[1, 0].set_ylabel("test accuracy")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    if runs:
        axes[1, 0].legend(fontsize=7)
    devices = sorted({r.metrics["device"] for r in runs if r.metrics})
    save_figure(fig, path, f"LeNet with and without batch norm, {', '.join(devices)}")


def main(argv: list[str] | None = None) -> int:
    return BNAblation().main(argv)


if __name__ == "__main__":
    sys.exit(main())
