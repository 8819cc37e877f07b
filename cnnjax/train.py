"""A whole training run, as `train_and_evaluate(config, workdir)`: the data on the
devices, the epoch loop, and what the run leaves in its directory (`RunDir`:
config.json, run.json, metrics.json, curves.png, log.txt, checkpoints/).

The loop dispatches one jitted step per batch with the same arguments each time
and never waits for the device, except where the progress bar reads the running
totals (every `refresh_every` steps) and once at the end of each epoch. Training
is data parallel over every device (or `num_devices` of them), see
`cnnjax.parallel`; with several hosts, only process 0 writes files and logs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cnnjax import runtime
from cnnjax.checkpoint import CheckpointError, Checkpoints, DiskFull, is_disk_full
from cnnjax.config import TrainConfig
from cnnjax.data import FashionMNIST, eval_batch_indices, load_fashion_mnist, train_batch_indices
from cnnjax.parallel import DataParallel, is_primary, max_over_processes, primary_first
from cnnjax.plots import plot_curves
from cnnjax.rundir import RunDir
from cnnjax.steps import (
    Totals,
    TrainState,
    build_model,
    create_train_state,
    evaluate,
    layer_set,
    train_step,
    zero_totals,
)


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


def describe_device() -> str:
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


def flops(jitted, *args, **static) -> float:
    """The FLOPs of `jitted(*args, **static)` as XLA's cost analysis counts them in the
    lowered, not yet optimized, program: after optimization a GPU's convolutions are
    cuDNN calls, which the analysis does not count. GPUs and TPUs (behind PJRT's C API)
    analyse no lowered program, so there the same program is lowered for the CPU,
    from the arguments' shapes alone, and counted there."""
    cost = jitted.lower(*args, **static).cost_analysis()
    if cost is None:
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
        with jax.default_device(jax.devices("cpu")[0]):
            cost = jitted.lower(*shapes, **static).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX returns a list
    return float(cost.get("flops", 0.0)) if cost else 0.0


class _StopOnSignal:
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

    def __enter__(self):
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

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: stop at once
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self._restore()


@dataclasses.dataclass
class Prepared:
    """A run set up on the devices, shared by `train_and_evaluate` and the
    benchmark: the data and
    the initial state placed over the mesh, and both steps compiled ahead of time
    (so compilation is timed on its own) with the arrays they always read bound."""

    config: TrainConfig
    parallel: DataParallel
    state: TrainState
    totals: Totals
    num_train: int
    num_test: int
    steps_per_epoch: int
    compile_seconds: float
    train_flops: float  # of one train step, as XLA counts them before optimizing
    compiled_train: Any  # jax.stages.Compiled
    compiled_eval: Any
    arrays: dict[str, jax.Array]  # what the compiled steps read besides state and batches
    _shuffle_key: jax.Array

    @classmethod
    def create(cls, config: TrainConfig, data: FashionMNIST,
               num_devices: int | None = None) -> Prepared:
        num_train, num_test = len(data.train_labels), len(data.test_labels)
        if config.batch_size > num_train:
            raise ValueError(f"batch size {config.batch_size} is larger than the "
                             f"{num_train} training examples")
        parallel = DataParallel.create(num_devices)
        if config.batch_size % parallel.num_devices:
            raise ValueError(f"batch size {config.batch_size} is not divisible by the "
                             f"{parallel.num_devices} devices")
        steps_per_epoch = num_train // config.batch_size

        # Everything the steps read stays on the devices for the whole run: the data
        # and state replicated, the batch index tables split along the batch axis.
        arrays = dict(zip(("train_images", "train_labels", "test_images", "test_labels"),
                          parallel.replicate((data.train_images, data.train_labels,
                                              data.test_images, data.test_labels))))
        arrays["test_batches"], arrays["test_masks"] = parallel.shard_batches(
            eval_batch_indices(num_test, config.batch_size))
        shuffle_key, rng_key, init_key = jax.random.split(jax.random.key(config.seed), 3)
        arrays["rng_key"] = jax.random.wrap_key_data(
            parallel.replicate(jax.random.key_data(rng_key)))
        state = create_train_state(config, build_model(config), init_key, parallel.replicated,
                                   steps_per_epoch)
        totals = parallel.replicate(zero_totals())

        started = time.perf_counter()
        batches = jax.ShapeDtypeStruct((steps_per_epoch, config.batch_size), jnp.int32,
                                       sharding=parallel.batch_sharding(2, 1))
        train_args = (state, totals, arrays["train_images"], arrays["train_labels"], batches,
                      arrays["rng_key"])
        train_static = dict(resize=config.resize, augment=config.augment)
        compiled_train = train_step.lower(*train_args, **train_static).compile()
        compiled_eval = evaluate.lower(
            state, arrays["test_images"], arrays["test_labels"], arrays["test_batches"],
            arrays["test_masks"], resize=config.resize).compile()
        compile_seconds = round(time.perf_counter() - started, 3)
        return cls(config, parallel, state, totals, num_train, num_test, steps_per_epoch,
                   compile_seconds, flops(train_step, *train_args, **train_static),
                   compiled_train, compiled_eval,
                   arrays, shuffle_key)

    def zero_totals(self) -> Totals:
        """Fresh running totals, replicated over the mesh like the state (with several
        hosts, a host-local array could be neither stepped on nor checkpointed)."""
        return self.parallel.replicate(zero_totals())

    def epoch_batches(self, epoch: int) -> jax.Array:
        """Epoch `epoch`'s shuffled (steps_per_epoch, batch_size) index table, split
        over the devices along the batch axis."""
        indices = train_batch_indices(jax.random.fold_in(self._shuffle_key, epoch),
                                      self.num_train, self.config.batch_size)
        return self.parallel.shard_batches(np.asarray(indices))

    def train_step(self, state: TrainState, totals: Totals, batches: jax.Array
                   ) -> tuple[TrainState, Totals]:
        """One compiled `steps.train_step` (it consumes `state` and `totals`)."""
        a = self.arrays
        return self.compiled_train(state, totals, a["train_images"], a["train_labels"],
                                   batches, a["rng_key"])

    def evaluate(self, state: TrainState) -> jax.Array:
        """Correct predictions on the whole test set (a device scalar)."""
        a = self.arrays
        return self.compiled_eval(state, a["test_images"], a["test_labels"],
                                  a["test_batches"], a["test_masks"])


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike | RunDir, *,
                       data: FashionMNIST | None = None, data_dir: str | None = None,
                       resume: bool = False, force: bool = False,
                       num_devices: int | None = None, command: str = "",
                       log: Callable[[str], None] = print, progress: bool | None = None,
                       keep_checkpoints: bool = True, refresh_every: int = 100) -> dict:
    """Train `config.arch` as `config` says and evaluate it after every epoch, in the
    run directory `workdir`; returns the content of metrics.json.

    `workdir` is made for a new run (refused if it holds another one, unless
    `force`), or with `resume` continued from its newest checkpoint. `data` is
    Fashion-MNIST as `cnnjax.data.load_fashion_mnist(data_dir)` gives it, loaded
    here if not given. The global batch is split over the first `num_devices`
    devices (default: all), which must divide `config.batch_size`. `progress` shows
    a progress bar (None: only when stderr is a terminal). `command` is recorded in
    run.json. Without `keep_checkpoints`, the checkpoints go once the run finishes.

    Raises:
      Interrupted: after Ctrl-C or SIGTERM, once the checkpoint is saved.
      Diverged: the loss became NaN or infinite (the last checkpoint is kept).
      DiskFull: a checkpoint or metrics.json could not be written for lack of space;
        metrics.json is never ahead of the newest complete checkpoint.
      RunDirError, CheckpointError: `workdir` cannot be used as asked.
    """
    if data is None:
        data = primary_first(lambda: load_fashion_mnist(
            data_dir, max_train=config.max_train, max_test=config.max_test))
    if isinstance(workdir, RunDir):
        run_dir = workdir
    elif resume:
        run_dir = RunDir(workdir)
    else:
        run_dir = primary_first(lambda: RunDir.create(workdir, config, force),
                                others=lambda: RunDir(workdir))
    writer = is_primary()
    if writer:
        def say(line: str) -> None:
            log(line)
            try:
                run_dir.log(line)
            except OSError:  # log.txt is a copy; a full disk is reported where it matters
                pass
    else:
        def say(line: str) -> None:
            pass

    if resume:
        run_dir.check_resumable()
    run = Prepared.create(config, data, num_devices)
    state, totals = run.state, run.totals
    steps_per_epoch = run.steps_per_epoch
    checkpoints = Checkpoints(run_dir.checkpoints)
    metrics = {"arch": config.arch, "config": config.to_dict(), "device": describe_device(),
               "device_count": run.parallel.num_devices, "process_count": jax.process_count(),
               "compile_seconds": run.compile_seconds,
               "train_examples_per_epoch": steps_per_epoch * config.batch_size,
               "dropped_per_epoch": run.num_train - steps_per_epoch * config.batch_size,
               "test_examples": run.num_test, "epochs": []}
    start_epoch, start_batch = 0, 0
    if resume:
        try:
            state, totals, position = checkpoints.restore(state, totals)
        except CheckpointError:
            checkpoints.close()
            raise
        start_epoch, start_batch = position["epoch"], position["batch"]
        metrics["epochs"] = position["history"]
        say(f"resumed from {run_dir.path} at epoch {start_epoch + 1}, batch {start_batch}")
    if writer:
        run_dir.start(command, device=describe_device(), device_count=run.parallel.num_devices,
                      process_count=jax.process_count(), layers=layer_set(config),
                      runtime=runtime.settings())
    say(f"training {config.arch} on {describe_device()} x{run.parallel.num_devices}: "
        f"{config.epochs} epochs, lr {config.lr}, batch {config.batch_size}, "
        f"{config.resize}x{config.resize}, {config.dtype}; {steps_per_epoch} steps/epoch "
        f"({metrics['dropped_per_epoch']} examples of the last partial batch dropped, "
        f"different ones each epoch); compiled in {run.compile_seconds:.1f}s")

    def no_space(what: str) -> DiskFull:
        """The error for a full disk, once the run is closed and marked interrupted."""
        err = DiskFull(f"no space left on device while saving {what} in {run_dir.path}; "
                       f"free space, then --resume {run_dir.path}")
        try:
            checkpoints.wait()
        except Exception:  # noqa: BLE001 -- the failed save, reported as `err`
            pass
        checkpoints.remove_incomplete()  # room to record the status in run.json
        end("interrupted", str(err), quiet=True)
        return err

    def commit(epoch: int, batch: int, what: str) -> None:
        """Save the state at (epoch, batch) and wait until the checkpoint is on disk,
        so that nothing written after it (metrics.json) is ever ahead of it."""
        try:
            checkpoints.save(state, totals, {"epoch": epoch, "batch": batch,
                                             "history": metrics["epochs"]})
            checkpoints.wait()
        except Exception as err:
            if is_disk_full(err):
                raise no_space(what) from None
            raise

    def end(status: str, reason: str | None = None, quiet: bool = False) -> None:
        """Close the checkpoints (`quiet`: ignoring their errors) and record how the
        run ended in run.json."""
        try:
            checkpoints.wait()
            checkpoints.close()
        except Exception:
            if not quiet:
                raise
        finally:
            if writer:
                try:
                    run_dir.end(status, reason)
                except OSError:  # e.g. the disk is full; the message says more
                    pass

    with _StopOnSignal(every=refresh_every) as stop:
        for epoch in range(start_epoch, config.epochs):
            batches = run.epoch_batches(epoch)
            first = start_batch if epoch == start_epoch else 0
            bar = tqdm(total=steps_per_epoch, initial=first,
                       desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False,
                       dynamic_ncols=True,
                       disable=not writer or ((not sys.stderr.isatty()) if progress is None
                                              else not progress))
            epoch_start = time.perf_counter()
            for batch in range(first, steps_per_epoch):
                if stop.stop_now(batch):
                    bar.close()
                    reason = f"stopped at epoch {epoch + 1}, batch {batch}"
                    commit(epoch, batch, f"the checkpoint of epoch {epoch + 1}, batch {batch}")
                    end("interrupted", reason)
                    raise Interrupted(reason, stop.signum)
                state, totals = run.train_step(state, totals, batches)
                bar.update()
                if (batch + 1) % refresh_every == 0:
                    bar.set_postfix(_postfix(totals, time.perf_counter() - epoch_start,
                                             (batch + 1 - first) * config.batch_size))
            host_totals = jax.device_get(totals)  # waits for the epoch's last step
            train_seconds = time.perf_counter() - epoch_start
            bar.close()
            if host_totals["first_nonfinite_step"] >= 0:
                step = int(host_totals["first_nonfinite_step"])
                kind = "NaN" if math.isnan(host_totals["loss_sum"]) else "infinite"
                reason = (f"the loss became {kind} in epoch {epoch + 1} at step {step + 1} "
                          f"(batch {step - epoch * steps_per_epoch + 1} of the epoch)")
                end("diverged", reason)
                raise Diverged(reason)

            test_acc = int(run.evaluate(state)) / run.num_test
            count = int(host_totals["count"])
            metrics["epochs"].append({
                "epoch": epoch + 1,
                "train_loss": float(host_totals["loss_sum"]) / count,
                "train_acc": int(host_totals["correct"]) / count,
                "test_acc": test_acc,
                # Examples trained on in this sitting of the epoch (after a resume,
                # only those since the resume), over the time they took.
                "examples_per_sec": (steps_per_epoch - first) * config.batch_size / train_seconds,
                "seconds": time.perf_counter() - epoch_start,
                "train_examples": (steps_per_epoch - first) * config.batch_size,
                "train_seconds": train_seconds,
            })
            totals = run.zero_totals()
            commit(epoch + 1, 0, f"epoch {epoch + 1}'s checkpoint")
            if writer:
                try:
                    run_dir.write_metrics(metrics)
                    plot_curves(metrics["epochs"], run_dir.curves_file,
                                f"{config.arch}, lr {config.lr}, batch {config.batch_size}, "
                                f"{config.resize}x{config.resize}, {config.dtype}, "
                                f"{describe_device()} x{run.parallel.num_devices}")
                except OSError as err:
                    if is_disk_full(err):
                        raise no_space(f"epoch {epoch + 1}'s metrics") from None
                    raise
            e = metrics["epochs"][-1]
            say(f"epoch {epoch + 1}/{config.epochs}: loss {e['train_loss']:.3f}, "
                f"train acc {e['train_acc']:.3f}, test acc {e['test_acc']:.3f}, "
                f"{e['examples_per_sec']:.1f} examples/sec, {e['seconds']:.1f}s")
    end("finished")
    if writer and not keep_checkpoints:
        run_dir.remove_checkpoints()
    if stop.pending():
        # The signal came after the last step was queued: the run is finished and
        # saved, and the caller (a sweep about to start its next run) must stop too.
        raise Interrupted("after the last step: the run finished", stop.signum, finished=True)
    return metrics


def _postfix(totals, seconds: float, examples: int) -> dict[str, str]:
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
    rate = examples_per_sec(metrics)
    return (f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, "
            f"test acc {last['test_acc']:.3f}\n"
            f"{rate:.1f} examples/sec on {metrics['device']}")

