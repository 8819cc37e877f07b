"""Checkpoints of a run with orbax: the train state, the epoch's running totals and
where the run stands (epoch, batch, history), written atomically and verified when
read back."""

from __future__ import annotations

import errno
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax import lax

from cnnjax.steps import Totals, TrainState


class CheckpointError(Exception):
    """A checkpoint exists but cannot be read back (truncated, damaged or foreign files)."""


class DiskFull(Exception):
    """The disk filled up while a run was saving; the message says what was lost."""


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, is "no space left on device"
    (orbax and tensorstore wrap the OSError, or only keep its text)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@jax.jit
def fingerprint(tree: Any) -> dict[str, jax.Array]:
    """A 32-bit checksum of every array in `tree`, keyed by its path: the sum of its
    elements' bits, each weighted by an odd number that depends on its position, so
    that any changed, lost or swapped value changes the sum (modulo 2**32)."""
    def checksum(x: jax.Array) -> jax.Array:
        x = jnp.ravel(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        bits = lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        odd = (2 * jnp.arange(x.size, dtype=jnp.uint32) + 1) * jnp.uint32(2654435761)
        return jnp.sum(bits.astype(jnp.uint32) * odd, dtype=jnp.uint32)

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): checksum(leaf) for path, leaf in leaves}


def _host_fingerprint(tree: Any) -> dict[str, int]:
    return {path: int(value) for path, value in jax.device_get(fingerprint(tree)).items()}


class Checkpoints:
    """Saves and restores a run's checkpoints under `directory`, keeping the newest two.

    Orbax writes each checkpoint into a temporary directory and renames it to its step
    when complete, so a crash or a full disk while saving leaves the previous
    checkpoint the newest (leftover temporary directories are removed when the next
    run opens `directory`). A fingerprint of the arrays is saved beside them and
    checked on restore, so damaged data is found before training continues.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsilence: Callable[[], None] | None = None

    def save(self, state: TrainState, totals: Totals, progress: dict[str, Any]) -> None:
        """Save at the state's global step. The arrays are copied off the device
        before this returns; the files are written in the background (`wait`)."""
        tree = {"state": _state_tree(state), "totals": totals}
        progress = {**progress, "fingerprint": _host_fingerprint(tree)}
        self._unsilence = self._unsilence or _silence_failed_io()
        self._manager.save(int(state.step), args=ocp.args.Composite(
            train=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave(progress)))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, state: TrainState, totals: Totals
                ) -> tuple[TrainState, Totals, dict[str, Any]]:
        """Restore the newest checkpoint into the structure of `state` and `totals`.

        Raises:
          CheckpointError: the newest checkpoint cannot be read, or its arrays do not
            match their fingerprint; the message names it and says what to do. Older
            checkpoints are never used silently.
        """
        step = self.latest_step()
        target = {"state": _state_tree(state), "totals": totals}
        undo_silence = _silence_failed_io()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                train=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 -- orbax, tensorstore and json all raise
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            raise self._damaged(step, f"{type(err).__name__}: {reason}") from None
        undo_silence()
        tree, progress = restored["train"], restored["progress"]
        saved = progress.pop("fingerprint", None)
        if saved is not None:
            found = _host_fingerprint(tree)
            differ = [path for path in saved if found.get(path) != saved[path]]
            if differ or set(found) != set(saved):
                raise self._damaged(step, "its arrays do not match the fingerprint saved "
                                          f"with them: {', '.join(differ[:3]) or 'structure'}")
        return state.replace(**tree["state"]), tree["totals"], progress

    def _damaged(self, step: int, why: str) -> CheckpointError:
        older = [s for s in self._manager.all_steps() if s != step]
        fix = (f"delete {self.directory / str(step)} to resume from the checkpoint at "
               f"step {max(older)}, or " if older else "")
        return CheckpointError(f"the checkpoint at step {step} in {self.directory} is damaged "
                               f"({why}); {fix}start over with --out {self.directory.parent} "
                               "--force")

    def wait(self) -> None:
        """Block until every save has reached the disk; raises what the save raised
        (whose noise on stderr stays silenced: the caller reports it)."""
        try:
            self._manager.wait_until_finished()
        except Exception:
            self._unsilence = None  # more of the failure's noise may come: keep it quiet
            raise
        if self._unsilence:
            self._unsilence()
            self._unsilence = None

    def close(self) -> None:
        self._manager.close()

    def remove_incomplete(self) -> None:
        """Delete what a failed save left (orbax's temporary directories), to give
        back the space it took; the next run would delete them anyway."""
        for path in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _silence_failed_io() -> Callable[[], None]:
    """Silence the noise of a failed save or restore; returns a function that undoes
    this, for when the operation succeeded.

    When a write fails (e.g. the disk is full), orbax's writer thread logs the error
    and its traceback through absl; when a restore fails, orbax closes its event loop
    while tensorstore reads of the other arrays are still in flight, and as they
    finish their callbacks raise "Event loop is closed" as unraisable exceptions and
    asyncio logs "exception was never retrieved". The error itself still reaches our
    caller, which reports it in one line; this filters only that noise, from before
    the operation starts (the callbacks can fire before or after the error reaches
    us, so a failed operation leaves the filter in place).
    """
    loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
    previous_hook, previous_levels = sys.unraisablehook, [lg.level for lg in loggers]

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous_hook(unraisable)

    sys.unraisablehook = hook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)

    def undo():
        sys.unraisablehook = previous_hook
        for logger, level in zip(loggers, previous_levels):
            logger.setLevel(level)

    return undo
