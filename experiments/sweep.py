"""One driver for the experiments that train many runs (reproduce, bn_ablation,
degradation): each declares which runs it makes and how it reports them; the driver
trains them and rebuilds the report.

An experiment is a `Sweep`: a `runs(args)` list of named `TrainConfig`s and a
`report(out, runs)` that writes REPORT.md, a figure and summary.json from the runs
found on disk. The driver gives every experiment the same command line (a flag per
TrainConfig field the experiment does not set itself, applied to every run; --out,
--data-dir, --continue, --report-only), trains each run into
results/<device-kind>/[folder/]<run name>/ with `RunDir` (checkpoints are removed
once a run finishes), and after a Ctrl-C prints the command that continues.

- Without --continue every run starts afresh.
- With --continue, a run that finished with the same settings is kept, one that was
  interrupted continues from its checkpoint, and the rest are trained.
- The report is rebuilt from every run in the folder, this invocation's and earlier
  ones', so runs made at different times (or on a GPU later) add up.
"""

from __future__ import annotations

import abc
import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from cnnjax import runtime
from cnnjax.config import TrainConfig
from cnnjax.data import FashionMNIST, load_fashion_mnist
from cnnjax.interrupts import Diverged, Interrupted
from cnnjax.prepared import check_input_size
from cnnjax.rundir import RunDir, RunDirError, write_json
from cnnjax.train import train_and_evaluate
from experiments.cli import (
    EXIT_DIVERGED,
    ArgumentParser,
    UsageError,
    add_config_flags,
    command_line,
    config_overrides,
    fail,
    failure,
    interrupted,
    parser_for,
)


@dataclasses.dataclass(frozen=True)
class Run:
    """A run an experiment asks for: its directory name and its settings."""

    name: str
    config: TrainConfig


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run read back from disk: a finished one, or one that diverged."""

    dir: Path
    config: TrainConfig
    metrics: dict[str, Any] | None  # None if it diverged before an epoch ended
    info: dict[str, Any]  # run.json

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def diverged(self) -> str | None:
        """Why the run diverged, or None if it finished."""
        return self.info.get("reason", "diverged") if self.info["status"] == "diverged" else None

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return (self.metrics or {}).get("epochs", [])

    @property
    def date(self) -> str:
        return self.info.get("ended", "?")[:10]


def device_kind() -> str:
    """The results directory's name for this machine: 'cpu', or the accelerator's
    kind (e.g. 'nvidia-h100-80gb-hbm3')."""
    kind = jax.devices()[0].device_kind
    return "cpu" if jax.default_backend() == "cpu" else kind.lower().replace(" ", "-")


def load_runs(directory: Path) -> list[RunRecord]:
    """Every finished or diverged run directly under `directory`, by name."""
    records = []
    for path in sorted(p for p in directory.iterdir() if p.is_dir()):
        run_dir = RunDir(path)
        info = run_dir.info()
        if info.get("status") not in ("finished", "diverged"):
            continue  # interrupted or running: no row yet
        records.append(RunRecord(path, run_dir.config(), run_dir.metrics(), info))
    return records


class Sweep(abc.ABC):
    """An experiment over many runs. Subclasses set the class attributes and
    implement `runs` and `report` (and `add_flags` for flags of their own)."""

    module: str  # e.g. "experiments.reproduce"
    doc: str  # the module docstring: --help's description and epilog
    folder: str = ""  # under results/<device-kind>/
    own_settings: tuple[str, ...] = ("arch",)  # TrainConfig fields the sweep sets itself
    divergence_fails: bool = True  # exit 3 if a run diverged (else it is just a result)

    def add_flags(self, parser: ArgumentParser) -> None:
        """The experiment's own flags."""

    def validate(self, args) -> None:
        """Raise UsageError for flags that do not make sense together."""

    @abc.abstractmethod
    def runs(self, args, overrides: dict[str, Any]) -> list[Run]:
        """The runs to train, in order; `overrides` are the settings flags given."""

    @abc.abstractmethod
    def report(self, out: Path, runs: list[RunRecord], args) -> None:
        """Write REPORT.md, the figure and summary.json into `out` from `runs` (every
        run on disk there, finished or diverged)."""

    # --- the driver ------------------------------------------------------------------------

    def build_parser(self) -> ArgumentParser:
        parser = parser_for(self.module, self.doc)
        self.add_flags(parser)
        add_config_flags(parser, exclude=self.own_settings,
                         title="settings for every run (default: each run's recipe)")
        group = parser.add_argument_group("files")
        group.add_argument("--out", metavar="DIR", default="results",
                           help=f"results/<device-kind>/{self.folder + '/' if self.folder else ''}"
                                " goes here (default: results)")
        group.add_argument("--data-dir", metavar="DIR",
                           help="where TFDS keeps the prepared Fashion-MNIST (default: TFDS's)")
        group.add_argument("--continue", dest="continue_", action="store_true",
                           help="after a Ctrl-C: keep the runs that finished, continue the "
                                "interrupted one from its checkpoint, and train the rest "
                                "(without it, every run starts afresh)")
        group.add_argument("--report-only", action="store_true",
                           help="train nothing; rebuild the report from the runs on disk")
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        parser = self.build_parser()
        args = parser.parse_args(argv)
        prog = parser.prog
        try:
            self.validate(args)
            runs = self.runs(args, config_overrides(args, exclude=self.own_settings))
            # Each run checks all its settings as it starts; the input sizes, which
            # flags such as --resize change for every run, are checked for all runs
            # here, so that a bad flag fails before hours of training, not after.
            for run in runs:
                check_input_size(run.config.arch, run.config.resize)
        except (UsageError, ValueError) as err:
            return fail(prog, str(err))

        runtime.configure()
        out = Path(args.out) / device_kind() / self.folder
        out.mkdir(parents=True, exist_ok=True)
        if args.report_only:
            self.report(out, load_runs(out), args)
            print(f"wrote {out}/REPORT.md")
            return 0
        command = command_line(self.module, argv)
        diverged = []
        try:
            load = _data_loader(args.data_dir)
            for run in runs:
                print(f"== {run.name}: {_describe(run.config)}", flush=True)
                try:
                    self.train(run, out / run.name, load, command, args.continue_)
                except Diverged as err:
                    print(f"diverged: {err}", flush=True)
                    diverged.append(f"{run.name} ({err})")
        except (Interrupted, KeyboardInterrupt) as err:
            self.report(out, load_runs(out), args)  # with the runs finished so far
            again = command if " --continue" in command else f"{command} --continue"
            return interrupted(prog, err, "Runs that finished are kept; continue with: "
                                          + again)
        except Exception as err:  # noqa: BLE001 -- what a run can end with is one line
            code = failure(prog, err)
            if code is None:
                raise
            return code
        self.report(out, load_runs(out), args)
        print(f"wrote {out}/REPORT.md")
        if diverged and self.divergence_fails:
            return fail(prog, f"the loss diverged for {'; '.join(diverged)}", EXIT_DIVERGED)
        return 0

    @staticmethod
    def train(run: Run, path: Path, load: Callable[[TrainConfig], FashionMNIST],
              command: str, continue_: bool) -> None:
        """Train `run` into `path`: afresh, or with `continue_` keep a finished run of
        the same settings and continue an interrupted one."""
        run_dir = RunDir(path)
        try:
            same = run_dir.config() == run.config
        except RunDirError:
            same = False
        if continue_ and same and run_dir.status == "finished":
            print(f"kept: {path} finished earlier with these settings", flush=True)
            return
        resume = continue_ and same and run_dir.has_checkpoint()
        if not resume:
            run_dir = RunDir.create(path, run.config)
        train_and_evaluate(run.config, run_dir, data=load(run.config), resume=resume,
                           command=command, keep_checkpoints=False, progress=None)


def _data_loader(data_dir: str | None) -> Callable[[TrainConfig], FashionMNIST]:
    """Fashion-MNIST for a config's subset, each subset loaded once."""
    loaded: dict[tuple[int | None, int | None], FashionMNIST] = {}

    def load(config: TrainConfig) -> FashionMNIST:
        key = (config.max_train, config.max_test)
        if key not in loaded:
            loaded[key] = load_fashion_mnist(data_dir, max_train=key[0], max_test=key[1])
        return loaded[key]

    return load


def _describe(config: TrainConfig) -> str:
    return (f"{config.arch}, {config.recipe} recipe, {config.epochs} epochs, lr {config.lr}, "
            f"batch {config.batch_size}, {config.resize}x{config.resize}"
            + ("" if config.is_full_recipe() else " (not the full recipe)"))


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """summary.json: one row per run, for scripts."""
    write_json(path, rows)


def subset(config: TrainConfig) -> str:
    """", N train / M test images" for a run on part of the data, else ""."""
    if config.max_train is None and config.max_test is None:
        return ""
    return f", {config.max_train or 'all'} train / {config.max_test or 'all'} test images"


# Flags whose values are paths of the machine that ran a command.
MACHINE_PATHS = ("--out", "--data-dir")


def as_typed(command: str) -> str:
    """`command` as a user would type it anywhere: without the flags that name paths
    of the machine that ran it (the defaults then apply)."""
    words, typed = shlex.split(command), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in MACHINE_PATHS:
            skip = True
        elif not word.startswith(tuple(f"{flag}=" for flag in MACHINE_PATHS)):
            typed.append(word)
    return shlex.join(typed)


def header(title: str, runs: list[RunRecord]) -> list[str]:
    """A report's title and where its runs come from (devices, dates, commands)."""
    devices = sorted({r.metrics["device"] if r.metrics else r.info.get("device", "?")
                      for r in runs})
    dates = sorted({r.date for r in runs})
    commands = sorted({as_typed(r.info.get("command", "?")) for r in runs})
    return [f"# {title} on {', '.join(devices) or 'no device yet'}", "",
            f"- dates: {', '.join(dates)}",
            "- commands: " + "; ".join(f"`{c}`" for c in commands)]
