"""An export loaded the way timm users load models sees what fasttt's evaluation saw (#28).

The runs here are untrained generations, finished as far as export can tell (no training);
their evaluation view is not fasttt's default one (a 0.875 crop, CIFAR's mean and std), so a
loader that falls back to any default shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import mark_finished, one_line_refusal, tiny_recipe
from PIL import Image

import fasttt.models  # noqa: F401  (registers fasttt's networks in timm, as users do)
from fasttt.augment import eval_view
from fasttt.checkpoint import save_weights
from fasttt.export import CONFIG, WEIGHTS, export, load_export
from fasttt.models import build_model, last_epoch_model
from fasttt.predict import preprocess, top5
from fasttt.recipe import Recipe
from fasttt.rundir import RECIPE

VIEW = {"augment.eval_crop_ratio": 0.875, "augment.mean": "[0.4914, 0.4822, 0.4465]",
        "augment.std": "[0.247, 0.243, 0.261]"}
SIZES = [(32, 32), (36, 36), (20, 28), (48, 40), (28, 20)]  # (H, W): square and not


def untrained_run(runs: Path, recipe: Recipe, generations: int) -> Path:
    """A run directory of `generations` untrained, finished generations of `recipe`."""
    run = runs / recipe.run.name
    run.mkdir(parents=True)
    recipe.write(run / RECIPE)
    for m in range(generations):
        (run / f"gen{m}").mkdir()
        network = build_model(recipe.model, recipe.run, 10, seed=m)
        save_weights(network, run / f"gen{m}" / "last.safetensors")
        mark_finished(run / f"gen{m}")
    return run


@pytest.fixture(scope="module")
def recipe(digits) -> Recipe:
    """The tiny run's recipe with VIEW, of ResNet-20: the architecture the tests name."""
    return tiny_recipe(digits, **VIEW, **{"model.name": '"cifar_resnet20"'})


@pytest.fixture(scope="module")
def run(recipe, tmp_path_factory) -> Path:
    """Two untrained cifar_resnet20 generations."""
    return untrained_run(tmp_path_factory.mktemp("timm") / "runs", recipe, generations=2)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory) -> Path:
    """`gen1/` (the last generation) and `ens/` (the ensemble of 0..1), as fasttt.export writes."""
    out = tmp_path_factory.mktemp("exports")
    export(run, out / "gen1", generation=None, ensemble=False)
    export(run, out / "ens", generation=None, ensemble=True)
    return out


def images() -> list[torch.Tensor]:
    """One uint8 (1, 3, H, W) image of each size in SIZES."""
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8))
            for h, w in SIZES]


def fasttt_logits(run: Path, recipe: Recipe, m: int, image: torch.Tensor) -> torch.Tensor:
    """Generation m's logits on the run's evaluation view of `image`, as training saw it."""
    model = last_epoch_model(run / f"gen{m}" / "last.safetensors", recipe.model, recipe.run, 10,
                             torch.device("cpu")).eval()
    with torch.no_grad():
        return model(eval_view(image, size=recipe.augment.eval_size, augment=recipe.augment))


def timm_loads(gen1: Path) -> dict:
    """Every way the README and timm load a single-generation export, by name."""
    config = json.loads((gen1 / CONFIG).read_text())
    file = str(gen1 / WEIGHTS)
    return {
        "local-dir": lambda: timm.create_model(f"local-dir:{gen1}", pretrained=True),
        "overlay": lambda: timm.create_model("cifar_resnet20", pretrained=True, num_classes=10,
                                             pretrained_cfg_overlay=dict(file=file)),
        "pretrained_cfg": lambda: timm.create_model(
            "cifar_resnet20", pretrained=True, pretrained_cfg=config["pretrained_cfg"],
            pretrained_cfg_overlay=dict(file=file)),
        "load_export": lambda: load_export(gen1)[0],
    }


def plain(data_config: dict) -> dict:
    """timm's data config with lists as tuples (config.json's lists stay lists in timm)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}


@pytest.mark.parametrize("way", ["local-dir", "overlay", "pretrained_cfg", "load_export"])
def test_timm_resolves_the_runs_evaluation_view_from_an_export(exports, recipe, way):
    model = timm_loads(exports / "gen1")[way]().eval()
    augment = recipe.augment
    assert plain(timm.data.resolve_data_config(model=model)) == {
        "input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
        "crop_mode": "center", "mean": augment.mean, "std": augment.std}
    if way != "pretrained_cfg":  # label_names are config.json's, beside its pretrained_cfg
        assert list(model.pretrained_cfg["label_names"]) == [str(d) for d in range(10)]


@pytest.mark.parametrize("way", ["local-dir", "overlay", "pretrained_cfg", "load_export"])
def test_timm_loaded_export_and_preprocess_give_fasttts_logits(run, exports, recipe, way):
    model = timm_loads(exports / "gen1")[way]().eval()
    data_config = timm.data.resolve_data_config(model=model)
    for image in images():
        with torch.no_grad():
            found = model(preprocess(image, data_config))
        expected = fasttt_logits(run, recipe, 1, image)
        assert torch.allclose(found, expected, rtol=1e-5, atol=1e-5), image.shape


def test_predict_ranks_classes_by_the_same_logits(run, exports, recipe):
    model, config = load_export(exports / "gen1")
    for image in images():
        probabilities = fasttt_logits(run, recipe, 1, image).softmax(1)[0]
        best = probabilities.topk(5)
        ranked = top5(model, config, image)
        assert [name for name, _ in ranked] == [str(i) for i in best.indices.tolist()]
        assert [p for _, p in ranked] == pytest.approx(best.values.tolist(), abs=1e-6)


def test_an_ensemble_export_loads_in_timm_as_the_softmax_average(run, exports, recipe):
    config = json.loads((exports / "ens" / CONFIG).read_text())
    assert config["architecture"] == "fasttt_softmax_average"
    assert config["model_args"] == {"member": "cifar_resnet20", "members": 2}
    model = timm.create_model(f"local-dir:{exports / 'ens'}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config(model=model)
    assert plain(data_config)["crop_pct"] == 0.875 and plain(data_config)["mean"] == (
        recipe.augment.mean)
    for image in images():
        expected = torch.stack([fasttt_logits(run, recipe, m, image).softmax(1)
                                for m in (0, 1)]).mean(0)
        with torch.no_grad():
            assert torch.allclose(model(preprocess(image, data_config)), expected, atol=1e-6)


def test_an_ensemble_is_refused_in_one_line_as_one_network(exports, tmp_path):
    ensemble = exports / "ens"
    one_line_refusal(lambda: timm.create_model(
        "cifar_resnet20", pretrained=True, num_classes=10,
        pretrained_cfg_overlay=dict(file=str(ensemble / WEIGHTS))),
        "is an ensemble export", f"local-dir:{ensemble}", "load_export")
    one_line_refusal(lambda: timm.create_model("fasttt_softmax_average"),
                     "model of an ensemble export", "local-dir:EXPORT")
    # An ensemble exported before ensembles loaded in timm named its members' architecture.
    legacy = tmp_path / "legacy"
    shutil.copytree(ensemble, legacy)
    config = json.loads((legacy / CONFIG).read_text())
    del config["model_args"]
    (legacy / CONFIG).write_text(json.dumps({**config, "architecture": "cifar_resnet20"}))
    message = one_line_refusal(lambda: timm.create_model(f"local-dir:{legacy}", pretrained=True),
                               "is an ensemble export", f"fasttt.export.load_export('{legacy}')")
    assert "local-dir" not in message
    model, _ = load_export(legacy)
    with torch.no_grad():
        assert torch.allclose(model(torch.randn(2, 3, 32, 32)).sum(1), torch.ones(2))


def test_weights_of_another_architecture_or_none_are_refused_in_one_line(exports):
    one_line_refusal(lambda: timm.create_model(
        "cifar_resnet32", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exports / "gen1" / WEIGHTS))),
        "is an export of cifar_resnet20, not cifar_resnet32", "local-dir:")
    one_line_refusal(lambda: timm.create_model("cifar_resnet20", pretrained=True),
                     "no published weights", "local-dir:EXPORT")


def test_a_runs_checkpoint_loads_whole_or_not_at_all(run, recipe):
    """A generation's last.safetensors (no config.json): all of it, head included."""
    file = str(run / "gen1" / "last.safetensors")
    model = timm.create_model("cifar_resnet20", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=file)).eval()
    image = images()[0]
    with torch.no_grad():
        found = model(eval_view(image, size=32, augment=recipe.augment))
    assert torch.allclose(found, fasttt_logits(run, recipe, 1, image), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch"):  # never a silently fresh head
        timm.create_model("cifar_resnet20", pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=file))


def test_an_export_takes_a_new_head_as_timm_models_do(exports):
    """timm's fine-tuning load: other classes drop the classifier, keep the rest."""
    model = timm.create_model(f"local-dir:{exports / 'gen1'}", pretrained=True, num_classes=3)
    original = timm.create_model(f"local-dir:{exports / 'gen1'}", pretrained=True)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    assert torch.equal(model.stem[0].weight, original.stem[0].weight)


def test_a_timm_architecture_loads_with_the_runs_view_not_timms(digits, tmp_path):
    """timm's own resnet18 registers 224 px, bicubic, crop 0.95: local-dir reads the run's."""
    recipe = tiny_recipe(digits, **VIEW, **{"model.name": '"resnet18"'})
    run = untrained_run(tmp_path / "runs", recipe, generations=1)
    export(run, tmp_path / "r18", generation=None, ensemble=False)
    model = timm.create_model(f"local-dir:{tmp_path / 'r18'}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config(model=model)
    assert plain(data_config) == {
        "input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
        "crop_mode": "center", "mean": recipe.augment.mean, "std": recipe.augment.std}
    for image in images()[2:4]:
        with torch.no_grad():
            found = model(preprocess(image, data_config))
        assert torch.allclose(found, fasttt_logits(run, recipe, 0, image), rtol=1e-4,
                              atol=1e-4)


def test_timms_own_transform_matches_only_an_image_it_need_not_resize(exports, run, recipe):
    """create_transform resizes to input_size / crop_pct (36 here) in 8 bits, then crops:
    only a 36 x 36 image passes unresized, and only it gets fasttt's logits."""
    model = timm.create_model(f"local-dir:{exports / 'gen1'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    for image in images():
        pil = Image.fromarray(image[0].permute(1, 2, 0).numpy())
        with torch.no_grad():
            found = model(transform(pil)[None])
        matches = torch.allclose(found, fasttt_logits(run, recipe, 1, image), atol=1e-5)
        assert matches == (tuple(image.shape[-2:]) == (36, 36)), image.shape


def test_preprocess_refuses_a_view_that_is_not_fasttts():
    model = timm.create_model("resnet18", num_classes=10)
    one_line_refusal(lambda: preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                                        timm.data.resolve_data_config(model=model)),
                     "bicubic", "not a fasttt export's")
