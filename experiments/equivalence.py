"""Check that every network here computes what the book's PyTorch network computes.

    python -m experiments.equivalence                       # all networks
    python -m experiments.equivalence --arch lenet_bn --arch resnet18
    python -m experiments.equivalence --json equivalence.json

For each network, the book's PyTorch network (experiments/torch_reference.py, on the
CPU, one thread) gets random weights: its own Xavier kernels and default biases, and
random batch-norm scales, shifts and moving statistics, so that eval mode is a real
test. The Flax network, as cnnjax.steps.build_model builds it for training, gets the
same weights through cnnjax.convert.from_torch, and both get the same batch of
random images and labels. Compared, in Flax's layout (PyTorch's gradients and
updated weights go through the same converter):

  eval logits    the logits in eval mode (moving batch-norm statistics)
  train logits   the logits in train mode (batch statistics); dropout is off on both
                 sides (rate 0), since the two would draw different masks
  loss           the mean cross-entropy of the train-mode logits
  grads          its gradient with respect to every parameter
  params         the parameters after one SGD step at the book's lr for the network
  BN stats       the moving batch-norm statistics after that step

One convention differs: PyTorch's nn.BatchNorm moves running_var towards the
unbiased batch variance (sum of squares / (n - 1), n = batch x height x width), Flax's
nn.BatchNorm (and the book's from-scratch BatchNorm, on both sides) towards the
biased one (/ n). Moving variances are compared after rescaling Flax's step towards
the batch variance by n / (n - 1); "raw var" is the float64 difference without it.

PyTorch in float64 is the truth, and JAX is compared with it twice:

- in float64 (JAX's 64-bit mode), every quantity must agree to 2^-20 (about 1e-6)
  of the quantity's largest true value. Float64 rounding is far smaller, but the
  networks return float32 logits, and their rounding (about 6e-8) reaches the loss
  and the gradients. This is the equivalence: the same function, gradients, update
  and statistics, with the rounding of float32 out of the way.
- in float32, as training computes, the quantities that are continuous in the
  weights and inputs (eval logits, train logits, BN stats) must be as accurate as
  PyTorch's own float32: within 10 x its error (|PyTorch float32 - truth|, largest
  over the quantity) + 2^-20 x the largest true value (a few float32 rounding steps,
  for quantities PyTorch happens to get almost exactly right). The loss is shown but
  not judged: one number's error says little about the float32 noise. Gradients are
  not compared in float32: where a ReLU input or a max-pool's runner-up lies within
  float32 rounding of the kink, PyTorch and JAX may round it to different sides, and
  the gradient jumps (one ReLU input of RegNetX-32's last block that does can change
  the gradients of every earlier layer by percents). In float64 such a crossing is
  vanishingly unlikely.

Each column shows the largest difference from the truth and, in brackets, that
difference over the quantity's largest true value; * marks what is not judged;
err/tol is the largest difference over its tolerance among the judged quantities (a
match is at most 1).

Inputs are small, so that all networks take a few minutes on 2 CPU cores, but large
enough that the feature map LeNet, AlexNet and VGG flatten, and the one the others
pool globally, is at least 2x2 (RegNetX-32: 4x4 at 32x32), so that the reordering of
flattened features and the pooling are tested.

Exit codes: 0 every network matches; 1 some network does not; 2 bad input (one line).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cnnjax import convert, models, runtime
from cnnjax.config import TrainConfig
from cnnjax.steps import build_model, make_optimizer
from cnnjax.prepared import SettingsError, check_input_size
from experiments.cli import UsageError, fail, parser_for, positive_int

try:
    import torch
    from torch.nn import functional as F

    from experiments import torch_reference
except ImportError:  # main() says so in one line
    torch = None

# The input size of each network: the smallest at which its last feature map, before
# flattening or global pooling, is at least 2x2 (RegNetX-32 has 4x4 at its smallest
# convenient size).
SIZES = {"lenet": 28, "lenet_bn_scratch": 28, "lenet_bn": 28, "alexnet": 97, "vgg11": 64,
         "nin": 99, "googlenet": 64, "resnet18": 64, "resnet34": 64, "densenet": 64,
         "regnetx32": 32}
QUANTITIES = ("eval_logits", "train_logits", "loss", "grads", "params", "batch_stats")
# Continuous functions of the weights and inputs: judged in float32 too.
CONTINUOUS = ("eval_logits", "train_logits", "batch_stats")
F64_TOLERANCE = 2.0 ** -20  # relative to the quantity's largest true value
NOISE_FACTOR = 10.0
FLOOR = 2.0 ** -20  # relative to the quantity's largest true value
BN_MOMENTUM = 0.9  # Flax's convention: the weight of the old moving statistics


@dataclasses.dataclass(frozen=True)
class Comparison:
    """JAX's result for one quantity, in one dtype, against the truth."""

    quantity: str
    dtype: str  # JAX's: float32 or float64
    max_abs: float  # largest |JAX - truth|
    max_rel: float  # max_abs / largest |truth|
    tolerance: float
    judged: bool  # False: shown, not part of the verdict (the float32 loss)
    worst_array: str  # where max_abs is

    @property
    def ratio(self) -> float:
        if self.tolerance:
            return self.max_abs / self.tolerance
        return np.inf if self.max_abs else 0.0

    @property
    def ok(self) -> bool:
        return not self.judged or self.ratio <= 1.0


@dataclasses.dataclass(frozen=True)
class Result:
    arch: str
    resize: int
    batch_size: int
    comparisons: list[Comparison]
    raw_var_max_abs: float | None  # float64 moving variances without the n / (n - 1)
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)


# --- the PyTorch side --------------------------------------------------------------------

def random_torch_network(arch: str, resize: int, seed: int) -> torch.nn.Module:
    """The book's PyTorch network `arch` with its own random initialisation, random
    batch-norm scales, shifts and moving statistics, and dropout off."""
    torch.manual_seed(seed)
    net = torch_reference.build(arch, resize=resize)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                scale, shift = module.weight, module.bias
                mean, var = module.running_mean, module.running_var
            elif isinstance(module, torch_reference.TorchBatchNorm):
                scale, shift = module.gamma, module.beta
                mean, var = module.moving_mean, module.moving_var
            else:
                continue
            scale.uniform_(0.5, 1.5)
            shift.normal_(0.0, 0.2)
            mean.normal_(0.0, 0.2)
            var.uniform_(0.5, 2.0)
    return net


def run_torch(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float
              ) -> dict[str, Any]:
    """Eval logits, then one training step of the book's `train_ch6` (cross-entropy,
    backward, SGD at `lr`), on `net` itself; NumPy arrays, PyTorch's layout."""
    net.eval()
    with torch.no_grad():  # the book's BatchNorm uses its moving statistics without grad
        eval_logits = net(x)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    optimizer.zero_grad()
    logits = net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    optimizer.step()
    return {"eval_logits": eval_logits.numpy(), "train_logits": logits.detach().numpy(),
            "loss": loss.detach().numpy(), "grads": grads, "after": net.state_dict()}


def torch_in_flax_layout(arch: str, resize: int, out: dict[str, Any],
                         before: dict[str, Any]) -> dict[str, Any]:
    """`run_torch`'s results with gradients and weights converted by the converter.
    Gradients exist for parameters only; the statistics of `before` fill the rest."""
    grads = convert.from_torch(arch, {**before, **out["grads"]}, resize, dtype=None)
    after = convert.from_torch(arch, out["after"], resize, dtype=None)
    return {"eval_logits": out["eval_logits"], "train_logits": out["train_logits"],
            "loss": out["loss"], "grads": grads["params"], "params": after["params"],
            "batch_stats": after["batch_stats"]}


# --- the JAX side ------------------------------------------------------------------------

def run_flax(arch: str, resize: int, variables: dict[str, Any], x: np.ndarray,
             y: np.ndarray, lr: float, dtype: str = "float32", train_step: bool = True
             ) -> dict[str, Any]:
    """What `run_torch` computes, with the Flax network as training builds it (CPU
    layers included) computing in `dtype`, and the optimizer training uses. The
    networks return float32 logits whatever `dtype` is. Without `train_step`, only
    the forward passes (no grads, params)."""
    config = TrainConfig.from_recipe(arch, lr=lr, resize=resize)
    model = build_model(config).clone(dtype=jnp.dtype(dtype))
    if hasattr(model, "dropout_rate"):
        model = model.clone(dropout_rate=0.0)
    tx = make_optimizer(config)

    def loss_fn(params, variables, x, y):
        logits, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates.get("batch_stats", {}))

    @jax.jit
    def compute(variables, x, y):
        params = variables["params"]
        out = {"eval_logits": model.apply(variables, x, train=False)}
        if train_step:
            (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, variables, x, y)
            steps, _ = tx.update(grads, tx.init(params), params)
            out.update(grads=grads, params=optax.apply_updates(params, steps))
        else:
            loss, (logits, stats) = loss_fn(params, variables, x, y)
        return {**out, "train_logits": logits, "loss": loss, "batch_stats": stats}

    # float64 needs JAX's 64-bit mode; "highest": true float32 on GPUs and TPUs too.
    with jax.enable_x64(dtype == "float64"), jax.default_matmul_precision("highest"):
        variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
        out = compute(variables, jnp.asarray(x, dtype), jnp.asarray(y))
        return jax.tree.map(np.asarray, out)


def var_as_torch(pairs, batch_size: int, old: dict, new: dict) -> dict:
    """Flax's moving statistics after a step, with each moving variance moved as
    PyTorch's nn.BatchNorm moves it: towards the unbiased batch variance."""
    flat_old, flat_new = traverse_util.flatten_dict(old), traverse_util.flatten_dict(new)
    for t, f in pairs:
        if f.kind != "batch_norm" or "running_var" not in t.tensors:
            continue  # the book's BatchNorm moves towards the biased variance too
        n = batch_size * int(np.prod(f.input_shape[1:-1]))
        key = f.path + (next(name for name in f.batch_stats if name.endswith("var")),)
        kept = BN_MOMENTUM * flat_old[key]
        flat_new[key] = kept + (flat_new[key] - kept) * n / (n - 1)
    return traverse_util.unflatten_dict(flat_new)


# --- the comparison ----------------------------------------------------------------------

def _leaves(tree) -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {"/".join(k): np.asarray(v, np.float64)
                for k, v in traverse_util.flatten_dict(tree).items()}
    return {"": np.asarray(tree, np.float64)}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest |a - b| over all arrays, and the array it is in."""
    if a.keys() != b.keys():
        raise ValueError(f"the arrays differ: {sorted(a)} vs {sorted(b)}")
    diffs = {}
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{name}: shape {a[name].shape} vs {b[name].shape}")
        diffs[name] = float(np.max(np.abs(a[name] - b[name]), initial=0.0))
        if np.isnan(diffs[name]):
            diffs[name] = np.inf
    name = max(diffs, key=diffs.get, default="")
    return diffs.get(name, 0.0), name


def compare(quantity: str, truth, result, torch32=None) -> Comparison:
    """JAX's float64 `result` (no `torch32`) or float32 `result` (with PyTorch's
    float32 `torch32`) for `quantity` against the truth, under the module's rules."""
    truth, result = _leaves(truth), _leaves(result)
    scale = max((float(np.max(np.abs(t), initial=0.0)) for t in truth.values()), default=0.0)
    max_abs, where = _max_diff(result, truth)
    if torch32 is None:
        dtype, tolerance, judged = "float64", F64_TOLERANCE * scale, True
    else:
        noise, _ = _max_diff(_leaves(torch32), truth)
        dtype, tolerance = "float32", NOISE_FACTOR * noise + FLOOR * scale
        judged = quantity in CONTINUOUS
    return Comparison(quantity, dtype, max_abs, max_abs / scale if scale else max_abs,
                      tolerance, judged, where)


def check(arch: str, resize: int | None = None, batch_size: int = 4, seed: int = 0) -> Result:
    """Compare network `arch` with the book's PyTorch network (see the module
    docstring) on a batch of `batch_size` random `resize` x `resize` images."""
    started = time.perf_counter()
    resize = resize or SIZES[arch]
    lr = TrainConfig.from_recipe(arch).lr
    net32 = random_torch_network(arch, resize, seed)
    net64 = copy.deepcopy(net32).double()
    before = {k: v.clone() for k, v in net32.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch_size, 1, resize, resize, generator=generator)
    y = torch.randint(0, 10, (batch_size,), generator=generator)

    truth, torch32 = (torch_in_flax_layout(arch, resize, run_torch(net, inputs, y, lr), before)
                      for net, inputs in ((net64, x.double()), (net32, x)))
    variables = convert.from_torch(arch, before, resize)
    x_nhwc = x.numpy().transpose(0, 2, 3, 1)
    ours = {dtype: run_flax(arch, resize, variables, x_nhwc, y.numpy(), lr, dtype,
                            train_step=dtype == "float64")
            for dtype in ("float64", "float32")}
    raw_var = None
    if variables["batch_stats"]:
        raw_var, _ = _max_diff(
            {k: v for k, v in _leaves(ours["float64"]["batch_stats"]).items()
             if k.endswith("var")},
            {k: v for k, v in _leaves(truth["batch_stats"]).items() if k.endswith("var")})
        pairs = convert.pair_layers(arch, before, resize)
        for out in ours.values():
            out["batch_stats"] = var_as_torch(pairs, batch_size, variables["batch_stats"],
                                              out["batch_stats"])
    quantities = [q for q in QUANTITIES if q != "batch_stats" or variables["batch_stats"]]
    comparisons = ([compare(q, truth[q], ours["float64"][q]) for q in quantities]
                   + [compare(q, truth[q], ours["float32"][q], torch32[q]) for q in quantities
                      if q in ours["float32"]])
    return Result(arch, resize, batch_size, comparisons, raw_var,
                  time.perf_counter() - started)


# --- the command line --------------------------------------------------------------------

HEADERS = {"eval_logits": "eval logits", "train_logits": "train logits", "loss": "loss",
           "grads": "grads", "params": "params", "batch_stats": "BN stats"}


def format_rows(result: Result) -> list[str]:
    """Two lines for one network: JAX in float64, then in float32, against the truth;
    a value that is not judged is marked with *."""
    lines = []
    for dtype in ("float64", "float32"):
        by_name = {c.quantity: c for c in result.comparisons if c.dtype == dtype}
        cells = [f"{c.max_abs:.1e} ({c.max_rel:.0e}){'' if c.judged else '*'}"
                 if (c := by_name.get(q)) else "-" for q in QUANTITIES]
        judged = [c for c in by_name.values() if c.judged]
        failed = [c.quantity for c in judged if not c.ok]
        verdict = ("MISMATCH in " + ", ".join(failed) if failed
                   else "match" if dtype == "float32" and result.ok else "")
        name, size = (result.arch, str(result.resize)) if dtype == "float64" else ("", "")
        raw = ("-" if result.raw_var_max_abs is None else f"{result.raw_var_max_abs:.1e}"
               ) if dtype == "float64" else ""
        lines.append("  ".join([f"{name:<17}{size:>4}", f"{dtype:<7}",
                                *(f"{c:<17}" for c in cells), f"{raw:<8}",
                                f"{max(c.ratio for c in judged):<7.2f}", verdict]).rstrip())
    return lines


def header() -> str:
    return "  ".join([f"{'network':<17}{'size':>4}", f"{'JAX':<7}",
                      *(f"{HEADERS[q]:<17}" for q in QUANTITIES), f"{'raw var':<8}",
                      f"{'err/tol':<7}", "result"])


def to_json(results: list[Result], seconds: float) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "jax_device": str(jax.devices()[0]),
        "rules": {
            "float64": f"|jax64 - torch64| <= {F64_TOLERANCE:.3g} x max |torch64|, "
                       "per quantity, for every quantity",
            "float32": f"|jax32 - torch64| <= {NOISE_FACTOR:g} x |torch32 - torch64| + "
                       f"{FLOOR:.3g} x max |torch64|, per quantity, for "
                       f"{', '.join(CONTINUOUS)}",
        },
        "matched": sum(r.ok for r in results),
        "networks": [{"arch": r.arch, "resize": r.resize, "batch_size": r.batch_size,
                      "match": r.ok, "seconds": round(r.seconds, 1),
                      "raw_var_max_abs": r.raw_var_max_abs,
                      "comparisons": [{**dataclasses.asdict(c), "ratio": c.ratio, "ok": c.ok}
                                      for c in r.comparisons]}
                     for r in results],
    }


def build_parser():
    parser = parser_for("experiments.equivalence", __doc__)
    parser.add_argument("--arch", action="append", choices=models.list_models(),
                        metavar="NAME", help="network to check; repeat for several "
                        f"(default: all: {', '.join(models.list_models())})")
    parser.add_argument("--resize", type=positive_int, metavar="R",
                        help="input size for every network checked (default: "
                             + ", ".join(f"{arch} {size}" for arch, size in SIZES.items())
                             + ")")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                        help="images per batch, at least 2 (default: 4)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the weights, images and labels (default: 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if torch is None:
        return fail(prog, "the check needs PyTorch: pip install torch (on a CPU-only "
                          "machine: --index-url https://download.pytorch.org/whl/cpu)")
    archs = args.arch or models.list_models()
    try:
        if args.batch_size < 2:
            raise UsageError("--batch-size must be at least 2 (batch norm's unbiased "
                             "variance divides by batch x height x width - 1)")
        for arch in archs if args.resize else ():
            check_input_size(arch, args.resize)
    except (UsageError, SettingsError) as err:
        return fail(prog, str(err))
    runtime.configure()
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"JAX ({jax.devices()[0].platform}) in float64 and float32 against the book's "
          f"PyTorch networks in float64 (the truth), batch {args.batch_size}. Columns: the "
          "largest |error| (over the largest true value); * not judged (see --help).")
    print(header())
    results = []
    for arch in archs:
        results.append(check(arch, args.resize, args.batch_size, args.seed))
        print("\n".join(format_rows(results[-1])), flush=True)
    seconds = time.perf_counter() - started
    matched = sum(r.ok for r in results)
    print(f"checked in {seconds:.0f}s")
    print(f"{matched}/{len(results)} networks match the book's PyTorch networks")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(to_json(results, seconds), f, indent=1)
                f.write("\n")
        except OSError as err:
            return fail(prog, f"cannot write --json {args.json}: {err.strerror}")
    return 0 if matched == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
