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
    (["--arch", "densenet", "--resize", "28", "--summary"],
     "--resize 28 is too small for densenet: its layers need at least 29x29"),
    (["--arch", "lenet", "--recipe", "fast"], "--recipe: expected one of classic, modern"),
    (["--arch", "lenet", "--schedule", "linear"], "--schedule: expected one of constant, cosine"),
    (["--arch", "lenet", "--momentum", "-0.5"], "--momentum: expected a finite number >= 0"),
    (["--arch", "lenet", "--augment", "yes"], "unrecognized arguments: yes"),
]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """`experiments.run`'s exit code and stderr, in this process (an argparse error
    exits through SystemExit, as it does on the command line)."""
    from experiments import run

    try:
        code = run.main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) or "none" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, stderr = run_main([*args, "--out", str(out)], capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert lines[0].startswith("python -m experiments.run: error: ")
    assert not out.exists()


# Settings that do not fit the data or the network: found once the data is loaded,
# before anything is written.
MISFITS = [
    (["--arch", "lenet", "--max-train", "100"],
     "--batch-size 256 is larger than the 100 training examples"),
    (["--arch", "alexnet", "--resize", "28"],
     "--resize 28 is too small for alexnet: its layers need at least 65x65"),
]


@pytest.mark.parametrize("args, message", MISFITS, ids=[" ".join(a) for a, _ in MISFITS])
def test_settings_that_do_not_fit_are_one_line_and_exit_2(args, message, fashion_mnist_dir,
                                                          tmp_path, capsys):
    code, stderr = run_main([*args, "--out", str(tmp_path / "out"), "--data-dir",
                             fashion_mnist_dir], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    # The same path as above, end to end in a fresh process.
    proc = run_cli("--arch", "lenet", "--lr", "0", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("python -m experiments.run: error: argument --lr: expected "
                                   "a finite number > 0, got 0 (see --help)")


def test_out_holding_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, stderr = run_main(["--arch", "lenet", "--out", str(out), "--max-train", "256"], capsys)
    assert code == 2
    assert "already holds files" in stderr and "--resume" in stderr and "--force" in stderr
    assert (out / "metrics.json").read_text() == "{}"


def test_out_that_cannot_be_written(tmp_path, fashion_mnist_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, stderr = run_main(["--arch", "lenet", "--out", str(blocker / "run"), "--max-train",
                             "256", "--max-test", "10", "--data-dir", fashion_mnist_dir], capsys)
    assert code == 2 and "cannot be written" in stderr


def test_resume_errors(tmp_path, fashion_mnist_dir, capsys):
    code, stderr = run_main(["--resume", str(tmp_path / "missing")], capsys)
    assert code == 2 and "no such directory" in stderr
    code, stderr = run_main(["--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a cnnjax run" in stderr

    run = tmp_path / "run"
    run.mkdir()
    config = {"arch": "lenet_bn", "epochs": 2, "lr": 1.0, "batch_size": 256, "resize": 28,
              "seed": 0, "momentum": 0.0, "weight_decay": 0.0, "max_train": 512, "max_test": 64}
    (run / "config.json").write_text(json.dumps(config))
    code, stderr = run_main(["--resume", str(run), "--arch", "lenet", "--lr", "0.5"], capsys)
    assert code == 2
    assert "--arch lenet (the run has lenet_bn)" in stderr
    assert "--lr 0.5 (the run has 1.0)" in stderr

    # A run whose checkpoints are gone cannot continue; starting over is the way out.
    code, stderr = run_main(["--resume", str(run), "--data-dir", fashion_mnist_dir], capsys)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert "there is no checkpoint to resume from" in line
    assert f"--out {run} --force" in line

    (run / "config.json").write_text(json.dumps({**config, "lr": -1}))
    code, stderr = run_main(["--resume", str(run)], capsys)
    assert code == 2 and "config.json is damaged (lr: expected a finite number" in stderr


def test_missing_dataset_is_one_line(monkeypatch, capsys, tmp_path):
    from cnnjax import data, train
    from experiments import run

    def unavailable(*args, **kwargs):
        raise data.DataUnavailableError("Fashion-MNIST is not prepared ...: install Debian's copy")

    monkeypatch.setattr(train, "load_fashion_mnist", unavailable)
    code = run.main(["--arch", "lenet", "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_diverging_run_stops_with_exit_3(tmp_path, fashion_mnist_dir):
    # SGD with momentum 1000 grows every step by about 1000x: the loss overflows in
    # the second epoch (of 8 steps each).
    out = tmp_path / "run"
    proc = run_cli("--arch", "lenet", "--lr", "1e10", "--momentum", "1000", "--batch-size", "64",
                   "--max-train", "512", "--max-test", "64", "--epochs", "3",
                   "--data-dir", fashion_mnist_dir, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("python -m experiments.run: error:")]
    assert "the loss became NaN in epoch 2 at step" in line and "lower --lr" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1  # the finished epoch is kept ...
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["8"]  # ... and saved,
    # nothing non-finite is
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "diverged" and info["reason"].startswith("the loss became NaN")


def test_out_that_is_not_utf8_is_one_line(tmp_path, capsys):
    out = os.fsdecode(os.fsencode(tmp_path) + b"/run-\xff")  # a valid Linux path, not UTF-8
    code, stderr = run_main(["--arch", "lenet", "--out", out], capsys)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert "run-\\xff: the path is not valid UTF-8" in line
    assert not os.path.exists(out)


def test_data_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code, stderr = run_main(["--arch", "lenet", "--max-train", "256", "--data-dir",
                             str(not_a_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert f"--data-dir {not_a_dir} is a file" in line
    assert not (tmp_path / "out").exists()
