"""The model zoo's names: each maps to a constructor and a one-line description.

As in timm, `get_model(name, **fields)` builds a network; the fields override the
module's own (e.g. `get_model("vgg11", ratio=1)`, or the `conv`, `dense` and `norm`
layers it is built from). The training recipes live in `cnnjax.config`, the
inspection tools (summary, parameter counts) in `cnnjax.models.summary`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cnnjax.scratch import BatchNorm as ScratchBatchNorm
from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseNet
from cnnjax.models.googlenet import GoogLeNet
from cnnjax.models.lenet import LeNet, LeNetBN
from cnnjax.models.nin import NiN
from cnnjax.models.regnet import AnyNet
from cnnjax.models.resnet import CifarResNet, ResNet
from cnnjax.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    constructor: Callable[..., nn.Module]
    description: str
    in_book: bool = True  # False: the degradation experiment's networks


_MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(LeNet, "LeNet-5 with sigmoids and average pooling (§6.6)"),
    "lenet_bn_scratch": ModelSpec(functools.partial(LeNetBN, norm=ScratchBatchNorm),
                                  "LeNet with the from-scratch batch norm (§7.5.3-7.5.4)"),
    "lenet_bn": ModelSpec(LeNetBN, "LeNet with flax.linen.BatchNorm (§7.5.5)"),
    "alexnet": ModelSpec(AlexNet, "AlexNet (§7.1)"),
    "vgg11": ModelSpec(VGG, "VGG-11 with conv widths divided by `ratio` (4 as trained "
                            "in §7.2)"),
    "nin": ModelSpec(NiN, "Network in Network (§7.3)"),
    "googlenet": ModelSpec(GoogLeNet, "GoogLeNet with nine Inception blocks (§7.4)"),
    "resnet18": ModelSpec(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
                          "ResNet-18 (§7.6)"),
    "resnet34": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
                          "ResNet-34: ResNet-18's builder with stages 3/4/6/3"),
    "densenet": ModelSpec(DenseNet, "DenseNet, growth rate 32, blocks 4/4/4/4 (§7.7)"),
    "regnetx32": ModelSpec(functools.partial(AnyNet, stem_channels=32, depths=(4, 6),
                                             widths=(32, 80), groups=16, bot_mul=1),
                           "RegNetX-32: AnyNet with ResNeXt blocks (d2l-en §8.8)"),
    **{f"{kind}{depth}": ModelSpec(
        functools.partial(CifarResNet, depth=depth, residual=kind == "resnet"),
        f"{depth}-layer {'residual' if kind == 'resnet' else 'plain (no shortcuts)'} network "
        "of the ResNet paper's CIFAR-10 experiment (degradation experiment)", in_book=False)
       for kind in ("plain", "resnet") for depth in (20, 56)},
}


def list_models(extras: bool = False) -> list[str]:
    """The book's networks, in the order the book introduces them; with `extras`,
    also the plain and residual networks of the degradation experiment."""
    return [name for name, spec in _MODELS.items() if extras or spec.in_book]


def get_spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models(extras=True))}"
        ) from None


def get_model(name: str, num_classes: int = 10, layers: dict[str, Any] | None = None,
              **fields) -> nn.Module:
    """Build network `name` with `num_classes` outputs; `fields` override the
    module's other fields (e.g. `get_model('vgg11', ratio=1)`). `layers` replaces
    the layers it is built from (`conv`, `max_pool`, ...; `cnnjax.cpu_kernels.layers_for`)
    where the network has them (LeNet has no max pool) and its name does not fix
    them (lenet_bn_scratch keeps the book's batch norm)."""
    constructor = get_spec(name).constructor
    module = getattr(constructor, "func", constructor)  # through functools.partial
    names = {field.name for field in dataclasses.fields(module)}
    chosen = getattr(constructor, "keywords", {})  # lenet_bn_scratch's own `norm`
    fields.update({k: v for k, v in (layers or {}).items() if k in names and k not in chosen})
    return constructor(num_classes=num_classes, **fields)


def describe(name: str) -> str:
    """A one-line description of network `name`, with its book section."""
    return get_spec(name).description
