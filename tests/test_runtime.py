"""The warning for an NVIDIA GPU that JAX does not use: when it applies, how the GPU is
found, and that `experiments.run` prints it."""

from __future__ import annotations

import os
import shutil

import pytest

from cnnjax import runtime


def test_warning_only_for_a_gpu_left_unused():
    warning = runtime.unused_gpu_warning("cpu", nvidia_present=True)
    assert warning is not None and "\n" not in warning
    assert 'pip install -e ".[cuda]"' in warning and "jax[cuda12]" in warning
    assert runtime.unused_gpu_warning("cpu", nvidia_present=False) is None  # no GPU here
    assert runtime.unused_gpu_warning("gpu", nvidia_present=True) is None  # JAX uses it
    assert runtime.unused_gpu_warning("tpu", nvidia_present=False) is None


@pytest.mark.parametrize("device_file, smi, expected", [
    (False, None, False),
    (True, None, True),
    (False, "/usr/bin/nvidia-smi", True),
])
def test_nvidia_gpu_found_by_device_file_or_nvidia_smi(device_file, smi, expected, monkeypatch):
    exists = os.path.exists
    monkeypatch.setattr(os.path, "exists",
                        lambda p: device_file if p == "/dev/nvidia0" else exists(p))
    monkeypatch.setattr(shutil, "which", lambda name: smi if name == "nvidia-smi" else None)
    assert runtime.nvidia_gpu_present() is expected


def test_experiments_run_prints_the_warning_first(monkeypatch, tmp_path, capsys):
    from experiments import run

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(runtime, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(runtime.jax, "default_backend", lambda: "cpu")
    # A run refused before any data is read: the warning comes before the error.
    code = run.main(["--arch", "lenet", "--max-train", "100", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 2
    assert lines[0] == runtime.unused_gpu_warning("cpu", True)
    assert "--batch-size 256 is larger than the 100 training examples" in lines[1]


def test_no_warning_when_jax_platforms_is_chosen(monkeypatch, capsys):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(runtime, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(runtime.jax, "default_backend", lambda: "cpu")
    runtime.warn_if_gpu_unused()
    assert capsys.readouterr().err == ""
