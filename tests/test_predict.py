"""Predictions of a network: the eval forward pass at the trained input size, in order
whatever the batching; a run's newest checkpoint restored exactly; a grid that marks
the wrong ones. (That a finished run's predictions score what its evaluation scored is
checked by tests/test_notebook.py, which trains one.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from matplotlib.colors import same_color

from cnnjax import data
from cnnjax.checkpoint import Checkpoints
from cnnjax.config import TrainConfig
from cnnjax.predict import Trained, load_trained, predict, prediction_grid
from cnnjax.rundir import RunDir, RunDirError
from cnnjax.steps import TrainState, zero_totals

# LeNet at 32x32: predicting without resizing the 28x28 images would fail.
CONFIG = TrainConfig(arch="lenet_bn", batch_size=16, resize=32)


@pytest.fixture(scope="module")
def trained() -> Trained:
    return Trained.init(CONFIG, seed=1)


def brightness_net(variables, x, train):
    """A stand-in network whose class is the image's mean brightness in tenths; it
    takes only what evaluation gives a network: scaled 32x32 images, train=False."""
    assert not train and x.shape[1:] == (32, 32, 1) and x.dtype == jnp.float32
    return -jnp.abs(x.mean(axis=(1, 2, 3))[:, None] * 10 - 0.5 - jnp.arange(10))


@pytest.mark.parametrize("batch_size", [None, 5])
def test_predict_keeps_order_across_padded_batches(batch_size):
    state = TrainState.create(apply_fn=brightness_net, params={}, batch_stats={},
                              tx=optax.identity())
    labels = np.random.default_rng(0).integers(0, 10, 37)
    # Each image of one brightness, in the middle of its label's tenth.
    images = np.ones((37, 28, 28, 1)) * np.round((labels + 0.5) * 25.5)[:, None, None, None]
    # 37 images in batches of 16 (the config's) or 5: the last batch is padded.
    predictions = predict(Trained(CONFIG, state), images.astype(np.uint8), batch_size)
    assert predictions.dtype == np.int32
    np.testing.assert_array_equal(predictions, labels)
    assert predict(Trained(CONFIG, state), images[:0].astype(np.uint8)).shape == (0,)


def test_predict_runs_the_network_in_eval_mode(trained):
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    state = trained.state
    apply = jax.jit(state.apply_fn, static_argnames="train")
    logits = apply({"params": state.params, "batch_stats": state.batch_stats},
                   data.preprocess(images, 32), train=False)
    np.testing.assert_array_equal(predict(trained, images), np.argmax(logits, -1))


def test_load_trained_restores_the_newest_checkpoint(trained, tmp_path):
    run_dir = RunDir.create(tmp_path / "run", CONFIG)
    shift = lambda state, by: state.replace(  # noqa: E731
        step=jnp.asarray(by, state.step.dtype),
        params=jax.tree_util.tree_map(lambda p: p + by, state.params),
        batch_stats=jax.tree_util.tree_map(lambda s: s * by, state.batch_stats))
    checkpoints = Checkpoints(run_dir.checkpoints)
    for step in (3, 7):
        checkpoints.save(shift(trained.state, step), zero_totals(),
                         {"epoch": step, "batch": 0, "history": []})
    checkpoints.wait()
    checkpoints.close()

    restored = load_trained(tmp_path / "run")
    expected = shift(trained.state, 7)
    assert restored.config == CONFIG and int(restored.state.step) == 7
    for got, want in ((restored.state.params, expected.params),
                      (restored.state.batch_stats, expected.batch_stats)):
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_load_trained_needs_a_checkpoint(tmp_path):
    RunDir.create(tmp_path / "run", CONFIG)
    with pytest.raises(RunDirError, match="no checkpoint"):
        load_trained(tmp_path / "run")


def test_grid_titles_true_over_predicted_and_marks_wrong_ones_red():
    images = np.arange(7 * 28 * 28, dtype=np.uint32).reshape(7, 28, 28, 1).astype(np.uint8)
    labels = [0, 1, 2, 3, 4, 5, 6]
    predictions = [0, 1, 9, 3, 4, 7, 6]
    fig = prediction_grid(images, labels, predictions, data.CLASS_NAMES, ncols=3)
    assert len(fig.axes) == 7  # 3 rows of 3, the last two places left empty
    for ax, image, label, pred in zip(fig.axes, images, labels, predictions):
        assert ax.title.get_text() == f"{data.CLASS_NAMES[label]}\n{data.CLASS_NAMES[pred]}"
        assert same_color(ax.title.get_color(), "red") == (label != pred)
        np.testing.assert_array_equal(ax.images[0].get_array(), image[..., 0])
