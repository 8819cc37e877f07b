"""Data parallelism with JAX's own sharding: a 1-D device mesh named 'data'.

Each global batch is split along the mesh, so every device runs the forward and
backward pass on `batch_size / num_devices` examples. Parameters, batch-norm
statistics, optimizer state and the (small) Fashion-MNIST arrays are replicated.
Because the jitted step is written for the global batch, XLA inserts the
collectives itself: the gradient becomes an all-reduce, and batch norm's mean and
variance are reductions over the *global* batch, so N devices compute the same
math as one (up to the order of floating-point additions).

Several hosts: `setup_devices` joins the cluster before anything
else touches JAX. Every host then holds the same data and draws the same batch
indices from the same key; each device gathers only its own slice of the global
batch, so each host feeds its part of it. Steps that touch shared files run on
process 0 first (`primary_first`); only process 0 writes logs and metrics. Tested
as a two-process cluster on one machine (tests/test_parallel.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
T = TypeVar("T")


class PrimaryFailed(Exception):
    """Process 0 failed at a step the other processes wait for (it reports why)."""


def in_cluster() -> bool:
    """Whether the environment says this process is one of several in a JAX cluster:
    an explicit coordinator, a SLURM job of several tasks, an Open MPI launch, or a
    Cloud TPU slice with several hosts (a Colab TPU has one host: not a cluster)."""
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)


# XLA:CPU hands some fusions (reductions, dots, element-wise chains) to YNNPACK. On
# 2 cores our train steps run up to 2x faster without them (docs/benchmarks.md,
# section 9), and jaxlib 0.11.2 miscompiles one of them: a bfloat16 max-pool followed
# by dense layers (VGG's and AlexNet's head) returns NaN
# (docs/bench/probes/ynn_bf16_nan.py). An empty list of YNN fusion types turns them
# off. JAX 0.10 and 0.11 know the flag; older jaxlibs may not, and XLA aborts on an
# unknown flag.
YNN_FUSIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def set_xla_cpu_flags() -> None:
    """Turn XLA:CPU's YNNPACK fusions off (JAX 0.10 and later): faster on the CPU
    and clear of a jaxlib 0.11 miscompilation. A no-op once JAX has started its
    backends, or where XLA_FLAGS already names the flag, which leaves it to you.
    GPUs and TPUs ignore it.

    `import cnnjax` calls it, so a notebook that imports cnnjax before running
    anything in JAX is covered; `setup_devices` calls it again.
    """
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if (jax.__version_info__ >= (0, 10) and "xla_cpu_experimental_ynn_fusion_type" not in flags
            and not xla_bridge.backends_are_initialized()):
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSIONS_OFF}".strip()


def setup_devices() -> None:
    """Prepare JAX's devices for data-parallel training; call before any other JAX call.

    - In a cluster (`in_cluster()`), join it with `jax.distributed.initialize()`,
      which finds the coordinator, process count and id in the environment (SLURM,
      Open MPI, Cloud TPU), or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
      JAX_PROCESS_ID set by hand.
    - Set XLA:CPU's flags (`set_xla_cpu_flags`).
    - With several *simulated* CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
      how one tries data parallelism on a laptop), size XLA's CPU thread pool for
      them (the NPROC variable, which XLA's CPU client reads when it starts). By
      default the pool has one thread per core; XLA runs each device's all-reduce on
      a pool thread and blocks it until all N devices arrive, so with fewer threads
      than devices the run can deadlock (seen with 8 devices on 2 cores within a few
      hundred steps). Blocked threads cost no CPU, so the pool gets 2N + cores.
    """
    set_xla_cpu_flags()
    if in_cluster() and not jax.distributed.is_initialized():
        # JAX reads JAX_COORDINATOR_ADDRESS itself; for a cluster it cannot detect,
        # the process count and id come from these two variables.
        env = os.environ
        counts = {key: int(env[name]) for key, name in (("num_processes", "JAX_NUM_PROCESSES"),
                                                         ("process_id", "JAX_PROCESS_ID"))
                  if name in env}
        jax.distributed.initialize(**counts)
    simulated = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                          os.environ.get("XLA_FLAGS", ""))
    if simulated and "NPROC" not in os.environ:
        from jax._src import xla_bridge  # NPROC is read when the CPU client starts

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("setup_devices() must run before anything uses JAX's devices")
        os.environ["NPROC"] = str(2 * int(simulated.group(1)) + (os.cpu_count() or 1))


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
    from jax.experimental import multihost_utils

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


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process must call
    it at the same point; on one host it is just `flag`)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(flag)).any())


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
