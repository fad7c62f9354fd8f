"""Models people can use: a generation or an ensemble exported, loaded by timm, predicting."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from conftest import one_line_refusal, snapshot, tiny_recipe
from PIL import Image

import fasttt.models  # noqa: F401  (registers fasttt's CIFAR networks in timm, as users do)
from fasttt.augment import eval_images
from fasttt.data import sequential_loader
from fasttt.export import MARKER, export, load_export
from fasttt.export import main as export_cli
from fasttt.files import publish_dir, staging_dir
from fasttt.models import last_epoch_model
from fasttt.predict import main as predict_cli

NAME = "digits_d06"


@pytest.fixture(scope="module")
def run(two_generation_run, tmp_path_factory) -> Path:
    """A finished patriarch and student on the digits: a copy of the shared run, so that an
    export that wrote into its run would fail here alone."""
    runs = tmp_path_factory.mktemp("export") / "runs"
    shutil.copytree(two_generation_run / "runs", runs)
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
    assert config["architecture"] == "cifar_resnet8" and config["num_classes"] == 10
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


# ------------------------------------------------------- what an export may replace


def refused(argv: list, *needles: str) -> str:
    """The one-line refusal of `python -m fasttt.export ARGV`, advising a command."""
    return one_line_refusal(lambda: export_cli([str(a) for a in argv]), *needles,
                            "nothing was changed", "python -m fasttt.export")


def follow_advice(message: str, new_dir: Path | str) -> dict:
    """Run the export a refusal advises, with `new_dir` for its NEW_DIR; the export's config."""
    argv = shlex.split(message[message.index("python -m fasttt.export"):])[3:]
    export_cli([str(new_dir) if arg == "NEW_DIR" else arg for arg in argv])
    return load_export(new_dir)[1]


def test_a_users_directory_is_refused_and_its_files_kept(run, tmp_path):
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "photos" / "cat.png").write_bytes(b"\x89PNG")
    before = snapshot(tmp_path)
    message = refused([run, mine, "--generation", "0"], "not empty", f"holds no {MARKER}")
    assert snapshot(tmp_path) == before
    assert follow_advice(message, tmp_path / "new")["fasttt"]["generations"] == [0]
    # An earlier export the user added a file to: the file is not the export's to delete.
    (tmp_path / "new" / "README.txt").write_text("my notes on this model")
    before = snapshot(tmp_path)
    refused([run, tmp_path / "new"], "README.txt", "did not write")
    assert snapshot(tmp_path) == before


def test_the_run_and_directories_inside_or_above_a_run_are_refused(run, tmp_path):
    runs = run.parent
    (tmp_path / "link").symlink_to(run)
    before = snapshot(runs)
    for target, why in [(run, "is a run directory"), (f"{run}/../{run.name}", "is a run"),
                        (tmp_path / "link", "is a run directory"),
                        (runs, f"holds the run {run}"), (run / "gen0", "inside the run"),
                        (run / "exports" / "new", f"inside the run {run}")]:
        message = refused([run, target], why)
        assert snapshot(runs) == before, target  # every generation, cache and report kept
    assert not (run / "exports").exists() and not list(runs.parent.glob(".*"))
    assert follow_advice(message, tmp_path / "export")["fasttt"]["generations"] == [1]


def test_a_file_is_refused_untouched(run, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"weights of mine")
    message = refused([run, tmp_path / "model.bin", "--ensemble"], "is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # no .model.bin.trash
    assert (tmp_path / "model.bin").read_bytes() == b"weights of mine"
    assert follow_advice(message, tmp_path / "out")["fasttt"]["generations"] == [0, 1]


def test_the_current_directory_is_refused_in_one_line(run, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for target in [".", "..", "./"]:
        message = refused([run, target], "current directory")
    assert not any((tmp_path / "here").iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["here"]
    follow_advice(message, "exported")  # relative to the current directory
    assert (tmp_path / "here" / "exported" / "model.safetensors").is_file()


def test_a_new_empty_or_earlier_export_directory_is_written(run, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in [tmp_path / "a" / "new", tmp_path / "empty"]:
        export_cli([str(run), str(out), "--generation", "0"])
        marker = json.loads((out / MARKER).read_text())
        assert marker["files"] == ["config.json", "model.safetensors"]
        # A rerun replaces its own export, now with generation 1.
        export_cli([str(run), str(out)])
        assert load_export(out)[1]["fasttt"]["generations"] == [1]
        assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *marker["files"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]  # no leftovers


def test_fasttt_replaces_its_own_directories_inside_a_run_but_never_the_run(tmp_path):
    """A teacher cache or a checkpoint (no marker) inside a run: cache.py's publish_dir."""
    run = tmp_path / "runs" / "r"
    cache = run / "gen0" / "cache"
    cache.mkdir(parents=True)
    (run / "recipe.toml").write_text("")
    (run / "inputs.json").write_text("{}")
    (cache / "old.npy").write_text("old")
    staging = staging_dir(cache)
    (staging / "new.npy").write_text("new")
    publish_dir(staging, cache)
    assert [p.name for p in cache.iterdir()] == ["new.npy"]
    for target, why in [(run, "is a run directory"), (run.parent, "holds the run")]:
        one_line_refusal(lambda t=target: publish_dir(staging_dir(t), t), why,
                         "move it out of the way")
    assert (run / "recipe.toml").is_file() and (cache / "new.npy").is_file()
