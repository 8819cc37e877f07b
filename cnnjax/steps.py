"""The train and eval steps of the book's `train_ch6`, as pure JAX functions to jit.

`train_ch6` trains with plain SGD on softmax cross-entropy, accumulates the loss and
accuracy over each epoch, then measures test accuracy with the moving batch-norm
statistics. Here the same happens in two steps over a small `TrainState`, which
`cnnjax.prepared.Prepared` jits and compiles for each run:

- `train_step` picks its batch from this epoch's shuffled index table (row
  `step % num_batches`), gathers it from the whole training set (kept on the device
  as uint8), scales and resizes it, takes one SGD step, and adds the batch's loss
  and correct count to running totals that stay on the device;
- `evaluate` runs `eval_step` over every test batch in one call: the forward pass
  in eval mode, counting correct predictions and masking the padding of the last
  batch so every test image counts once.

Neither step knows about devices: given arrays sharded over a 'data' mesh
(`cnnjax.parallel`), XLA splits the work and adds the collectives.

Randomness is derived, not carried: epoch `e` shuffles with `fold_in(shuffle_key, e)`
and step `s` drops out (and, with augmentation, crops and flips) with keys from
`fold_in(rng_key, s)`, so a resumed run replays exactly what an uninterrupted one would.

The optimizer and schedule follow `TrainConfig` (`cnnjax.config`): the book's plain
SGD at a constant lr, or momentum, weight decay and a cosine schedule with warm-up.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from cnnjax import cpu_kernels, models
from cnnjax.models.layers import torch_default_biases
from cnnjax.config import TrainConfig
from cnnjax.data import preprocess, random_crop_flip


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimizer) plus the moving BN statistics."""

    batch_stats: Any


Totals = dict[str, jax.Array]  # running sums over an epoch, kept on the device


def learning_rate(config: TrainConfig, steps_per_epoch: int) -> optax.ScalarOrSchedule:
    """The lr, or for `schedule="cosine"` the schedule over the whole run: linear
    warm-up from 0 for `warmup_epochs`, then a cosine decay to 0 at the last step."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        total_steps = config.epochs * steps_per_epoch
        # A run no longer than its warm-up still ends with one step of decay.
        warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1)
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup_steps=warmup_steps,
                                                  decay_steps=total_steps)
    raise ValueError(f"unknown schedule {config.schedule!r}; use 'constant' or 'cosine'")


def make_optimizer(config: TrainConfig, steps_per_epoch: int = 1
                   ) -> optax.GradientTransformation:
    """`torch.optim.SGD(lr, momentum, weight_decay)`: plain SGD as in the book unless
    momentum or weight decay is asked for (decay is added to the gradient, as in
    PyTorch, before the momentum). A schedule counts `steps_per_epoch` per epoch."""
    sgd = optax.sgd(learning_rate(config, steps_per_epoch), momentum=config.momentum or None)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd


def layer_set(config: TrainConfig, backend: str | None = None) -> str:
    """Which layers `build_model` builds the network from on `backend` (default: JAX's
    default backend): "cpu_kernels" (`cnnjax.cpu_kernels`) or "plain"."""
    backend = backend or jax.default_backend()
    return "cpu_kernels" if config.cpu_kernels and cpu_kernels.layers_for(backend) else "plain"


def build_model(config: TrainConfig, backend: str | None = None) -> nn.Module:
    """The network `config.arch`, computing in `config.dtype` (params stay float32),
    built from the layers `layer_set` names for `backend`."""
    layers = (cpu_kernels.layers_for(backend or jax.default_backend())
              if layer_set(config, backend) == "cpu_kernels" else {})
    return models.get_model(config.arch, dtype=jnp.dtype(config.dtype), layers=layers)


def create_train_state(config: TrainConfig, model: nn.Module, key: jax.Array,
                       sharding: jax.sharding.Sharding | None = None,
                       steps_per_epoch: int = 1) -> TrainState:
    """Initialise `model` for `config.resize`-sized one-channel images, placing every
    array of the state with `sharding` (e.g. replicated over a mesh), with the biases
    `config.init` names. An lr schedule needs the run's `steps_per_epoch`."""
    params_key, dropout_key = jax.random.split(key)
    x = jnp.zeros((1, config.resize, config.resize, 1), jnp.float32)

    @functools.partial(jax.jit, out_shardings=sharding)
    def init():
        variables = model.init({"params": params_key, "dropout": dropout_key}, x, train=False)
        params = variables["params"]
        if config.init == "book":
            params = torch_default_biases(params, jax.random.fold_in(params_key, 1))
        return TrainState.create(apply_fn=model.apply, params=params,
                                 batch_stats=variables.get("batch_stats", {}),
                                 tx=make_optimizer(config, steps_per_epoch))

    return init()


def zero_totals() -> Totals:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32),
            # First step whose loss was not finite, or -1.
            "first_nonfinite_step": jnp.full((), -1, jnp.int32)}


def train_step(state: TrainState, totals: Totals, images: jax.Array, labels: jax.Array,
               batches: jax.Array, rng_key: jax.Array, resize: int, augment: bool = False
               ) -> tuple[TrainState, Totals]:
    """One SGD step on the batch `images[batches[state.step % len(batches)]]`
    (randomly cropped and flipped if `augment`); adds its loss and accuracy to
    `totals`.

    `batches` is the epoch's (num_batches, batch_size) table of shuffled indices; the
    step finds its own row, so the loop passes the same arrays every step and does no
    work on the host between steps.
    """
    indices = batches[state.step % batches.shape[0]]
    x = images[indices]
    y = labels[indices]
    step_dropout_key = jax.random.fold_in(rng_key, state.step)
    if augment:
        step_dropout_key, augment_key = jax.random.split(step_dropout_key)
        x = random_crop_flip(x, augment_key)
    x = preprocess(x, resize)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": step_dropout_key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads,
                                      batch_stats=updates.get("batch_stats", state.batch_stats))
    bad = (totals["first_nonfinite_step"] < 0) & ~jnp.isfinite(loss)
    totals = {
        "loss_sum": totals["loss_sum"] + loss * y.shape[0],
        "correct": totals["correct"] + jnp.sum(jnp.argmax(logits, -1) == y),
        "count": totals["count"] + y.shape[0],
        "first_nonfinite_step": jnp.where(bad, state.step, totals["first_nonfinite_step"]),
    }
    return new_state, totals


def predict_logits(state: TrainState, images: jax.Array, resize: int) -> jax.Array:
    """The logits of `uint8` images (N, 28, 28, 1), scaled and resized to `resize` as
    in training, with the moving BN statistics and no dropout."""
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          preprocess(images, resize), train=False)


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array,
              mask: jax.Array, resize: int) -> jax.Array:
    """The number of correct predictions on `images[indices]` (where `mask`)."""
    logits = predict_logits(state, images[indices], resize)
    return jnp.sum((jnp.argmax(logits, -1) == labels[indices]) & mask)


def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, batches: jax.Array,
             masks: jax.Array, resize: int) -> jax.Array:
    """Correct predictions over all test batches (`batches`, `masks`: (num_batches,
    batch_size), from `data.eval_batch_indices`), in one call."""
    def body(i, correct):
        return correct + eval_step(state, images, labels, batches[i], masks[i], resize)

    return jax.lax.fori_loop(0, batches.shape[0], body, jnp.zeros((), jnp.int32))
