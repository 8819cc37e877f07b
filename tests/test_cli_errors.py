"""Bad input costs the user one line: exit code 2, a message naming the problem and
the fix, no traceback, and nothing written to --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


BAD_INPUTS = [
    (["--arch", "resnet50"], "--arch: expected one of lenet, lenet_bn_scratch, lenet_bn, "
                             "alexnet"),
    ([], "--arch is required"),
    (["--arch", "lenet", "--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    (["--arch", "lenet", "--lr", "-0.1"], "--lr: expected a finite number > 0"),
    (["--arch", "lenet", "--lr", "fast"], "--lr: expected a finite number > 0, got 'fast'"),
    (["--arch", "lenet", "--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["--arch", "lenet", "--epochs", "0"], "--epochs: expected a whole number > 0, got 0"),
    (["--arch", "lenet", "--epochs", "2.5"], "--epochs: expected a whole number > 0, got '2.5'"),
    (["--arch", "lenet", "--batch-size", "-4"], "--batch-size: expected a whole number > 0"),
    (["--arch", "lenet", "--batch-size", "nan"], "--batch-size: expected a whole number > 0"),
    (["--arch", "lenet", "--max-train", "0"], "--max-train: expected a whole number > 0"),
    (["--arch", "lenet", "--max-test", "-1"], "--max-test: expected a whole number > 0"),
    (["--arch", "lenet", "--max-train", "100"],
     "--batch-size 256 is larger than the 100 training examples"),
    (["--arch", "alexnet", "--resize", "28"],
     "--resize 28 is too small for alexnet: its layers need at least 65x65"),
    (["--arch", "densenet", "--resize", "28", "--summary"],
     "--resize 28 is too small for densenet: its layers need at least 29x29"),
    (["--arch", "lenet", "--recipe", "fast"], "--recipe: expected one of classic, modern"),
    (["--arch", "lenet", "--schedule", "linear"], "--schedule: expected one of constant, cosine"),
    (["--arch", "lenet", "--momentum", "-0.5"], "--momentum: expected a finite number >= 0"),
    (["--arch", "lenet", "--augment", "yes"], "unrecognized arguments: yes"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) or "none" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(*args, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_out_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    proc = run_cli("--arch", "lenet", "--out", str(out), "--max-train", "256", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds files" in proc.stderr and "--resume" in proc.stderr
    assert "--force" in proc.stderr
    assert (out / "metrics.json").read_text() == "{}"


def test_out_that_cannot_be_written(tmp_path, fashion_mnist_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_cli("--arch", "lenet", "--out", str(blocker / "run"), "--max-train", "256",
                   "--max-test", "10", "--data-dir", fashion_mnist_dir, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot be written" in proc.stderr


def test_resume_errors(tmp_path):
    proc = run_cli("--resume", str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    proc = run_cli("--resume", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "not a cnnjax run" in proc.stderr

    run = tmp_path / "run"
    run.mkdir()
    config = {"arch": "lenet_bn", "epochs": 2, "lr": 1.0, "batch_size": 256, "resize": 28,
              "seed": 0, "momentum": 0.0, "weight_decay": 0.0, "max_train": 512, "max_test": 64}
    (run / "config.json").write_text(json.dumps(config))
    proc = run_cli("--resume", str(run), "--arch", "lenet", "--lr", "0.5", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--arch lenet (the run has lenet_bn)" in proc.stderr
    assert "--lr 0.5 (the run has 1.0)" in proc.stderr

    # A run whose checkpoints are gone cannot continue; starting over is the way out.
    proc = run_cli("--resume", str(run), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "there is no checkpoint to resume from" in line
    assert f"--out {run} --force" in line

    (run / "config.json").write_text(json.dumps({**config, "lr": -1}))
    proc = run_cli("--resume", str(run), cwd=tmp_path)
    assert proc.returncode == 2 and "config.json is damaged (lr: expected a finite number" \
        in proc.stderr


def test_missing_dataset_is_one_line(monkeypatch, capsys, tmp_path):
    from cnnjax import data
    from experiments import run

    def unavailable(*args, **kwargs):
        raise data.DataUnavailableError("Fashion-MNIST is not prepared ...: install Debian's copy")

    monkeypatch.setattr(run, "load_fashion_mnist", unavailable)
    code = run.main(["--arch", "lenet", "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_diverging_run_stops_with_exit_3(tmp_path, fashion_mnist_dir):
    # The book trains GoogLeNet with lr 0.1; at lr 10 the loss is NaN within a few steps.
    out = tmp_path / "run"
    proc = run_cli("--arch", "googlenet", "--lr", "10", "--resize", "32", "--batch-size", "64",
                   "--max-train", "512", "--max-test", "64", "--epochs", "2",
                   "--data-dir", fashion_mnist_dir, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("python -m experiments.run: error:")]
    assert "the loss became NaN in epoch 1 at step" in line and "lower --lr" in line
    assert not (out / "metrics.json").exists()  # no epoch finished
    assert not any((out / "checkpoints").iterdir())  # nothing non-finite was saved
