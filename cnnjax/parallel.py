"""Data parallelism with JAX's own sharding: a 1-D device mesh named 'data'.

Each global batch is split along the mesh, so every device runs the forward and
backward pass on `batch_size / num_devices` examples. Parameters, batch-norm
statistics, optimizer state and the (small) Fashion-MNIST arrays are replicated.
Because the jitted step is written for the global batch, XLA inserts the
collectives itself: the gradient becomes an all-reduce, and batch norm's mean and
variance are reductions over the *global* batch, so N devices compute the same
math as one (up to the order of floating-point additions).

Several hosts: `cnnjax.runtime.configure` joins the cluster before anything
else touches JAX. Every host then holds the same data and draws the same batch
indices from the same key; each device gathers only its own slice of the global
batch, so each host feeds its part of it. Steps that touch shared files run on
process 0 first (`primary_first`); only process 0 writes logs and metrics. Tested
as a two-process cluster on one machine (tests/test_parallel.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
T = TypeVar("T")


class PrimaryFailed(Exception):
    """Process 0 failed at a step the other processes wait for (it reports why)."""


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files and prints (always true
    on one host)."""
    return jax.process_index() == 0


def primary_first(work: Callable[[], T], others: Callable[[], T] | None = None) -> T:
    """Run `work` on process 0, then, once it has returned, `others` (default: `work`)
    on the other processes: for steps that touch shared files, such as preparing
    the data set or the output directory. On one host this is just `work()`.

    If `work` raises on process 0, it raises there and the other processes raise
    `PrimaryFailed` instead of waiting forever.
    """
    if jax.process_count() == 1:
        return work()

    def tell_others(ok: bool) -> bool:
        return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

    if is_primary():
        try:
            result = work()
        except BaseException:
            tell_others(False)
            raise
        tell_others(True)
        return result
    if not tell_others(True):
        raise PrimaryFailed("process 0 stopped; its output says why")
    return (others or work)()


def sync_processes(name: str) -> None:
    """Wait until every process has got here (a collective; on one host, nothing)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
    """The largest of `value` over all processes (a collective: every process must call
    it at the same point; on one host it is just `value`)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.process_allgather(np.int32(value)).max())


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A 1-D 'data' mesh and the two ways an array is laid out over it."""

    mesh: Mesh

    @classmethod
    def create(cls, num_devices: int | None = None) -> DataParallel:
        """A mesh over the first `num_devices` devices (default: all of them, on all
        hosts)."""
        devices = jax.devices()
        if num_devices is not None:
            if not 1 <= num_devices <= len(devices):
                raise ValueError(f"asked for {num_devices} devices; there are {len(devices)}")
            if num_devices != len(devices) and jax.process_count() > 1:
                raise ValueError("a subset of devices is not supported on several hosts")
            devices = devices[:num_devices]
        return cls(Mesh(np.asarray(devices), (AXIS,)))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, ndim: int, batch_axis: int = 0) -> NamedSharding:
        """Split axis `batch_axis` of an `ndim`-dimensional array over the devices."""
        spec = [None] * ndim
        spec[batch_axis] = AXIS
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def replicate(self, tree: Any) -> Any:
        """Host (or single-device) arrays -> global arrays replicated on every device.
        Every process must pass the same values."""
        return jax.tree_util.tree_map(lambda x: _global_array(np.asarray(x), self.replicated),
                                      tree)

    def shard_batches(self, tree: Any) -> Any:
        """Arrays of shape (num_batches, batch_size, ...) -> global arrays whose batch
        axis (axis 1) is split over the devices."""
        return jax.tree_util.tree_map(
            lambda x: _global_array(np.asarray(x), self.batch_sharding(np.ndim(x), 1)), tree)


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # make_array_from_callback builds only this process's shards, so it works the
    # same on one host and on many.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
