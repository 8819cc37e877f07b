"""What the command-line tools share: the settings flags (one per `TrainConfig`
field), one-line errors and exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
from typing import Any

import jax

from cnnjax import config, models
from cnnjax.config import TrainConfig

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # the training loss stopped being finite
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after the checkpoint is saved

# The fields a recipe sets; their flags default to the recipe's values.
RECIPE_FIELDS = ("epochs", "lr", "batch_size", "resize", "momentum", "weight_decay",
                 "schedule", "warmup_epochs", "augment")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`prog: error: ...`) and exit code 2,
    without the usage dump; `--help` still shows everything."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def parser_for(module: str, doc: str) -> ArgumentParser:
    """The parser of `python -m module`: its docstring's first paragraph as the
    description and the rest (usage examples, what it writes) after the flags."""
    description, rest = doc.split("\n\n", 1)
    return ArgumentParser(prog=f"python -m {module}", description=description, epilog=rest,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print `prog: error: message` on stderr and return the exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that was run, as a user would type it."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"python -m {module} {args}".rstrip()


# --- the settings flags, made from TrainConfig's fields ---------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def flag_type(parse: type, check):
    """An argparse `type`: parse the text, then apply `check` (one of
    `cnnjax.config`'s), so a bad value fails on the command line with its message."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{check(None)}, got {text!r}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert


positive_int = flag_type(int, config.positive_int)
positive_float = flag_type(float, config.positive_float)


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    if field.name in RECIPE_FIELDS:
        return f"{text} (default: the recipe's)"
    if field.metadata["choices"] and field.name != "arch":
        text += f" [{', '.join(field.metadata['choices'])}]"
    if field.default is not None and field.name != "arch":
        text += f" (default: {field.default})"
    return text


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                     title: str = "training settings (TrainConfig; default: --recipe for "
                                  "--arch)") -> None:
    """A flag for every TrainConfig field not in `exclude`, in one argument group.
    Each defaults to None, meaning "not given": the recipe (or the resumed run)
    decides. Booleans get --NAME and --no-NAME."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(TrainConfig):
        if field.name in exclude:
            continue
        if _value_type(field) is bool:
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                               default=None, help=_help(field))
        else:
            group.add_argument(_flag(field.name), default=None,
                               type=flag_type(_value_type(field), field.metadata["check"]),
                               metavar=field.metadata["metavar"] or field.name.upper(),
                               help=_help(field))


def config_overrides(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings given on the command line (flags from `add_config_flags`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in exclude and getattr(args, f.name, None) is not None}


# --- checks that need the models ---------------------------------------------------------------

def check_resize(arch: str, resize: int) -> None:
    """The network must leave every layer a non-empty output at `resize` x `resize`."""
    if not models.accepts_input(arch, resize):
        smallest = models.min_input_size(arch)
        raise UsageError(f"--resize {resize} is too small for {arch}: its layers need at "
                         f"least {smallest}x{smallest} inputs (the book uses "
                         f"{config.recipe_settings(arch)['resize']})")


def check_devices(batch_size: int, devices: int | None) -> None:
    """`--devices` must exist, and the global batch must split evenly over them."""
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
