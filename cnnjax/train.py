"""A whole training run, `train_and_evaluate(config, workdir)`: set up, loop over
the epochs, save.

The loop dispatches one compiled step per batch with the same arguments each time
and never waits for the device, except where the progress bar reads the running
totals (every `refresh_every` steps) and once at the end of each epoch. Training
is data parallel over every device (or `num_devices` of them), see
`cnnjax.parallel`; with several hosts, only process 0 writes files and logs.
What a run writes as it goes is `cnnjax.recorder.Recorder`'s job; how it stops
early, `cnnjax.interrupts`'.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import jax
from tqdm.auto import tqdm

from cnnjax.config import TrainConfig
from cnnjax.data import FashionMNIST, load_fashion_mnist
from cnnjax.interrupts import Diverged, Interrupted, StopOnSignal
from cnnjax.parallel import is_primary, primary_first, sync_processes
from cnnjax.prepared import Prepared, check_settings
from cnnjax.recorder import Recorder
from cnnjax.rundir import RunDir
from cnnjax.steps import Totals, TrainState


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | RunDir,
                       data: FashionMNIST | None = None, *, data_dir: str | None = None,
                       resume: bool = False, force: bool = False,
                       num_devices: int | None = None, command: str = "",
                       log: Callable[[str], None] = print, progress: bool | None = None,
                       keep_checkpoints: bool = True, refresh_every: int = 100) -> dict:
    """Train `config.arch` as `config` says and evaluate it after every epoch, in the
    run directory `workdir`; returns the content of metrics.json.

    `data` is Fashion-MNIST as `cnnjax.data.load_fashion_mnist(data_dir)` gives it,
    loaded here if not given. `workdir` is made for a new run (refused if it holds
    another one, unless `force`), or with `resume` continued from its newest
    checkpoint. The global batch is split over the first `num_devices` devices
    (default: all). `progress` shows a progress bar (None: only when stderr is a
    terminal). `command` is recorded in run.json. Without `keep_checkpoints`, the
    checkpoints go once the run finishes.

    Raises:
      SettingsError, RunDirError, CheckpointError: the settings, `workdir` or its
        checkpoint cannot be used as asked (before anything is written).
      Interrupted: after Ctrl-C or SIGTERM, once the checkpoint is saved.
      Diverged: the loss became NaN or infinite (the last checkpoint is kept).
      DiskFull: a checkpoint or metrics.json could not be written for lack of space;
        metrics.json is never ahead of the newest complete checkpoint.
    """
    if data is None:
        data = primary_first(lambda: load_fashion_mnist(
            data_dir, max_train=config.max_train, max_test=config.max_test, progress=progress))
    check_settings(config, len(data.train_labels), num_devices)
    run_dir = _open_run_dir(workdir, config, resume, force)
    run = Prepared.create(config, data, num_devices)
    recorder = Recorder(run_dir, run, log)
    try:
        state, totals, start_epoch, start_batch = recorder.start(command, resume)
        with StopOnSignal(every=refresh_every) as stop:
            for epoch in range(start_epoch, config.epochs):
                first = start_batch if epoch == start_epoch else 0
                state, totals = _train_epoch(run, recorder, stop, state, totals, epoch, first,
                                             progress, refresh_every)
        recorder.end("finished")
    finally:
        recorder.close()
    if is_primary() and not keep_checkpoints:
        run_dir.remove_checkpoints()
    if stop.pending():
        # The signal came after the last step was queued: the run is finished and
        # saved, and the caller (a sweep about to start its next run) must stop too.
        raise Interrupted("after the last step: the run finished", stop.signum, finished=True)
    return recorder.metrics


def _open_run_dir(workdir: str | os.PathLike | RunDir, config: TrainConfig, resume: bool,
                  force: bool) -> RunDir:
    """The run's directory: `workdir` itself if it is a RunDir, else a new one (made
    by process 0, once every process has checked that it may be), or for `resume`
    one with a checkpoint."""
    if isinstance(workdir, RunDir):
        run_dir = workdir
    elif resume:
        run_dir = RunDir(workdir)
    else:
        RunDir.check_new(workdir, force)
        sync_processes("run directory checked")  # none makes it before all have checked
        return primary_first(lambda: RunDir.create(workdir, config),
                             others=lambda: RunDir(workdir))
    if resume:
        run_dir.check_resumable()
    return run_dir


def _train_epoch(run: Prepared, recorder: Recorder, stop: StopOnSignal, state: TrainState,
                 totals: Totals, epoch: int, first: int, progress: bool | None,
                 refresh_every: int) -> tuple[TrainState, Totals]:
    """Train epoch `epoch` from its batch `first`, evaluate, and record it; returns the
    state and fresh totals for the next epoch."""
    config, steps = run.config, run.steps_per_epoch
    batches = run.epoch_batches(epoch)
    show = recorder.writer and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="step", leave=False, dynamic_ncols=True, disable=not show)
    started = time.perf_counter()
    with bar:
        for batch in range(first, steps):
            if stop.stop_now(batch):
                reason = f"stopped at epoch {epoch + 1}, batch {batch}"
                recorder.save(state, totals, epoch, batch,
                              f"the checkpoint of epoch {epoch + 1}, batch {batch}")
                recorder.end("interrupted", reason)
                raise Interrupted(reason, stop.signum)
            state, totals = run.train_step(state, totals, batches)
            bar.update()
            if (batch + 1) % refresh_every == 0:
                bar.set_postfix(_postfix(totals, time.perf_counter() - started,
                                         (batch + 1 - first) * config.batch_size))
        host = jax.device_get(totals)  # waits for the epoch's last step
    train_seconds = time.perf_counter() - started
    if host["first_nonfinite_step"] >= 0:
        step = int(host["first_nonfinite_step"])
        kind = "NaN" if math.isnan(host["loss_sum"]) else "infinite"
        reason = (f"the loss became {kind} in epoch {epoch + 1} at step {step + 1} "
                  f"(batch {step - epoch * steps + 1} of the epoch)")
        recorder.end("diverged", reason)
        raise Diverged(reason)
    test_acc = int(run.evaluate(state)) / run.num_test
    count, trained = int(host["count"]), (steps - first) * config.batch_size
    totals = run.zero_totals()
    recorder.add_epoch(state, totals, {
        "epoch": epoch + 1, "train_loss": float(host["loss_sum"]) / count,
        "train_acc": int(host["correct"]) / count, "test_acc": test_acc,
        # Examples trained on in this sitting of the epoch (after a resume, only
        # those since the resume), over the time they took.
        "examples_per_sec": trained / train_seconds,
        "seconds": time.perf_counter() - started,
        "train_examples": trained, "train_seconds": train_seconds})
    return state, totals


def _postfix(totals: Totals, seconds: float, examples: int) -> dict[str, str]:
    t = jax.device_get(totals)
    count = max(int(t["count"]), 1)
    return {"loss": f"{float(t['loss_sum']) / count:.3f}",
            "acc": f"{int(t['correct']) / count:.3f}",
            "img/s": f"{examples / seconds:.0f}"}


def examples_per_sec(metrics: dict) -> float:
    """Training examples per second over all epochs, as `train_ch6` reports it."""
    epochs = metrics["epochs"]
    return sum(e["train_examples"] for e in epochs) / sum(e["train_seconds"] for e in epochs)


def book_summary(metrics: dict) -> str:
    """The two lines `train_ch6` ends with: final loss and accuracies, and the
    examples/sec over all epochs on the device."""
    last = metrics["epochs"][-1]
    return (f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, "
            f"test acc {last['test_acc']:.3f}\n"
            f"{examples_per_sec(metrics):.1f} examples/sec on {metrics['device']}")
