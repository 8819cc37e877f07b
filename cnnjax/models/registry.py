"""The model zoo: each name maps to a constructor and the book's training recipe.

Like timm's registry, `get_model(name)` builds a network and `recipe(name)` gives
the settings the notes train it with (`d2l.train_ch6`: plain SGD, 10 epochs).
The recipes come from the notes in `shared/seeds/` (see `d2l_results.json`); where
two notes differ, the one following the book chapter by chapter (note 001) wins.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import BatchNorm as ScratchBatchNorm
from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseNet
from cnnjax.models.googlenet import GoogLeNet
from cnnjax.models.lenet import LeNet, LeNetBN
from cnnjax.models.nin import NiN
from cnnjax.models.resnet import ResNet
from cnnjax.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the book trains a network on Fashion-MNIST."""

    lr: float
    batch_size: int
    resize: int  # images are resized from 28x28 to resize x resize
    epochs: int = 10


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    constructor: Callable[..., nn.Module]
    recipe: Recipe
    description: str


_MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(LeNet, Recipe(lr=0.9, batch_size=256, resize=28),
                       "LeNet-5 with sigmoids and average pooling (§6.6)"),
    "lenet_bn_scratch": ModelSpec(
        functools.partial(LeNetBN, norm=ScratchBatchNorm),
        Recipe(lr=1.0, batch_size=256, resize=28),
        "LeNet with the from-scratch batch norm (§7.5.3-7.5.4)"),
    "lenet_bn": ModelSpec(LeNetBN, Recipe(lr=1.0, batch_size=256, resize=28),
                          "LeNet with flax.linen.BatchNorm (§7.5.5)"),
    "alexnet": ModelSpec(AlexNet, Recipe(lr=0.01, batch_size=128, resize=224),
                         "AlexNet (§7.1)"),
    "vgg11": ModelSpec(VGG, Recipe(lr=0.05, batch_size=128, resize=224),
                       "VGG-11 with conv widths divided by `ratio` (4 as trained in §7.2)"),
    "nin": ModelSpec(NiN, Recipe(lr=0.1, batch_size=128, resize=224),
                     "Network in Network (§7.3)"),
    "googlenet": ModelSpec(GoogLeNet, Recipe(lr=0.1, batch_size=128, resize=96),
                           "GoogLeNet with nine Inception blocks (§7.4)"),
    "resnet18": ModelSpec(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
                          Recipe(lr=0.05, batch_size=256, resize=96), "ResNet-18 (§7.6)"),
    "resnet34": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
                          Recipe(lr=0.05, batch_size=256, resize=96),
                          "ResNet-34: ResNet-18's builder with stages 3/4/6/3"),
    "densenet": ModelSpec(DenseNet, Recipe(lr=0.05, batch_size=256, resize=96),
                          "DenseNet, growth rate 32, blocks 4/4/4/4 (§7.7)"),
}


def list_models() -> list[str]:
    """The names `get_model` accepts, in the order the book introduces them."""
    return list(_MODELS)


def _spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None


def get_model(name: str, num_classes: int = 10, **fields) -> nn.Module:
    """Build network `name` with `num_classes` outputs; `fields` override the
    module's other fields (e.g. `get_model('vgg11', ratio=1)`)."""
    return _spec(name).constructor(num_classes=num_classes, **fields)


def recipe(name: str) -> dict:
    """The book's training settings for `name`: lr, epochs, batch_size, resize."""
    return dataclasses.asdict(_spec(name).recipe)


def describe(name: str) -> str:
    """A one-line description of network `name`, with its book section."""
    return _spec(name).description


def count_params(params) -> int:
    """Number of trainable values in a params tree (moving statistics live in
    `batch_stats`, not here, so they are not counted)."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    name: str
    output_shape: tuple[int, ...]  # without the batch axis
    num_params: int


def block_infos(model: nn.Module, resize: int, channels: int = 1) -> list[BlockInfo]:
    """Each top-level block of `model` in call order, with its output shape for one
    `resize` x `resize` image and its parameter count.

    Runs under `jax.eval_shape`, so nothing is computed or allocated: even VGG-11
    at 224x224 takes a fraction of a second.
    """
    outputs: list[tuple[str, tuple[int, ...]]] = []

    def record_top_level(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and len(context.module.path) == 1:
            outputs.append((context.module.name, tuple(out.shape[1:])))
        return out

    def init():
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return model.init(rngs, jnp.zeros((1, resize, resize, channels)), train=False)

    with nn.intercept_methods(record_top_level):
        variables = jax.eval_shape(init)
    params = variables["params"]
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

    def init():
        return get_model(name).init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                    jnp.zeros((1, resize, resize, 1)), train=False)

    try:
        with nn.intercept_methods(check):
            jax.eval_shape(init)
    except (TypeError, ValueError, ZeroDivisionError):  # e.g. a window larger than its input
        return False
    return not empty


@functools.cache
def min_input_size(name: str) -> int:
    """The smallest square input network `name` accepts (AlexNet: 65x65, so not
    Fashion-MNIST's 28x28). Found by bisection: if a size works, every larger one does."""
    low, high = 1, recipe(name)["resize"]  # high always works
    while low < high:
        mid = (low + high) // 2
        if accepts_input(name, mid):
            high = mid
        else:
            low = mid + 1
    return low


def summary(name: str, resize: int | None = None) -> str:
    """A table of network `name`'s top-level blocks: output shape (H x W x C, or C
    after pooling) and parameters, like the book's "output shape" printouts, and
    the total. `resize` defaults to the recipe's input size."""
    resize = resize or recipe(name)["resize"]
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
