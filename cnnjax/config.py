"""Every setting of a training run, and the recipes that fill them in.

`TrainConfig` is the one list of settings: the command line (`experiments.run`
makes a flag of every field), config.json and every experiment read and write it.
A recipe is a set of its values:

- classic, the book's (`d2l.train_ch6`: plain SGD at a constant lr, 10 epochs),
  with each network's lr, batch size and input size from the book's chapters;
- modern, beyond the book: momentum, weight decay, a cosine schedule after a
  linear warm-up, random crops and flips;
- the CPU recipe, `experiments.reproduce --cpu`: for ResNet-18, the classic recipe
  on all the data for fewer epochs at a smaller input size, so that it reaches a
  real accuracy within an hour on a 2-core CPU (named as such wherever it is
  reported).

    config = TrainConfig.from_recipe("resnet18", "modern", lr=0.2, augment=False)
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from cnnjax.models import registry

RECIPES = ("classic", "modern")
SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
INITS = ("book", "zeros")


# --- checks shared by the dataclass and the command line ----------------------------------

def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any) -> str | None:
    """None if `value` is a whole number > 0, else what is wrong."""
    return None if _whole_number(value) and value > 0 else "expected a whole number > 0"


def positive_float(value: Any) -> str | None:
    return None if _number(value) and value > 0 else "expected a finite number > 0"


def non_negative_float(value: Any) -> str | None:
    return None if _number(value) and value >= 0 else "expected a finite number >= 0"


def any_int(value: Any) -> str | None:
    return None if _whole_number(value) else "expected a whole number"


def one_of(*choices: str):
    def check(value: Any) -> str | None:
        return None if value in choices else f"expected one of {', '.join(choices)}"
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def setting(default: Any, help: str, check=None, *, choices: tuple[str, ...] = (),
            optional: bool = False, metavar: str | None = None) -> Any:
    """A TrainConfig field: its default, its --help text and the check its values pass
    (`choices`: one of these strings; `optional`: None is allowed too, meaning "all")."""
    return dataclasses.field(default=default, metadata={
        "help": help, "check": check or one_of(*choices), "choices": choices,
        "optional": optional, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's numbers (same config, seed and device: same
    numbers). Build one with `from_recipe`; every field is checked on creation."""

    arch: str = setting(None, "network to train", choices=tuple(registry.list_models(extras=True)),
                        metavar="NAME")
    recipe: str = setting("classic", "which recipe the other defaults come from: classic "
                          "(the book's: plain SGD, constant lr) or modern (momentum 0.9, "
                          "weight decay 5e-4, cosine schedule after 1 epoch of warm-up, "
                          "random crops and flips)", choices=RECIPES)
    epochs: int = setting(10, "passes over the training set", positive_int, metavar="N")
    lr: float = setting(0.1, "SGD learning rate (the peak lr with a cosine schedule)",
                        positive_float)
    batch_size: int = setting(256, "examples per SGD step (global: split over the devices) "
                              "and per evaluation batch", positive_int, metavar="N")
    resize: int = setting(28, "resize the 28x28 images to RxR on the device (bilinear)",
                          positive_int, metavar="R")
    momentum: float = setting(0.0, "SGD momentum (0: plain SGD, as in the book)",
                              non_negative_float, metavar="M")
    weight_decay: float = setting(0.0, "L2 weight decay added to the gradient, as in "
                                  "torch.optim.SGD", non_negative_float, metavar="WD")
    schedule: str = setting("constant", "lr schedule: constant, or cosine (decay to 0 at "
                            "the last step, after --warmup-epochs of linear warm-up)",
                            choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, "epochs of linear warm-up from 0 to --lr (cosine "
                                   "schedule only)", non_negative_float, metavar="E")
    augment: bool = setting(False, "random crop (2-pixel padding) and horizontal flip of "
                            "every training image, on the device", boolean)
    seed: int = setting(0, "seed of initialisation, shuffling, dropout and augmentation",
                        any_int, metavar="S")
    init: str = setting("book", "initial biases: book (as the book's train_ch6 leaves them: "
                        "PyTorch's default, uniform in +-1/sqrt(fan_in)) or zeros (Flax's "
                        "default); kernels are Xavier-uniform either way", choices=INITS)
    max_train: int | None = setting(None, "train on the first N training images only "
                                    "(quick runs; default all 60,000)", positive_int,
                                    optional=True, metavar="N")
    max_test: int | None = setting(None, "evaluate on the first N test images only "
                                   "(quick runs; default all 10,000)", positive_int,
                                   optional=True, metavar="N")
    dtype: str = setting("float32", "computation dtype of convolutions and matmuls; "
                         "params, optimizer state, BN statistics and the loss stay float32",
                         choices=DTYPES)
    cpu_kernels: bool = setting(True, "on a CPU, build the network from cnnjax's CPU kernels "
                                "(cnnjax.cpu_kernels: the same values, faster on XLA:CPU); "
                                "--no-cpu-kernels builds it from the plain layers. No effect "
                                "on a GPU or TPU", boolean)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.metadata["optional"]:
                continue
            problem = field.metadata["check"](value)
            if problem:
                raise ValueError(f"{field.name}: {problem}, got {value!r}")

    @classmethod
    def from_recipe(cls, arch: str, recipe: str = "classic", **overrides: Any) -> TrainConfig:
        """`recipe` for `arch`, with the `overrides` that are not None applied."""
        settings = recipe_settings(arch, recipe)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(arch=arch, recipe=recipe, **settings)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config a dict (e.g. config.json) describes; missing fields take the
        defaults. Raises ValueError for unknown fields or bad values."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown settings {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def is_full_recipe(self) -> bool:
        """Whether this is exactly its recipe (seed, initialisation and dtype aside) on
        all the data."""
        recipe = recipe_settings(self.arch, self.recipe)
        return (all(getattr(self, k) == v for k, v in recipe.items())
                and self.max_train is None and self.max_test is None)


# --- the recipes --------------------------------------------------------------------------

# The book's `train_ch6`: lr, batch size and input size of each network as its chapter
# trains it (d2l §6.6 and §7.1-7.7; RegNetX-32 from the English edition's §8.8, whose
# `d2l.Trainer` does the same), 10 epochs of plain SGD at a constant lr.
BOOK: dict[str, dict[str, Any]] = {
    "lenet": dict(lr=0.9, batch_size=256, resize=28),
    "lenet_bn_scratch": dict(lr=1.0, batch_size=256, resize=28),
    "lenet_bn": dict(lr=1.0, batch_size=256, resize=28),
    "alexnet": dict(lr=0.01, batch_size=128, resize=224),
    "vgg11": dict(lr=0.05, batch_size=128, resize=224),
    "nin": dict(lr=0.1, batch_size=128, resize=224),
    "googlenet": dict(lr=0.1, batch_size=128, resize=96),
    "resnet18": dict(lr=0.05, batch_size=256, resize=96),
    "resnet34": dict(lr=0.05, batch_size=256, resize=96),
    "densenet": dict(lr=0.05, batch_size=256, resize=96),
    "regnetx32": dict(lr=0.05, batch_size=128, resize=96),
}

# The ResNet paper's small-image networks (degradation experiment) get the paper's
# CIFAR-10 settings (He et al. 2016, §4.2) at 28x28: its first phase, lr 0.1, for 20 epochs.
RESNET_PAPER = dict(lr=0.1, batch_size=128, resize=28, epochs=20, momentum=0.9,
                    weight_decay=1e-4)

# The modern recipe: the classic one's input size, batch and epochs, with these.
MODERN = dict(momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
              augment=True)
# Its peak lr: the original papers' 0.01 with momentum for AlexNet, VGG, NiN and
# GoogLeNet; 0.1 for the rest (for the LeNets about the book's step of 1.0, since
# momentum 0.9 multiplies the step by about 10).
MODERN_LR = {"alexnet": 0.01, "vgg11": 0.01, "nin": 0.01, "googlenet": 0.01}


def recipe_settings(arch: str, recipe: str = "classic") -> dict[str, Any]:
    """The fields `recipe` sets for `arch` (a fresh dict)."""
    registry.get_spec(arch)  # unknown names fail here, with the valid ones
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.name in ("epochs", "momentum", "weight_decay", "schedule",
                              "warmup_epochs", "augment")}
    classic = {**defaults, **(BOOK[arch] if arch in BOOK else RESNET_PAPER)}
    if recipe == "classic":
        return classic
    return {**classic, **MODERN, "lr": MODERN_LR.get(arch, 0.1)}


# --- the CPU recipe and the experiments' quick presets --------------------------------------

# The smallest comfortable input size of each larger network on a CPU (the notebook's
# quick CPU run, and the CPU recipe).
CPU_RESIZE = {"alexnet": 96, "vgg11": 64, "nin": 96, "googlenet": 64, "resnet18": 64,
              "resnet34": 64, "densenet": 64, "regnetx32": 64}
# experiments.reproduce --cpu: the LeNets keep their full recipe (minutes on 2 cores);
# ResNet-18 keeps its lr and batch size and trains on all the data for CPU_EPOCHS epochs
# at CPU_RESIZE (its first epoch took 26 minutes on 2 cores without AVX-512, with other
# work running). The other networks have none: the plain SGD of AlexNet, VGG, NiN and
# GoogLeNet needs more epochs than that, and DenseNet and RegNetX-32 would add as much
# time again each.
CPU_EPOCHS = 2
CPU_RECIPE_ARCHS = ("lenet", "lenet_bn_scratch", "lenet_bn", "resnet18")
# experiments.degradation --quick: 8 epochs on 6,400 images (about 30 minutes on 2 cores).
DEGRADATION_QUICK = dict(epochs=8, max_train=6_400, max_test=2_000)


def cpu_overrides(arch: str) -> dict[str, Any]:
    """What the CPU recipe (`experiments.reproduce --cpu`) changes in `arch`'s classic
    recipe: nothing for the LeNets. Raises ValueError for a network without one."""
    if arch not in CPU_RECIPE_ARCHS:
        raise ValueError(f"{arch} has no CPU recipe (networks with one: "
                         f"{', '.join(CPU_RECIPE_ARCHS)}); train it without --cpu, "
                         "on a GPU")
    if BOOK[arch]["resize"] == 28:
        return {}
    return {"epochs": CPU_EPOCHS, "resize": CPU_RESIZE[arch]}
