"""The model zoo: block shapes from the book, parameter counts from the reference
PyTorch builds, train/eval behaviour, the registry API and the summary."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from cnnjax import config, models, reference
from cnnjax.models import (
    AnyNet,
    DenseBlock,
    Inception,
    Residual,
    ResNeXtBlock,
    count_params,
    nin_block,
    transition_block,
    vgg_block,
)

ALL = models.list_models()
WITH_BN = {"lenet_bn_scratch", "lenet_bn", "resnet18", "resnet34", "densenet", "regnetx32"}
WITH_DROPOUT = {"alexnet", "vgg11", "nin"}
# Small inputs that every layer of each network still accepts, for tests that compute.
SMALL_RESIZE = {"lenet": 28, "lenet_bn_scratch": 28, "lenet_bn": 28, "alexnet": 67,
                "vgg11": 32, "nin": 67, "googlenet": 32, "resnet18": 32, "resnet34": 32,
                "densenet": 32, "regnetx32": 32}


def init(module: nn.Module, x: jnp.ndarray, **kwargs):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return module.init(rngs, x, **kwargs)


def output_shape(module: nn.Module, x: jnp.ndarray, **kwargs) -> jax.ShapeDtypeStruct:
    """Shape and dtype of module(x), computed abstractly (nothing is run)."""
    return jax.eval_shape(lambda: module.apply(init(module, x, **kwargs), x, **kwargs))


# --- blocks, with the shapes the book prints -------------------------------------------

def test_residual_keeps_shape():
    chex.assert_shape(output_shape(Residual(3), jnp.ones((4, 6, 6, 3))), (4, 6, 6, 3))


def test_residual_with_1x1conv_halves_and_widens():
    blk = Residual(6, use_1x1conv=True, strides=2)
    x = jax.random.uniform(jax.random.key(0), (4, 6, 6, 3))
    y, _ = jax.jit(lambda x: blk.apply(init(blk, x), x, train=True, mutable=["batch_stats"]))(x)
    chex.assert_shape(y, (4, 3, 3, 6))
    chex.assert_tree_all_finite(y)
    assert jnp.all(y >= 0)  # ends with a ReLU


def test_dense_block_and_transition():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    blk = DenseBlock(2, 10)
    y = jax.jit(lambda x: blk.apply(init(blk, x), x))(x)
    chex.assert_shape(y, (4, 8, 8, 23))
    # The input passes through unchanged as the first channels (concatenation).
    chex.assert_trees_all_close(y[..., :3], x)
    chex.assert_shape(output_shape(transition_block(10), y), (4, 4, 4, 10))


def test_vgg_and_nin_blocks():
    x = jnp.ones((2, 8, 8, 3))
    chex.assert_shape(output_shape(vgg_block(2, 16), x), (2, 4, 4, 16))
    chex.assert_shape(output_shape(nin_block(8, kernel_size=3, strides=2, padding=1), x),
                      (2, 4, 4, 8))
    chex.assert_shape(output_shape(nin_block(8, kernel_size=11, strides=4, padding=0),
                                   jnp.ones((1, 224, 224, 1))), (1, 54, 54, 8))


def test_resnext_block_shapes():
    # The shapes d2l-en §8.6.5 prints.
    x = jnp.ones((4, 96, 96, 32))
    chex.assert_shape(output_shape(ResNeXtBlock(32, 16, 1), x), (4, 96, 96, 32))
    chex.assert_shape(output_shape(ResNeXtBlock(64, 16, 1, use_1x1conv=True, strides=2), x),
                      (4, 48, 48, 64))


def test_resnext_block_groups_are_channels_wide():
    # `groups` is the width of a group: 32 channels in groups of 16 is 2 groups, so
    # the 3x3 kernel sees 16 input channels.
    variables = jax.eval_shape(lambda: init(ResNeXtBlock(32, 16, 1), jnp.ones((1, 8, 8, 32))))
    chex.assert_shape(variables["params"]["Conv_1"]["kernel"], (3, 3, 16, 32))


def test_inception_output_channels():
    y = output_shape(Inception(64, (96, 128), (16, 32), 32), jnp.ones((2, 12, 12, 192)))
    chex.assert_shape(y, (2, 12, 12, 256))


def test_googlenet_nine_inception_blocks():
    channels = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Inception) and context.method_name == "__call__":
            channels.append(out.shape[-1])
        return out

    with nn.intercept_methods(record):  # one abstract forward pass (init)
        jax.eval_shape(lambda: init(models.get_model("googlenet"), jnp.ones((1, 96, 96, 1))))
    assert channels == [256, 480, 512, 512, 512, 528, 832, 832, 1024]


# --- whole networks ----------------------------------------------------------------------

def stage_shapes(name: str, resize: int) -> list[tuple[int, ...]]:
    return [info.output_shape for info in models.block_infos(models.get_model(name), resize)]


@pytest.mark.parametrize("resize, side", [(224, 56), (96, 24)])
def test_resnet18_stage_shapes(resize, side):
    assert stage_shapes("resnet18", resize) == [
        (side, side, 64), (side, side, 64), (side // 2, side // 2, 128),
        (side // 4, side // 4, 256), (side // 8, side // 8, 512), (512,), (10,)]


@pytest.mark.parametrize("resize, side", [(224, 56), (96, 24)])
def test_googlenet_stage_shapes(resize, side):
    assert stage_shapes("googlenet", resize) == [
        (side, side, 64), (side // 2, side // 2, 192), (side // 4, side // 4, 480),
        (side // 8, side // 8, 832), (1024,), (10,)]


def test_lenet_layer_shapes():
    # §6.6: 28x28 -> conv 6@28x28 -> pool 14x14 -> conv 16@10x10 -> pool 5x5 -> 120, 84, 10
    assert stage_shapes("lenet", 28) == [(28, 28, 6), (14, 14, 6), (10, 10, 16), (5, 5, 16),
                                         (120,), (84,), (10,)]


@pytest.mark.parametrize("name", ALL)
def test_logits_at_recipe_resolution(name):
    resize = config.recipe_settings(name)["resize"]
    chex.assert_shape(output_shape(models.get_model(name), jnp.ones((3, resize, resize, 1))),
                      (3, 10))


@pytest.mark.parametrize("name", [n for n in ALL if reference.parameter_count(n)])
def test_parameter_count_matches_the_reference(name):
    resize = config.recipe_settings(name)["resize"]
    variables = jax.eval_shape(lambda: init(models.get_model(name), jnp.ones((1, resize, resize, 1))))
    assert count_params(variables["params"]) == reference.parameter_count(name)


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def resnet_params(stage_sizes) -> int:
    """ResNet's parameter count worked out by hand from §7.6 (BN: scale and shift)."""
    total = conv_params(1, 64, 7) + 2 * 64  # b1
    c_in = 64
    for i, n in enumerate(stage_sizes):
        c = 64 * 2**i
        for j in range(n):
            total += conv_params(c_in, c, 3) + conv_params(c, c, 3) + 4 * c
            if i > 0 and j == 0:
                total += conv_params(c_in, c, 1)  # the 1x1 conv on the shortcut
            c_in = c
    return total + 512 * 10 + 10


def test_resnet_parameter_counts_by_hand():
    for name, sizes in [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))]:
        variables = jax.eval_shape(lambda: init(models.get_model(name), jnp.ones((1, 96, 96, 1))))
        assert count_params(variables["params"]) == resnet_params(sizes)
    assert resnet_params((2, 2, 2, 2)) == reference.parameter_count("resnet18")


def anynet_params(stem: int, stages, groups: int) -> int:
    """AnyNet's parameter count (bot_mul 1) worked out by hand from d2l-en §8.6.5 and
    §8.8: per block three convs (the middle one grouped) and, in a stage's first
    block, the 1x1 shortcut conv, each followed by batch norm (scale and shift)."""
    total, c_in = conv_params(1, stem, 3) + 2 * stem, stem
    for depth, c in stages:
        for i in range(depth):
            block_in = c_in if i == 0 else c
            total += conv_params(block_in, c, 1) + 9 * groups * c + c + conv_params(c, c, 1)
            total += 3 * 2 * c
            if i == 0:
                total += conv_params(block_in, c, 1) + 2 * c
        c_in = c
    return total + c_in * 10 + 10


def test_regnetx32_parameter_count():
    variables = jax.eval_shape(lambda: init(models.get_model("regnetx32"),
                                            jnp.ones((1, 96, 96, 1))))
    # 179,290 is also the count of a PyTorch build of the book's code (test_torch_reference).
    assert count_params(variables["params"]) == anynet_params(32, [(4, 32), (6, 80)], 16)
    assert count_params(variables["params"]) == 179_290


def test_anynet_takes_other_designs():
    net = AnyNet(depths=(1, 2, 1), widths=(16, 32, 64), groups=8, stem_channels=16)
    variables = jax.eval_shape(lambda: init(net, jnp.ones((2, 64, 64, 1))))
    assert count_params(variables["params"]) == anynet_params(16, [(1, 16), (2, 32), (1, 64)], 8)
    chex.assert_shape(output_shape(net, jnp.ones((2, 64, 64, 1))), (2, 10))
    with pytest.raises(ValueError, match="one entry per stage"):
        init(AnyNet(depths=(1, 2), widths=(16,)), jnp.ones((1, 32, 32, 1)))


def test_resnet34_has_resnet18_stage_shapes():
    assert stage_shapes("resnet34", 96) == stage_shapes("resnet18", 96)


def test_vgg_ratio_one_is_full_vgg11():
    variables = jax.eval_shape(lambda: init(models.get_model("vgg11", ratio=1),
                                            jnp.ones((1, 224, 224, 1))))
    widths = [1, 64, 128, 256, 256, 512, 512, 512, 512]  # VGG-11's eight 3x3 convs
    convs = sum(conv_params(a, b, 3) for a, b in zip(widths, widths[1:]))
    dense = (512 * 7 * 7 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert count_params(variables["params"]) == convs + dense


@pytest.mark.parametrize("name", [n for n in ALL if n != "resnet34"])  # resnet18's code
def test_train_and_eval_modes(name):
    model = models.get_model(name)
    r = SMALL_RESIZE[name]
    x = jax.random.uniform(jax.random.key(2), (4, r, r, 1))

    @jax.jit  # one compilation for everything
    def run(x):
        variables = init(model, x, train=False)
        y_eval = model.apply(variables, x, train=False)  # no dropout rng: none is drawn
        y_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(3)})
        return variables, y_eval, y_train, updates

    variables, y_eval, y_train, updates = run(x)
    assert ("batch_stats" in variables) == (name in WITH_BN)
    chex.assert_shape(y_eval, (4, 10))
    chex.assert_tree_all_finite(y_eval)
    if name in WITH_BN | WITH_DROPOUT:
        assert not jnp.allclose(y_train, y_eval, atol=1e-6), "train mode should differ"
    else:
        chex.assert_trees_all_close(y_train, y_eval, atol=1e-6)
    if name in WITH_BN:
        # One train step moves the moving statistics away from their initial values.
        moved = jax.tree_util.tree_map(lambda new, old: bool(jnp.any(new != old)),
                                       updates["batch_stats"], variables["batch_stats"])
        assert all(jax.tree_util.tree_leaves(moved))
    else:
        assert not updates


# --- registry and summary ----------------------------------------------------------------

def test_list_models_names():
    assert ALL == ["lenet", "lenet_bn_scratch", "lenet_bn", "alexnet", "vgg11", "nin",
                   "googlenet", "resnet18", "resnet34", "densenet", "regnetx32"]


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: lenet, lenet_bn_scratch"):
        models.get_model("resnet50")


def test_get_model_fields_and_classes():
    assert models.get_model("vgg11").ratio == 4
    assert models.get_model("vgg11", ratio=1).ratio == 1
    assert models.get_model("lenet", num_classes=3).num_classes == 3
    assert models.get_model("resnet34").stage_sizes == (3, 4, 6, 3)


def test_recipes_follow_the_reference():
    for run in reference.load()["runs"]:
        if run["source"] != "001":  # the chapter-by-chapter source wins where two differ
            continue
        name = run["arch"].split(" ")[0]
        assert config.recipe_settings(name) == {
            **CLASSIC, **{k: run[k] for k in ("lr", "batch_size", "resize", "epochs")}}
    assert config.recipe_settings("lenet") == {**CLASSIC, "lr": 0.9, "batch_size": 256,
                                               "resize": 28, "epochs": 10}
    assert config.recipe_settings("resnet34") == config.recipe_settings("resnet18")
    assert config.recipe_settings("lenet_bn") == config.recipe_settings("lenet_bn_scratch")


CLASSIC = {"momentum": 0.0, "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0.0,
           "augment": False}  # d2l.train_ch6: plain SGD at a constant lr


def test_modern_recipe_keeps_input_batch_and_epochs():
    for name in ALL:
        classic, modern = config.recipe_settings(name), config.recipe_settings(name, "modern")
        assert {k: modern[k] for k in ("batch_size", "resize", "epochs")} == \
            {k: classic[k] for k in ("batch_size", "resize", "epochs")}
        assert (modern["momentum"], modern["weight_decay"], modern["schedule"],
                modern["warmup_epochs"], modern["augment"]) == (0.9, 5e-4, "cosine", 1.0, True)
    assert config.recipe_settings("resnet18", "modern")["lr"] == 0.1
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        config.recipe_settings("resnet18", "fast")


# --- the degradation experiment's networks (He et al. 2016, §4.2) ------------------------

@pytest.mark.parametrize("name, paper_params", [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_cifar_resnets_have_the_papers_size(name, paper_params):
    infos = models.block_infos(models.get_model(name), 28)
    assert [i.output_shape for i in infos if i.name.startswith("stage")] == \
        [(28, 28, 16), (14, 14, 32), (7, 7, 64)]
    # The paper reports 0.27M and 0.85M with zero-padding shortcuts; the book's 1x1-conv
    # shortcuts (two of them, 16->32 and 32->64 channels) add 2,656.
    total = sum(i.num_params for i in infos)
    assert abs(total - paper_params) / paper_params < 0.02


def test_plain_networks_are_the_residual_ones_without_shortcuts():
    assert "plain56" in models.list_models(extras=True) and "plain56" not in ALL
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    plain, residual = models.get_model("plain20"), models.get_model("resnet20")
    plain_vars = jax.eval_shape(plain.init, jax.random.key(1), x)
    residual_vars = jax.eval_shape(residual.init, jax.random.key(1), x)
    # The same layers, minus the two 1x1 shortcut convs.
    shapes = lambda v: {jax.tree_util.keystr(k): a.shape for k, a in  # noqa: E731
                        jax.tree_util.tree_leaves_with_path(v["params"])}
    extra = set(shapes(residual_vars)) - set(shapes(plain_vars))
    assert len(extra) == 4 and all("Conv_2" in k for k in extra)  # 2 kernels, 2 biases
    assert jax.eval_shape(plain.apply, plain_vars, x).shape == (2, 10)
    assert jax.eval_shape(residual.apply, residual_vars, x).shape == (2, 10)


def test_plain_block_is_the_residual_block_without_the_addition():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 16))
    variables = Residual(16).init(jax.random.key(1), x)
    plain_out, inter = Residual(16, shortcut=False).apply(
        variables, x, capture_intermediates=lambda mdl, _: isinstance(mdl, nn.BatchNorm))
    before_relu = inter["intermediates"]["BatchNorm_1"]["__call__"][0]
    chex.assert_trees_all_close(plain_out, nn.relu(before_relu))
    chex.assert_trees_all_close(Residual(16).apply(variables, x), nn.relu(before_relu + x),
                                atol=1e-6)


def test_cifar_resnet_depth_must_be_6n_plus_2():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="depth must be 6n"):
        models.CifarResNet(depth=21).init(jax.random.key(0), x)


def test_summary_lists_blocks_and_total():
    text = models.summary("resnet18", resize=224)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:]}
    assert rows["b1"][0] == "56x56x64"
    assert rows["b5"][0] == "7x7x512"
    assert rows["total"] == ["11,178,378"]
    assert "input 1x224x224x1" in text
