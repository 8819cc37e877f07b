"""What the command-line tools share: the settings flags (one per `TrainConfig`
field), one-line errors and exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import typing
from typing import Any

import jax

from cnnjax import config
from cnnjax.checkpoint import CheckpointError, DiskFull
from cnnjax.config import TrainConfig
from cnnjax.data import DataUnavailableError
from cnnjax.interrupts import Diverged, Interrupted
from cnnjax.parallel import PrimaryFailed
from cnnjax.prepared import SettingsError
from cnnjax.rundir import RunDirError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # the training loss stopped being finite
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); 143 (128 + SIGTERM) for SIGTERM

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


def failure(prog: str, err: BaseException, config: TrainConfig | None = None) -> int | None:
    """Report an error a run can end with as one line on stderr and return its exit
    code, or return None for any other error (to be raised). The one place that maps
    what goes wrong to what the user reads, for every tool that trains."""
    if isinstance(err, Diverged):
        hint = f"; try a lower --lr (now {config.lr})" if config else ""
        return fail(prog, f"{err}{hint}. The last good checkpoint is kept", EXIT_DIVERGED)
    if isinstance(err, PrimaryFailed):
        return fail(prog, f"process {jax.process_index()}: {err}")
    if isinstance(err, (DataUnavailableError, RunDirError, CheckpointError, DiskFull,
                        SettingsError, UsageError)):
        return fail(prog, str(err))
    if "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err):
        what = (f"training {config.arch} with --batch-size {config.batch_size} at "
                f"{config.resize}x{config.resize}" if config else "this run")
        return fail(prog, f"the device ran out of memory {what}; try a smaller --batch-size")
    return None


def interrupted(prog: str, err: BaseException, then: str) -> int:
    """One line for a run stopped by Ctrl-C or SIGTERM (`Interrupted`, or a second
    signal's KeyboardInterrupt), ending with `then` (how to continue); its exit code."""
    if isinstance(err, Interrupted):
        name = signal.Signals(err.signum).name
        saved = "" if err.finished else "; checkpoint saved"
        print(f"{prog}: interrupted by {name} ({err}){saved}. {then}", file=sys.stderr)
        return err.exit_code
    print(f"{prog}: interrupted at once, without saving; {then}", file=sys.stderr)
    return EXIT_INTERRUPTED


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
