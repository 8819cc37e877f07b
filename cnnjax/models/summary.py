"""Looking inside a network without running it: parameter counts, each top-level
block's output shape (the book's "output shape" printouts) and the smallest input
a network accepts. Everything runs under `jax.eval_shape`: nothing is computed or
allocated, so even VGG-11 at 224x224 takes a fraction of a second."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.models.registry import describe, get_model


def count_params(params) -> int:
    """Number of trainable values in a params tree (moving statistics live in
    `batch_stats`, not here, so they are not counted)."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def _abstract_init(model: nn.Module, resize: int, channels: int = 1):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(
        rngs, jnp.zeros((1, resize, resize, channels)), train=False))


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    name: str
    output_shape: tuple[int, ...]  # without the batch axis
    num_params: int


def block_infos(model: nn.Module, resize: int, channels: int = 1) -> list[BlockInfo]:
    """Each top-level block of `model` in call order, with its output shape for one
    `resize` x `resize` image and its parameter count."""
    outputs: list[tuple[str, tuple[int, ...]]] = []

    def record_top_level(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and len(context.module.path) == 1:
            outputs.append((context.module.name, tuple(out.shape[1:])))
        return out

    with nn.intercept_methods(record_top_level):
        params = _abstract_init(model, resize, channels)["params"]
    return [BlockInfo(name, shape, count_params(params.get(name, {})))
            for name, shape in outputs]


def accepts_input(name: str, resize: int) -> bool:
    """Whether every layer of network `name` has a non-empty output for a
    `resize` x `resize` input (too small an image shrinks to nothing on the way)."""
    empty = []

    def check(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if any(d == 0 for leaf in jax.tree_util.tree_leaves(out) for d in leaf.shape):
            empty.append(context.module.name)
        return out

    try:
        with nn.intercept_methods(check):
            _abstract_init(get_model(name), resize)
    except (TypeError, ValueError, ZeroDivisionError):  # e.g. a window larger than its input
        return False
    return not empty


@functools.cache
def min_input_size(name: str) -> int:
    """The smallest square input network `name` accepts (AlexNet: 65x65, so not
    Fashion-MNIST's 28x28). Found by bisection: if a size works, every larger one does."""
    low, high = 1, 224  # every network of the zoo takes 224x224
    while low < high:
        mid = (low + high) // 2
        if accepts_input(name, mid):
            high = mid
        else:
            low = mid + 1
    return low


def summary(name: str, resize: int) -> str:
    """A table of network `name`'s top-level blocks for `resize` x `resize` inputs:
    output shape (H x W x C, or C after pooling) and parameters, and the total."""
    infos = block_infos(get_model(name), resize)
    total = sum(info.num_params for info in infos)
    width = max(len(info.name) for info in infos) + 2
    lines = [f"{name}: {describe(name)}",
             f"input 1x{resize}x{resize}x1 (N, H, W, C)",
             f"{'block':<{width}}{'output shape':<18}{'params':>12}"]
    for info in infos:
        shape = "x".join(str(d) for d in info.output_shape)
        lines.append(f"{info.name:<{width}}{shape:<18}{info.num_params:>12,}")
    lines.append(f"{'total':<{width}}{'':<18}{total:>12,}")
    return "\n".join(lines)
