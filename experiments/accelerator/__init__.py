"""One call on an accelerator: the full classic recipe of every network of the
reference table, then ResNet-18's modern recipe and its benchmark beside PyTorch,
all within a deadline.

    python -m experiments.accelerator --out "$OUT"              # on a GPU, 8.5 minutes
    python -m experiments.accelerator --out "$OUT" --minutes 20 # a longer slot
    python -m experiments.accelerator --dry-run --out /tmp/acc  # the same stages on a CPU

Stages, in order, as separate processes (`experiments.reproduce`, `experiments.bench`):
1. rows: each network of the reference table with the book's recipe (the 224x224
   ones last, so that a cut leaves whole rows), --parallel at a time on the one
   device, each with its share of the device's memory;
2. modern: ResNet-18 with the modern recipe (target: 94% test accuracy);
3. bench: ResNet-18 at 96x96, batch 256, in float32 and bfloat16, beside PyTorch's
   book loop, with MFU; then the tuned PyTorch flavour (channels-last, bf16,
   torch.compile), given --tuned-seconds at most and skipped with a note when over.

At the deadline every process still running gets SIGTERM: it saves a checkpoint and
stops, and a second call (same --work) continues it; finished rows are kept. Runs are
trained in --work (default runs/accelerator; checkpoints live there), and after each
process ends everything but the checkpoints is copied to --out, so a call cut short
still returns what finished: --out/results/<device-kind>/ (REPORT.md, summary.json,
test_acc.png, one directory per run), --out/bench.jsonl, --out/logs/ and
--out/call.json, and all of them again in one file, --out/call.tar.gz, for copying
back from a machine that returns only a few files.

The accelerator machines may have JAX and PyTorch but neither TensorFlow nor TFDS nor
a network: --carry DIR (default .gpu when it exists) brings TFDS as wheels (DIR/whl,
installed into --work for the child processes) and Fashion-MNIST already prepared
(DIR/tfds); `bash experiments/accelerator/carry.sh` builds .gpu on a machine with
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from experiments.cli import fail, parser_for, positive_float, positive_int

# The reference table's networks, quickest first; the 224x224 ones last.
ROWS = ("lenet_bn_scratch", "resnet18", "densenet", "googlenet", "regnetx32", "nin",
        "vgg11", "alexnet")
GRACE_SECONDS = 30  # between SIGTERM at the deadline and SIGKILL
MIN_START_SECONDS = 30  # a process that would get less is not started
# --dry-run: every stage on a CPU in a minute or two, at the smallest input size each
# network accepts.
DRY_ROWS = ("--epochs", "1", "--max-train", "64", "--max-test", "32", "--batch-size", "32")
DRY_RESIZE = {"alexnet": 67, "nin": 67}
DRY_BENCH = ("--batch-size", "8", "--resize", "32", "--windows", "1", "--steps", "1")
# The network of the modern and bench stages; in a dry run a small one, since on a CPU
# compiling ResNet-18 (in float32 and bfloat16) would take most of the dry run.
FOCUS, DRY_FOCUS = "resnet18", "lenet_bn"
BENCH = ("--batch-size", "256", "--windows", "5", "--steps", "20")


@dataclasses.dataclass
class Job:
    """One process of the call."""

    name: str
    args: list[str]  # after `python -m`
    seconds: float | None = None  # its own limit, besides the deadline
    process: subprocess.Popen | None = None
    started: float = 0.0
    stopped: float | None = None  # when it was sent SIGTERM
    outcome: str = "not started: no time left"


def build_parser():
    parser = parser_for("experiments.accelerator", __doc__)
    parser.add_argument("--out", metavar="DIR", default=os.environ.get("OUT"),
                        help="where the results are copied as they come (default: $OUT)")
    parser.add_argument("--work", metavar="DIR", default="runs/accelerator",
                        help="where runs train and keep their checkpoints between calls "
                             "(default: runs/accelerator)")
    parser.add_argument("--minutes", type=positive_float, default=8.5,
                        help="deadline for the whole call (default 8.5)")
    parser.add_argument("--parallel", type=positive_int, default=3,
                        help="training processes at once on the device (default 3)")
    parser.add_argument("--stages", nargs="+", choices=("rows", "modern", "bench"),
                        default=["rows", "modern", "bench"], help="stages to run (default: all)")
    parser.add_argument("--archs", nargs="+", metavar="NAME", default=list(ROWS),
                        help=f"networks of the rows stage (default: {' '.join(ROWS)})")
    parser.add_argument("--tuned-seconds", type=positive_float, default=240,
                        help="most time the tuned PyTorch benchmark may take, torch.compile "
                             "included (default 240)")
    parser.add_argument("--carry", metavar="DIR",
                        help="TFDS wheels (DIR/whl) and prepared Fashion-MNIST (DIR/tfds) "
                             "(default: .gpu when it exists)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="prepared Fashion-MNIST (default: DIR/tfds of --carry, else TFDS's)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny settings (1 epoch on 64 images at the smallest input "
                             f"size, one timed step; {DRY_FOCUS} for the modern and bench "
                             "stages) to check the whole call on a CPU")
    return parser


def jobs_for(args, data_dir: str | None, has_torch: bool) -> tuple[list[Job], list[Job]]:
    """(training jobs, benchmark jobs) of the stages asked for."""
    work = str(Path(args.work) / "results")
    common = ["--continue", "--out", work] + (["--data-dir", data_dir] if data_dir else [])

    def tiny(arch: str) -> list[str]:
        return [*DRY_ROWS, "--resize", str(DRY_RESIZE.get(arch, 32))] if args.dry_run else []

    focus = DRY_FOCUS if args.dry_run else FOCUS
    training = []
    if "rows" in args.stages:
        training += [Job(arch, ["experiments.reproduce", "--archs", arch, *common, *tiny(arch)])
                     for arch in args.archs]
    if "modern" in args.stages:
        training.append(Job(f"{focus}-modern", ["experiments.reproduce", "--archs", focus,
                                                "--recipe", "modern", *common, *tiny(focus)]))
    bench = []
    if "bench" in args.stages:
        jsonl = str(Path(args.work) / "bench.jsonl")
        settings = list(DRY_BENCH if args.dry_run else BENCH)
        data = ["--data-dir", data_dir] if data_dir else []
        for dtype in ("float32", "bfloat16"):
            bench.append(Job(f"bench-{dtype}", [
                "experiments.bench", "--arch", focus, "--dtype", dtype, *settings, *data,
                "--jsonl", jsonl, *(["--torch", "book"] if has_torch else [])]))
        if has_torch:
            bench.append(Job("bench-tuned", [
                "experiments.bench", "--arch", focus, "--dtype", "bfloat16", *settings,
                *data, "--jsonl", jsonl, "--torch", "tuned"], seconds=args.tuned_seconds))
    return training, bench


def run_jobs(jobs: list[Job], parallel: int, deadline: float, env: dict, logs: Path,
             after_each) -> None:
    """Run `jobs` in order, `parallel` at a time, until `deadline` (time.monotonic()):
    then SIGTERM (a checkpoint is saved), and SIGKILL after GRACE_SECONDS."""
    waiting, running = list(jobs), []
    while waiting or running:
        now = time.monotonic()
        while waiting and len(running) < parallel and deadline - now > MIN_START_SECONDS:
            job = waiting.pop(0)
            log = open(logs / f"{job.name}.log", "w")
            job.process = subprocess.Popen([sys.executable, "-m", *job.args], env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
            job.started, job.outcome = now, "running"
            print(f"started {job.name}: python -m {' '.join(job.args)}", flush=True)
            running.append(job)
        if not running:
            break
        time.sleep(0.5)
        now = time.monotonic()
        for job in list(running):
            code = job.process.poll()
            over = now > deadline or (job.seconds and now - job.started > job.seconds)
            if code is None and over and job.stopped is None:
                job.process.send_signal(signal.SIGTERM)
                job.stopped = now
                job.outcome = ("stopped at the deadline" if now > deadline
                               else f"stopped at its limit of {job.seconds:g} s")
            elif code is None and job.stopped and now - job.stopped > GRACE_SECONDS:
                job.process.kill()
            if code is not None:
                running.remove(job)
                if job.stopped is None:
                    job.outcome = "done" if code == 0 else f"failed (exit {code})"
                else:
                    job.outcome += f" (exit {code})"
                print(f"{job.name}: {job.outcome} after {now - job.started:.0f} s", flush=True)
                after_each()
    for job in waiting:
        print(f"{job.name}: {job.outcome}", flush=True)


EXPORTED = ("results", "logs", "bench.jsonl", "call.json")


def export(work: Path, out: Path) -> None:
    """Copy everything in `work` but checkpoints and installed wheels to `out`, and
    pack the copies into out/call.tar.gz (replaced whole, never left half-written)."""
    for name in EXPORTED:
        source = work / name
        if source.is_dir():
            shutil.copytree(source, out / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoints"))
        elif source.is_file():
            shutil.copy2(source, out / name)
    partial = out / "call.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for name in EXPORTED:
            if (out / name).exists():
                tar.add(out / name, arcname=name)
    partial.replace(out / "call.tar.gz")


def install_carried_wheels(carry: Path, work: Path) -> str | None:
    """Install DIR/whl into work/site when TFDS is missing; the path for PYTHONPATH."""
    wheels = sorted((carry / "whl").glob("*.whl"))
    if importlib.util.find_spec("tensorflow_datasets") or not wheels:
        return None
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)],
                   check=True)
    return str(site.absolute())


def _imports(module: str) -> bool:
    """Whether `module` imports (installed and working)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if not args.out:
        return fail(prog, "--out is required (or set $OUT): where the results are copied")
    deadline = time.monotonic() + args.minutes * 60
    work, out = Path(args.work), Path(args.out)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    carry = Path(args.carry) if args.carry else (Path(".gpu") if Path(".gpu").is_dir() else None)
    data_dir = args.data_dir or (str(carry / "tfds") if carry and (carry / "tfds").is_dir()
                                 else None)

    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # Several processes share the device: each allocates as it goes, up to its share.
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / args.parallel:.2f}"}
    site = install_carried_wheels(carry, work) if carry else None
    paths = [site, str(Path.cwd())] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    has_torch = _imports("torch")
    training, bench = jobs_for(args, data_dir, has_torch)
    record = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": argv or sys.argv[1:],
              "torch": has_torch, "jobs": []}

    def after_each() -> None:
        record["jobs"] = [{"name": j.name, "outcome": j.outcome} for j in training + bench]
        (work / "call.json").write_text(json.dumps(record, indent=1) + "\n")
        export(work, out)

    run_jobs(training, args.parallel, deadline, env, work / "logs", after_each)
    run_jobs(bench, 1, deadline, env, work / "logs", after_each)  # alone on the device
    if not has_torch and "bench" in args.stages:
        print("PyTorch is not installed: the benchmark ran without it", flush=True)
    # One report from every run, whichever process finished last.
    report = Job("report", ["experiments.reproduce", "--report-only", "--out",
                            str(work / "results")])
    run_jobs([report], 1, deadline + MIN_START_SECONDS + 60, env, work / "logs", after_each)
    after_each()
    failed = [j.name for j in training + bench + [report] if j.outcome.startswith("failed")]
    print(f"wrote {out}; " + ("failed: " + ", ".join(failed) if failed else "nothing failed"),
          flush=True)
    return 1 if failed else 0
