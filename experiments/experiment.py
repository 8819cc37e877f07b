"""What the experiment CLIs (reproduce, bn_ablation, degradation) share: where
results go, training one run into its own directory, and reading runs back."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path


def device_kind() -> str:
    """The results directory's name for this machine: 'cpu', or the accelerator's
    kind (e.g. 'nvidia-h100-80gb-hbm3')."""
    import jax

    kind = jax.devices()[0].device_kind
    return "cpu" if jax.default_backend() == "cpu" else kind.lower().replace(" ", "-")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that was run, as a user would type it."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f"python -m {module} {args}".rstrip()


def train_run(config, data, run_dir: Path, command: str) -> dict:
    """Train `config` on `data` into a fresh `run_dir` and keep the numbers only:
    config.json, metrics.json, curves.png, log.txt and run.json (date and command);
    the checkpoints are removed. Returns the metrics."""
    from cnnjax.trainer import fit, write_json

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", config.to_dict())
    log_lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    metrics = fit(config, data, run_dir, log=log)
    (run_dir / "log.txt").write_text("\n".join(log_lines) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_json(run_dir / "run.json", {"date": time.strftime("%Y-%m-%d"), "command": command})
    return metrics


def load_runs(directory: Path) -> list[dict]:
    """Every finished run under `directory`: dicts with 'dir', 'config' (TrainConfig),
    'metrics' and 'run' (run.json), in directory-name order."""
    from cnnjax.train import TrainConfig

    runs = []
    for metrics_file in sorted(directory.glob("*/metrics.json")):
        run_dir = metrics_file.parent
        metrics = json.loads(metrics_file.read_text())
        run_file = run_dir / "run.json"
        runs.append({"dir": run_dir, "config": TrainConfig(**metrics["config"]),
                     "metrics": metrics,
                     "run": json.loads(run_file.read_text()) if run_file.is_file() else {}})
    return runs
