"""Checkpoints of a run with orbax: the train state, the epoch's running totals and
where the run stands (epoch, batch, history), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from cnnjax.train import Totals, TrainState


class Checkpoints:
    """Saves and restores a run's checkpoints under `directory`, keeping the newest two.

    Orbax writes each checkpoint into a temporary directory and renames it when
    complete, so a crash while saving leaves the previous checkpoint usable.
    """

    def __init__(self, directory: str | Path):
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

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
        """Restore the newest checkpoint into the structure of `state` and `totals`."""
        target = {"state": _state_tree(state), "totals": totals}
        restored = self._manager.restore(self.latest_step(), args=ocp.args.Composite(
            train=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
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
