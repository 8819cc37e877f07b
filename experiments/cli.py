"""Pieces shared by the experiment CLIs: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import math
import sys

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # the training loss stopped being finite
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after the checkpoint is saved


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`run: error: ...`) and exit code 2,
    without the usage dump; `--help` still shows everything."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def parser_for(module: str, doc: str) -> ArgumentParser:
    """The CLI parser of `python -m module`: its docstring's first paragraph as the
    description and the rest (usage examples, what it writes) after the flags."""
    description, rest = doc.split("\n\n", 1)
    return ArgumentParser(prog=f"python -m {module}", description=description, epilog=rest,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print `prog: error: message` on stderr and return the exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def check_resize(arch: str, resize: int) -> None:
    """The network must leave every layer a non-empty output at `resize` x `resize`."""
    from cnnjax import models

    if not models.accepts_input(arch, resize):
        smallest = models.min_input_size(arch)
        raise UsageError(f"--resize {resize} is too small for {arch}: its layers need at "
                         f"least {smallest}x{smallest} inputs (the book uses "
                         f"{models.recipe(arch)['resize']})")


def check_devices(batch_size: int, devices: int | None) -> None:
    """`--devices` must exist, and the global batch must split evenly over them."""
    import jax

    available = jax.device_count()
    if devices is not None and devices > available:
        raise UsageError(f"--devices {devices}: there are only {available} "
                         f"{jax.default_backend()} devices here")
    num_devices = devices or available
    if batch_size % num_devices:
        multiple = -(-batch_size // num_devices) * num_devices
        raise UsageError(f"--batch-size {batch_size} is not divisible by the {num_devices} "
                         f"devices it is split over; use a multiple of {num_devices} "
                         f"(e.g. {multiple}) or choose --devices")
