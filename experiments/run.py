"""Train a network of the book on Fashion-MNIST (or print its summary, or test PyTorch weights).

    python -m experiments.run --arch lenet_bn              # the book's recipe
    python -m experiments.run --arch resnet18 --recipe modern --lr 0.2 --no-augment
    python -m experiments.run --arch googlenet --epochs 1 --max-train 2048
    python -m experiments.run --resume runs/lenet_bn-20261121-120000
    python -m experiments.run --arch resnet18 --summary --resize 224
    python -m experiments.run --arch resnet18 --dtype bfloat16 --devices 4
    python -m experiments.run --arch lenet_bn --eval-only --torch-weights lenet_bn.pt

Every setting defaults to the book's recipe for the network (cnnjax.config; --recipe
modern for momentum, weight decay, a cosine schedule and augmentation); any flag
overrides it. A run writes config.json, run.json, metrics.json, curves.png, log.txt
and a checkpoint per epoch into --out. Training is data parallel over all devices
(a Colab TPU's 8 cores, every GPU); --batch-size is the global batch. Launched as one
process per host of a cluster (Cloud TPU pod, SLURM, Open MPI, or
JAX_COORDINATOR_ADDRESS set), the processes join with jax.distributed.initialize()
and train together; there --out must be a directory every host sees, and only
process 0 writes into it and prints.

On a CPU the networks are built from cnnjax's CPU kernels (cnnjax.cpu_kernels; the
same values, faster there; --no-cpu-kernels builds them from the plain layers), and
cnnjax.runtime.configure() turns XLA:CPU's YNNPACK fusions off, has glibc's malloc
keep freed memory and runs each step on the calling thread. run.json records the
layer set and these settings; set XLA_FLAGS, MALLOC_* or GLIBC_TUNABLES, or
JAX_CPU_ENABLE_ASYNC_DISPATCH to choose any of them yourself, or
CNNJAX_CPU_SETTINGS=off to leave all three out.

Exit codes: 0 done; 2 bad input, a damaged checkpoint or a full disk (one line says
what and how to fix it); 3 the loss diverged; 130 interrupted with Ctrl-C, 143 with
SIGTERM (a checkpoint is saved first; resume with --resume).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

import jax

from cnnjax import convert, models, runtime
from cnnjax.config import TrainConfig
from cnnjax.data import eval_batch_indices, load_fashion_mnist
from cnnjax.interrupts import Interrupted
from cnnjax.parallel import is_primary
from cnnjax.prepared import SettingsError, check_input_size
from cnnjax.rundir import RunDir, RunDirError
from cnnjax.steps import TrainState, build_model, evaluate, make_optimizer
from cnnjax.train import book_summary, train_and_evaluate
from experiments.cli import (
    UsageError,
    add_config_flags,
    command_line,
    config_overrides,
    fail,
    failure,
    interrupted,
    parser_for,
    positive_int,
)

def build_parser():
    parser = parser_for("experiments.run", __doc__)
    parser.add_argument("--summary", action="store_true",
                        help="print each top-level block's output shape and parameter count "
                             "(at --resize) and exit without training")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate on the test set instead of training: --arch with the "
                             "weights of --torch-weights (prints the test accuracy)")
    parser.add_argument("--torch-weights", metavar="FILE",
                        help="with --eval-only: the state_dict() of the book's PyTorch network "
                             "for --arch (as experiments/torch_reference.py builds it, for "
                             "--resize inputs), saved with torch.save; needs PyTorch")
    add_config_flags(parser)
    run = parser.add_argument_group("the run")
    run.add_argument("--out", metavar="DIR",
                     help="output directory (default: runs/<arch>-<timestamp>); must be new "
                          "or empty unless --force")
    run.add_argument("--force", action="store_true", help="replace whatever --out holds")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its last checkpoint, with its "
                          "settings (--epochs may be raised to train longer; with a cosine "
                          "schedule that stretches the schedule over the new length, so the "
                          "lr jumps at the resume)")
    run.add_argument("--data-dir", metavar="DIR",
                     help="where TFDS keeps the prepared Fashion-MNIST (default: TFDS's, "
                          "~/tensorflow_datasets); prepared once, then reused")
    run.add_argument("--devices", type=positive_int, metavar="N",
                     help="train on the first N devices (default: all); N must divide "
                          "--batch-size")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar, only a line per epoch (the default when the "
                          "output is not a terminal)")
    return parser


def resolve_config(args) -> TrainConfig:
    """The run's settings: the recipe with the given flags, or, with --resume, the
    resumed run's settings (which the given flags must agree with)."""
    given = config_overrides(args)
    if args.resume:
        return RunDir(args.resume).resume_config(given)
    if args.arch is None:
        raise UsageError("--arch is required (or --resume DIR); valid names: "
                         + ", ".join(models.list_models(extras=True)))
    return TrainConfig.from_recipe(given.pop("arch"), given.pop("recipe", "classic"), **given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.summary:
            if args.arch is None:
                raise UsageError("--summary needs --arch")
            resize = args.resize or TrainConfig.from_recipe(args.arch).resize
            check_input_size(args.arch, resize)
            print(models.summary(args.arch, resize))
            return 0
        runtime.configure()  # before anything starts JAX's devices
        runtime.warn_if_gpu_unused()
        config = resolve_config(args)
        if args.eval_only or args.torch_weights:
            return evaluate_torch_weights(config, args, prog)
        if jax.process_count() > 1 and not (args.out or args.resume):
            raise UsageError(f"--out is required when training on {jax.process_count()} "
                             "hosts: a directory that every host sees (a shared file system)")
        if not args.resume:
            args.out = args.out or f"runs/{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    except (UsageError, RunDirError, SettingsError) as err:
        return fail(prog, str(err))
    return train(config, args, prog, command_line("experiments.run", argv))


def evaluate_torch_weights(config: TrainConfig, args, prog: str) -> int:
    """--eval-only: the test accuracy of --arch with the PyTorch weights of
    --torch-weights (cnnjax.convert.from_torch), evaluated as training evaluates."""
    if not (args.eval_only and args.torch_weights) or args.resume:
        raise UsageError("--eval-only --torch-weights FILE (without --resume) evaluates "
                         "the PyTorch weights in FILE; give both flags")
    check_input_size(config.arch, config.resize)
    try:
        import torch
    except ImportError:
        raise UsageError("--torch-weights needs PyTorch: pip install torch") from None
    try:
        state_dict = torch.load(args.torch_weights, map_location="cpu", weights_only=True)
    except OSError as err:
        raise UsageError(f"cannot read --torch-weights {args.torch_weights}: "
                         f"{err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 -- whatever torch.load makes of other files
        raise UsageError(f"torch.load(weights_only=True) cannot read {args.torch_weights} "
                         f"({type(err).__name__}): not a file torch.save wrote, or one holding "
                         "more than tensors (save the network's state_dict())") from None
    if not isinstance(state_dict, Mapping):
        raise UsageError(f"{args.torch_weights} holds a {type(state_dict).__name__}, not a "
                         "state dict: save the network's state_dict()")
    try:
        variables = convert.from_torch(config.arch, state_dict, config.resize)
    except ValueError as err:
        raise UsageError(f"{args.torch_weights} does not hold the weights of {config.arch} "
                         f"for {config.resize}x{config.resize} inputs: {err}") from None
    try:
        data = load_fashion_mnist(args.data_dir, max_train=1, max_test=config.max_test,
                                  progress=False if args.no_progress else None)
        state = TrainState.create(apply_fn=build_model(config).apply, tx=make_optimizer(config),
                                  params=variables["params"],
                                  batch_stats=variables["batch_stats"])
        batches, masks = eval_batch_indices(len(data.test_labels), config.batch_size)
        evaluate_all = jax.jit(evaluate, static_argnames="resize")
        correct = int(evaluate_all(state, data.test_images, data.test_labels, batches, masks,
                                   resize=config.resize))
    except Exception as err:  # noqa: BLE001 -- what evaluating can end with is one line
        code = failure(prog, err, config)
        if code is None:
            raise
        return code
    total = len(data.test_labels)
    print(f"{config.arch} with the weights of {args.torch_weights}: test acc "
          f"{correct / total:.3f} ({correct}/{total} test images at "
          f"{config.resize}x{config.resize})")
    return 0


def train(config: TrainConfig, args, prog: str, command: str) -> int:
    out = args.resume or args.out
    try:
        metrics = train_and_evaluate(
            config, out, data_dir=args.data_dir, resume=bool(args.resume), force=args.force,
            num_devices=args.devices, command=command,
            progress=False if args.no_progress else None)
    except (Interrupted, KeyboardInterrupt) as err:
        then = (f"Its results are in {out}." if getattr(err, "finished", False)
                else f"Resume with: python -m experiments.run --resume {out}")
        code = interrupted(prog, err, then)
        if isinstance(err, KeyboardInterrupt) and jax.process_count() > 1:
            # A normal exit would wait at JAX's shutdown barrier for processes that
            # are still stepping; they stop with an error once this one is gone.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except Exception as err:  # noqa: BLE001 -- what a run can end with is one line
        code = failure(prog, err, config)
        if code is None:
            raise
        return code
    if is_primary():
        print(book_summary(metrics))
        print(f"wrote {out}/metrics.json, {out}/curves.png and checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
