"""Training: the steps against plain computations, a short real run that learns,
exact resume, and the CLI end to end on real Fashion-MNIST (small subsets)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import config as recipes
from cnnjax import data, models, steps
from cnnjax.config import TrainConfig
from cnnjax.steps import create_train_state, learning_rate, zero_totals
from cnnjax.interrupts import Interrupted
from cnnjax.prepared import Prepared
from cnnjax.train import book_summary, train_and_evaluate

# The steps as `Prepared` runs them: jitted.
train_step = jax.jit(steps.train_step, static_argnames=("resize", "augment"))
evaluate = jax.jit(steps.evaluate, static_argnames="resize")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data(fashion_mnist_dir) -> data.FashionMNIST:
    return data.load_fashion_mnist(fashion_mnist_dir, max_train=2048, max_test=500)


def synthetic(num_train: int, num_test: int, seed: int = 0) -> data.FashionMNIST:
    rng = np.random.default_rng(seed)
    images = lambda n: rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)  # noqa: E731
    labels = lambda n: rng.integers(0, 10, (n,), dtype=np.int32)  # noqa: E731
    return data.FashionMNIST(images(num_train), labels(num_train), images(num_test), labels(num_test))


def test_train_step_is_one_sgd_step_on_cross_entropy():
    config = TrainConfig(arch="lenet_bn", epochs=1, lr=0.5, batch_size=8, resize=28)
    ds = synthetic(16, 1)
    state = create_train_state(config, models.get_model("lenet_bn"), jax.random.key(0))
    # The epoch's index table has two batches; step 0 takes the first row.
    batches = jnp.stack([jnp.arange(3, 11), jnp.arange(8)]).astype(jnp.int32)
    x = ds.train_images[3:11].astype(np.float32) / 255.0
    y = ds.train_labels[3:11]
    key = jax.random.key(1)

    def loss_fn(params):  # the same step, written out directly
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        state.params)
    expected_params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, state.params, grads)
    expected_stats = updates["batch_stats"]

    new_state, totals = train_step(state, zero_totals(), jnp.asarray(ds.train_images),
                                   jnp.asarray(ds.train_labels), batches, key, resize=28)
    np.testing.assert_allclose(float(totals["loss_sum"]), float(loss) * 8, rtol=1e-5)
    assert int(totals["correct"]) == int(np.sum(np.argmax(logits, -1) == y))
    assert int(totals["count"]) == 8 and int(new_state.step) == 1
    # Eager and jitted steps round differently, by up to 2e-6 here: in the conv
    # biases, whose exact gradient is 0 (batch norm removes them), and in the first
    # conv's kernel. Each weight matrix's largest update is between 3e-3 and 0.16.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           new_state.params, expected_params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           new_state.batch_stats, expected_stats)


@pytest.mark.parametrize("arch", ["lenet", "regnetx32"])
def test_book_initialisation_draws_pytorch_default_biases(arch):
    from flax import traverse_util

    def layers(init):
        config = TrainConfig.from_recipe(arch, resize=32, init=init)
        params = create_train_state(config, models.get_model(arch), jax.random.key(0)).params
        flat = traverse_util.flatten_dict(params)
        return {path[:-1]: (flat[path[:-1] + ("kernel",)], flat[path])
                for path in flat if path[-1] == "bias" and path[:-1] + ("kernel",) in flat}

    book, zeros = layers("book"), layers("zeros")
    assert book.keys() == zeros.keys() and len(book) >= 5
    for name, (kernel, bias) in book.items():
        fan_in = int(np.prod(kernel.shape[:-1]))  # in_channels / groups * kh * kw
        bound = 1 / np.sqrt(fan_in)
        assert np.all(np.abs(bias) <= bound), name
        if bias.size >= 10:  # spread over the interval, not piled near 0
            assert np.max(np.abs(bias)) > 0.5 * bound, name
        assert not np.any(zeros[name][1]), name  # --init zeros: Flax's zero biases
        np.testing.assert_array_equal(kernel, zeros[name][0])  # same Xavier kernels
    assert TrainConfig.from_recipe(arch).init == "book"


def test_modern_recipe_warms_up_from_zero_then_decays_to_zero():
    config = TrainConfig.from_recipe("resnet18", "modern", epochs=4)
    schedule = learning_rate(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0  # warm-up starts at 0 ...
    np.testing.assert_allclose(float(schedule(5)), 0.05, rtol=1e-6)  # ... rises linearly ...
    np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)  # ... to lr after 1 epoch
    np.testing.assert_allclose(float(schedule(25)), 0.05, rtol=1e-5)  # cosine: half-way
    assert float(schedule(40)) == 0.0
    assert learning_rate(TrainConfig.from_recipe("resnet18"), 10) == 0.05  # classic: constant
    # A 1-epoch run is all warm-up but its last step, which decays to 0.
    one_epoch = learning_rate(config.replace(epochs=1), steps_per_epoch=10)
    np.testing.assert_allclose([float(one_epoch(s)) for s in (0, 9, 10)], [0.0, 0.1, 0.0],
                               atol=1e-7)


def test_modern_train_step_follows_the_schedule_and_augments():
    config = TrainConfig.from_recipe("lenet_bn", "modern", batch_size=8, epochs=2)
    ds = synthetic(16, 1)
    args = (jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels),
            jnp.arange(16, dtype=jnp.int32).reshape(2, 8), jax.random.key(1))
    state = create_train_state(config, models.get_model("lenet_bn"), jax.random.key(0),
                               steps_per_epoch=2)
    initial = jax.tree_util.tree_map(np.asarray, state.params)
    state, _ = train_step(state, zero_totals(), *args, resize=28, augment=True)
    # Step 0 of the warm-up has lr 0: nothing moves, weight decay included.
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, state.params), initial)
    state, totals = train_step(state, zero_totals(), *args, resize=28, augment=True)
    assert not np.allclose(state.params["Dense_0"]["kernel"], initial["Dense_0"]["kernel"])

    # The same step without augmentation sees other pixels, so it has another loss.
    fresh = lambda: create_train_state(config, models.get_model("lenet_bn"),  # noqa: E731
                                       jax.random.key(0), steps_per_epoch=2)
    _, plain = train_step(fresh(), zero_totals(), *args, resize=28, augment=False)
    _, augmented = train_step(fresh(), zero_totals(), *args, resize=28, augment=True)
    assert float(plain["loss_sum"]) != float(augmented["loss_sum"])


@pytest.mark.parametrize("num_test, batch_size", [(10, 4), (13, 13), (7, 16)])
def test_eval_counts_every_test_image_once(num_test, batch_size):
    config = TrainConfig(arch="lenet", epochs=1, lr=0.1, batch_size=batch_size, resize=28)
    ds = synthetic(1, num_test)
    state = create_train_state(config, models.get_model("lenet"), jax.random.key(0))
    # Reference: one forward pass over the whole test set at once.
    logits = state.apply_fn({"params": state.params}, ds.test_images / 255.0, train=False)
    expected = int(np.sum(np.argmax(logits, -1) == ds.test_labels))
    indices, mask = data.eval_batch_indices(num_test, batch_size)
    correct = evaluate(state, jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels),
                       jnp.asarray(indices), jnp.asarray(mask), resize=28)
    assert int(correct) == expected


def test_resume_gives_the_numbers_of_an_uninterrupted_run(small_data, tmp_path):
    config = TrainConfig(arch="lenet_bn", epochs=2, lr=1.0, batch_size=256, resize=28, seed=3)
    quiet = dict(data=small_data, log=lambda _: None, progress=False)
    straight = train_and_evaluate(config, tmp_path / "straight", **quiet)
    train_and_evaluate(config.replace(epochs=1), tmp_path / "stopped", **quiet)
    resumed = train_and_evaluate(config, tmp_path / "stopped", resume=True, **quiet)
    keys = ("epoch", "train_loss", "train_acc", "test_acc")
    assert [{k: e[k] for k in keys} for e in resumed["epochs"]] == \
           [{k: e[k] for k in keys} for e in straight["epochs"]]
    assert straight["test_examples"] == 500
    assert straight["train_examples_per_epoch"] == 2048  # 8 full batches, nothing dropped


def test_modern_recipe_learns_and_resumes_exactly(small_data, tmp_path):
    # The schedule spans the whole run and every step draws its own crops and flips:
    # redoing the last epoch from the previous checkpoint must give the same numbers.
    config = TrainConfig.from_recipe("lenet_bn", "modern", epochs=2, batch_size=64)
    out = tmp_path / "run"
    straight = train_and_evaluate(config, out, data=small_data, log=lambda _: None,
                                  progress=False)
    assert straight["epochs"][-1]["test_acc"] > 0.5  # chance is 0.1
    last_checkpoint = out / "checkpoints" / str(2 * 2048 // 64)  # the global step
    assert last_checkpoint.is_dir()
    shutil.rmtree(last_checkpoint)
    lines = []
    resumed = train_and_evaluate(config, out, data=small_data, resume=True, log=lines.append,
                                 progress=False)
    assert lines[0].startswith(f"resumed from {out} at epoch 2, batch 0")
    assert resumed["epochs"][1]["train_examples"] == 2048  # only epoch 2 was trained again
    keys = ("epoch", "train_loss", "train_acc", "test_acc")
    assert [{k: e[k] for k in keys} for e in resumed["epochs"]] == \
           [{k: e[k] for k in keys} for e in straight["epochs"]]


def test_ctrl_c_after_the_last_step_finishes_the_run_then_stops_the_caller(small_data,
                                                                           tmp_path, capsys):
    """Ctrl-C once the last step is queued (here: while the last epoch is reported)
    has no step left to stop at: the run finishes and is kept, and the caller (a
    sweep about to start its next run) is told to stop too."""
    out, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)

    def ctrl_c_at_the_end(line: str) -> None:
        if line.startswith("epoch 1/1:"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stopped:
        train_and_evaluate(TrainConfig(arch="lenet_bn", epochs=1, batch_size=256), out,
                           data=small_data, log=ctrl_c_at_the_end, progress=False)
    assert stopped.value.finished and stopped.value.exit_code == 130
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    from experiments.cli import interrupted

    assert interrupted("python -m experiments.run", stopped.value, f"Its results are in {out}.") \
        == 130
    assert capsys.readouterr().err == ("python -m experiments.run: interrupted by SIGINT (after "
                                       f"the last step: the run finished). Its results are in "
                                       f"{out}.\n")


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_train_flops_count_the_networks_training_work(backend, monkeypatch):
    """The bench's FLOPs (and MFU) come from `Prepared.train_flops`: about 3x the
    forward pass (forward, input and kernel gradients; the first layer needs no input
    gradient), whichever layers the backend gets. A GPU's compiled program would count
    almost none (its convolutions are cuDNN calls), and its lowered one has no cost
    analysis at all: there the count comes from the CPU."""
    monkeypatch.setattr("cnnjax.prepared.build_model",
                        functools.partial(steps.build_model, backend=backend))
    if backend == "gpu":
        analyse = jax.stages.Lowered.cost_analysis
        lowered = []

        def as_on_a_gpu(self):  # the device's own lowering (the first) has no analysis
            lowered.append(self)
            return None if len(lowered) == 1 else analyse(self)

        monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", as_on_a_gpu)
    batch = 16
    run = Prepared.create(TrainConfig(arch="lenet", resize=28, batch_size=batch),
                          synthetic(64, 16))
    # LeNet (§6.6) at 28x28: conv 6@5x5 pad 2, conv 16@5x5 on 14x14, dense 400-120-84-10.
    forward = 2 * (28 * 28 * 6 * 25 + 10 * 10 * 16 * 25 * 6 + 400 * 120 + 120 * 84 + 84 * 10)
    first_input_grad = 2 * 28 * 28 * 6 * 25
    # On a CPU the first layer's sums are followed by a product with the 6x6 identity
    # (`cpu_kernels.one_channel_conv`), which XLA counts too.
    identity = 2 * 28 * 28 * 6 * 6 if backend == "cpu" else 0
    assert run.train_flops == pytest.approx(
        batch * (3 * forward - first_input_grad + identity), rel=0.05)


def test_book_summary_lines():
    metrics = {"device": "cpu (cpu)", "epochs": [
        {"train_loss": 0.5, "train_acc": 0.8, "test_acc": 0.75, "train_examples": 100,
         "train_seconds": 1.0},
        {"train_loss": 0.2674, "train_acc": 0.9021, "test_acc": 0.8417, "train_examples": 100,
         "train_seconds": 3.0}]}
    assert book_summary(metrics) == ("loss 0.267, train acc 0.902, test acc 0.842\n"
                                     "50.0 examples/sec on cpu (cpu)")


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_trains_on_real_data(fashion_mnist_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--arch", "lenet_bn", "--epochs", "1", "--max-train", "512",
                   "--max-test", "256", "--data-dir", fashion_mnist_dir, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last_lines = proc.stdout.strip().splitlines()
    assert last_lines[-3].startswith("loss ") and ", test acc " in last_lines[-3]
    assert " examples/sec on cpu" in last_lines[-2]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == "lenet_bn" and metrics["device_count"] == jax.device_count()
    assert metrics["config"] == {**recipes.recipe_settings("lenet_bn"), "arch": "lenet_bn",
                                 "epochs": 1, "seed": 0, "max_train": 512, "max_test": 256,
                                 "dtype": "float32", "recipe": "classic", "init": "book",
                                 "cpu_kernels": True}
    assert TrainConfig.from_json((out / "config.json").read_text()).to_dict() == \
        metrics["config"]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["command"].startswith(
        "python -m experiments.run --arch lenet_bn")
    assert info["versions"]["jax"] == jax.__version__
    # The layer set and the start-up settings the run actually used.
    assert info["layers"] == "cpu_kernels"
    assert info["runtime"]["cpu_async_dispatch"] is False
    assert info["runtime"]["malloc_keeps_freed_memory"] is True
    assert "--xla_cpu_experimental_ynn_fusion_type=" in info["runtime"]["xla_flags"]
    assert "epoch 1/1: loss " in (out / "log.txt").read_text()
    assert metrics["device"].startswith("cpu") and metrics["compile_seconds"] > 0
    (epoch,) = metrics["epochs"]
    assert set(epoch) >= {"epoch", "train_loss", "train_acc", "test_acc", "examples_per_sec",
                          "seconds"}
    assert 0 <= epoch["test_acc"] <= 1 and epoch["examples_per_sec"] > 0
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert any((out / "checkpoints").iterdir())


def test_cli_trains_with_the_plain_layers_on_request(fashion_mnist_dir, tmp_path):
    out = tmp_path / "plain"
    proc = run_cli("--arch", "lenet_bn", "--epochs", "1", "--max-train", "256",
                   "--max-test", "256", "--no-cpu-kernels", "--data-dir", fashion_mnist_dir,
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["cpu_kernels"] is False
    assert json.loads((out / "run.json").read_text())["layers"] == "plain"
    assert "--cpu-kernels" in run_cli("--help").stdout


def test_build_model_uses_the_cpu_kernels_only_on_a_cpu_and_when_asked():
    config = TrainConfig.from_recipe("resnet18")
    assert steps.layer_set(config, "cpu") == "cpu_kernels"
    assert steps.layer_set(config.replace(cpu_kernels=False), "cpu") == "plain"
    assert steps.layer_set(config, "gpu") == "plain"
    fast, plain = (steps.build_model(c, "cpu") for c in (config, config.replace(cpu_kernels=False)))
    assert fast.norm is not plain.norm and plain.norm is models.get_model("resnet18").norm


def test_cli_summary_for_every_network(capsys):
    from experiments.run import main

    for name in models.list_models():
        assert main(["--arch", name, "--summary"]) == 0
        assert capsys.readouterr().out.startswith(f"{name}: ")
