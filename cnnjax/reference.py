"""The reference figures, shipped with the package (`d2l_reference.json`): the results
of the book's PyTorch code as published with the d2l study notes cnnjax follows, and
the parameter counts of those PyTorch networks."""

from __future__ import annotations

import functools
import json
from importlib import resources

# The reference file keys some networks by other names.
_RESULT_NAMES = {"vgg11": "vgg11 (ratio 4)"}
_COUNT_NAMES = {"vgg11": "vgg11 (ratio 4)", "lenet_bn_scratch": "lenet_bn"}


@functools.cache
def load() -> dict:
    """The whole reference file: `runs` (results) and `parameter_counts`."""
    return json.loads(resources.files("cnnjax").joinpath("d2l_reference.json").read_text())


def result(arch: str) -> dict | None:
    """The reference run of `arch` (lr, batch, input size, epochs, final loss and
    accuracies, examples/sec), or None. Where two sources report one, the one that
    follows the book chapter by chapter ("001") wins."""
    name = _RESULT_NAMES.get(arch, arch)
    rows = sorted((r for r in load()["runs"] if r["arch"] == name),
                  key=lambda r: r["source"] != "001")
    return rows[0] if rows else None


def parameter_count(arch: str) -> int | None:
    """Trainable parameters of the reference PyTorch build of `arch`, or None if
    there is none (resnet34)."""
    return load()["parameter_counts"].get(_COUNT_NAMES.get(arch, arch))
