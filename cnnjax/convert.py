"""The weights of the book's PyTorch networks in cnnjax's Flax networks.

`from_torch(arch, state_dict)` turns the `state_dict()` of a network as the book
builds it in PyTorch (`experiments/torch_reference.py` rebuilds them all) into the
`{"params", "batch_stats"}` of the same network here:

    variables = from_torch("lenet_bn", torch.load("lenet_bn.pt", weights_only=True))
    logits = get_model("lenet_bn").apply(variables, images, train=False)

Layers are paired kind by kind (convolutions with convolutions, dense layers with
dense layers, batch norms with batch norms), each kind in order: PyTorch's in the
order its modules were registered (the order of the state dict), Flax's in the order
the network calls them. Within each kind the two orders agree for every network of
the book, although across kinds they need not (the book's `Residual` registers its
1x1 `conv3` before `bn1`; Flax creates it last). Every pair must have the same shapes
once the layouts are converted:

- convolution: weight (O, I/groups, kh, kw) -> kernel (kh, kw, I/groups, O); bias;
- dense (`nn.Linear`): weight (out, in) -> kernel (in, out); bias. A dense layer fed
  by a flattened feature map gets its input rows reordered from PyTorch's
  channel-major (C, H, W) flattening to the channels-last (H, W, C) one here;
- batch norm: weight, bias, running_mean, running_var (`nn.BatchNorm2d/1d`) or
  gamma, beta, moving_mean, moving_var (the book's from-scratch `BatchNorm`, §7.5.3)
  -> scale, bias, mean, var (`nn.BatchNorm`) or gamma, beta, moving_mean, moving_var
  (`cnnjax.scratch.BatchNorm`). `num_batches_tracked` has no counterpart.

Anything that does not pair up raises ValueError naming the layers concerned: a
layer without a counterpart of its kind, or a pair whose shapes differ (both named).
PyTorch itself is not needed: the values may be tensors or NumPy arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.config import recipe_settings
from cnnjax.models import get_model

KINDS = ("conv", "dense", "batch_norm")

# Each batch-norm naming: (scale, bias, mean, var) in that order.
TORCH_BN_NAMES = (("weight", "bias", "running_mean", "running_var"),
                  ("gamma", "beta", "moving_mean", "moving_var"))
FLAX_BN_NAMES = {("scale", "bias"): ("mean", "var"),
                 ("gamma", "beta"): ("moving_mean", "moving_var")}


@dataclasses.dataclass(frozen=True)
class FlaxLayer:
    """A layer of a Flax network that holds variables, as it is called."""

    path: tuple[str, ...]  # its place in the variables tree
    kind: str  # one of KINDS
    params: dict[str, tuple[int, ...]]  # name -> shape
    batch_stats: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]  # for a batch of one image
    # (H, W, C) of the feature map a dense layer's input is the flattening of.
    flattened_from: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        return "/".join(self.path) or "(top)"


@dataclasses.dataclass(frozen=True)
class TorchLayer:
    """A module of a PyTorch state dict that holds tensors."""

    prefix: str  # the key of its tensors, less ".weight" etc.
    kind: str
    tensors: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.prefix or "(top)"


@functools.cache
def flax_layers(arch: str, resize: int | None = None) -> tuple[FlaxLayer, ...]:
    """The layers of network `arch` with variables, in the order it calls them for
    one `resize` x `resize` image (default: the book's size for it). Nothing is
    computed: the network is traced abstractly."""
    resize = resize or recipe_settings(arch)["resize"]
    model = get_model(arch)
    inputs: dict[tuple[str, ...], tuple[int, ...]] = {}
    flattened: dict[tuple[str, ...], tuple[int, ...] | None] = {}
    last_output: list[tuple[int, ...] | None] = [None]

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = context.module.path
        if path not in inputs:
            inputs[path] = tuple(args[0].shape)
            flattened[path] = last_output[0]
        out = next_fun(*args, **kwargs)
        last_output[0] = tuple(out.shape) if hasattr(out, "shape") else None
        return out

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init(
            rngs, jnp.zeros((1, resize, resize, 1)), train=False))

    def own(collection: str, path: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        tree = variables.get(collection, {})
        for name in path:
            tree = tree.get(name, {})
        return {k: tuple(v.shape) for k, v in tree.items() if not isinstance(v, Mapping)}

    layers = []
    for path, input_shape in inputs.items():
        params, stats = own("params", path), own("batch_stats", path)
        if not params and not stats:
            continue  # a container, a pool, dropout
        kind = _flax_kind(path, params, stats)
        source = None
        if kind == "dense":
            source = _flattened_map(path, input_shape, flattened[path])
        layers.append(FlaxLayer(path, kind, params, stats, input_shape, source))
    return tuple(layers)


def _flax_kind(path, params, stats) -> str:
    if set(params) == {"kernel", "bias"} and not stats:
        if len(params["kernel"]) == 4:
            return "conv"
        if len(params["kernel"]) == 2:
            return "dense"
    for names, stat_names in FLAX_BN_NAMES.items():
        if set(params) == set(names) and set(stats) == set(stat_names):
            return "batch_norm"
    raise ValueError(f"Flax layer {'/'.join(path)} holds {sorted(params)} and "
                     f"{sorted(stats)}: not a convolution, dense or batch-norm layer")


def _flattened_map(path, input_shape, previous) -> tuple[int, int, int] | None:
    """(H, W, C) of the map a dense layer's input was flattened from, or None when
    its input is a vector already (after global pooling or another dense layer)."""
    if previous is None or len(previous) == 2:
        return None
    if len(previous) == 4 and math.prod(previous[1:]) == input_shape[-1]:
        return tuple(previous[1:])
    raise ValueError(f"cannot tell how the input of Flax layer {'/'.join(path)} "
                     f"{input_shape} was made from the {previous} output before it")


def torch_layers(state_dict: Mapping[str, Any]) -> list[TorchLayer]:
    """The modules of a PyTorch state dict with their tensors as NumPy arrays, in the
    order of the state dict; `num_batches_tracked` is left out."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if name == "num_batches_tracked":
            continue
        grouped.setdefault(prefix, {})[name] = _numpy(key, value)
    return [TorchLayer(prefix, _torch_kind(prefix, tensors), tensors)
            for prefix, tensors in grouped.items()]


def _numpy(key: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    except Exception as err:  # noqa: BLE001 -- any value that is not an array
        raise ValueError(f"state dict entry {key!r} is not an array: {err}") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"state dict entry {key!r} is not an array of numbers "
                         f"(dtype {array.dtype})")
    return array


def _torch_kind(prefix: str, tensors: dict[str, np.ndarray]) -> str:
    names = set(tensors)
    if names == {"weight", "bias"} and tensors["weight"].ndim in (2, 4):
        return "conv" if tensors["weight"].ndim == 4 else "dense"
    if any(names == set(bn) for bn in TORCH_BN_NAMES):
        return "batch_norm"
    shapes = ", ".join(f"{k} {v.shape}" for k, v in tensors.items())
    raise ValueError(f"PyTorch layer {prefix or '(top)'} ({shapes}) is not a "
                     "convolution, linear or batch-norm layer")


def pair_layers(arch: str, state_dict: Mapping[str, Any], resize: int | None = None
                ) -> list[tuple[TorchLayer, FlaxLayer]]:
    """Each PyTorch layer of `state_dict` with the layer of network `arch` it maps
    to, in Flax's call order (see the module docstring). Raises ValueError when the
    two do not pair up (a layer has no counterpart, or the kinds' counts differ)."""
    torch_side, flax_side = torch_layers(state_dict), flax_layers(arch, resize)
    pairs = []
    for kind in KINDS:
        ours = [layer for layer in flax_side if layer.kind == kind]
        theirs = [layer for layer in torch_side if layer.kind == kind]
        for t, f in itertools.zip_longest(theirs, ours):
            if f is None or t is None:
                missing = (f"PyTorch layer {t.name} has no counterpart in {arch}" if f is None
                           else f"{arch}'s layer {f.name} has no counterpart in the state dict")
                raise ValueError(f"{missing}: the state dict has {len(theirs)} {kind} layers, "
                                 f"{arch} has {len(ours)}")
            pairs.append((t, f))
    order = {layer.path: i for i, layer in enumerate(flax_side)}
    return sorted(pairs, key=lambda pair: order[pair[1].path])


def nchw_to_nhwc_rows(weight: np.ndarray, height: int, width: int, channels: int
                      ) -> np.ndarray:
    """A dense weight (out, C*H*W) that reads a (C, H, W)-flattened map, reordered
    to read the same map flattened as (H, W, C)."""
    out = weight.shape[0]
    return weight.reshape(out, channels, height * width).transpose(0, 2, 1).reshape(out, -1)


def _mismatch(t: TorchLayer, f: FlaxLayer, what: str) -> ValueError:
    hint = ""
    if f.flattened_from is not None:
        hint = (f"; it reads a flattened {'x'.join(map(str, f.flattened_from))} (HxWxC) "
                "map: was the PyTorch network built for another input size (resize)?")
    return ValueError(f"PyTorch layer {t.name} ({t.kind}) does not fit {f.name}: {what}{hint}")


def _convert(t: TorchLayer, f: FlaxLayer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if f.kind in ("conv", "dense"):
        weight, bias = t.tensors["weight"], t.tensors["bias"]
        want = f.params["kernel"]
        # PyTorch's shape of the kernel Flax wants.
        torch_shape = (want[3], want[2], want[0], want[1]) if f.kind == "conv" else want[::-1]
        if weight.shape != torch_shape or bias.shape != f.params["bias"]:
            raise _mismatch(t, f, f"weight {weight.shape} and bias {bias.shape} for kernel "
                                  f"{want} (PyTorch: {torch_shape}) and bias {f.params['bias']}")
        if f.kind == "conv":
            kernel = weight.transpose(2, 3, 1, 0)
        else:
            if f.flattened_from is not None:
                weight = nchw_to_nhwc_rows(weight, *f.flattened_from)
            kernel = weight.T
        return {"kernel": kernel, "bias": bias}, {}
    names = next(n for n in TORCH_BN_NAMES if set(n) == set(t.tensors))
    # The book's BatchNorm keeps (1, C) or (1, C, 1, 1) tensors; nn.BatchNorm (C,).
    values = [t.tensors[n].reshape(-1) for n in names]
    param_names = next(p for p in FLAX_BN_NAMES if set(p) == set(f.params))
    channels = f.params[param_names[0]][0]
    if any(v.shape != (channels,) for v in values):
        shapes = ", ".join(f"{n} {t.tensors[n].shape}" for n in names)
        raise _mismatch(t, f, f"{shapes} for {channels} channels")
    return (dict(zip(param_names, values[:2])),
            dict(zip(FLAX_BN_NAMES[param_names], values[2:])))


def from_torch(arch: str, state_dict: Mapping[str, Any], resize: int | None = None,
               dtype: Any = np.float32) -> dict[str, Any]:
    """The variables ({"params", "batch_stats"}, NumPy arrays of `dtype`, or of the
    state dict's dtype if None) of network `arch` holding the weights and batch-norm
    statistics of `state_dict`, the `state_dict()` of the book's PyTorch network
    (`experiments.torch_reference.build(arch, resize=resize)`). `resize` (default: the
    book's for `arch`) sizes the dense layers of the networks that flatten a feature
    map (LeNet, AlexNet, VGG). Raises ValueError if the two do not match."""
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for t, f in pair_layers(arch, state_dict, resize):
        params, stats = _convert(t, f)
        for collection, values in (("params", params), ("batch_stats", stats)):
            if not values:
                continue
            tree = variables[collection]
            for name in f.path:
                tree = tree.setdefault(name, {})
            tree.update({k: np.asarray(v, dtype) if dtype is not None else v.copy()
                         for k, v in values.items()})
    return variables
