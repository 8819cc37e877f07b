"""A run set up on the devices, where the trainer and the benchmark both start.

`check_settings` is the one place where a run's settings are checked against the
network, the devices and the data; `Prepared.create` then places the data and the
initial state over the mesh and compiles both steps ahead of time, so that
compilation is timed on its own. The compiled steps belong to the `Prepared`
object (each run jits the steps anew), so they are freed with it when a run ends.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import models
from cnnjax.config import TrainConfig, recipe_settings
from cnnjax.data import FashionMNIST, eval_batch_indices, train_batch_indices
from cnnjax.parallel import DataParallel
from cnnjax.steps import (Totals, TrainState, build_model, create_train_state, evaluate,
                          train_step, zero_totals)


class SettingsError(ValueError):
    """The settings do not fit the network, the devices or the data; the message
    names the setting as its flag and says what would fit."""


def check_input_size(arch: str, resize: int) -> None:
    """The network must leave every layer a non-empty output at `resize` x `resize`."""
    if not models.accepts_input(arch, resize):
        smallest = models.min_input_size(arch)
        raise SettingsError(f"--resize {resize} is too small for {arch}: its layers need at "
                            f"least {smallest}x{smallest} inputs (the book uses "
                            f"{recipe_settings(arch)['resize']})")


def check_settings(config: TrainConfig, num_train: int | None = None,
                   num_devices: int | None = None) -> None:
    """Raise SettingsError unless `config` can run here: the first `num_devices`
    devices (default: all) exist and split its batch evenly, the batch is no larger
    than the `num_train` training examples (when known), and the network takes its
    input size."""
    available = jax.device_count()
    if num_devices is not None and num_devices > available:
        raise SettingsError(f"--devices {num_devices}: there are only {available} "
                            f"{jax.default_backend()} devices here")
    if num_devices not in (None, available) and jax.process_count() > 1:
        raise SettingsError(f"--devices {num_devices}: on {jax.process_count()} hosts a run "
                            "uses every device")
    devices = num_devices or available
    if config.batch_size % devices:
        multiple = -(-config.batch_size // devices) * devices
        raise SettingsError(f"--batch-size {config.batch_size} is not divisible by the "
                            f"{devices} devices it is split over; use a multiple of {devices} "
                            f"(e.g. {multiple}) or choose --devices")
    if num_train is not None and config.batch_size > num_train:
        raise SettingsError(f"--batch-size {config.batch_size} is larger than the {num_train} "
                            "training examples; use a smaller --batch-size or a larger "
                            "--max-train")
    check_input_size(config.arch, config.resize)


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


@dataclasses.dataclass
class Prepared:
    """A run set up on the devices: the data and the initial state placed over the
    mesh, and both steps compiled ahead of time with the arrays they always read
    bound. Check the settings first (`check_settings`)."""

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
        parallel = DataParallel.create(num_devices)
        steps_per_epoch = num_train // config.batch_size

        # Everything the steps read stays on the devices for the whole run: the data and
        # state replicated, the batch index tables split along the batch axis.
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

        # Jitted here, not once for all runs: a jitted function keeps what it compiled
        # for every state structure it has seen, and each run's state is a new one.
        train = jax.jit(functools.partial(train_step, resize=config.resize,
                                          augment=config.augment),
                        donate_argnames=("state", "totals"))
        evaluate_all = jax.jit(functools.partial(evaluate, resize=config.resize))
        started = time.perf_counter()
        batches = jax.ShapeDtypeStruct((steps_per_epoch, config.batch_size), jnp.int32,
                                       sharding=parallel.batch_sharding(2, 1))
        train_args = (state, totals, arrays["train_images"], arrays["train_labels"], batches,
                      arrays["rng_key"])
        compiled_train = train.lower(*train_args).compile()
        compiled_eval = evaluate_all.lower(
            state, arrays["test_images"], arrays["test_labels"], arrays["test_batches"],
            arrays["test_masks"]).compile()
        compile_seconds = round(time.perf_counter() - started, 3)
        return cls(config, parallel, state, totals, num_train, num_test, steps_per_epoch,
                   compile_seconds, flops(train, *train_args), compiled_train, compiled_eval,
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
