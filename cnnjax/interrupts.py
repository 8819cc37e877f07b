"""How a run stops early: Ctrl-C or SIGTERM between two steps (`StopOnSignal`), and
the errors a run ends with when it does not finish (`Interrupted`, `Diverged`)."""

from __future__ import annotations

import signal

import jax

from cnnjax.parallel import max_over_processes


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped at a step boundary and saved a checkpoint,
    or (`finished`) the signal came after its last step, and the run finished."""

    def __init__(self, message: str, signum: int = signal.SIGINT, finished: bool = False):
        super().__init__(message)
        self.signum = signum
        self.finished = finished

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended:
        130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + self.signum


class Diverged(Exception):
    """The training loss stopped being finite."""


class StopOnSignal:
    """While active, Ctrl-C (SIGINT) or SIGTERM (what Colab, preemptible cloud VMs,
    SLURM and Kubernetes send before they stop a job) sets a flag that the loop checks
    between steps; a second one stops at once (KeyboardInterrupt).

    With several hosts, the signal may reach the processes at different steps (or
    reach only one), while a checkpoint save is a collective that all must join.
    There `stop_now` asks every process every `every` steps whether any of them
    was interrupted, so that all stop at the same step, save together and exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, every: int):
        self.signum: int | None = None
        self.every = every
        self.processes = jax.process_count()

    def __enter__(self) -> StopOnSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def stop_now(self, step: int) -> bool:
        if self.processes == 1:
            return self.signum is not None
        if step % self.every:
            return False
        # Every process learns the signal any of them got (0: none).
        self.signum = max_over_processes(self.signum or 0) or None
        return self.signum is not None

    def pending(self) -> int | None:
        """After the loop: the signal any process got, the same on all of them."""
        if self.processes > 1:
            self.signum = max_over_processes(self.signum or 0) or None
        return self.signum

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop at once
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc) -> None:
        self._restore()
