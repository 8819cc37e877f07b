"""The accelerator call (`experiments.accelerator`): its CPU dry run goes through
every stage and returns what a GPU call returns; a second call keeps what finished;
the deadline stops what runs and starts nothing new."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from experiments import accelerator

ROOT = Path(__file__).resolve().parents[1]


def call(*args: str) -> subprocess.CompletedProcess:
    # Compile time, not speed, is what a dry run spends: XLA's unoptimised backend.
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    return subprocess.run([sys.executable, "-m", "experiments.accelerator", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_dry_run_goes_through_every_stage_and_a_second_call_keeps_it(fashion_mnist_dir,
                                                                      tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--dry-run", "--out", str(out), "--work", str(work), "--data-dir",
            fashion_mnist_dir, "--archs", "lenet_bn_scratch", "--tuned-seconds", "1"]
    proc = call(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {job["name"]: job["outcome"] for job in
            json.loads((out / "call.json").read_text())["jobs"]}
    for name in ("lenet_bn_scratch", "lenet_bn-modern", "bench-float32", "bench-bfloat16"):
        assert jobs[name] == "done", jobs
    if "bench-tuned" in jobs:  # with PyTorch: torch.compile is cut at --tuned-seconds
        assert jobs["bench-tuned"].startswith("stopped at its limit of 1 s"), jobs

    results = out / "results" / "cpu"
    runs = {row["run"] for row in json.loads((results / "summary.json").read_text())}
    assert {"lenet_bn_scratch-quick", "lenet_bn-modern-quick"} <= runs
    assert (results / "REPORT.md").is_file() and (results / "test_acc.png").is_file()
    assert (results / "lenet_bn_scratch-quick" / "curves.png").is_file()
    assert not list(out.rglob("checkpoints"))  # they stay in --work
    bench = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert sorted(row["dtype"] for row in bench if "jax_img_per_s" in row) == [
        "bfloat16", "float32"]
    with tarfile.open(out / "call.tar.gz") as tar:  # everything again, in one file
        packed = set(tar.getnames())
    assert {"call.json", "bench.jsonl", "results/cpu/REPORT.md",
            "results/cpu/lenet_bn_scratch-quick/curves.png"} <= packed
    assert not any("checkpoints" in name for name in packed)

    proc = call(*args, "--stages", "rows")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kept:" in (out / "logs" / "lenet_bn_scratch.log").read_text()


def test_the_deadline_stops_running_jobs_and_starts_no_more(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "MIN_START_SECONDS", 1)
    monkeypatch.setattr(accelerator, "GRACE_SECONDS", 5)
    sleep = ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(60)"]
    jobs = [accelerator.Job("first", sleep), accelerator.Job("limited", sleep, seconds=1),
            accelerator.Job("third", sleep)]
    calls = []
    start = time.monotonic()
    accelerator.run_jobs(jobs, 2, start + 3, dict(os.environ), tmp_path,
                         lambda: calls.append(1))
    assert time.monotonic() - start < 20
    first, limited, third = (job.outcome for job in jobs)
    assert first.startswith("stopped at the deadline")
    assert limited.startswith("stopped at its limit of 1 s")
    assert third.startswith("not started") or third.startswith("stopped at the deadline")
    assert len(calls) == sum(job.process is not None for job in jobs)
