"""The figures the study notes report, shipped with the package (`d2l_reference.json`)."""

from __future__ import annotations

import functools
import json
from importlib import resources

# The reference file keys networks as the notes name them.
_REFERENCE_NAMES = {"vgg11": "vgg11 (ratio 4)", "lenet_bn_scratch": "lenet_bn"}


@functools.cache
def load() -> dict:
    """The whole reference file: `runs` (the notes' results) and `parameter_counts`."""
    return json.loads(resources.files("cnnjax").joinpath("d2l_reference.json").read_text())


def parameter_count(arch: str) -> int | None:
    """Trainable parameters of the notes' PyTorch build of `arch`, or None if they
    give none (resnet34 is not in the notes)."""
    return load()["parameter_counts"].get(_REFERENCE_NAMES.get(arch, arch))
