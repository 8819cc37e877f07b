"""A run never loses work or misleads about why it stopped: kill -9 and SIGTERM
mid-epoch, a crash in the middle of a checkpoint save, damaged checkpoints, a full
disk and running out of memory, all through the CLI on the real Fashion-MNIST (small
subsets)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_signalled

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m experiments.run"
# 2 epochs of 100 steps.
SETTINGS = ("--arch", "lenet_bn", "--epochs", "2", "--batch-size", "128", "--max-train",
            "12800", "--max-test", "500", "--seed", "5", "--no-progress")
STEPS_PER_EPOCH = 12800 // 128
COMPARED = ("epoch", "train_loss", "train_acc", "test_acc")


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def final_numbers(out: Path) -> list[dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return [{k: e[k] for k in COMPARED} for e in metrics["epochs"]]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(fashion_mnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability") / "straight"
    proc = cli(*SETTINGS, "--data-dir", fashion_mnist_dir, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_kill_9_mid_epoch_then_resume_gives_the_same_numbers(uninterrupted, fashion_mnist_dir,
                                                             tmp_path):
    out = tmp_path / "killed"
    args = [*SETTINGS, "--data-dir", fashion_mnist_dir, "--out", str(out)]
    proc = run_signalled("experiments.run", args, signal.SIGKILL, STEPS_PER_EPOCH + 30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The kill landed inside epoch 2: only epoch 1 reached metrics.json and a checkpoint.
    assert len(final_numbers(out)) == 1
    assert checkpoint_steps(out)[-1] == STEPS_PER_EPOCH

    proc = cli("--resume", str(out), "--data-dir", fashion_mnist_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {out} at epoch 2, batch 0" in proc.stdout
    assert final_numbers(out) == final_numbers(uninterrupted)


def test_sigterm_saves_mid_epoch_exits_143_and_resumes_exactly(uninterrupted, fashion_mnist_dir,
                                                               tmp_path):
    # SIGTERM is what Colab, preemptible VMs, SLURM and Kubernetes send; it is handled
    # as Ctrl-C is (which the cluster and experiment tests send).
    out = tmp_path / "terminated"
    args = [*SETTINGS, "--data-dir", fashion_mnist_dir, "--out", str(out)]
    proc = run_signalled("experiments.run", args, signal.SIGTERM, STEPS_PER_EPOCH + 30)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith(f"{PROG}: interrupted")]
    # The signal came during batch 29 of epoch 2 (from 0): the run stops before batch 30.
    assert line == (f"{PROG}: interrupted by SIGTERM (stopped at epoch 2, batch 30); "
                    f"checkpoint saved. Resume with: {PROG} --resume {out}")
    assert checkpoint_steps(out)[-1] == STEPS_PER_EPOCH + 30  # a mid-epoch checkpoint
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    proc = cli("--resume", str(out), "--data-dir", fashion_mnist_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {out} at epoch 2, batch 30" in proc.stdout
    assert final_numbers(out) == final_numbers(uninterrupted)


def array_files(checkpoint: Path) -> list[Path]:
    """The files holding a checkpoint's array data (OCDBT's `d/` folders)."""
    return [p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"]


def test_damaged_checkpoint_is_one_line_and_exit_2(uninterrupted, fashion_mnist_dir, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    newest = checkpoint_steps(out)[-1]
    for path in array_files(out / "checkpoints" / str(newest)):  # truncate the data
        path.write_bytes(path.read_bytes()[:10])
    proc = cli("--resume", str(out), "--epochs", "3", "--data-dir", fashion_mnist_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith(f"{PROG}: error:")]
    assert f"the checkpoint at step {newest} in " in line and "is damaged" in line
    assert f"to resume from the checkpoint at step {STEPS_PER_EPOCH}" in line

    # Following the advice works: the older checkpoint resumes.
    shutil.rmtree(out / "checkpoints" / str(newest))
    proc = cli("--resume", str(out), "--data-dir", fashion_mnist_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert final_numbers(out) == final_numbers(uninterrupted)


def test_flipped_bytes_in_checkpoint_data_are_found(uninterrupted, fashion_mnist_dir, tmp_path):
    # Flipped bytes inside the array data still read back as arrays (of other
    # values); the fingerprint saved with them finds that before training goes on.
    out = tmp_path / "flipped"
    shutil.copytree(uninterrupted, out)
    newest = checkpoint_steps(out)[-1]
    biggest = max(array_files(out / "checkpoints" / str(newest)), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0x5A
    biggest.write_bytes(bytes(data))
    proc = cli("--resume", str(out), "--epochs", "3", "--data-dir", fashion_mnist_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith(f"{PROG}: error:")]
    assert f"the checkpoint at step {newest} in " in line and "is damaged" in line
    assert f"to resume from the checkpoint at step {STEPS_PER_EPOCH}" in line
    assert "--lr" not in line
    assert len(final_numbers(out)) == 2  # nothing was trained or written


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs: room for one checkpoint of the run below, not two. Needs root."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_is_one_line_and_loses_nothing(uninterrupted, fashion_mnist_dir, small_disk):
    out = small_disk / "run"
    proc = cli(*SETTINGS, "--data-dir", fashion_mnist_dir, "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line == (f"{PROG}: error: no space left on device while saving epoch 2's "
                    f"checkpoint in {out}; free space, then --resume {out}")
    # metrics.json is never ahead of the newest complete checkpoint, and the half-written
    # one is not taken for a checkpoint.
    assert len(final_numbers(out)) == 1 and checkpoint_steps(out) == [STEPS_PER_EPOCH]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    proc = cli("--resume", str(out), "--data-dir", fashion_mnist_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert final_numbers(out) == final_numbers(uninterrupted)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tmp_path):
    # A child process saves checkpoint 1, starts saving checkpoint 2 (400 MB, so
    # the write takes a while) and is killed before that save completes.
    script = textwrap.dedent("""
        import os, signal, sys
        import jax, jax.numpy as jnp
        from cnnjax import models
        from cnnjax.checkpoint import Checkpoints
        from cnnjax.config import TrainConfig
        from cnnjax.steps import create_train_state, zero_totals

        config = TrainConfig(arch="lenet", epochs=1, lr=0.1, batch_size=8, resize=28)
        state = create_train_state(config, models.get_model("lenet"), jax.random.key(0))
        checkpoints = Checkpoints(sys.argv[1])
        checkpoints.save(state.replace(step=1), zero_totals(), {"epoch": 1, "batch": 0})
        checkpoints.wait()
        big = {**zero_totals(), "ballast": jnp.ones((100_000_000,))}
        checkpoints.save(state.replace(step=2), big, {"epoch": 2, "batch": 0})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    directory = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(directory)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (directory / "2.orbax-checkpoint-tmp").is_dir()  # the save was cut short

    import jax

    from cnnjax import models
    from cnnjax.checkpoint import Checkpoints
    from cnnjax.config import TrainConfig
    from cnnjax.steps import create_train_state, zero_totals

    config = TrainConfig(arch="lenet", epochs=1, lr=0.1, batch_size=8, resize=28)
    state = create_train_state(config, models.get_model("lenet"), jax.random.key(1))
    checkpoints = Checkpoints(directory)
    assert checkpoints.latest_step() == 1
    restored, _, progress = checkpoints.restore(state, zero_totals())
    assert int(restored.step) == 1 and progress["epoch"] == 1
    checkpoints.close()


def test_out_of_memory_is_one_line_and_exit_2(fashion_mnist_dir, tmp_path):
    # A real allocation failure: NiN's first layer on 1024 images of 2000x2000
    # needs about 97 GB.
    proc = cli("--arch", "nin", "--batch-size", "1024", "--resize", "2000", "--max-train",
               "1024", "--max-test", "16", "--data-dir", fashion_mnist_dir,
               "--out", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith(f"{PROG}: error:")]
    assert "ran out of memory training nin with --batch-size 1024 at 2000x2000" in line
    assert "try a smaller --batch-size" in line


# Ten quick runs in one fresh process, as a notebook that re-runs its training cell or
# a sweep makes them; prints the resident memory (MiB) after each.
REPEATED_RUNS = textwrap.dedent("""
    import sys
    from cnnjax import runtime
    runtime.configure()
    from cnnjax.config import TrainConfig
    from cnnjax.data import load_fashion_mnist
    from cnnjax.train import train_and_evaluate

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    data_dir, out = sys.argv[1], sys.argv[2]
    data = load_fashion_mnist(data_dir, max_train=2048, max_test=512)
    config = TrainConfig.from_recipe("lenet_bn", epochs=1, max_train=2048, max_test=512)
    for i in range(10):
        train_and_evaluate(config, f"{out}/run{i}", data=data, log=lambda line: None,
                           progress=False)
        print(rss_mib(), flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_runs_in_one_process_leave_nothing_behind(fashion_mnist_dir, tmp_path):
    """What a run holds (its compiled steps, device arrays, checkpoint manager,
    figures) goes when it ends: memory stays flat over many runs in one process."""
    proc = subprocess.run([sys.executable, "-c", REPEATED_RUNS, fashion_mnist_dir,
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = [float(line) for line in proc.stdout.split()]
    assert len(rss) == 10
    assert rss[9] - rss[2] < 30, rss  # MiB; before runs released their steps: ~15 per run
