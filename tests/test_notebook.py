"""The Colab notebook runs top to bottom in a Jupyter kernel on a CPU without internet
(its quick settings), draws the curves and the prediction grid, and is kept in the
repository without outputs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "cnnjax.ipynb"


def test_notebook_is_kept_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_a_cpu(fashion_mnist_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("CNNJAX_DATA_DIR", fashion_mnist_dir)
    monkeypatch.setenv("CNNJAX_WORKDIR", str(workdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")])))
    # On a machine with an accelerator the notebook would train the full recipe.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, if a cell fails.
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    def outputs_of(text: str) -> list[dict]:
        cell = next(c for c in nb.cells if c.cell_type == "code" and text in c.source)
        return cell.outputs

    def has_png(text: str) -> bool:
        return any("image/png" in o.get("data", {}) for o in outputs_of(text))

    assert has_png("curves.png") and has_png("prediction_grid(data.test_images")
    # The quick settings: the CPU's network on the subset, trained as configured.
    config = json.loads((workdir / "config.json").read_text())
    assert config["arch"] == "lenet_bn" and config["max_train"] is not None
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == config["epochs"]
    # The restored network's predictions score what the run's own evaluation scored
    # (the same forward pass, batched differently: at most one near-tie may flip).
    printed = "".join(o.get("text", "") for o in outputs_of("accuracy = "))
    found = re.fullmatch(r"test accuracy (\S+) on (\d+) images\n", printed)
    assert found and int(found[2]) == config["max_test"], printed
    assert abs(float(found[1]) - metrics["epochs"][-1]["test_acc"]) <= 1.5 / config["max_test"]
