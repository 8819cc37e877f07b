"""The benchmark and reproduction CLIs, end to end on tiny settings."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_signalled

from cnnjax import config as recipes
from cnnjax.config import TrainConfig
from experiments import reproduce

ROOT = Path(__file__).resolve().parents[1]


def run_main(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args`, run in this process (faster: no new interpreter, and
    the compiled steps are shared); its exit code, stdout and stderr."""
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(module, code, out.getvalue(), err.getvalue())


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bench_prints_a_json_line_and_a_table(fashion_mnist_dir, tmp_path):
    jsonl = tmp_path / "bench.jsonl"
    proc = run_main("experiments.bench", "--arch", "lenet", "--batch-size", "32",
                    "--max-train", "512", "--max-test", "64",
                    "--windows", "2", "--steps", "2", "--data-dir", fashion_mnist_dir,
                    "--jsonl", str(jsonl))
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["arch"] == "lenet" and row["batch_size"] == 32 and row["resize"] == 28
    assert row["jax_img_per_s"] > 0 and len(row["jax_window_img_per_s"]) == 2
    assert row["flops_per_step"] > 1e6 and row["compile_s"] > 0 and row["data"] == "fashion_mnist"
    # What the step was compiled with: the layer set and the start-up settings.
    assert row["layers"] == "cpu_kernels"
    assert row["runtime"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert json.loads(jsonl.read_text()) == row
    assert "| lenet | 32 | 28x28 | float32 | 1 |" in proc.stdout


def test_bench_times_both_layer_sets_side_by_side(fashion_mnist_dir):
    proc = run_main("experiments.bench", "--arch", "lenet_bn", "--batch-size", "32",
                    "--max-train", "256", "--max-test", "32", "--windows", "2",
                    "--steps", "1", "--data-dir", fashion_mnist_dir, "--both-layer-sets")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert len(row["jax_window_img_per_s"]) == len(row["jax_plain_window_img_per_s"]) == 2
    assert row["kernels_speedup"] == pytest.approx(
        row["jax_img_per_s"] / row["jax_plain_img_per_s"], rel=1e-2)
    assert "| plain layers img/s | CPU kernels / plain |" in proc.stdout


def test_bench_times_pytorch_beside_jax(fashion_mnist_dir):
    pytest.importorskip("torch")
    proc = run_main("experiments.bench", "--arch", "lenet", "--batch-size", "16",
                    "--max-train", "256", "--max-test", "32", "--windows", "2",
                    "--steps", "1", "--data-dir", fashion_mnist_dir, "--torch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert len(row["jax_window_img_per_s"]) == len(row["torch_window_img_per_s"]) == 2
    assert row["ratio"] == pytest.approx(row["jax_img_per_s"] / row["torch_img_per_s"],
                                         rel=1e-2)
    assert row["torch_threads"] >= 1 and "| lenet | 16 | 28x28 |" in proc.stdout
    assert multiprocessing.active_children() == []  # PyTorch's timing process has ended


# `python -m experiments.bench args...` that sends itself SIGTERM as it starts timing
# its second network, after printing the process ids of its children, and at the end
# says whether it imported PyTorch.
BENCH_TERMINATED = """
import multiprocessing, os, signal, sys
from experiments import bench

interleaved, calls = bench.time_interleaved, []

def terminated_at_the_second(windows, rounds, steps):
    calls.append(1)
    if len(calls) == 2:
        print("children", *[c.pid for c in multiprocessing.active_children()], flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    return interleaved(windows, rounds, steps)

bench.time_interleaved = terminated_at_the_second
code = bench.main(sys.argv[1:])
print("imported torch:", "torch" in sys.modules)
sys.exit(code)
"""


def test_sigterm_stops_the_bench_with_one_line_and_ends_pytorchs_process(fashion_mnist_dir,
                                                                          tmp_path):
    pytest.importorskip("torch")
    jsonl = tmp_path / "bench.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", BENCH_TERMINATED, "--arch", "lenet", "lenet_bn",
         "--batch-size", "16", "--max-train", "256", "--max-test", "32", "--windows", "1",
         "--steps", "1", "--data-dir", fashion_mnist_dir, "--torch", "--jsonl", str(jsonl)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m experiments.bench: interrupted by SIGTERM while timing lenet_bn; the rows "
        f"measured before it are in {jsonl}")
    assert [json.loads(line)["arch"] for line in jsonl.read_text().splitlines()] == ["lenet"]
    (children,) = [line.split()[1:] for line in proc.stdout.splitlines()
                   if line.startswith("children")]
    assert len(children) == 1  # PyTorch's timing process, ended with the bench:
    assert not Path(f"/proc/{children[0]}").exists()
    assert "imported torch: False" in proc.stdout  # PyTorch ran in that process only


# `python -m experiments.bench args...` that has PyTorch's process start a long
# window (100,000 steps), then prints that process's id and kills itself (SIGKILL:
# no handler runs, and nothing tells the busy child).
BENCH_KILLED = """
import multiprocessing, os, signal, sys, threading, time
from experiments import bench

def killed(windows, rounds, steps):
    threading.Thread(target=windows["torch"], args=(100_000,), daemon=True).start()
    time.sleep(1)
    print("children", *[c.pid for c in multiprocessing.active_children()], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

bench.time_interleaved = killed
sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel ends it on Linux")
def test_pytorchs_timing_process_dies_with_a_killed_bench(fashion_mnist_dir, tmp_path):
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out.txt"  # a file, not a pipe, which the child would hold open
    with open(out, "w") as f:
        code = subprocess.Popen(
            [sys.executable, "-c", BENCH_KILLED, "--arch", "lenet", "--batch-size", "16",
             "--max-train", "256", "--max-test", "32", "--windows", "1", "--steps", "1",
             "--data-dir", fashion_mnist_dir, "--torch"],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True).wait(600)
    assert code == -signal.SIGKILL, out.read_text()[-2000:]
    (children,) = [line.split()[1:] for line in out.read_text().splitlines()
                   if line.startswith("children")]
    (child,) = map(int, children)
    deadline = time.monotonic() + 10  # the window alone would last minutes
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not running(child)
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has ended)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_bench_alternates_the_timed_windows():
    from experiments.bench import time_interleaved

    calls = []

    def timer(name, rate):
        def window(steps):
            calls.append((name, steps))
            return rate if len(calls) > 2 else rate / 100  # the untimed first windows: slow
        return window

    rates = time_interleaved({"jax": timer("jax", 2.0), "torch": timer("torch", 1.0)}, 3, 5)
    assert rates == {"jax": [2.0] * 3, "torch": [1.0] * 3}
    # One untimed window each, then the timed ones.
    assert [name for name, _ in calls] == ["jax", "torch", "jax", "torch", "torch", "jax",
                                           "jax", "torch"]
    assert all(steps == 5 for _, steps in calls)


def test_bench_rejects_bad_input():
    proc = run_main("experiments.bench", "--arch", "resnet50")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown --arch resnet50" in proc.stderr
    proc = run_main("experiments.bench", "--arch", "alexnet", "--resize", "28")
    assert proc.returncode == 2 and "too small for alexnet" in proc.stderr


def test_reproduce_names_a_longer_run_apart_from_full_and_quick_ones():
    """A recipe trained for more epochs on all the data is neither the full recipe
    (its row would claim the book's settings) nor a quick look (it learns more), and
    the CPU recipe is a kind of its own."""
    recipe = TrainConfig.from_recipe("resnet18", "modern")
    names = {changes: reproduce.run_name(dataclasses.replace(recipe, **dict(changes)))
             for changes in [(), (("epochs", 20),), (("epochs", 5),),
                             (("epochs", 20), ("max_train", 512)), (("epochs", 20), ("lr", 0.2))]}
    assert list(names.values()) == ["resnet18-modern", "resnet18-modern-20ep",
                                    "resnet18-modern-quick", "resnet18-modern-quick",
                                    "resnet18-modern-quick"]
    assert reproduce.kind(dataclasses.replace(recipe, epochs=20)) == "longer"

    cpu = TrainConfig.from_recipe("resnet18", **recipes.cpu_overrides("resnet18"))
    assert (cpu.epochs, cpu.resize, cpu.lr, cpu.max_train) == (2, 64, 0.05, None)
    assert reproduce.run_name(cpu) == "resnet18-cpu"
    assert reproduce.run_name(cpu.replace(seed=1, cpu_kernels=False)) == "resnet18-cpu"
    assert reproduce.run_name(cpu.replace(max_train=512)) == "resnet18-quick"
    assert reproduce.run_name(cpu.replace(lr=0.1)) == "resnet18-quick"
    lenet = TrainConfig.from_recipe("lenet", **recipes.cpu_overrides("lenet"))
    assert reproduce.run_name(lenet) == "lenet"  # the LeNets keep their full recipe
    with pytest.raises(ValueError, match="alexnet has no CPU recipe"):
        recipes.cpu_overrides("alexnet")
    proc = run_main("experiments.reproduce", "--cpu", "--archs", "alexnet")
    assert proc.returncode == 2 and "alexnet has no CPU recipe" in proc.stderr


def test_reproduce_writes_a_report_marking_quick_rows(fashion_mnist_dir, tmp_path):
    tiny = ("--epochs", "1", "--max-train", "512", "--max-test", "256",
            "--data-dir", fashion_mnist_dir, "--out", str(tmp_path))
    proc = run_main("experiments.reproduce", "--archs", "lenet_bn_scratch",
                    "--recipe", "classic", "modern", *tiny)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "cpu" / "REPORT.md").read_text()
    assert ("**quick** (not the full recipe; settings in each row): lenet_bn_scratch-quick, "
            "lenet_bn_scratch-modern-quick") in report
    classic, modern = [line for line in report.splitlines()
                       if line.startswith("| [`lenet_bn_scratch`]")]
    assert ("| classic | **quick** | 1 ep, lr 1.0, batch 256, 28x28, 512 train / 256 test "
            "images |") in classic
    assert "| 0.267 / 0.902 / 0.842 / 21,185 |" in classic  # the reference beside ours
    metrics = json.loads((tmp_path / "cpu" / "lenet_bn_scratch-quick" / "metrics.json").read_text())
    ours = metrics["epochs"][-1]["test_acc"]
    assert f"{100 * (ours - 0.842):+.1f} |" in classic
    assert ("| modern | **quick** | 1 ep, lr 0.1, batch 256, 28x28, momentum 0.9, wd 0.0005, "
            "cosine (1 ep warm-up), crop+flip, 512 train / 256 test images |") in modern
    modern_config = json.loads(
        (tmp_path / "cpu" / "lenet_bn_scratch-modern-quick" / "config.json").read_text())
    assert modern_config["recipe"] == "modern" and modern_config["augment"] is True
    assert (tmp_path / "cpu" / "test_acc.png").read_bytes().startswith(b"\x89PNG")

    # A later invocation adds its rows and keeps the earlier ones.
    proc = run_main("experiments.reproduce", "--archs", "lenet", *tiny)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "cpu" / "REPORT.md").read_text()
    assert sum(line.startswith("| [`lenet_bn_scratch`]") for line in report.splitlines()) == 2
    assert any(line.startswith("| [`lenet`](lenet-quick/)") for line in report.splitlines())
    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert {row["run"] for row in summary} == {"lenet_bn_scratch-quick",
                                               "lenet_bn_scratch-modern-quick", "lenet-quick"}


def test_bn_ablation_reports_each_network_and_lr(fashion_mnist_dir, tmp_path):
    proc = run_main("experiments.bn_ablation", "--networks", "lenet", "lenet_bn",
                    "--lrs", "0.3", "--epochs", "2", "--max-train", "512", "--max-test", "512",
                    "--threshold", "0.3", "--data-dir", fashion_mnist_dir, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "cpu" / "bn_ablation"
    report = (out / "REPORT.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    # lr 1.0, the book's lr, is always added to the sweep.
    assert [(r["arch"], r["lr"]) for r in summary] == [("lenet", 0.3), ("lenet", 1.0),
                                                       ("lenet_bn", 0.3), ("lenet_bn", 1.0)]
    for row in summary:
        metrics = json.loads((out / f"{row['arch']}-lr{row['lr']:g}" / "metrics.json").read_text())
        assert metrics["config"]["lr"] == row["lr"] and len(metrics["epochs"]) == 2
        assert row["final"] == metrics["epochs"][-1]
        line = next(x for x in report.splitlines()
                    if x.startswith(f"| [`{row['arch']}`]({row['arch']}-lr{row['lr']:g}/)"))
        assert f"| {row['final']['test_acc']:.3f} |" in line
        reached = next((e["epoch"] for e in metrics["epochs"] if e["test_acc"] >= 0.3), None)
        assert row["first_epoch_reaching_threshold"] == reached
    best = {a: max((r for r in summary if r["arch"] == a), key=lambda r: r["final"]["test_acc"])
            for a in ("lenet", "lenet_bn")}
    assert ("each network's best lr: " + ", ".join(f"{a} {r['lr']:g}" for a, r in best.items())
            in report)
    assert (out / "bn_ablation.png").read_bytes().startswith(b"\x89PNG")


def test_degradation_compares_plain_and_residual(fashion_mnist_dir, tmp_path):
    proc = run_main("experiments.degradation", "--networks", "plain20", "resnet20",
                    "--epochs", "1", "--max-train", "256", "--max-test", "128",
                    "--data-dir", fashion_mnist_dir, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "cpu" / "degradation"
    report = (out / "REPORT.md").read_text()
    rows = {r["arch"]: r for r in json.loads((out / "summary.json").read_text())}
    assert rows["plain20"]["params"] == 270_122 and rows["resnet20"]["params"] == 272_778
    for arch in ("plain20", "resnet20"):
        epochs = json.loads((out / arch / "metrics.json").read_text())["epochs"]
        assert rows[arch]["final_train_error"] == 1 - epochs[-1]["train_acc"]
        assert f"| {100 * (1 - epochs[-1]['train_acc']):.2f}% |" in report
    # One depth of each kind: shortcuts can be compared at 20 layers, depths not at all.
    plain_error, residual_error = (100 * rows[a]["final_train_error"] for a in ("plain20",
                                                                                "resnet20"))
    assert (f"- at 20 layers, shortcuts change the final training error from "
            f"{plain_error:.2f}% (plain) to {residual_error:.2f}% (residual)") in report
    assert "56-layer" not in report
    assert (out / "degradation.png").read_bytes().startswith(b"\x89PNG")


def test_ctrl_c_in_an_experiment_then_continue_keeps_finished_runs(fashion_mnist_dir, tmp_path):
    # Two runs (lr 0.3, then the book's 1.0), 2 epochs of 50 steps each; Ctrl-C comes
    # during batch 10 of the second run's second epoch (its 161st step).
    args = ["--networks", "lenet_bn", "--lrs", "0.3", "--epochs", "2", "--max-train", "12800",
            "--max-test", "500", "--data-dir", fashion_mnist_dir, "--out", str(tmp_path)]
    proc = run_signalled("experiments.bn_ablation", args, signal.SIGINT, 2 * 50 + 50 + 11)
    assert proc.returncode == 130, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("python -m experiments.bn_ablation: interrupted by SIGINT (stopped "
                           "at epoch 2, batch 11); checkpoint saved. "), line
    assert line.endswith(" --continue")
    out = tmp_path / "cpu" / "bn_ablation"
    finished = (out / "lenet_bn-lr0.3" / "metrics.json").read_text()
    interrupted = json.loads((out / "lenet_bn-lr1" / "run.json").read_text())
    assert interrupted["status"] == "interrupted"
    assert interrupted["reason"] == "stopped at epoch 2, batch 11"
    # The report holds the finished run only.
    report = (out / "REPORT.md").read_text()
    assert "(lenet_bn-lr0.3/)" in report and "(lenet_bn-lr1/)" not in report

    proc = run_main("experiments.bn_ablation", *args, "--continue")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kept: " in proc.stdout and "resumed from " in proc.stdout
    assert (out / "lenet_bn-lr0.3" / "metrics.json").read_text() == finished  # not retrained
    resumed = json.loads((out / "lenet_bn-lr1" / "metrics.json").read_text())
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert "resumed from" in (out / "lenet_bn-lr1" / "log.txt").read_text()
    assert not (out / "lenet_bn-lr1" / "checkpoints").exists()
    assert "| [`lenet_bn`](lenet_bn-lr1/)" in (out / "REPORT.md").read_text()


@pytest.mark.parametrize("module, args, message", [
    ("experiments.bn_ablation", ("--threshold", "2"),
     "--threshold: expected a number in (0, 1], got 2"),
    ("experiments.bn_ablation", ("--batch-size", "0"),
     "--batch-size: expected a whole number > 0, got 0"),
    ("experiments.degradation", ("--networks", "resnet50"), "invalid choice: 'resnet50'"),
    ("experiments.reproduce", ("--recipe", "fast"), "invalid choice: 'fast'"),
])
def test_experiments_reject_bad_input(module, args, message):
    proc = run_main(module, *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_reports_show_commands_as_a_user_types_them():
    from experiments.sweep import as_typed

    ran = ("python -m experiments.reproduce --archs alexnet --continue --out runs/acc/results "
           "--data-dir .gpu/tfds")
    assert as_typed(ran) == "python -m experiments.reproduce --archs alexnet --continue"
    assert as_typed("python -m experiments.run --arch lenet --out=/tmp/x") == \
        "python -m experiments.run --arch lenet"
