"""The benchmark and reproduction CLIs, end to end on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bench_prints_a_json_line_and_a_table(fashion_mnist_dir, tmp_path):
    jsonl = tmp_path / "bench.jsonl"
    proc = run_module("experiments.bench", "--arch", "lenet", "--batch-size", "32",
                      "--windows", "2", "--steps", "2", "--data-dir", fashion_mnist_dir,
                      "--jsonl", str(jsonl))
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["arch"] == "lenet" and row["batch_size"] == 32 and row["resize"] == 28
    assert row["jax_img_per_s"] > 0 and len(row["jax_window_img_per_s"]) == 2
    assert row["flops_per_step"] > 1e6 and row["compile_s"] > 0 and row["data"] == "fashion_mnist"
    assert json.loads(jsonl.read_text()) == row
    assert "| lenet | 32 | 28x28 | float32 | 1 |" in proc.stdout


def test_bench_rejects_bad_input():
    proc = run_module("experiments.bench", "--arch", "resnet50")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown --arch resnet50" in proc.stderr
    proc = run_module("experiments.bench", "--arch", "alexnet", "--resize", "28")
    assert proc.returncode == 2 and "too small for alexnet" in proc.stderr


def test_reproduce_writes_a_report_marking_quick_rows(fashion_mnist_dir, tmp_path):
    proc = run_module("experiments.reproduce", "--archs", "lenet_bn_scratch", "--epochs", "1",
                      "--max-train", "512", "--max-test", "256", "--data-dir", fashion_mnist_dir,
                      "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "cpu" / "REPORT.md").read_text()
    assert "**quick** (not the notes' recipe; settings in each row) for lenet_bn_scratch" in report
    (row,) = [line for line in report.splitlines() if line.startswith("| [`lenet_bn_scratch`]")]
    # The notes' figures (note 001) beside ours.
    assert "| **quick** | 1 ep, lr 1.0, batch 256, 28x28, 512 train / 256 test images |" in row
    assert "0.267 / 0.902 / 0.842 / 21,185 (note 001)" in row
    metrics = json.loads((tmp_path / "cpu" / "lenet_bn_scratch" / "metrics.json").read_text())
    ours = metrics["epochs"][-1]["test_acc"]
    assert f"{100 * (ours - 0.842):+.1f} |" in row
    assert (tmp_path / "cpu" / "test_acc.png").read_bytes().startswith(b"\x89PNG")
