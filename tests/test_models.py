"""The model factory and the paper's CIFAR networks: shapes, sizes, timm interface, layouts."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from fasttt.checkpoint import save_weights
from fasttt.errors import UserError
from fasttt.models import (
    CIFAR_MODELS,
    build_model,
    create_model,
    last_epoch_model,
    penultimate_features,
)
from fasttt.recipe import build_recipe

FAST_MODELS = [name for name in CIFAR_MODELS if name != "cifar_densenet_bc190"]
# Published sizes (He et al. 2016 Table 6; Huang et al. 2017 Table 2), in parameters.
PUBLISHED = {
    "cifar_resnet20": 0.27e6, "cifar_resnet32": 0.46e6, "cifar_resnet56": 0.85e6,
    "cifar_resnet110": 1.7e6, "cifar_densenet_bc100": 0.8e6, "cifar_densenet_bc190": 25.6e6,
}
WIDTHS = {"cifar_resnet8": 64, "cifar_resnet20": 64, "cifar_resnet32": 64, "cifar_resnet56": 64,
          "cifar_resnet110": 64, "cifar_densenet_bc100": 342}


@pytest.fixture
def images():
    """Two random CIFAR-sized images."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def parameter_count(model: nn.Module) -> int:
    """All learnable parameters."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", FAST_MODELS)
def test_cifar_model_shapes(name, images):
    model = create_model(name, num_classes=100).eval()
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
    assert features.shape == (2, WIDTHS[name], 8, 8)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_parameter_counts_match_papers(name):
    # The papers' rounded DenseNet sizes are those of the CIFAR-100 head. ResNet-8 (n = 1)
    # is not in the paper's table: its count is the 6n+2 family's, as models.py states.
    count = parameter_count(create_model(name, num_classes=100))
    if name == "cifar_resnet8":
        assert count == 81_140
    else:
        assert abs(count / PUBLISHED[name] - 1) < 0.03, count


def test_densenet_bc190_width():
    model = create_model("cifar_densenet_bc190", num_classes=100)
    assert model.num_features == 2190
    assert model.get_classifier().in_features == 2190


@pytest.mark.parametrize("name", FAST_MODELS)
def test_penultimate_features_width(name, images):
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        features = penultimate_features(model, images)
        logits = model.get_classifier()(features)
        expected = model(images)
    assert features.shape == (2, WIDTHS[name]) == (2, model.num_features)
    torch.testing.assert_close(logits, expected)


def test_penultimate_features_of_timm_model():
    model = create_model("resnet18", num_classes=10, pretrained=False).eval()
    with torch.no_grad():
        features = penultimate_features(model, torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 512)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_densenet_bc100"])
def test_channels_last_matches_contiguous(name, images):
    # Training mode: batch statistics keep activations at unit scale at initialization.
    model = create_model(name, num_classes=10).train()
    with torch.no_grad():
        expected = model(images)
        model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes(dtype, images):
    model = create_model("cifar_resnet20", num_classes=10).train()
    with torch.no_grad():
        expected = model(images)
        got = model.to(dtype)(images.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_unknown_name_is_a_one_line_user_error():
    with pytest.raises(UserError) as err:
        create_model("cifar_resnet57", num_classes=10)
    message = str(err.value)
    assert "\n" not in message
    assert "'cifar_resnet57'" in message
    assert all(name in message for name in CIFAR_MODELS)


def test_pretrained_cifar_model_is_a_user_error():
    with pytest.raises(UserError, match="pretrained"):
        create_model("cifar_resnet20", num_classes=10, pretrained=True)


def test_registered_in_timm_and_reset_classifier(images):
    model = timm.create_model("cifar_resnet20", num_classes=7).eval()
    assert isinstance(model, nn.Module) and model.num_classes == 7
    assert model(images).shape == (2, 7)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    assert model(images).shape == (2, 3)
    model.reset_classifier(0)
    assert model(images).shape == (2, model.num_features)


def test_create_model_passes_timm_names_through():
    model = create_model("resnet18", num_classes=10)
    assert model.get_classifier().out_features == 10


def test_weight_init():
    model = create_model("cifar_resnet56", num_classes=10)
    conv = model.stages[2][1].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    assert (model.get_classifier().bias == 0).all()


def test_run_compile_compiles_in_place_and_keeps_checkpoint_keys(monkeypatch):
    defaults, compiling = build_recipe({}, "defaults"), build_recipe(
        {"run": {"compile": True, "compile_mode": "reduce-overhead"}}, "defaults")
    modes, compile_lazily = [], torch.compile

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return compile_lazily(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    plain = build_model(defaults.model, defaults.run, 10, seed=0)
    compiled = build_model(compiling.model, compiling.run, 10, seed=0)
    # nn.Module.compile: the forward is compiled lazily, the module and its keys stay.
    assert compiled._compiled_call_impl is not None and plain._compiled_call_impl is None
    assert modes == ["reduce-overhead"]  # CUDA graphs: the mode reaches torch.compile
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(),
                                                 plain.state_dict().values(), strict=True))


def test_build_model_is_seeded_and_last_epoch_model_loads_saved_weights(tmp_path):
    recipe = build_recipe({"model": {"name": "cifar_resnet20"}}, "defaults")
    first, again, other = (build_model(recipe.model, recipe.run, 10, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                     other.state_dict().values(), strict=True))
    assert first.stem[0].weight.is_contiguous(memory_format=torch.channels_last) == \
        recipe.run.channels_last
    save_weights(other, tmp_path / "last.safetensors")
    loaded = last_epoch_model(tmp_path / "last.safetensors", recipe.model, recipe.run, 10,
                              torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 other.state_dict().values(), strict=True))
    with pytest.raises(UserError, match="holds weights of another model"):
        last_epoch_model(tmp_path / "last.safetensors", recipe.model, recipe.run, 7,
                         torch.device("cpu"))
