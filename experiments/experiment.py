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


def train_run(config, data, run_dir: Path, command: str, *, continue_: bool = False,
              log=print) -> dict:
    """Train `config` on `data` into `run_dir` and keep the numbers only:
    config.json, metrics.json, curves.png, log.txt and run.json (date and command;
    written last, so it marks a finished run); the checkpoints are removed at the end.

    With `continue_` (the CLIs' --continue, after a Ctrl-C), a run already in
    `run_dir` with the same config is not started again: a finished one is kept as
    it is, an unfinished one continues from its checkpoint. Returns the metrics.

    Raises what `fit` raises: Interrupted (checkpoint saved), Diverged.
    """
    from cnnjax.trainer import fit, write_json

    same_config = (_read_json(run_dir / "config.json")
                   == json.loads(json.dumps(config.to_dict())))
    finished = (run_dir / "run.json").is_file() and (run_dir / "metrics.json").is_file()
    if continue_ and same_config and finished:
        log(f"kept: {run_dir} finished earlier with this config")
        return json.loads((run_dir / "metrics.json").read_text())
    resume = continue_ and same_config and (run_dir / "checkpoints").is_dir()
    if not resume:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_json(run_dir / "config.json", config.to_dict())

    with open(run_dir / "log.txt", "a") as log_file:
        def log_line(line: str) -> None:
            log(line)
            log_file.write(line + "\n")
            log_file.flush()

        metrics = fit(config, data, run_dir, resume=resume, log=log_line)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_json(run_dir / "run.json", {"date": time.strftime("%Y-%m-%d"), "command": command})
    return metrics


def add_continue_flag(parser) -> None:
    """The experiments' --continue flag (read as `args.continue_`, for `train_run`)."""
    parser.add_argument("--continue", dest="continue_", action="store_true",
                        help="after a Ctrl-C: keep the runs that finished, continue the "
                             "interrupted one from its checkpoint, and train the rest "
                             "(without it, every run starts afresh)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def interrupted(prog: str, err: BaseException, command: str) -> int:
    """One line for a Ctrl-C in an experiment, and exit code 130."""
    from experiments.cli import EXIT_INTERRUPTED

    why = f" ({err})" if str(err) else ""
    again = command if " --continue" in command else f"{command} --continue"
    print(f"{prog}: interrupted{why}; runs that finished are kept, the one in progress "
          f"has a checkpoint. Continue with: {again}", file=sys.stderr)
    return EXIT_INTERRUPTED


def load_runs(directory: Path) -> list[dict]:
    """Every finished run under `directory` (one with run.json): dicts with 'dir',
    'config' (TrainConfig), 'metrics' and 'run' (run.json), in directory-name order."""
    from cnnjax.train import TrainConfig

    runs = []
    for metrics_file in sorted(directory.glob("*/metrics.json")):
        run_dir = metrics_file.parent
        if not (run_dir / "run.json").is_file():  # interrupted, not finished: no row
            continue
        metrics = json.loads(metrics_file.read_text())
        run_file = run_dir / "run.json"
        runs.append({"dir": run_dir, "config": TrainConfig(**metrics["config"]),
                     "metrics": metrics,
                     "run": json.loads(run_file.read_text())})
    return runs
