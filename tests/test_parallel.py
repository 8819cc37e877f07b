"""Data parallelism: N devices compute the same training as one.

JAX fakes 8 CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=8,
which must be set before JAX starts, so these tests run in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import signalled_command

from cnnjax import runtime

ROOT = Path(__file__).resolve().parents[1]
EIGHT_CPU_DEVICES = "--xla_force_host_platform_device_count=8"


def run_python(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": EIGHT_CPU_DEVICES}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_eight_devices_train_like_one(fashion_mnist_dir, tmp_path):
    # 100 SGD steps of LeNet with batch norm on the real data, global batch 64:
    # once on 1 device, once split 8 ways (8 images per device). Batch norm's
    # statistics are over the global batch either way.
    proc = run_python(f"""
        from experiments.run import main
        # main() sets the devices up before JAX starts; nothing may touch them before.
        for n in (1, 8):
            code = main(["--arch", "lenet_bn", "--batch-size", "64", "--max-train", "6400",
                         "--max-test", "512", "--epochs", "1", "--devices", str(n),
                         "--data-dir", {fashion_mnist_dir!r}, "--no-progress",
                         "--out", {str(tmp_path)!r} + f"/devices{{n}}"])
            assert code == 0, code
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, eight = (json.loads((tmp_path / f"devices{n}" / "metrics.json").read_text())
                  for n in (1, 8))
    assert (one["device_count"], eight["device_count"]) == (1, 8)
    assert eight["train_examples_per_epoch"] == 100 * 64
    (a,), (b,) = one["epochs"], eight["epochs"]
    assert a["train_loss"] < 1.5 and a["test_acc"] > 0.6  # it learned (chance: 2.3, 0.1)
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert abs(a["test_acc"] - b["test_acc"]) <= 2 / 512  # at most 2 images flip


def test_state_is_replicated_and_batches_split(tmp_path):
    proc = run_python("""
        import jax, numpy as np
        from cnnjax import data, runtime
        from cnnjax.config import TrainConfig
        from cnnjax.prepared import Prepared

        runtime.configure()
        rng = np.random.default_rng(0)
        images = lambda n: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
        ds = data.FashionMNIST(images(256), labels(256), images(64), labels(64))
        config = TrainConfig(arch="lenet_bn", epochs=1, lr=0.5, batch_size=64, resize=28)
        run = Prepared.create(config, ds)
        assert run.parallel.num_devices == 8
        batches = run.epoch_batches(0)
        assert batches.sharding.spec == jax.sharding.PartitionSpec(None, "data")
        assert batches.addressable_shards[0].data.shape == (4, 8)  # 8 images per device
        state, totals = run.train_step(run.state, run.totals, batches)
        for leaf in jax.tree_util.tree_leaves((state, totals)):
            assert leaf.sharding.is_fully_replicated, leaf.sharding
        # The compiled step talks between devices only by all-reduce: no device
        # ever gathers the whole batch.
        text = run.compiled_train.as_text()
        assert "all-reduce" in text and "all-gather" not in text
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]


def start_cluster(args: list[str], processes: int = 2, devices_each: int = 2,
                  signal_first: tuple[int, int] | None = None) -> list[subprocess.Popen]:
    """Start `python -m experiments.run ARGS` as a cluster of `processes` processes on
    this machine, each with `devices_each` CPU devices, joined through a coordinator
    address as on real hosts (JAX's CPU collectives between processes use gloo).
    `signal_first` (signal, step): process 0 sends itself that signal during that
    training step (`conftest.signalled_command`)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = []
    for rank in range(processes):
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(rank)}
        command = [sys.executable, "-m", "experiments.run", *args]
        if rank == 0 and signal_first:
            command = signalled_command("experiments.run", args, *signal_first)
        started.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    return started


def finish(started: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    finished = []
    for proc in started:
        stdout, stderr = proc.communicate(timeout=600)
        finished.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return finished


def our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("python -m experiments.run")]


def test_two_hosts_train_like_one_device(fashion_mnist_dir, tmp_path):
    # Two processes with two devices each, as two hosts would run them, sharing the
    # output directory: 3 epochs of 32 steps, with Ctrl-C to process 0 alone during
    # batch 7 of epoch 2 (the processes agree at the start of each epoch, so both
    # stop at the start of epoch 3), then resumed; against the same run on one device.
    # At the recipe's lr of 1.0 with batch 64, 600 steps amplify the different order
    # of float32 additions to ~2e-4 (as between 1 and 4 devices in one process); at
    # lr 0.3 the runs agree to ~1e-6.
    common = ["--arch", "lenet_bn", "--batch-size", "64", "--lr", "0.3",
              "--max-train", "2048", "--max-test", "512", "--epochs", "3",
              "--data-dir", fashion_mnist_dir, "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "experiments.run", *common,
                          "--out", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert one.returncode == 0, one.stderr[-3000:]

    out = tmp_path / "cluster"
    host0, host1 = finish(start_cluster([*common, "--out", str(out)],
                                        signal_first=(signal.SIGINT, 32 + 8)))
    # Both stop at the same step and save it.
    assert (host0.returncode, host1.returncode) == (130, 130), (host0.stderr[-3000:],
                                                                 host1.stderr[-3000:])
    stops = [our_lines(proc.stderr) for proc in (host0, host1)]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    assert re.search(r"interrupted by SIGINT \(stopped at epoch 3, batch 0\); "
                     r"checkpoint saved", stops[0][0]), stops[0][0]

    host0, host1 = finish(start_cluster(["--resume", str(out)]))
    assert (host0.returncode, host1.returncode) == (0, 0), host0.stderr[-3000:]
    assert "resumed from" in host0.stdout and "wrote" in host0.stdout
    assert not re.search("resumed|epoch|loss|wrote", host1.stdout)  # only process 0 prints
    single, cluster = (json.loads((tmp_path / name / "metrics.json").read_text())
                       for name in ("one", "cluster"))
    assert (cluster["process_count"], cluster["device_count"]) == (2, 4)
    assert len(cluster["epochs"]) == 3
    for a, b in zip(single["epochs"], cluster["epochs"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert abs(a["test_acc"] - b["test_acc"]) <= 2 / 512
    assert single["epochs"][-1]["test_acc"] > 0.6  # it learned (chance is 0.1)

    # Bad input (here: --out is taken) stops every process, each with one line,
    # instead of leaving some waiting for the others.
    host0, host1 = finish(start_cluster([*common, "--out", str(out)], devices_each=1))
    assert (host0.returncode, host1.returncode) == (2, 2)
    for proc in (host0, host1):
        lines = our_lines(proc.stderr)
        assert len(lines) == 1 and "already holds files" in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_batch_not_divisible_by_devices_is_one_line(tmp_path, fashion_mnist_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": EIGHT_CPU_DEVICES}
    for args, message in [
        (["--batch-size", "100"], "--batch-size 100 is not divisible by the 8 devices it is "
                                  "split over; use a multiple of 8 (e.g. 104) or choose --devices"),
        (["--devices", "16"], "--devices 16: there are only 8 cpu devices here"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "experiments.run", "--arch", "lenet", *args,
                               "--out", str(tmp_path / "out"), "--data-dir", fashion_mnist_dir],
                              cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),  # an interactive one-task job
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # one TPU host (Colab)
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, True),  # a pod slice
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_cluster_detection(monkeypatch, env, expected):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runtime.in_cluster() is expected


def test_xla_flags_turn_ynn_fusions_off_unless_the_user_chose():
    off = runtime.YNN_FUSIONS_OFF
    assert runtime.xla_flags("", (0, 10, 2)) == off
    assert runtime.xla_flags("--xla_cpu_multi_thread_eigen=true", (0, 11, 2)) == \
        f"--xla_cpu_multi_thread_eigen=true {off}"
    mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    assert runtime.xla_flags(mine, (0, 11, 2)) == mine  # the user's choice is kept
    assert runtime.xla_flags("", (0, 9, 0)) == ""  # older XLA may not know the flag


def test_cpu_threads_for_simulated_devices():
    assert runtime.cpu_threads("--xla_force_host_platform_device_count=8", None) == \
        str(16 + (os.cpu_count() or 1))
    assert runtime.cpu_threads("--xla_force_host_platform_device_count=8", "4") is None
    assert runtime.cpu_threads("", None) is None


def test_import_changes_nothing_and_configure_sets_the_flags():
    code = textwrap.dedent("""
        import os
        before = dict(os.environ)
        import cnnjax, cnnjax.config, cnnjax.data, cnnjax.models, cnnjax.cpu_kernels, cnnjax.plots
        import cnnjax.runtime, cnnjax.steps, cnnjax.train
        import experiments.run, experiments.reproduce, experiments.bench
        print(dict(os.environ) == before)
        cnnjax.runtime.configure()
        print(os.environ.get("XLA_FLAGS"))
        import sys
        print("matplotlib.pyplot" in sys.modules)  # pyplot would pick a backend
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import jax

    expected = runtime.xla_flags("", jax.__version_info__) or "None"
    assert out.stdout.splitlines() == ["True", expected, "False"]


def test_cpu_settings_can_be_left_out_and_are_reported():
    code = textwrap.dedent("""
        import json
        from cnnjax import runtime
        runtime.configure()
        print(json.dumps(runtime.settings()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    reported = {}
    for choice in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, "CNNJAX_CPU_SETTINGS": choice}, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        reported[choice] = json.loads(out.stdout)
    assert reported["off"] == {"xla_flags": "", "malloc_keeps_freed_memory": False,
                               "cpu_async_dispatch": True, "nproc": None}
    assert reported["on"]["malloc_keeps_freed_memory"] is True
    assert reported["on"]["cpu_async_dispatch"] is False


FAULTS_PER_STEP = """
import resource, statistics, sys
from cnnjax import runtime
if sys.argv[1] == "configure":
    runtime.configure()
import jax, jax.numpy as jnp
from jax import lax

def loss(kernels, x):  # eight 3x3 convolutions, batch 64, 32x32x32: 144 MB of temporaries
    for k in kernels:
        x = jax.nn.relu(lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return x.sum()

step = jax.jit(jax.grad(loss))
kernels, x = [jnp.full((3, 3, 32, 32), 0.01)] * 8, jnp.ones((64, 32, 32, 32))
for _ in range(2):
    jax.block_until_ready(step(kernels, x))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(kernels, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))  # a step now and then still grows the heap
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_configure_keeps_freed_memory_so_steps_stop_faulting_in_fresh_pages():
    """XLA:CPU allocates a step's large buffers anew on every execution; with glibc's
    defaults each execution gets fresh pages from the kernel (thousands of page
    faults), after `configure()` it reuses the memory the last one freed. Only
    because the step then runs on the calling thread: dispatched to one of XLA's
    threads (the user's choice here), its 144 MB of temporaries exceed what a
    thread's arena keeps."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*runtime.MALLOC_VARIABLES, runtime.ASYNC_DISPATCH_VARIABLE)}
    faults = {}
    for mode, extra in (("default", {}), ("configure", {}),
                        ("configure", {runtime.ASYNC_DISPATCH_VARIABLE: "1"})):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True,
                             text=True, env={**env, **extra}, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[mode + (" async" if extra else "")] = float(out.stdout.split()[-1])
    assert faults["default"] > 20000 and faults["configure async"] > 20000, faults
    assert faults["configure"] < 200, faults


def test_keep_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert runtime.keep_freed_memory() is False
