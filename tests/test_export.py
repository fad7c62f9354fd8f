"""Models people can use: a generation or an ensemble exported, loaded by timm, predicting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from conftest import one_line_refusal, tiny_recipe, tiny_run_args
from PIL import Image

import fasttt.models  # noqa: F401  (registers fasttt's CIFAR networks in timm, as users do)
from fasttt.augment import eval_images
from fasttt.data import sequential_loader
from fasttt.export import export, load_export
from fasttt.export import main as export_cli
from fasttt.models import last_epoch_model
from fasttt.predict import main as predict_cli
from fasttt.train import main as train

NAME = "digits_d06"


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory) -> Path:
    """A finished patriarch and student on the digits."""
    runs = tmp_path_factory.mktemp("export") / "runs"
    train(tiny_run_args(digits, runs, **{"generations.students": 1}))
    return runs / NAME


@pytest.fixture(scope="module")
def val_batch(digits):
    """Eight validation digits, as the loader gives them."""
    loader = sequential_loader(digits, split="val", batch_size=8, num_workers=1)
    return next(iter(loader))


def generation_logits(run: Path, digits: Path, m: int, batch) -> torch.Tensor:
    """Generation m's logits on the run's evaluation view of `batch`, as training saw it."""
    recipe = tiny_recipe(digits)
    model = last_epoch_model(run / f"gen{m}" / "last.safetensors", recipe.model, recipe.run,
                             10, torch.device("cpu")).eval()
    with torch.no_grad():
        return model(eval_images(batch, recipe.augment, torch.device("cpu")))


def test_an_exported_generation_loads_in_timm_and_gives_the_runs_outputs(run, digits, tmp_path,
                                                                        val_batch):
    export_cli([str(run), str(tmp_path / "gen1")])
    config = json.loads((tmp_path / "gen1" / "config.json").read_text())
    assert config["architecture"] == "cifar_resnet20" and config["num_classes"] == 10
    assert config["label_names"] == [str(d) for d in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=10,
                              pretrained_cfg_overlay={"file": str(tmp_path / "gen1" /
                                                                  "model.safetensors")}).eval()
    views = eval_images(val_batch, tiny_recipe(digits).augment, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(views), generation_logits(run, digits, 1, val_batch))


def test_an_exported_ensemble_is_the_softmax_average_of_its_generations(run, digits, tmp_path,
                                                                         val_batch):
    export(run, tmp_path / "ensemble", generation=None, ensemble=True)
    model, config = load_export(tmp_path / "ensemble")
    assert config["fasttt"]["generations"] == [0, 1]
    views = eval_images(val_batch, tiny_recipe(digits).augment, torch.device("cpu"))
    expected = torch.stack([generation_logits(run, digits, m, val_batch).softmax(1)
                            for m in (0, 1)]).mean(0)
    with torch.no_grad():
        assert torch.allclose(model(views), expected, atol=1e-6)


def test_predict_prints_the_top5_of_the_runs_evaluation_view(run, digits, tmp_path, val_batch,
                                                             capsys):
    export(run, tmp_path / "gen0", generation=0, ensemble=False)
    images = []
    for i in range(2):
        images.append(tmp_path / f"digit{i}.png")
        Image.fromarray(np.ascontiguousarray(val_batch.image[i].permute(1, 2, 0).numpy())).save(
            images[-1])
    capsys.readouterr()
    predict_cli([str(tmp_path / "gen0"), *map(str, images)])
    lines = capsys.readouterr().out.splitlines()
    probabilities = generation_logits(run, digits, 0, val_batch).softmax(1)
    for i, line in enumerate(lines):
        ranked = line.split(": ", 1)[1].split(", ")
        assert len(ranked) == 5
        name, p = ranked[0].split()
        assert int(name) == int(probabilities[i].argmax())
        assert float(p) == pytest.approx(float(probabilities[i].max()), abs=1e-3)


def test_bad_exports_and_images_are_one_line(run, tmp_path):
    one_line_refusal(lambda: export(run, tmp_path / "x", generation=3, ensemble=False),
                     "generation 3", "has not finished", "--generation 0..1")
    one_line_refusal(lambda: load_export(tmp_path / "missing"), "no readable config.json")
    export(run, tmp_path / "gen1", generation=1, ensemble=False)
    (tmp_path / "not_an_image.png").write_text("hello")
    one_line_refusal(lambda: predict_cli([str(tmp_path / "gen1"),
                                          str(tmp_path / "not_an_image.png")]),
                     "cannot read", "not_an_image.png")


@pytest.mark.parametrize("ensemble", [False, True])
def test_the_onnx_export_gives_pytorchs_outputs_in_onnxruntime(run, tmp_path, ensemble):
    export_cli([str(run), str(tmp_path / "out"), "--onnx", *(["--ensemble"] if ensemble else [])])
    model, _ = load_export(tmp_path / "out")
    images = torch.randn(3, 3, 32, 32)  # another batch size than the export's example
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    found = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(found, model(images).numpy(), atol=1e-4)
