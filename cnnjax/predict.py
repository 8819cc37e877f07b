"""Using a trained network: restore it from its run directory, predict the classes
of images, and draw a grid of images with their true and predicted labels (the
book's `predict_ch3`).

    trained = load_trained("runs/lenet_bn-20261121-120000")
    predictions = predict(trained, data.test_images)
    prediction_grid(data.test_images[:18], data.test_labels[:18], predictions[:18],
                    data.class_names)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

from cnnjax.checkpoint import Checkpoints
from cnnjax.config import TrainConfig
from cnnjax.rundir import RunDir, RunDirError
from cnnjax.steps import (TrainState, build_model, create_train_state, predict_logits,
                          zero_totals)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A network and its variables: `state.apply_fn` is the model's `apply`,
    `state.params` and `state.batch_stats` its variables; `config` says how it was
    trained (the input size among others)."""

    config: TrainConfig
    state: TrainState

    @classmethod
    def init(cls, config: TrainConfig, seed: int = 0) -> Trained:
        """`config.arch` freshly initialised, not trained."""
        return cls(config, create_train_state(config, build_model(config), jax.random.key(seed)))


def load_trained(workdir: str | os.PathLike | RunDir) -> Trained:
    """The network of the run in `workdir` with its newest checkpoint (the final state
    once the run has finished), on the default device. For a run that has stopped:
    opening the checkpoints removes any that is still being written.

    Raises:
      RunDirError: `workdir` is not a run, or has no checkpoint (a run trained
        without keeping its checkpoints).
      CheckpointError: the newest checkpoint is damaged.
    """
    run_dir = workdir if isinstance(workdir, RunDir) else RunDir(workdir)
    config = run_dir.config()
    if not run_dir.has_checkpoint():
        raise RunDirError(f"{run_dir.path} holds no checkpoint to load the network from")
    # The shapes to restore into, placed on the default device: the state as
    # `create_train_state` makes it, traced but not computed. The number of steps per
    # epoch only changes a schedule's values, not its state.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: create_train_state(config, build_model(config),
                                                  jax.random.key(0))))
    checkpoints = Checkpoints(run_dir.checkpoints)
    try:
        state, _, _ = checkpoints.restore(template, zero_totals())
    finally:
        checkpoints.close()
    return Trained(config, state)


@functools.partial(jax.jit, static_argnames=("resize",))
def _predict_batch(state: TrainState, images: jax.Array, resize: int) -> jax.Array:
    return predict_logits(state, images, resize).argmax(-1)


def predict(trained: Trained, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """The predicted class (int32, (N,)) of each `uint8` image (N, H, W, 1), as
    evaluation computes it: scaled and resized to the trained input size, in eval
    mode (moving BN statistics, no dropout). Runs in batches of `batch_size`
    (default: the training batch), all of one shape so that it compiles once."""
    images = np.asarray(images)
    batch_size = min(batch_size or trained.config.batch_size, max(len(images), 1))
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padding = batch_size - len(batch)
        if padding:
            batch = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]), batch.dtype)])
        labels = _predict_batch(trained.state, batch, resize=trained.config.resize)
        predictions.append(np.asarray(labels)[:batch_size - padding])
    if not predictions:
        return np.zeros((0,), np.int32)
    return np.concatenate(predictions).astype(np.int32)


def prediction_grid(images: np.ndarray, labels: Sequence[int], predictions: Sequence[int],
                    class_names: Sequence[str], ncols: int = 6) -> Figure:
    """A grid of `images` (N, H, W, 1), each titled with its true class over its
    predicted class, in red where they differ (the book's `predict_ch3`)."""
    n = len(images)
    if not n:
        raise ValueError("no images to show")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(1.5 * ncols, 1.8 * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, image, label, pred in zip(axes, images, labels, predictions):
        ax.imshow(np.asarray(image).squeeze(-1), cmap="gray")
        ax.set_title(f"{class_names[label]}\n{class_names[pred]}", fontsize=8,
                     color="black" if label == pred else "red")
        ax.axis("off")
    for ax in axes[n:]:  # the empty places of the last row
        fig.delaxes(ax)
    fig.tight_layout()
    return fig
