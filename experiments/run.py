"""Train a network of the book on Fashion-MNIST (or print its summary).

    python -m experiments.run --arch lenet_bn              # the book's recipe
    python -m experiments.run --arch resnet18 --recipe modern
    python -m experiments.run --arch googlenet --epochs 1 --max-train 2048
    python -m experiments.run --resume runs/lenet_bn-20261121-120000
    python -m experiments.run --arch resnet18 --summary --resize 224
    python -m experiments.run --arch resnet18 --dtype bfloat16 --devices 4

Defaults are the notes' recipe for the network (`cnnjax.models.recipe`; --recipe
modern for momentum, weight decay, a cosine schedule and augmentation). A run writes
config.json, metrics.json, curves.png and a checkpoint per epoch into --out.
Training is data parallel over all devices (a Colab TPU's 8 cores, every GPU);
--batch-size is the global batch. Launched as one process per host of a cluster
(Cloud TPU pod, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS set), the processes
join with jax.distributed.initialize() and train together; there --out must be a
directory every host sees, and only process 0 writes into it and prints.

Exit codes: 0 done, 2 bad input (one line says what and how to fix it),
3 the loss diverged, 130 interrupted with Ctrl-C (resume with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from experiments.cli import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    ArgumentParser,
    UsageError,
    check_devices,
    check_resize,
    fail,
    non_negative_float,
    positive_float,
    positive_int,
)

FULL_TRAIN_SIZE = 60_000


def build_parser() -> ArgumentParser:
    from cnnjax import models

    names = ", ".join(models.list_models(extras=True))
    parser = ArgumentParser(
        prog="python -m experiments.run", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", metavar="NAME", help=f"network to train: {names}")
    parser.add_argument("--summary", action="store_true",
                        help="print each top-level block's output shape and parameter count "
                             "(at --resize) and exit without training")
    recipe = parser.add_argument_group("training settings (default: --recipe for --arch)")
    recipe.add_argument("--recipe", choices=("classic", "modern"),
                        help="classic: the notes' (plain SGD, constant lr; the default); "
                             "modern: momentum 0.9, weight decay 5e-4, cosine schedule "
                             "after 1 epoch of warm-up, random crops and flips")
    recipe.add_argument("--epochs", type=positive_int, help="passes over the training set")
    recipe.add_argument("--lr", type=positive_float, help="SGD learning rate")
    recipe.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="examples per SGD step (and per evaluation batch)")
    recipe.add_argument("--resize", type=positive_int, metavar="R",
                        help="resize the 28x28 images to RxR on the device (bilinear)")
    recipe.add_argument("--momentum", type=non_negative_float, metavar="M",
                        help="SGD momentum (default 0: plain SGD as in the book)")
    recipe.add_argument("--weight-decay", type=non_negative_float, metavar="WD",
                        help="L2 weight decay added to the gradient (default 0)")
    recipe.add_argument("--seed", type=int, help="seed for initialisation, shuffling and "
                                                 "dropout; same seed, settings and device "
                                                 "give the same numbers (default 0)")
    recipe.add_argument("--max-train", type=positive_int, metavar="N",
                        help="train on the first N training images only (quick runs)")
    recipe.add_argument("--max-test", type=positive_int, metavar="N",
                        help="evaluate on the first N test images only (quick runs)")
    recipe.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="computation dtype of convolutions and matmuls; params, "
                             "optimizer state, BN statistics and the loss stay float32 "
                             "(default float32)")
    devices = parser.add_argument_group("devices")
    devices.add_argument("--devices", type=positive_int, metavar="N",
                         help="train on the first N devices (default: all); N must divide "
                              "--batch-size")
    io = parser.add_argument_group("files")
    io.add_argument("--data-dir", metavar="DIR",
                    help="where TFDS keeps the prepared Fashion-MNIST (default: TFDS's, "
                         "~/tensorflow_datasets); prepared once, then reused")
    io.add_argument("--out", metavar="DIR",
                    help="output directory (default: runs/<arch>-<timestamp>); must be new "
                         "or empty unless --force")
    io.add_argument("--force", action="store_true",
                    help="replace whatever --out already holds")
    io.add_argument("--resume", metavar="DIR",
                    help="continue the run in DIR from its last checkpoint, with its settings "
                         "(--epochs may be raised to train longer; with a cosine schedule "
                         "that stretches the schedule over the new length, so the lr "
                         "jumps at the resume)")
    io.add_argument("--no-progress", action="store_true",
                    help="no progress bar, only a line per epoch (the default when the "
                         "output is not a terminal)")
    return parser


# Settings a user may pass; None means "not given on the command line".
_SETTINGS = ("epochs", "lr", "batch_size", "resize", "momentum", "weight_decay", "seed",
             "max_train", "max_test", "dtype", "recipe")


def resolve_config(args):
    """The run's TrainConfig: the recipe with the given flags, or, with --resume,
    the resumed run's settings (which the given flags must agree with)."""
    from cnnjax.train import TrainConfig

    given = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    if args.resume:
        config_file = Path(args.resume) / "config.json"
        if not Path(args.resume).is_dir():
            raise UsageError(f"--resume {args.resume}: no such directory")
        if not config_file.is_file():
            raise UsageError(f"--resume {args.resume}: not a cnnjax run (no config.json); "
                             "give the --out directory of an earlier run")
        try:
            saved = TrainConfig(**json.loads(config_file.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise UsageError(f"--resume {args.resume}: config.json is damaged ({err})") from None
        if args.arch is not None:
            given["arch"] = args.arch
        differ = [f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})"
                  for k, v in given.items() if k != "epochs" and getattr(saved, k) != v]
        if differ:
            raise UsageError(f"--resume {args.resume} continues a run with other settings: "
                             f"{'; '.join(differ)}; drop those flags, or start a new run "
                             "with a new --out")
        return dataclasses.replace(saved, epochs=given.get("epochs", saved.epochs))

    check_arch(args.arch)
    return TrainConfig.from_recipe(args.arch, given.pop("recipe", "classic"), **given)


def check_arch(arch: str | None) -> None:
    from cnnjax import models

    names = ", ".join(models.list_models(extras=True))
    if arch is None:
        raise UsageError(f"--arch is required (or --resume DIR); valid names: {names}")
    if arch not in models.list_models(extras=True):
        raise UsageError(f"unknown --arch {arch!r}; valid names: {names}")


def validate(config, args) -> None:
    """The checks that need no data, before anything is written."""
    import jax

    check_devices(config.batch_size, args.devices)
    if jax.process_count() > 1 and not (args.out or args.resume):
        raise UsageError(f"--out is required when training on {jax.process_count()} hosts: "
                         "a directory that every host sees (a shared file system)")

    available = min(config.max_train or FULL_TRAIN_SIZE, FULL_TRAIN_SIZE)
    if config.batch_size > available:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {available} "
                         "training examples; use a smaller --batch-size or a larger --max-train")
    check_resize(config.arch, config.resize)


def prepare_out_dir(config, args) -> Path:
    if args.resume:
        return Path(args.resume)
    out = Path(args.out or f"runs/{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            raise UsageError(f"--out {out} already holds files (another run?); continue it "
                             "with --resume, replace it with --force, or pick another --out")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    except OSError as err:
        raise UsageError(f"--out {out} cannot be written ({err.strerror})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    from cnnjax import models
    from cnnjax.parallel import setup_devices

    if not args.summary:
        setup_devices()  # before anything else touches the devices

    try:
        if args.summary:
            check_arch(args.arch)
            resize = args.resize or models.recipe(args.arch)["resize"]
            check_resize(args.arch, resize)
            print(models.summary(args.arch, resize=resize))
            return 0
        config = resolve_config(args)
        validate(config, args)
        return train(config, args, prog)
    except UsageError as err:
        return fail(prog, str(err))


def train(config, args, prog: str) -> int:
    import jax

    from cnnjax.checkpoint import CheckpointError
    from cnnjax.data import DataUnavailableError, load_fashion_mnist
    from cnnjax.parallel import PrimaryFailed, is_primary, primary_first
    from cnnjax.trainer import Diverged, Interrupted, book_summary, fit

    # With several hosts, process 0 prepares the data set and the output directory
    # (shared files) while the others wait, then they read what it made.
    try:
        data = primary_first(lambda: load_fashion_mnist(
            args.data_dir, max_train=config.max_train, max_test=config.max_test))
        out = primary_first(lambda: prepare_out_dir(config, args),
                            others=lambda: Path(args.resume or args.out))
    except DataUnavailableError as err:
        return fail(prog, str(err))
    except PrimaryFailed as err:
        return fail(prog, f"process {jax.process_index()}: {err}")
    resume_hint = f"python -m experiments.run --resume {out}"
    try:
        metrics = fit(config, data, out, resume=bool(args.resume), num_devices=args.devices,
                      progress=False if args.no_progress else None)
    except Interrupted as err:
        print(f"{prog}: interrupted ({err}); checkpoint saved. Resume with: {resume_hint}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"{prog}: interrupted at once; resume from the newest checkpoint with: "
              f"{resume_hint}", file=sys.stderr)
        if jax.process_count() > 1:
            # A normal exit would wait at JAX's shutdown barrier for processes that
            # are still stepping; they stop with an error once this one is gone.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except CheckpointError as err:
        return fail(prog, f"--resume {out}: {err}")
    except Diverged as err:
        return fail(prog, f"{err}; try a lower --lr (now {config.lr}). The last good "
                          f"checkpoint is in {out}/checkpoints", EXIT_DIVERGED)
    except Exception as err:  # noqa: BLE001 -- only out-of-memory is translated
        if "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err):
            return fail(prog, f"the device ran out of memory training {config.arch} with "
                              f"--batch-size {config.batch_size} at {config.resize}x"
                              f"{config.resize}; try a smaller --batch-size")
        raise
    if is_primary():
        print(book_summary(metrics))
        print(f"wrote {out}/metrics.json, {out}/curves.png and checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
