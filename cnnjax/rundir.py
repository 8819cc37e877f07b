"""A run's directory: what it holds, and the rules for making, replacing and resuming it.

    config.json    the settings (`TrainConfig`), written first; a resume reads them
    run.json       how the run was made and where it stands: command, device,
                   layer set and start-up settings, versions, start and end dates,
                   status (running, finished, interrupted, diverged)
    metrics.json   per-epoch loss, accuracies and examples/sec (rewritten atomically
                   after every epoch)
    curves.png     train loss, train accuracy and test accuracy against epoch
    log.txt        the lines the run printed
    checkpoints/   orbax checkpoints, one per epoch (and one on an interruption)

`experiments.run` and every experiment use it, so a run looks the same wherever it
was made. With several hosts, only process 0 writes.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from cnnjax.config import TrainConfig

STATUSES = ("running", "finished", "interrupted", "diverged")


class RunDirError(Exception):
    """The directory cannot be used as asked; the message says why and what to do."""


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict[str, str]:
    """Python and the libraries that decide a run's numbers."""
    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class RunDir:
    """One run's directory (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / "config.json")
    run_file = property(lambda self: self.path / "run.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    curves_file = property(lambda self: self.path / "curves.png")
    log_file = property(lambda self: self.path / "log.txt")
    checkpoints = property(lambda self: self.path / "checkpoints")

    # --- making one --------------------------------------------------------------------

    @staticmethod
    def check_new(path: str | os.PathLike, force: bool = False) -> None:
        """Raise RunDirError unless a new run may be made in `path`: it does not
        exist, is an empty directory, or (`force`) may be replaced. Writes nothing."""
        path = Path(path)
        _check_utf8(path, "--out")
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--out {path} is a file; give a directory")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise RunDirError(f"--out {path} already holds files (another run?); continue it "
                              "with --resume, replace it with --force, or pick another --out")

    @classmethod
    def create(cls, path: str | os.PathLike, config: TrainConfig) -> RunDir:
        """A new run of `config` in `path`, replacing what is there (`check_new` says
        whether that may be done)."""
        run_dir = cls(path)
        try:
            if run_dir.path.is_dir():
                shutil.rmtree(run_dir.path)
            run_dir.path.mkdir(parents=True)
            run_dir.config_file.write_text(config.to_json())
        except OSError as err:
            raise RunDirError(f"--out {run_dir.path} cannot be written "
                              f"({err.strerror or err})") from None
        return run_dir

    # --- reading one -------------------------------------------------------------------

    def config(self) -> TrainConfig:
        """The run's settings. Raises RunDirError if this is not a run or its
        config.json is damaged."""
        _check_utf8(self.path, "--resume")
        if not self.path.is_dir():
            raise RunDirError(f"--resume {self.path}: no such directory")
        if not self.config_file.is_file():
            raise RunDirError(f"--resume {self.path}: not a cnnjax run (no config.json); "
                              "give the --out directory of an earlier run")
        try:
            return TrainConfig.from_json(self.config_file.read_text())
        except (ValueError, TypeError) as err:
            raise RunDirError(f"--resume {self.path}: config.json is damaged ({err})") from None

    def resume_config(self, given: dict[str, Any] | None = None) -> TrainConfig:
        """The settings to continue this run with: its own, where `given` (settings
        named on the command line) may only raise `epochs`; any other difference
        raises RunDirError, naming each."""
        saved = self.config()
        given = {k: v for k, v in (given or {}).items() if v is not None}
        differ = [f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})"
                  for k, v in given.items() if k != "epochs" and getattr(saved, k) != v]
        if differ:
            raise RunDirError(f"--resume {self.path} continues a run with other settings: "
                              f"{'; '.join(differ)}; drop those flags, or start a new run "
                              "with a new --out")
        return saved.replace(epochs=given.get("epochs", saved.epochs))

    def info(self) -> dict[str, Any]:
        """run.json, or {} if there is none."""
        return read_json(self.run_file) or {}

    @property
    def status(self) -> str | None:
        return self.info().get("status")

    def metrics(self) -> dict[str, Any] | None:
        return read_json(self.metrics_file)

    def has_checkpoint(self) -> bool:
        """Whether checkpoints/ holds a complete checkpoint (orbax names those by
        their step; one still being written has a temporary name)."""
        return self.checkpoints.is_dir() and any(
            p.name.isdigit() for p in self.checkpoints.iterdir())

    def check_resumable(self) -> None:
        """Raise RunDirError unless there is a checkpoint to resume from."""
        if not self.has_checkpoint():
            raise RunDirError(f"--resume {self.path}: there is no checkpoint to resume from "
                              f"in {self.checkpoints}; start over with --out {self.path} "
                              "--force")

    # --- writing while it runs ---------------------------------------------------------

    def start(self, command: str, **details: Any) -> None:
        """Record in run.json that the run (or its resumption) is starting, with
        `details` of how (device, layer set, start-up settings, ...)."""
        info = self.info()
        now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        started = info.get("started", [])
        if isinstance(started, str):
            started = [started]
        self._write_info({**info, "status": "running", "command": command,
                          "started": [*started, now], **details, "versions": versions()})

    def end(self, status: str, reason: str | None = None) -> None:
        """Record in run.json how the run ended (`status`, one of STATUSES)."""
        info = {**self.info(), "status": status,
                "ended": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        info.pop("reason", None)
        if reason:
            info["reason"] = reason
        self._write_info(info)

    def _write_info(self, info: dict[str, Any]) -> None:
        write_json(self.run_file, info)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics_file, metrics)

    def log(self, line: str) -> None:
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)


def _check_utf8(path: Path, flag: str) -> None:
    """Checkpoints are written by tensorstore, which takes only UTF-8 paths; a path
    with other bytes (possible on Linux) is refused here rather than deep inside it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        readable = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise RunDirError(f"{flag} {readable}: the path is not valid UTF-8, which the "
                          "checkpoint library cannot write; choose a path in UTF-8") from None
