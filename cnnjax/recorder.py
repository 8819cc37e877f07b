"""What a run leaves in its directory as it goes (`Recorder`): checkpoints,
metrics.json, curves.png, log.txt and run.json (see `cnnjax.rundir` for the files)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from cnnjax import runtime
from cnnjax.checkpoint import Checkpoints, DiskFull, is_disk_full
from cnnjax.parallel import is_primary
from cnnjax.plots import plot_curves
from cnnjax.prepared import Prepared, describe_device
from cnnjax.rundir import RunDir
from cnnjax.steps import Totals, TrainState, layer_set


class Recorder:
    """What a run leaves in its directory as it goes: a checkpoint after every epoch
    (and when it stops early), then metrics.json and curves.png, the lines it prints
    in log.txt, and in run.json how it started and ended. Only process 0 writes
    files other than the checkpoints, which all processes save together. A full disk
    ends the run with DiskFull, after the run is marked interrupted."""

    def __init__(self, run_dir: RunDir, run: Prepared, log: Callable[[str], None]):
        self.run_dir, self.run, self.log = run_dir, run, log
        self.writer = is_primary()
        self.checkpoints: Checkpoints | None = Checkpoints(run_dir.checkpoints)
        config, kept = run.config, run.steps_per_epoch * run.config.batch_size
        self.metrics = {
            "arch": config.arch, "config": config.to_dict(), "device": describe_device(),
            "device_count": run.parallel.num_devices, "process_count": jax.process_count(),
            "compile_seconds": run.compile_seconds, "train_examples_per_epoch": kept,
            "dropped_per_epoch": run.num_train - kept, "test_examples": run.num_test,
            "epochs": []}

    def say(self, line: str) -> None:
        if not self.writer:
            return
        self.log(line)
        try:
            self.run_dir.log(line)
        except OSError:  # log.txt is a copy; a full disk is reported where it matters
            pass

    def start(self, command: str, resume: bool) -> tuple[TrainState, Totals, int, int]:
        """Record the start in run.json; returns the state, totals, epoch and batch
        to start from (the newest checkpoint's with `resume`)."""
        run, config = self.run, self.run.config
        state, totals, epoch, batch = run.state, run.totals, 0, 0
        if resume:
            state, totals, position = self.checkpoints.restore(state, totals)
            epoch, batch = position["epoch"], position["batch"]
            self.metrics["epochs"] = position["history"]
            self.say(f"resumed from {self.run_dir.path} at epoch {epoch + 1}, batch {batch}")
        if self.writer:
            self.run_dir.start(command, device=describe_device(),
                               device_count=run.parallel.num_devices,
                               process_count=jax.process_count(), layers=layer_set(config),
                               runtime=runtime.settings())
        self.say(f"training {config.arch} on {describe_device()} x{run.parallel.num_devices}: "
                 f"{config.epochs} epochs, lr {config.lr}, batch {config.batch_size}, "
                 f"{config.resize}x{config.resize}, {config.dtype}; {run.steps_per_epoch} "
                 f"steps/epoch ({self.metrics['dropped_per_epoch']} examples of the last "
                 "partial batch dropped, different ones each epoch); compiled in "
                 f"{run.compile_seconds:.1f}s")
        return state, totals, epoch, batch

    def save(self, state: TrainState, totals: Totals, epoch: int, batch: int,
             what: str) -> None:
        """Save the state at (epoch, batch) and wait until the checkpoint is on disk,
        so that nothing written after it (metrics.json) is ever ahead of it."""
        try:
            self.checkpoints.save(state, totals, {"epoch": epoch, "batch": batch,
                                                  "history": self.metrics["epochs"]})
            self.checkpoints.wait()
        except Exception as err:
            if is_disk_full(err):
                raise self._no_space(what) from None
            raise

    def add_epoch(self, state: TrainState, totals: Totals, record: dict) -> None:
        """Record a finished epoch: its checkpoint, then metrics.json and the curves."""
        self.metrics["epochs"].append(record)
        epoch, config, run = record["epoch"], self.run.config, self.run
        self.save(state, totals, epoch, 0, f"epoch {epoch}'s checkpoint")
        if self.writer:
            try:
                self.run_dir.write_metrics(self.metrics)
                plot_curves(self.metrics["epochs"], self.run_dir.curves_file,
                            f"{config.arch}, lr {config.lr}, batch {config.batch_size}, "
                            f"{config.resize}x{config.resize}, {config.dtype}, "
                            f"{describe_device()} x{run.parallel.num_devices}")
            except OSError as err:
                if is_disk_full(err):
                    raise self._no_space(f"epoch {epoch}'s metrics") from None
                raise
        self.say(f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.3f}, "
                 f"train acc {record['train_acc']:.3f}, test acc {record['test_acc']:.3f}, "
                 f"{record['examples_per_sec']:.1f} examples/sec, {record['seconds']:.1f}s")

    def end(self, status: str, reason: str | None = None, quiet: bool = False) -> None:
        """Close the checkpoints (`quiet`: ignoring their errors) and record how the
        run ended in run.json."""
        try:
            self.close(quiet)
        finally:
            if self.writer:
                try:
                    self.run_dir.end(status, reason)
                except OSError:  # e.g. the disk is full; the message says more
                    pass

    def close(self, quiet: bool = True) -> None:
        """Wait for the checkpoints being written, then release the checkpoint manager
        and its threads (once)."""
        checkpoints, self.checkpoints = self.checkpoints, None
        if checkpoints is None:
            return
        try:
            checkpoints.wait()
        except Exception:
            if not quiet:
                raise
        finally:
            checkpoints.close()

    def _no_space(self, what: str) -> DiskFull:
        """The error for a full disk, once the run is closed and marked interrupted."""
        err = DiskFull(f"no space left on device while saving {what} in {self.run_dir.path}; "
                       f"free space, then --resume {self.run_dir.path}")
        checkpoints = self.checkpoints
        self.close()  # quietly: the failed save is reported as `err`
        if checkpoints is not None:
            checkpoints.remove_incomplete()  # room to record the status in run.json
        self.end("interrupted", str(err))
        return err
