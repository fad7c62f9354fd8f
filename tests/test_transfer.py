"""Transfer to another dataset: a run directory's generations as features for a linear SVM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPE, mark_finished, set_pairs
from PIL import Image

from beton_builders.__main__ import main as build_betons
from fasttt.checkpoint import save_weights
from fasttt.errors import UserError, exit_on_user_error
from fasttt.models import build_model
from fasttt.recipe import load_recipe
from fasttt.rundir import WEIGHTS, generation_dir
from fasttt.transfer import main, open_target, pooled_labels, split_indices, trained_generations

COLOURS = {"blue": (30, 40, 210), "green": (40, 190, 50), "red": (210, 40, 30)}
PER_CLASS = {"train": 6, "val": 2}
CANVAS = 48


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A photo beton of 24 noisy, variously sized images in three colour classes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, count in PER_CLASS.items():
        for name, colour in COLOURS.items():
            (root / "src" / split / name).mkdir(parents=True)
            for i in range(count):
                height, width = rng.integers(20, CANVAS, 2)
                pixels = np.array(colour) + rng.integers(-40, 40, (height, width, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    root / "src" / split / name / f"{i}.JPEG", quality=90)
    build_betons(["imagefolder", str(root / "src"), str(root / "colours"),
                  "--max-resolution", str(CANVAS), "--num-workers", "1"])
    return root / "colours"


@pytest.fixture(scope="module")
def run_dir(digits, tmp_path_factory) -> Path:
    """A finished two-generation run of randomly initialised ResNet-20s on the digits."""
    run = tmp_path_factory.mktemp("runs") / "digits_d06"
    run.mkdir()
    recipe = load_recipe(RECIPE, set_pairs(**{"data.beton_dir": f'"{digits}"',
                                              "data.num_workers": 1}))
    recipe.write(run / "recipe.toml")
    for m in range(2):
        generation_dir(run, m).mkdir()
        save_weights(build_model(recipe.model, recipe.run, 10, seed=m),
                     generation_dir(run, m) / WEIGHTS)
        mark_finished(generation_dir(run, m))
    return run


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the CLI as `python -m fasttt.transfer` runs it."""
    try:
        exit_on_user_error(lambda: main(argv))
        status = 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_every_generation_is_scored_on_the_held_out_images(run_dir, photos, capsys):
    status, printed, _ = run_cli([str(run_dir), str(photos), "--train-per-class", "3",
                                  "--canvas-size", str(CANVAS), "--batch-size", "8"], capsys)
    assert status == 0 and "accuracy %" in printed
    result = json.loads((run_dir / "transfer" / "colours.json").read_text())
    assert set(result) == {"target", "train_per_class", "seed", "svm_c", "train_samples",
                           "test_samples", "generations"}  # nothing that varies between runs
    assert result["target"] == str(photos.resolve())
    assert (result["train_per_class"], result["seed"], result["svm_c"]) == (3, 0, 1.0)
    assert (result["train_samples"], result["test_samples"]) == (9, 15)
    assert [g["generation"] for g in result["generations"]] == [0, 1]
    # Colour classes stay linearly separable through random convolutions (chance: 33 %);
    # features paired with the wrong labels would score near chance.
    assert all(g["accuracy"] >= 80 for g in result["generations"])


def test_the_split_is_fixed_by_the_seed_and_takes_n_per_class(digits):
    target = open_target(digits, 0)
    labels = pooled_labels(target)
    assert len(labels) == 1797  # train and val pooled
    names = target.manifest["class_names"]
    train, test = split_indices(labels, names, 20, seed=0)
    again, _ = split_indices(labels, names, 20, seed=0)
    other, _ = split_indices(labels, names, 20, seed=1)
    assert np.array_equal(train, again)
    assert not np.array_equal(train, other)
    assert np.bincount(labels[train], minlength=10).tolist() == [20] * 10
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))


def test_too_many_training_images_per_class_is_one_line_naming_the_class(run_dir, photos,
                                                                         capsys):
    status, _, err = run_cli([str(run_dir), str(photos), "--train-per-class", "8",
                              "--canvas-size", str(CANVAS)], capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "class 'blue' has only 8 images" in err and "--train-per-class 7 or less" in err


def test_bad_runs_and_targets_are_one_line_errors(run_dir, photos, digits, tmp_path, capsys):
    status, _, err = run_cli([str(tmp_path / "missing"), str(photos), "--train-per-class", "2"],
                             capsys)
    assert status == 2 and err.count("\n") == 1 and "not a run directory" in err
    status, _, err = run_cli([str(run_dir), str(tmp_path), "--train-per-class", "2"], capsys)
    assert status == 2 and err.count("\n") == 1 and "no manifest.json" in err
    status, _, err = run_cli([str(run_dir), str(photos), "--train-per-class", "2"], capsys)
    assert status == 2 and "--canvas-size" in err
    status, _, err = run_cli([str(run_dir), str(photos)], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "--train-per-class" in err and "usage: python -m fasttt.transfer" in err
    unfinished = tmp_path / "unfinished"
    (unfinished / "gen0").mkdir(parents=True)
    (unfinished / "recipe.toml").write_text((run_dir / "recipe.toml").read_text())
    with pytest.raises(UserError, match="no finished generation"):
        main([str(unfinished), str(digits), "--train-per-class", "2"])
    # A finished generation whose weights are gone is named, not skipped.
    shutil.copytree(run_dir / "gen0", unfinished / "gen0", dirs_exist_ok=True)
    (unfinished / "gen0" / "last.safetensors").unlink()
    with pytest.raises(UserError, match="gen0/last.safetensors is missing: delete .*gen0 and "
                                        "rerun the same command"):
        trained_generations(unfinished)
    assert trained_generations(run_dir) == [0, 1]
