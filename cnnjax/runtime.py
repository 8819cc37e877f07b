"""Settings JAX reads once, when it starts its backends: apply them first.

`configure()` is the one function to call, before anything runs in JAX. The command
line tools call it first thing; in a notebook, call it in the first cell:

    import cnnjax.runtime
    cnnjax.runtime.configure()

Called later, the XLA settings come too late to matter (XLA reads them at start-up);
nothing breaks, they just do not apply. Importing cnnjax does not call it.

`warn_if_gpu_unused()` then says in one line when the machine has an NVIDIA GPU
that JAX does not use (JAX's CPU build installed: `pip install -e ".[cuda]"`).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
from typing import Any

import jax

# XLA:CPU hands some fusions (reductions, dots, element-wise chains) to YNNPACK (JAX
# 0.10 and later). Our train steps run faster without them on a CPU
# (docs/performance.md), and jaxlib 0.11.2 miscompiles one of them: a bfloat16
# max-pool followed by dense layers (VGG's and AlexNet's head) returns NaN. An empty
# list of YNN fusion types turns them off. GPUs and TPUs ignore the flag; jaxlibs
# before 0.10 may not know it, and XLA aborts on an unknown flag.
YNN_FUSIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type="
SIMULATED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def in_cluster() -> bool:
    """Whether the environment says this process is one of several in a JAX cluster:
    an explicit coordinator, a SLURM job of several tasks, an Open MPI launch, or a
    Cloud TPU slice with several hosts (a Colab TPU has one host: not a cluster)."""
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)


def xla_flags(flags: str, jax_version: tuple[int, ...]) -> str:
    """XLA_FLAGS with the YNN fusions turned off, unless the flags already choose
    (the user's choice wins) or this JAX predates the flag."""
    if jax_version < (0, 10) or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return flags
    return f"{flags} {YNN_FUSIONS_OFF}".strip()


def cpu_threads(flags: str, env_nproc: str | None) -> str | None:
    """The size of XLA's CPU thread pool (the NPROC variable) for N simulated CPU
    devices (XLA_FLAGS=--xla_force_host_platform_device_count=N), or None to leave it.

    XLA runs each device's all-reduce on a pool thread and blocks it until all N
    devices arrive; by default the pool has one thread per core, so with fewer
    threads than devices a run can deadlock (seen with 8 devices on 2 cores).
    Blocked threads cost no CPU, so the pool gets 2N + cores.
    """
    simulated = SIMULATED_DEVICES.search(flags)
    if not simulated or env_nproc is not None:
        return None
    return str(2 * int(simulated.group(1)) + (os.cpu_count() or 1))


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                    "GLIBC_TUNABLES")
ASYNC_DISPATCH_VARIABLE = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
CPU_SETTINGS_VARIABLE = "CNNJAX_CPU_SETTINGS"  # "off": configure() leaves XLA and malloc alone
_malloc_configured = False  # whether configure() changed glibc's malloc in this process


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a program frees for its next allocations;
    returns whether it did (Linux with glibc, and no malloc settings in the
    environment: the user's choice wins).

    XLA:CPU allocates a step's large buffers anew on every execution. By default
    glibc hands blocks over 32 MB (at most) straight from the kernel and gives them
    back on free, so on every step the kernel maps, faults and zeroes fresh pages
    (docs/performance.md has the measurements). Here the main heap serves large
    blocks too and keeps what is freed. Each thread keeps its own arena: XLA's
    worker threads allocate often, and one arena's lock would slow them down.
    """
    if not sys.platform.startswith("linux") or any(v in os.environ for v in MALLOC_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, for one)
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))


def configure() -> None:
    """Prepare JAX for training with cnnjax; call before anything runs in JAX.

    The CPU speed settings (the first and third below; CNNJAX_CPU_SETTINGS=off in
    the environment leaves them out, to compare or rule them out):

    - Turn XLA:CPU's YNNPACK fusions off (`xla_flags`).
    - With simulated CPU devices, size XLA's CPU thread pool for them (`cpu_threads`).
    - Have glibc's malloc keep freed memory for the next step (`keep_freed_memory`),
      and then run each CPU step on the thread that calls it (unless
      JAX_CPU_ENABLE_ASYNC_DISPATCH chooses). XLA allocates a step's buffers on the
      thread that runs it, and a worker thread's arena (heaps of 64 MB) maps any
      larger block fresh from the kernel whatever the settings; the main thread's
      heap keeps them. Python then waits for each step instead of queueing the next
      (no slower on the CPU, docs/performance.md). Steps over several CPU devices
      still run on XLA's threads.
    - In a cluster (`in_cluster()`), join it with `jax.distributed.initialize()`,
      which finds the coordinator, process count and id in the environment (SLURM,
      Open MPI, Cloud TPU), or in JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
      JAX_PROCESS_ID set by hand.
    """
    env = os.environ
    speed = env.get(CPU_SETTINGS_VARIABLE, "on") != "off"
    flags = env.get("XLA_FLAGS", "")
    if speed and xla_flags(flags, jax.__version_info__):
        flags = env["XLA_FLAGS"] = xla_flags(flags, jax.__version_info__)
    threads = cpu_threads(flags, env.get("NPROC"))
    if threads:
        env["NPROC"] = threads
    global _malloc_configured
    _malloc_configured = _malloc_configured or (speed and keep_freed_memory())
    if _malloc_configured and ASYNC_DISPATCH_VARIABLE not in env:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if in_cluster() and not jax.distributed.is_initialized():
        counts = {key: int(env[name]) for key, name in (("num_processes", "JAX_NUM_PROCESSES"),
                                                         ("process_id", "JAX_PROCESS_ID"))
                  if name in env}
        jax.distributed.initialize(**counts)


def settings() -> dict[str, Any]:
    """The start-up settings in effect in this process, as run.json records them:
    XLA_FLAGS, whether `configure()` made glibc's malloc keep freed memory, whether
    CPU steps are dispatched to XLA's threads (JAX's default) or run on the calling
    thread, and NPROC (XLA's CPU thread pool) where set. Each can be chosen in the
    environment instead (MALLOC_* or GLIBC_TUNABLES, JAX_CPU_ENABLE_ASYNC_DISPATCH,
    XLA_FLAGS, NPROC), which `configure()` leaves alone, and CNNJAX_CPU_SETTINGS=off
    leaves all the speed settings out."""
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""),
            "malloc_keeps_freed_memory": _malloc_configured,
            "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
            "nproc": os.environ.get("NPROC")}


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU, as its driver shows it: the device
    file /dev/nvidia0 or the `nvidia-smi` program."""
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def unused_gpu_warning(backend: str, nvidia_present: bool) -> str | None:
    """The warning for a machine with an NVIDIA GPU (`nvidia_present`) on which JAX
    runs on the CPU (`backend`, as `jax.default_backend()` names it), or None."""
    if backend != "cpu" or not nvidia_present:
        return None
    return ("warning: this machine has an NVIDIA GPU but JAX sees only the CPU; to train "
            'on the GPU: pip install -e ".[cuda]" (or pip install -U "jax[cuda12]")')


def warn_if_gpu_unused() -> None:
    """Print `unused_gpu_warning` for this machine on stderr if it applies, unless
    JAX_PLATFORMS chooses the platforms. Starts JAX's backends, so call it after
    `configure()`."""
    if os.environ.get("JAX_PLATFORMS"):
        return
    warning = unused_gpu_warning(jax.default_backend(), nvidia_gpu_present())
    if warning:
        print(warning, file=sys.stderr)
