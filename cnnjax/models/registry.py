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
from cnnjax.models.resnet import CifarResNet, ResNet
from cnnjax.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a network is trained on Fashion-MNIST: the `TrainConfig` settings."""

    lr: float
    batch_size: int
    resize: int  # images are resized from 28x28 to resize x resize
    epochs: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    augment: bool = False


RECIPES = ("classic", "modern")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    constructor: Callable[..., nn.Module]
    recipe: Recipe  # the classic recipe: the notes' (the ResNet paper's for the extras)
    modern_lr: float  # the modern recipe's peak lr (with momentum 0.9)
    description: str
    in_book: bool = True  # False: the degradation experiment's networks


def _book(lr: float, batch_size: int, resize: int) -> Recipe:
    """`d2l.train_ch6`: plain SGD at a constant lr for 10 epochs."""
    return Recipe(lr=lr, batch_size=batch_size, resize=resize)


# The ResNet paper's CIFAR-10 settings (He et al. 2016, §4.2) at 28x28, with a constant
# lr of 0.1 (the paper's first phase) for 20 epochs.
_RESNET_PAPER = Recipe(lr=0.1, batch_size=128, resize=28, epochs=20, momentum=0.9,
                       weight_decay=1e-4)

_MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(LeNet, _book(lr=0.9, batch_size=256, resize=28), 0.1,
                       "LeNet-5 with sigmoids and average pooling (§6.6)"),
    "lenet_bn_scratch": ModelSpec(
        functools.partial(LeNetBN, norm=ScratchBatchNorm),
        _book(lr=1.0, batch_size=256, resize=28), 0.1,
        "LeNet with the from-scratch batch norm (§7.5.3-7.5.4)"),
    "lenet_bn": ModelSpec(LeNetBN, _book(lr=1.0, batch_size=256, resize=28), 0.1,
                          "LeNet with flax.linen.BatchNorm (§7.5.5)"),
    "alexnet": ModelSpec(AlexNet, _book(lr=0.01, batch_size=128, resize=224), 0.01,
                         "AlexNet (§7.1)"),
    "vgg11": ModelSpec(VGG, _book(lr=0.05, batch_size=128, resize=224), 0.01,
                       "VGG-11 with conv widths divided by `ratio` (4 as trained in §7.2)"),
    "nin": ModelSpec(NiN, _book(lr=0.1, batch_size=128, resize=224), 0.01,
                     "Network in Network (§7.3)"),
    "googlenet": ModelSpec(GoogLeNet, _book(lr=0.1, batch_size=128, resize=96), 0.01,
                           "GoogLeNet with nine Inception blocks (§7.4)"),
    "resnet18": ModelSpec(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
                          _book(lr=0.05, batch_size=256, resize=96), 0.1, "ResNet-18 (§7.6)"),
    "resnet34": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
                          _book(lr=0.05, batch_size=256, resize=96), 0.1,
                          "ResNet-34: ResNet-18's builder with stages 3/4/6/3"),
    "densenet": ModelSpec(DenseNet, _book(lr=0.05, batch_size=256, resize=96), 0.1,
                          "DenseNet, growth rate 32, blocks 4/4/4/4 (§7.7)"),
    **{f"{kind}{depth}": ModelSpec(
        functools.partial(CifarResNet, depth=depth, residual=kind == "resnet"),
        _RESNET_PAPER, 0.1,
        f"{depth}-layer {'residual' if kind == 'resnet' else 'plain (no shortcuts)'} network "
        "of the ResNet paper's CIFAR-10 experiment (degradation experiment)", in_book=False)
       for kind in ("plain", "resnet") for depth in (20, 56)},
}

# The modern recipe, beyond the notes: SGD with momentum 0.9 and weight decay 5e-4, a
# cosine schedule after one epoch of linear warm-up, random crops and flips.
_MODERN = dict(momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
               augment=True)


def list_models(extras: bool = False) -> list[str]:
    """The book's networks, in the order the book introduces them; with `extras`,
    also the plain and residual networks of the degradation experiment."""
    return [name for name, spec in _MODELS.items() if extras or spec.in_book]


def _spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models(extras=True))}"
        ) from None


def get_model(name: str, num_classes: int = 10, **fields) -> nn.Module:
    """Build network `name` with `num_classes` outputs; `fields` override the
    module's other fields (e.g. `get_model('vgg11', ratio=1)`)."""
    return _spec(name).constructor(num_classes=num_classes, **fields)


def recipe(name: str, kind: str = "classic") -> dict:
    """The training settings of network `name` (the `TrainConfig` fields lr, epochs,
    batch_size, resize, momentum, weight_decay, schedule, warmup_epochs, augment).

    kind="classic": the notes' recipe (`d2l.train_ch6`: plain SGD, constant lr, 10
    epochs); for the degradation networks, the ResNet paper's. kind="modern": the
    same input size, batch and epochs with momentum 0.9, weight decay 5e-4, a
    cosine schedule after a 1-epoch warm-up, random crops and flips, at the
    network's modern lr (the original papers' 0.01 with momentum for AlexNet, VGG,
    NiN and GoogLeNet; 0.1 for the rest, which for the LeNets keeps the book's
    effective step, since momentum 0.9 multiplies the step by about 10).
    """
    spec = _spec(name)
    if kind == "classic":
        return dataclasses.asdict(spec.recipe)
    if kind == "modern":
        return dataclasses.asdict(dataclasses.replace(spec.recipe, lr=spec.modern_lr, **_MODERN))
    raise ValueError(f"unknown recipe {kind!r}; valid: {', '.join(RECIPES)}")


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
