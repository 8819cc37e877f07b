"""The book's PyTorch weights in the Flax networks (`cnnjax.convert`) and the check
that the networks compute what the book's compute (`experiments.equivalence`).

The converter's tests on NumPy state dicts run everywhere; the tests against the
PyTorch networks need PyTorch and are skipped without it.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax import convert, models
from experiments import equivalence, run

# --- the converter on NumPy state dicts (no PyTorch) ---------------------------------------

# The book's LeNet (§6.6) and LeNet with batch norm (§7.5) at 28x28: PyTorch's shape
# of each conv and linear weight, or the channels of each batch norm, under the key
# nn.Sequential gives the layer.
LENET = {"0": (6, 1, 5, 5), "3": (16, 6, 5, 5), "7": (120, 400), "9": (84, 120),
         "11": (10, 84)}
LENET_BN = {"0": (6, 1, 5, 5), "1": 6, "4": (16, 6, 5, 5), "5": 16, "9": (120, 256),
            "10": 120, "12": (84, 120), "13": 84, "15": (10, 84)}


def numpy_state_dict(layers: dict, scratch_bn: bool = False, seed: int = 0) -> dict:
    """A random state dict in PyTorch's layout for `layers`. Batch norms use
    nn.BatchNorm's names, or with `scratch_bn` those of the book's from-scratch
    BatchNorm (§7.5.3) and its shapes: (1, C, 1, 1) after a conv, (1, C) after a
    linear layer."""
    rng = np.random.default_rng(seed)
    state, conv = {}, True
    for key, shape in layers.items():
        if isinstance(shape, tuple):
            state[f"{key}.weight"] = rng.normal(0, 0.3, shape).astype(np.float32)
            state[f"{key}.bias"] = rng.normal(0, 0.3, shape[0]).astype(np.float32)
            conv = len(shape) == 4
            continue
        names = ("weight", "bias", "running_mean", "running_var")
        bn_shape = (shape,)
        if scratch_bn:
            names = ("gamma", "beta", "moving_mean", "moving_var")
            bn_shape = (1, shape, 1, 1) if conv else (1, shape)
        values = (rng.uniform(0.5, 1.5, bn_shape), rng.normal(0, 0.2, bn_shape),
                  rng.normal(0, 0.2, bn_shape), rng.uniform(0.5, 2.0, bn_shape))
        state.update({f"{key}.{n}": v.astype(np.float32) for n, v in zip(names, values)})
        if not scratch_bn:
            state[f"{key}.num_batches_tracked"] = np.array(3)
    return state


def _conv(x, state, key, padding=0):
    y = lax.conv_general_dilated(x, state[f"{key}.weight"], (1, 1), [(padding, padding)] * 2,
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + state[f"{key}.bias"][None, :, None, None]


def _avg_pool(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4


def _linear(x, state, key):
    return x @ state[f"{key}.weight"].T + state[f"{key}.bias"]


def _batch_norm(x, state, key):
    """Eval mode, with either naming; parameters broadcast along axis 1 (channels)."""
    names = [("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_var")]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale, shift, mean, var = (next(state[f"{key}.{n}"] for n in pair if f"{key}.{n}" in state)
                               .reshape(shape) for pair in names)
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + shift


def nchw_lenet(state, x):
    """The book's LeNet on NCHW images with PyTorch-layout weights, flattening
    channel-major as nn.Flatten does: a reference written without the converter."""
    x = _avg_pool(jax.nn.sigmoid(_conv(x, state, "0", padding=2)))
    x = _avg_pool(jax.nn.sigmoid(_conv(x, state, "3")))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.sigmoid(_linear(x, state, "7"))
    x = jax.nn.sigmoid(_linear(x, state, "9"))
    return _linear(x, state, "11")


def nchw_lenet_bn(state, x):
    """The book's LeNet with batch norm (§7.5.4), in eval mode, like `nchw_lenet`."""
    x = _avg_pool(jax.nn.sigmoid(_batch_norm(_conv(x, state, "0"), state, "1")))
    x = _avg_pool(jax.nn.sigmoid(_batch_norm(_conv(x, state, "4"), state, "5")))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.sigmoid(_batch_norm(_linear(x, state, "9"), state, "10"))
    x = jax.nn.sigmoid(_batch_norm(_linear(x, state, "12"), state, "13"))
    return _linear(x, state, "15")


NUMPY_CASES = {
    "lenet": (LENET, False, nchw_lenet),
    "lenet_bn": (LENET_BN, False, nchw_lenet_bn),
    "lenet_bn_scratch": (LENET_BN, True, nchw_lenet_bn),
}


def converted_and_reference_logits(arch: str):
    layers, scratch_bn, reference = NUMPY_CASES[arch]
    state = numpy_state_dict(layers, scratch_bn)
    x = jax.random.uniform(jax.random.key(0), (3, 1, 28, 28))
    variables = convert.from_torch(arch, state)
    ours = models.get_model(arch).apply(variables, jnp.transpose(x, (0, 2, 3, 1)), train=False)
    return np.asarray(ours), np.asarray(reference(state, x))


@pytest.mark.parametrize("arch", NUMPY_CASES)
def test_converted_weights_compute_the_pytorch_layout_network(arch):
    ours, reference = converted_and_reference_logits(arch)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_reference_catches_unpermuted_flatten(monkeypatch):
    # Negative control: without reordering the flattened features, LeNet's first
    # dense layer reads the wrong inputs.
    monkeypatch.setattr(convert, "nchw_to_nhwc_rows", lambda weight, *shape: weight)
    ours, reference = converted_and_reference_logits("lenet")
    assert np.abs(ours - reference).max() > 1e-2 * np.abs(reference).max()


def test_conversion_layouts_and_names():
    state = numpy_state_dict(LENET_BN, scratch_bn=True)
    variables = convert.from_torch("lenet_bn_scratch", state)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["Conv_1"]["kernel"],
                                  state["4.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["Dense_1"]["kernel"], state["12.weight"].T)
    np.testing.assert_array_equal(params["BatchNorm_0"]["gamma"], state["1.gamma"].ravel())
    np.testing.assert_array_equal(stats["BatchNorm_2"]["moving_var"],
                                  state["10.moving_var"].ravel())
    # The first dense layer reads a 4x4x16 map: row (h*4 + w)*16 + c of the kernel is
    # PyTorch's column c*16 + h*4 + w.
    h, w, c = 1, 3, 5
    np.testing.assert_array_equal(params["Dense_0"]["kernel"][(h * 4 + w) * 16 + c],
                                  state["9.weight"][:, c * 16 + h * 4 + w])
    flax = convert.from_torch("lenet_bn", numpy_state_dict(LENET_BN))
    assert set(flax["params"]["BatchNorm_3"]) == {"scale", "bias"}
    assert set(flax["batch_stats"]["BatchNorm_3"]) == {"mean", "var"}
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(flax))


def test_layers_are_listed_in_call_order():
    # Residual registers its 1x1 conv3 before bn1 in PyTorch; Flax creates it last.
    layers = convert.flax_layers("resnet18", 32)
    block = [layer.path[-1] for layer in layers if layer.path[:2] == ("b3", "Residual_0")]
    assert block == ["Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1", "Conv_2"]
    first_dense = next(layer for layer in layers if layer.kind == "dense")
    assert first_dense.flattened_from is None  # global average pooling before it
    lenet_dense = next(layer for layer in convert.flax_layers("lenet") if layer.kind == "dense")
    assert lenet_dense.flattened_from == (5, 5, 16)


def renamed(state: dict, old: str, value) -> dict:
    return {**state, old: value}


@pytest.mark.parametrize("arch, state, message", [
    ("lenet_bn", numpy_state_dict(LENET),
     "lenet_bn's layer BatchNorm_0 has no counterpart in the state dict: the state dict has "
     "0 batch_norm layers, lenet_bn has 4"),
    ("lenet", renamed(numpy_state_dict(LENET), "3.weight", np.zeros((16, 6, 3, 3))),
     r"PyTorch layer 3 \(conv\) does not fit Conv_1: weight \(16, 6, 3, 3\)"),
    ("lenet", {**numpy_state_dict(LENET), "13.weight": np.zeros((10, 10)),
               "13.bias": np.zeros(10)},
     "PyTorch layer 13 has no counterpart in lenet: the state dict has 4 dense layers"),
    ("lenet", renamed(numpy_state_dict(LENET), "5.scale", np.ones(3)),
     r"PyTorch layer 5 \(scale \(3,\)\) is not a convolution, linear or batch-norm layer"),
    ("lenet", renamed(numpy_state_dict(LENET), "0.bias", "six numbers"),
     "state dict entry '0.bias' is not an array"),
])
def test_mismatched_state_dict_names_the_layers(arch, state, message):
    with pytest.raises(ValueError, match=message):
        convert.from_torch(arch, state)


def test_weights_for_another_input_size_say_so():
    with pytest.raises(ValueError, match=r"Dense_0: weight \(120, 400\).*kernel \(576, 120\)"
                                         r".*another input size"):
        convert.from_torch("lenet", numpy_state_dict(LENET), resize=32)


# --- against the book's PyTorch networks ------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command runs it; several threads thrash on 2 cores
    yield torch
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", models.list_models())
def test_from_torch_gives_the_pytorch_eval_logits(arch, torch):
    resize = equivalence.SIZES[arch]
    net = equivalence.random_torch_network(arch, resize, seed=1).eval()
    x = torch.rand(2, 1, resize, resize, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x).numpy()
    variables = convert.from_torch(arch, net.state_dict(), resize)
    logits = jax.jit(lambda v, x: models.get_model(arch).apply(v, x, train=False))(
        variables, x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# The whole check, for the networks whose two XLA compilations (float64 training step,
# float32 forward) fit this file's time; `python -m experiments.equivalence` checks all.
FULL_CHECK = ["lenet", "lenet_bn_scratch", "lenet_bn"]


def assert_matches(result: equivalence.Result) -> None:
    """Every float64 comparison, and float32's eval logits, within the rules. Float32's
    train-mode results are left to the command: this process compiles XLA without
    optimisation (conftest.py), where Flax's one-pass batch variance, E[x^2] - E[x]^2,
    is less accurate than PyTorch's two-pass one, beyond the float32 tolerance for
    some networks."""
    for c in result.comparisons:
        if c.dtype == "float64" or c.quantity == "eval_logits":
            assert c.ok, (result.arch, c)


@pytest.mark.parametrize("arch", FULL_CHECK)
def test_network_matches_the_book(arch, torch):
    result = equivalence.check(arch, batch_size=3)
    assert_matches(result)
    quantities = {(c.dtype, c.quantity) for c in result.comparisons}
    assert ("float64", "grads") in quantities and ("float64", "params") in quantities
    if arch != "lenet":
        assert ("float64", "batch_stats") in quantities


def test_check_fails_without_the_flatten_permutation(torch, monkeypatch):
    monkeypatch.setattr(convert, "nchw_to_nhwc_rows", lambda weight, *shape: weight)
    result = equivalence.check("lenet", batch_size=2)
    failed = {(c.dtype, c.quantity) for c in result.comparisons if not c.ok}
    assert {("float64", "eval_logits"), ("float64", "grads"),
            ("float32", "eval_logits")} <= failed


def test_check_fails_for_weights_off_by_1e5(torch, monkeypatch):
    # The tolerances are tight: scaling every JAX parameter by 1 + 1e-5, an error well
    # beyond float32 rounding, is caught in both dtypes.
    run_flax = equivalence.run_flax

    def off(arch, resize, variables, *args, **kwargs):
        params = jax.tree.map(lambda p: p * (1 + 1e-5), variables["params"])
        return run_flax(arch, resize, {**variables, "params": params}, *args, **kwargs)

    monkeypatch.setattr(equivalence, "run_flax", off)
    result = equivalence.check("lenet_bn", batch_size=2)
    failed = {(c.dtype, c.quantity) for c in result.comparisons if not c.ok}
    assert {("float64", "eval_logits"), ("float64", "train_logits"),
            ("float32", "eval_logits")} <= failed
    assert not result.ok


def test_moving_variance_convention(torch, monkeypatch):
    # PyTorch's nn.BatchNorm moves running_var towards the unbiased batch variance:
    # compared as they are, the moving variances differ (the book's BatchNorm uses the
    # biased one, as Flax does, so lenet_bn_scratch has nothing to convert).
    monkeypatch.setattr(equivalence, "var_as_torch", lambda pairs, n, old, new: new)
    results = {arch: equivalence.check(arch, batch_size=2)
               for arch in ("lenet_bn", "lenet_bn_scratch")}
    stats = {arch: next(c for c in r.comparisons
                        if c.dtype == "float64" and c.quantity == "batch_stats")
             for arch, r in results.items()}
    assert not stats["lenet_bn"].ok and stats["lenet_bn"].worst_array.endswith("/var")
    assert stats["lenet_bn_scratch"].ok
    assert results["lenet_bn"].raw_var_max_abs == pytest.approx(stats["lenet_bn"].max_abs)


def test_command_output_exit_code_and_json(torch, tmp_path, capsys, monkeypatch):
    out = tmp_path / "equivalence.json"
    code = equivalence.main(["--arch", "lenet", "--batch-size", "2", "--json", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and printed[-1] == "1/1 networks match the book's PyTorch networks"
    assert re.match(r"lenet +28 +float64 ", printed[2])
    report = json.loads(out.read_text())
    assert report["matched"] == 1 and report["networks"][0]["match"]

    monkeypatch.setattr(convert, "nchw_to_nhwc_rows", lambda weight, *shape: weight)
    code = equivalence.main(["--arch", "lenet", "--batch-size", "2"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and printed[-1] == "0/1 networks match the book's PyTorch networks"
    assert "MISMATCH in eval_logits" in printed[-4]


# --- experiments.run --eval-only --torch-weights ----------------------------------------------

def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = run.main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_only_reports_the_pytorch_networks_accuracy(torch, request, tmp_path, capsys):
    from cnnjax.data import load_fashion_mnist
    from experiments import torch_reference

    # Asked for here, so that without PyTorch the data set is not prepared for nothing.
    fashion_mnist_dir = request.getfixturevalue("fashion_mnist_dir")
    data = load_fashion_mnist(fashion_mnist_dir, max_train=1024, max_test=300)
    images = torch.from_numpy(data.train_images).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(data.train_labels).long()
    torch.manual_seed(0)
    net = torch_reference.build("lenet_bn")
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    for step in range(64):  # a few of the book's steps, so that the accuracy says something
        batch = slice(16 * step, 16 * (step + 1))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images[batch]), labels[batch]).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        test = torch.from_numpy(data.test_images).permute(0, 3, 1, 2).float() / 255
        expected = int((net(test).argmax(1).numpy() == data.test_labels).sum())
    weights = tmp_path / "lenet_bn.pt"
    torch.save(net.state_dict(), weights)

    code, out, err = run_main(["--arch", "lenet_bn", "--eval-only", "--torch-weights",
                               str(weights), "--max-test", "300", "--data-dir",
                               fashion_mnist_dir], capsys)
    assert code == 0, err
    correct = int(re.search(r"test acc [\d.]+ \((\d+)/300 test images at 28x28\)", out)[1])
    assert expected > 90  # trained: well above chance (30 of 300)
    assert abs(correct - expected) <= 1  # float32 rounding may flip a near tie


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "not a file torch.save wrote"),
    (None, "cannot read --torch-weights"),
])
def test_eval_only_bad_file_is_one_line(content, message, torch, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    if content is not None:
        weights.write_bytes(content)
    code, _, err = run_main(["--arch", "lenet", "--eval-only", "--torch-weights", str(weights)],
                            capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_eval_only_wrong_network_is_one_line(torch, tmp_path, capsys):
    from experiments import torch_reference

    weights = tmp_path / "lenet.pt"
    torch.save(torch_reference.build("lenet").state_dict(), weights)
    code, _, err = run_main(["--arch", "lenet_bn", "--eval-only", "--torch-weights",
                             str(weights)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not hold the weights of lenet_bn" in err and "BatchNorm_0" in err


def test_eval_only_flags_and_missing_torch(tmp_path, capsys, monkeypatch):
    code, _, err = run_main(["--arch", "lenet", "--eval-only"], capsys)
    assert code == 2 and "give both flags" in err
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    code, _, err = run_main(["--arch", "lenet", "--eval-only", "--torch-weights",
                             str(tmp_path / "w.pt")], capsys)
    assert code == 2 and "needs PyTorch" in err and len(err.strip().splitlines()) == 1
