"""Reproduce the reference results: train each network with its recipe and compare.

    python -m experiments.reproduce                     # every network, the book's recipes
    python -m experiments.reproduce --cpu               # the CPU recipe for the larger networks
    python -m experiments.reproduce --archs lenet lenet_bn lenet_bn_scratch
    python -m experiments.reproduce --archs resnet18 --recipe classic modern

Each run goes into its own directory under results/<device-kind>/, named
<arch>[-modern][-<N>ep|-cpu|-quick]. REPORT.md is then rebuilt from every run there, this
invocation's and earlier ones': per run the recipe and settings, the reference loss,
train acc, test acc and examples/sec (cnnjax/d2l_reference.json: the book's PyTorch
code as run by the study notes cnnjax follows), ours, and the difference in test
accuracy; one figure with every run's test-accuracy curve
(test_acc.png); summary.json; the device, dates and commands. Every row says whether
it is the full recipe, the full recipe trained for more epochs (--epochs N on all the
data: "longer", named -<N>ep), the CPU recipe (--cpu) or anything else ("quick", such
as --epochs 1 --max-train 512). A run whose loss diverges is reported as such, and
the command exits with 3.

--recipe modern (beyond the book): momentum 0.9, weight decay 5e-4, a cosine
schedule after one epoch of warm-up, random crops and flips (cnnjax.config).

--cpu, the CPU recipe, trains the LeNet family with the full recipe, and ResNet-18
with its classic recipe on all the data for 2 epochs at 64x64, which fits a 2-core CPU
(without --archs, only these networks). ResNet-18's row is marked "cpu": it shows what
the network reaches in 2 epochs, not the reference accuracy after 10 at 96x96. The
other networks have no CPU recipe (cnnjax.config.CPU_RECIPE_ARCHS says why).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from cnnjax import config, models, reference
from cnnjax.config import CPU_RECIPE_ARCHS, TrainConfig, cpu_overrides, recipe_settings
from cnnjax.plots import new_figure, save_figure
from cnnjax.train import examples_per_sec
from experiments.cli import UsageError
from experiments.sweep import Run, RunRecord, Sweep, header, subset, write_summary

# The kinds of run, in the report's order, and what the report says of each.
KIND_MEANINGS = {
    "full": "full recipe",
    "longer": "longer (the full recipe for more epochs)",
    "cpu": (f"**cpu** (the CPU recipe: the classic recipe on all the data for "
            f"{config.CPU_EPOCHS} epochs at 64x64; settings in each row)"),
    "quick": "**quick** (not the full recipe; settings in each row)",
}
KINDS = tuple(KIND_MEANINGS)

# The reference table's networks, in its order, then RegNetX-32 and the two LeNets it
# leaves out.
ARCHS = ("alexnet", "vgg11", "nin", "googlenet", "lenet_bn_scratch", "resnet18", "densenet",
         "regnetx32", "lenet", "lenet_bn")
def kind(config: TrainConfig) -> str:
    """full: exactly the recipe; longer: the recipe, on all the data, for more epochs;
    cpu: the CPU recipe (`cnnjax.config.cpu_overrides`); quick: anything else."""
    if config.is_full_recipe():
        return "full"
    recipe = recipe_settings(config.arch, config.recipe)
    as_recipe = dataclasses.replace(config, epochs=recipe["epochs"])
    if config.epochs > recipe["epochs"] and as_recipe.is_full_recipe():
        return "longer"
    cpu = cpu_overrides(config.arch) if config.arch in CPU_RECIPE_ARCHS else {}
    as_cpu = dataclasses.replace(config, **{**recipe, **cpu}, max_train=None, max_test=None)
    if cpu and config.recipe == "classic" and as_cpu == config:
        return "cpu"
    return "quick"


def run_name(config: TrainConfig) -> str:
    suffix = {"full": "", "longer": f"-{config.epochs}ep", "cpu": "-cpu",
              "quick": "-quick"}[kind(config)]
    return config.arch + ("-modern" if config.recipe == "modern" else "") + suffix


def settings(config: TrainConfig) -> str:
    text = (f"{config.epochs} ep, lr {config.lr}, batch {config.batch_size}, "
            f"{config.resize}x{config.resize}")
    if config.recipe == "modern":
        text += (f", momentum {config.momentum}, wd {config.weight_decay:g}, "
                 f"{config.schedule} ({config.warmup_epochs:g} ep warm-up)"
                 + (", crop+flip" if config.augment else ""))
    return text + subset(config)


class Reproduce(Sweep):
    module = "experiments.reproduce"
    doc = __doc__
    own_settings = ("arch", "recipe")

    def add_flags(self, parser) -> None:
        parser.add_argument("--archs", nargs="+", metavar="NAME",
                            help=f"networks to train (default: {' '.join(ARCHS)}; with "
                                 f"--cpu: {' '.join(config.CPU_RECIPE_ARCHS)})")
        parser.add_argument("--recipe", nargs="+", choices=config.RECIPES, default=["classic"],
                            help="classic: the book's recipe (default); modern: momentum, "
                                 "weight decay, cosine schedule with warm-up, crops and flips; "
                                 "both: --recipe classic modern")
        parser.add_argument("--cpu", action="store_true",
                            help="the CPU recipe: the full recipe for the LeNets; for "
                                 "ResNet-18 its classic recipe on all the data for "
                                 f"{config.CPU_EPOCHS} epochs at 64x64")

    def validate(self, args) -> None:
        args.archs = args.archs or list(config.CPU_RECIPE_ARCHS if args.cpu else ARCHS)
        unknown = [a for a in args.archs if a not in models.list_models()]
        if unknown:
            raise UsageError(f"unknown --archs {', '.join(unknown)}; valid names: "
                             + ", ".join(models.list_models()))

    def runs(self, args, overrides) -> list[Run]:
        runs = []
        for recipe in args.recipe:
            for arch in args.archs:
                cpu = config.cpu_overrides(arch) if args.cpu else {}
                run_config = TrainConfig.from_recipe(arch, recipe, **{**cpu, **overrides})
                runs.append(Run(run_name(run_config), run_config))
        return runs

    def report(self, out: Path, runs: list[RunRecord], args) -> None:
        order = models.list_models()
        runs = sorted((r for r in runs if r.config.arch in order),
                      key=lambda r: (order.index(r.config.arch), r.config.recipe != "classic",
                                     KINDS.index(kind(r.config)), r.config.epochs))
        lines = header("Reproducing the reference results", runs)
        for name, meaning in KIND_MEANINGS.items():
            named = [r.name for r in runs if kind(r.config) == name]
            if named:
                lines.append(f"- {meaning}: {', '.join(named)}")
        lines += ["- each row's directory holds its config.json, run.json (command, date, "
                  "device, versions), metrics.json, curves.png and log.txt",
                  "", "| network | recipe | kind | settings | reference: loss / train / "
                      "test / ex/s | ours: loss / train / test / ex/s | test acc, ours - "
                      "reference (points) |",
                  "|---|---|---|---|---|---|---:|"]
        for run in runs:
            ref = reference.result(run.config.arch)
            theirs = ("-" if ref is None else
                      f"{ref['loss']:.3f} / {ref['train_acc']:.3f} / {ref['test_acc']:.3f} / "
                      f"{ref['examples_per_sec']:,.0f}")
            if run.diverged:
                ours, diff = f"diverged: {run.diverged}", "-"
            else:
                last = run.epochs[-1]
                ours = (f"{last['train_loss']:.3f} / {last['train_acc']:.3f} / "
                        f"{last['test_acc']:.3f} / {examples_per_sec(run.metrics):,.0f}")
                diff = ("-" if ref is None
                        else f"{100 * (last['test_acc'] - ref['test_acc']):+.1f}")
            marked = {"cpu": "**cpu**", "quick": "**quick**"}.get(kind(run.config),
                                                                 kind(run.config))
            lines.append(f"| [`{run.config.arch}`]({run.name}/) | {run.config.recipe} | {marked} "
                         f"| {settings(run.config)} | {theirs} | {ours} | {diff} |")
        lines += ["", "The reference runs the book's PyTorch code (cnnjax/d2l_reference.json); "
                      "its examples/sec were measured on CUDA GPUs it does not name, ours on "
                      "the device above, so compare those only between runs on one device. "
                      "The reference figures are for the classic recipe, also in the modern "
                      "rows."]
        lines += ["", "![test accuracy of every run](test_acc.png)", ""]
        (out / "REPORT.md").write_text("\n".join(lines))
        plot_test_accuracy(runs, out / "test_acc.png")
        write_summary(out / "summary.json", [
            {"run": r.name, "config": r.config.to_dict(),
             "full_recipe": r.config.is_full_recipe(), "kind": kind(r.config),
             "diverged": r.diverged,
             "final": r.epochs[-1] if r.epochs else None, "reference": reference.result(r.config.arch),
             "date": r.date, "command": r.info.get("command")} for r in runs])


def plot_test_accuracy(runs: list[RunRecord], path: Path) -> None:
    fig, ax = new_figure(figsize=(7, 4.5))
    for run in runs:
        label = (run.config.arch + (", modern" if run.config.recipe == "modern" else "")
                 + {"full": "", "longer": f" ({run.config.epochs} ep)",
                    "cpu": " (CPU recipe)", "quick": " (quick)"}[kind(run.config)])
        ax.plot([e["epoch"] for e in run.epochs], [e["test_acc"] for e in run.epochs],
                "--o" if run.config.recipe == "modern" else "-o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="test accuracy")
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=7, ncol=2)
    devices = sorted({r.metrics["device"] for r in runs if r.metrics})
    save_figure(fig, path, f"test accuracy, {', '.join(devices)}")


def main(argv: list[str] | None = None) -> int:
    return Reproduce().main(argv)


if __name__ == "__main__":
    sys.exit(main())
