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
directory per network.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from experiments.cli import EXIT_DIVERGED, ArgumentParser, fail, parser_for, positive_int
from experiments.experiment import add_continue_flag

NETWORKS = ("plain20", "plain56", "resnet20", "resnet56")
QUICK = {"epochs": 8, "max_train": 6_400, "max_test": 2_000}


def build_parser() -> ArgumentParser:
    parser = parser_for("experiments.degradation", __doc__)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['epochs']} epochs on the first {QUICK['max_train']:,} "
                             f"training and {QUICK['max_test']:,} test images (fits a "
                             "2-core CPU in about 30 minutes)")
    parser.add_argument("--epochs", type=positive_int,
                        help="epochs per network (default 20; --quick: 8)")
    parser.add_argument("--max-train", type=positive_int, metavar="N",
                        help="train on the first N images (default all; --quick: "
                             f"{QUICK['max_train']:,})")
    parser.add_argument("--max-test", type=positive_int, metavar="N",
                        help="test on the first N images (default all; --quick: "
                             f"{QUICK['max_test']:,})")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                        metavar="NAME", help=f"networks to train (default: {' '.join(NETWORKS)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    add_continue_flag(parser)
    parser.add_argument("--out", metavar="DIR", default="results",
                        help="results/<device-kind>/degradation/ goes here (default: results)")
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data_dir (default: TFDS's)")
    return parser


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
    from cnnjax.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharey=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = {**(QUICK if args.quick else {}),
                **{k: getattr(args, k) for k in ("epochs", "max_train", "max_test")
                   if getattr(args, k) is not None}}

    from cnnjax import models
    from cnnjax.data import DataUnavailableError, load_fashion_mnist
    from cnnjax.parallel import setup_devices
    from cnnjax.train import TrainConfig, build_model
    from cnnjax.trainer import Diverged, Interrupted, describe_device, write_json
    from experiments.experiment import command_line, device_kind, interrupted, train_run

    setup_devices()
    try:
        data = load_fashion_mnist(args.data_dir, max_train=settings.get("max_train"),
                                  max_test=settings.get("max_test"))
    except DataUnavailableError as err:
        return fail(parser.prog, str(err))
    out = Path(args.out) / device_kind() / "degradation"
    out.mkdir(parents=True, exist_ok=True)
    command = command_line("experiments.degradation", argv)
    results, rows = {}, []
    try:
        for arch in args.networks:
            config = TrainConfig.from_recipe(arch, seed=args.seed, **settings)
            print(f"== {arch}: {models.describe(arch)}", flush=True)
            try:
                metrics = train_run(config, data, out / arch, command,
                                    continue_=args.continue_)
            except Diverged as err:
                return fail(parser.prog, f"{arch}: {err}; no report written", EXIT_DIVERGED)
            results[arch] = metrics["epochs"]
            num_params = sum(b.num_params for b in models.block_infos(build_model(config), 28))
            train_error, test_error = final_errors(metrics["epochs"])
            rows.append({"arch": arch, "params": num_params,
                         "final_train_error": train_error, "final_test_error": test_error,
                         "best_test_error": 1 - max(e["test_acc"] for e in metrics["epochs"])})
    except (Interrupted, KeyboardInterrupt) as err:
        return interrupted(parser.prog, err, command)

    recipe = models.recipe(args.networks[0])
    subset = ("all" if not settings.get("max_train") else f"{settings['max_train']:,}")
    lines = [f"# Degradation: plain vs residual networks on {describe_device()}", "",
             f"- date: {time.strftime('%Y-%m-%d')}",
             f"- command: `{command}`",
             f"- recipe (the same for all): SGD, momentum {recipe['momentum']}, weight decay "
             f"{recipe['weight_decay']:g}, lr {recipe['lr']} constant, batch "
             f"{recipe['batch_size']}, 28x28, {settings.get('epochs', recipe['epochs'])} epoch(s) "
             f"on {subset} training images "
             f"({settings.get('max_test') or 10_000:,} test images), seed {args.seed}"
             + ("; **quick** (a shorter run than the full version)" if args.quick else ""),
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
                  "statistics, weights still moving), as the ResNet paper plots it; test error "
                  "uses the moving statistics.", "", "What the runs show:", *findings(results),
              "", "![training and test error against epoch](degradation.png)", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    plot(results, out / "degradation.png", f"plain vs residual nets, {describe_device()}")
    write_json(out / "summary.json", rows)
    print("\n".join(findings(results)))
    print(f"wrote {out}/REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
