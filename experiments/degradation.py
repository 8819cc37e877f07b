"""The ResNet paper's degradation experiment at Fashion-MNIST scale: does a deeper
plain network train worse, while a deeper residual network trains better?

    python -m experiments.degradation            # 20 epochs, all 60,000 images (a GPU)
    python -m experiments.degradation --quick    # 8 epochs on 6,400 images (~30 min, 2 CPU cores)

He et al. (2016) found that a 56-layer plain network reaches a higher training
error than a 20-layer one, although it could copy the shallower net and add
identity layers, and that shortcuts remove this degradation. This trains their
small-image networks (cnnjax.models.CifarResNet: a 3x3 conv, three stages of
16/32/64 channels at 28x28, 14x14 and 7x7, batch norm everywhere) with and without
shortcuts at 20 and 56 layers, all with the same recipe: SGD with momentum 0.9,
weight decay 1e-4, lr 0.1, batch 128 (the paper's first phase), one seed.

Writes results/<device-kind>/degradation/: REPORT.md (a table of final training
and test error, and what the runs show), degradation.png (training and test
error against epoch, plain nets beside residual ones), summary.json and one
directory per network. A run whose loss diverges gets no row, and the command
exits with 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnjax import config, models
from cnnjax.config import TrainConfig
from cnnjax.plots import new_figure, save_figure
from experiments.sweep import Run, RunRecord, Sweep, header, subset, write_summary

NETWORKS = ("plain20", "plain56", "resnet20", "resnet56")


def final_errors(epochs: list[dict]) -> tuple[float, float]:
    """(training error over the last epoch, test error after it)."""
    return 1 - epochs[-1]["train_acc"], 1 - epochs[-1]["test_acc"]


def findings(results: dict) -> list[str]:
    """What the runs show, in the paper's terms, for each kind with both depths."""
    lines = []
    for kind in ("plain", "resnet"):
        shallow, deep = results.get(f"{kind}20"), results.get(f"{kind}56")
        if not (shallow and deep):
            continue
        (train20, test20), (train56, test56) = final_errors(shallow), final_errors(deep)
        name = "plain" if kind == "plain" else "residual"
        verdict = ("higher than" if train56 > train20 else
                   "lower than" if train56 < train20 else "equal to")
        lines.append(f"- {name}: the 56-layer net ends with a training error {verdict} the "
                     f"20-layer net's ({100 * train56:.2f}% vs {100 * train20:.2f}%; test "
                     f"error {100 * test56:.2f}% vs {100 * test20:.2f}%)")
    for depth in (20, 56):
        plain, residual = results.get(f"plain{depth}"), results.get(f"resnet{depth}")
        if plain and residual:
            (plain_train, _), (residual_train, _) = final_errors(plain), final_errors(residual)
            lines.append(f"- at {depth} layers, shortcuts change the final training error from "
                         f"{100 * plain_train:.2f}% (plain) to {100 * residual_train:.2f}% "
                         "(residual)")
    return lines


def plot(results: dict, path: Path, title: str) -> None:
    fig, axes = new_figure(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind, name in zip(axes, ("plain", "resnet"), ("plain", "residual (ResNet)")):
        for color, depth in (("C0", 20), ("C3", 56)):
            epochs = results.get(f"{kind}{depth}")
            if not epochs:
                continue
            x = [e["epoch"] for e in epochs]
            ax.plot(x, [100 * (1 - e["train_acc"]) for e in epochs], "-o", color=color, ms=3,
                    label=f"{kind}-{depth} train")
            ax.plot(x, [100 * (1 - e["test_acc"]) for e in epochs], ":", color=color,
                    label=f"{kind}-{depth} test")
        ax.set(title=name, xlabel="epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("error (%)")
    save_figure(fig, path, title)


class Degradation(Sweep):
    module = "experiments.degradation"
    doc = __doc__
    folder = "degradation"

    def add_flags(self, parser) -> None:
        quick = config.DEGRADATION_QUICK
        parser.add_argument("--quick", action="store_true",
                            help=f"{quick['epochs']} epochs on the first {quick['max_train']:,} "
                                 f"training and {quick['max_test']:,} test images (fits a "
                                 "2-core CPU in about 30 minutes)")
        parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                            metavar="NAME",
                            help=f"networks to train (default: {' '.join(NETWORKS)})")

    def runs(self, args, overrides) -> list[Run]:
        quick = config.DEGRADATION_QUICK if args.quick else {}
        return [Run(arch, TrainConfig.from_recipe(arch, **{**quick, **overrides}))
                for arch in args.networks]

    def report(self, out: Path, runs: list[RunRecord], args) -> None:
        runs = [r for r in runs if r.config.arch in NETWORKS and not r.diverged]
        runs.sort(key=lambda r: NETWORKS.index(r.config.arch))
        results = {r.config.arch: r.epochs for r in runs}
        rows = []
        for run in runs:
            train_error, test_error = final_errors(run.epochs)
            params = sum(b.num_params for b in models.block_infos(models.get_model(run.config.arch),
                                                                    run.config.resize))
            rows.append({"arch": run.config.arch, "params": params,
                         "final_train_error": train_error, "final_test_error": test_error,
                         "best_test_error": 1 - max(e["test_acc"] for e in run.epochs)})
        recipes = sorted({
            f"SGD, momentum {c.momentum}, weight decay {c.weight_decay:g}, lr {c.lr} "
            f"{c.schedule}, batch {c.batch_size}, {c.resize}x{c.resize}, {c.epochs} epoch(s)"
            f"{subset(c)}, seed {c.seed}" + ("" if c.is_full_recipe() else " (**quick**: a "
                                             "shorter run than the full version)")
            for c in (r.config for r in runs)})
        lines = header("Degradation: plain vs residual networks", runs) + [
            f"- recipe: {'; '.join(recipes)}",
            "", "| network | layers | shortcuts | params | final train error | "
                "final test error | best test error |",
            "|---|---:|---|---:|---:|---:|---:|"]
        for row in rows:
            arch = row["arch"]
            lines.append(f"| [`{arch}`]({arch}/) | {arch[-2:]} | "
                         f"{'yes' if arch.startswith('resnet') else 'no'} | {row['params']:,} | "
                         f"{100 * row['final_train_error']:.2f}% | "
                         f"{100 * row['final_test_error']:.2f}% | "
                         f"{100 * row['best_test_error']:.2f}% |")
        lines += ["", "Training error is over the last epoch, measured while training (batch "
                      "statistics, weights still moving), as the ResNet paper plots it; test "
                      "error uses the moving statistics.", "", "What the runs show:",
                  *findings(results), "",
                  "![training and test error against epoch](degradation.png)", ""]
        (out / "REPORT.md").write_text("\n".join(lines))
        devices = sorted({r.metrics["device"] for r in runs})
        plot(results, out / "degradation.png", f"plain vs residual nets, {', '.join(devices)}")
        write_summary(out / "summary.json", rows)
        print("\n".join(findings(results)))


def main(argv: list[str] | None = None) -> int:
    return Degradation().main(argv)


if __name__ == "__main__":
    sys.exit(main())
