"""The book's PyTorch networks (`experiments/torch_reference.py`) match the Flax zoo:
same parameter counts, (batch, 10) logits at each recipe's input size; and the
bench's PyTorch timers (`experiments/bench_torch.py`) train them."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnnjax import models  # noqa: E402
from cnnjax.config import recipe_settings  # noqa: E402
from experiments import bench_torch, torch_reference  # noqa: E402

ALL = models.list_models()


def jax_param_count(arch: str, resize: int) -> int:
    def init():
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return models.get_model(arch).init(rngs, jnp.zeros((1, resize, resize, 1)), train=False)

    return models.count_params(jax.eval_shape(init)["params"])


@pytest.mark.parametrize("arch", ALL)
def test_param_count_matches_jax(arch):
    resize = recipe_settings(arch)["resize"]
    assert torch_reference.count_params(torch_reference.build(arch)) == jax_param_count(arch, resize)


@pytest.mark.parametrize("arch", ALL)
def test_logits_shape_at_recipe_resize(arch):
    resize = recipe_settings(arch)["resize"]
    model = torch_reference.build(arch).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, resize, resize))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch, resize", [("lenet", 32), ("alexnet", 96), ("vgg11", 64)])
def test_flattening_nets_follow_resize(arch, resize):
    model = torch_reference.build(arch, resize=resize)
    assert torch_reference.count_params(model) == jax_param_count(arch, resize)


def test_unknown_arch_lists_names():
    with pytest.raises(ValueError, match="resnet18"):
        torch_reference.build("resnet50")


def test_time_training_book_smoke():
    result = bench_torch.time_training("lenet", batch_size=4, resize=28, lr=0.9,
                                       windows=2, steps_per_window=1, warmup_steps=1)
    assert len(result["window_img_per_s"]) == 2 and result["img_per_s"] > 0
    assert result["flavour"] == "book" and result["compiled"] is False
    assert math.isfinite(result["final_loss"])


def test_time_training_tuned_compiles_and_trains():
    # The GPU flavour (channels-last, bf16 autocast, torch.compile), run on the CPU so
    # that its code path is checked before a GPU run spends device time on it.
    result = bench_torch.time_training("lenet_bn", batch_size=16, resize=28, lr=0.5,
                                       flavour="tuned", device="cpu", windows=1,
                                       steps_per_window=2, warmup_steps=1)
    assert result["flavour"] == "tuned" and result["compiled"] is True
    assert result["img_per_s"] > 0 and math.isfinite(result["final_loss"])

