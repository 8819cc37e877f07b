"""Does batch norm speed up convergence? LeNet without BN, with the from-scratch BN
and with flax's BN, over a sweep of learning rates.

    python -m experiments.bn_ablation                       # 3 networks x 4 lrs x 10 epochs
    python -m experiments.bn_ablation --lrs 1.0 --epochs 3  # a shorter look

The notes (d2l §7.5) train LeNet with batch norm at lr 1.0 and say that batch norm
lets networks converge faster and at larger learning rates. This trains each of
lenet (no BN, the book's sigmoid LeNet), lenet_bn_scratch and lenet_bn with the
book's recipe (plain SGD, batch 256, 28x28, 10 epochs) at every --lrs value,
including the notes' 1.0, and picks each network's best lr from the sweep (highest
final test accuracy). Writes results/<device-kind>/bn_ablation/: REPORT.md (a
table per run: final loss, accuracies, the first epoch with test accuracy >=
--threshold), bn_ablation.png (train loss and test accuracy against epoch, a
column per lr), summary.json and one directory per run. A run
whose loss stops being finite is reported as diverged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from experiments.cli import (
    ArgumentParser,
    fail,
    parser_for,
    positive_float,
    positive_int,
)
from experiments.experiment import add_continue_flag

NETWORKS = ("lenet", "lenet_bn_scratch", "lenet_bn")
LABELS = {"lenet": "no BN", "lenet_bn_scratch": "from-scratch BN", "lenet_bn": "flax BN"}
NOTES_LR = 1.0


def build_parser() -> ArgumentParser:
    parser = parser_for("experiments.bn_ablation", __doc__)
    parser.add_argument("--lrs", nargs="+", type=positive_float, metavar="LR",
                        default=[0.1, 0.3, 1.0, 3.0],
                        help="learning rates to train each network at (default: 0.1 0.3 1.0 "
                             "3.0; 1.0, the notes' lr, is always added)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                        metavar="NAME", help=f"networks to compare (default: {' '.join(NETWORKS)})")
    parser.add_argument("--epochs", type=positive_int, default=10,
                        help="epochs per run (default 10, the book's)")
    parser.add_argument("--threshold", type=float, default=0.80,
                        help="report the first epoch whose test accuracy reaches this "
                             "(default 0.80)")
    parser.add_argument("--max-train", type=positive_int, metavar="N",
                        help="train on the first N images only (quick looks; the report says so)")
    parser.add_argument("--max-test", type=positive_int, metavar="N",
                        help="test on the first N images only (the report says so)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    add_continue_flag(parser)
    parser.add_argument("--out", metavar="DIR", default="results",
                        help="results/<device-kind>/bn_ablation/ goes here (default: results)")
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data_dir (default: TFDS's)")
    return parser


def run_name(arch: str, lr: float) -> str:
    return f"{arch}-lr{lr:g}"


def first_epoch_reaching(epochs: list[dict], threshold: float) -> int | None:
    return next((e["epoch"] for e in epochs if e["test_acc"] >= threshold), None)


def best_lrs(results: dict) -> dict[str, float]:
    """Each network's lr with the highest final test accuracy (diverged runs lose)."""
    best = {}
    for (arch, lr), result in results.items():
        acc = result["epochs"][-1]["test_acc"] if result.get("epochs") else -1.0
        if arch not in best or acc > best[arch][1]:
            best[arch] = (lr, acc)
    return {arch: lr for arch, (lr, _) in best.items()}


def write_report(path: Path, results: dict, best: dict, header: list[str],
                 threshold: float) -> None:
    lines = header + [
        "", f"| network | lr | final train loss | final train acc | final test acc | "
            f"first epoch with test acc >= {threshold:.2f} | |",
        "|---|---:|---:|---:|---:|---:|---|"]
    for (arch, lr), result in results.items():
        marks = ", ".join(m for m, on in (("the notes' lr", lr == NOTES_LR),
                                          ("best of the sweep", best.get(arch) == lr)) if on)
        name = f"[`{arch}`]({run_name(arch, lr)}/) ({LABELS[arch]})"
        if result.get("diverged"):
            lines.append(f"| {name} | {lr:g} | diverged: {result['diverged']} | | | | {marks} |")
            continue
        last = result["epochs"][-1]
        reached = first_epoch_reaching(result["epochs"], threshold)
        lines.append(f"| {name} | {lr:g} | {last['train_loss']:.3f} | {last['train_acc']:.3f} | "
                     f"{last['test_acc']:.3f} | {reached or 'not reached'} | {marks} |")
    lines += ["", "![train loss and test accuracy against epoch](bn_ablation.png)", ""]
    path.write_text("\n".join(lines))


def plot(results: dict, path: Path, title: str) -> None:
    """A column per lr: train loss (top) and test accuracy (bottom) of each network."""
    from cnnjax.plots import plt, save_figure

    lrs = sorted({lr for _, lr in results})
    fig, axes = plt.subplots(2, len(lrs), figsize=(3.2 * len(lrs) + 1, 6), dpi=120,
                             sharex=True, sharey="row", squeeze=False)
    # The two BN networks compute the same numbers: the scratch one is drawn wider and
    # dashed so that it shows under flax's.
    styles = {"lenet": dict(color="C0", ls="-", lw=1.5),
              "lenet_bn": dict(color="C2", ls="-", lw=1.5),
              "lenet_bn_scratch": dict(color="C1", ls="--", lw=3.5)}
    for column, lr in enumerate(lrs):
        for arch in ("lenet", "lenet_bn_scratch", "lenet_bn"):
            epochs = results.get((arch, lr), {}).get("epochs")
            if not epochs:
                continue
            x = [e["epoch"] for e in epochs]
            axes[0, column].plot(x, [e["train_loss"] for e in epochs], label=LABELS[arch],
                                 **styles[arch])
            axes[1, column].plot(x, [e["test_acc"] for e in epochs], label=LABELS[arch],
                                 **styles[arch])
        axes[0, column].set_title(f"lr {lr:g}" + (" (the notes')" if lr == NOTES_LR else ""),
                                  fontsize=9)
        axes[1, column].set_xlabel("epoch")
    axes[0, 0].set(ylabel="train loss", yscale="log")
    axes[1, 0].set_ylabel("test accuracy")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes[1, 0].legend(fontsize=7)
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 1:
        return fail(parser.prog, f"--threshold {args.threshold} must lie in (0, 1]")
    lrs = sorted(set(args.lrs) | {NOTES_LR})

    from cnnjax.data import DataUnavailableError, load_fashion_mnist
    from cnnjax.parallel import setup_devices
    from cnnjax.train import TrainConfig
    from cnnjax.trainer import Diverged, Interrupted, describe_device, write_json
    from experiments.experiment import command_line, device_kind, interrupted, train_run

    setup_devices()
    try:
        data = load_fashion_mnist(args.data_dir, max_train=args.max_train,
                                  max_test=args.max_test)
    except DataUnavailableError as err:
        return fail(parser.prog, str(err))
    out = Path(args.out) / device_kind() / "bn_ablation"
    out.mkdir(parents=True, exist_ok=True)
    command = command_line("experiments.bn_ablation", argv)
    results = {}
    try:
        for arch in args.networks:
            for lr in lrs:
                config = TrainConfig.from_recipe(arch, lr=lr, epochs=args.epochs, seed=args.seed,
                                                 max_train=args.max_train,
                                                 max_test=args.max_test)
                print(f"== {arch} at lr {lr:g}", flush=True)
                try:
                    metrics = train_run(config, data, out / run_name(arch, lr), command,
                                        continue_=args.continue_)
                    results[(arch, lr)] = {"epochs": metrics["epochs"]}
                except Diverged as err:
                    print(f"diverged: {err}", flush=True)
                    results[(arch, lr)] = {"diverged": str(err), "epochs": []}
    except (Interrupted, KeyboardInterrupt) as err:
        return interrupted(parser.prog, err, command)

    best = best_lrs(results)
    subset = (f"; **subset**: {args.max_train or 'all'} train / {args.max_test or 'all'} "
              "test images" if args.max_train or args.max_test else "")
    header = [f"# Batch norm ablation on {describe_device()}", "",
              f"- date: {time.strftime('%Y-%m-%d')}",
              f"- command: `{command}`",
              f"- recipe: plain SGD, batch 256, 28x28, {args.epochs} epochs, seed {args.seed}"
              f"{subset}; the notes train the BN LeNets at lr {NOTES_LR:g}",
              "- each network's best lr: " + ", ".join(f"{a} {lr:g}" for a, lr in best.items())]
    write_report(out / "REPORT.md", results, best, header, args.threshold)
    plot(results, out / "bn_ablation.png",
         f"LeNet with and without batch norm, {describe_device()}")
    write_json(out / "summary.json", [
        {"arch": a, "lr": lr, "diverged": r.get("diverged"),
         "final": r["epochs"][-1] if r["epochs"] else None,
         "first_epoch_reaching_threshold": first_epoch_reaching(r["epochs"], args.threshold),
         "threshold": args.threshold} for (a, lr), r in results.items()])
    print(f"wrote {out}/REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
