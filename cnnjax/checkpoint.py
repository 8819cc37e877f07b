"""Checkpoints of a run with orbax: the train state, the epoch's running totals and
where the run stands (epoch, batch, history), written atomically."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from cnnjax.steps import Totals, TrainState


class CheckpointError(Exception):
    """A checkpoint exists but cannot be read back (truncated, damaged or foreign files)."""


class Checkpoints:
    """Saves and restores a run's checkpoints under `directory`, keeping the newest two.

    Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp` and renames it
    when complete, so a crash while saving leaves the previous checkpoint usable
    (tests/test_reliability.py kills a process in the middle of a save to check this).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, totals: Totals, progress: dict[str, Any]) -> None:
        """Save at the state's global step. The arrays are copied off the device
        before this returns; the files are written in the background."""
        tree = {"state": _state_tree(state), "totals": totals}
        self._manager.save(int(state.step), args=ocp.args.Composite(
            train=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave(progress)))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, state: TrainState, totals: Totals
                ) -> tuple[TrainState, Totals, dict[str, Any]]:
        """Restore the newest checkpoint into the structure of `state` and `totals`.

        Raises:
          CheckpointError: the newest checkpoint cannot be read; the message names it
            and says what to do. Older checkpoints are never used silently.
        """
        step = self.latest_step()
        target = {"state": _state_tree(state), "totals": totals}
        undo_silence = _ignore_abandoned_reads()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                train=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 -- orbax, tensorstore and json all raise
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            older = [s for s in self._manager.all_steps() if s != step]
            fix = (f"delete {self.directory / str(step)} to resume from the checkpoint at "
                   f"step {max(older)}, or " if older else "")
            raise CheckpointError(f"the checkpoint at step {step} in {self.directory} is "
                                  f"damaged ({type(err).__name__}: {reason}); {fix}start "
                                  f"over with --out {self.directory.parent} --force") from None
        undo_silence()
        tree = restored["train"]
        return state.replace(**tree["state"]), tree["totals"], restored["progress"]

    def wait(self) -> None:
        """Block until every save has reached the disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _ignore_abandoned_reads() -> Callable[[], None]:
    """Silence the noise of a failed restore; returns a function that undoes this.

    When a restore fails, orbax closes its event loop while tensorstore reads of the
    other arrays are still in flight. As they finish, their callbacks raise "Event
    loop is closed" as unraisable exceptions, and asyncio logs their failures as
    "exception was never retrieved", each with a traceback around our one-line
    error. This filters exactly those, from just before the restore starts (the
    callbacks can fire before the exception reaches us).
    """
    asyncio_logger = logging.getLogger("asyncio")
    previous_hook, previous_level = sys.unraisablehook, asyncio_logger.level

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous_hook(unraisable)

    sys.unraisablehook = hook
    asyncio_logger.setLevel(logging.CRITICAL)

    def undo():
        sys.unraisablehook = previous_hook
        asyncio_logger.setLevel(previous_level)

    return undo
