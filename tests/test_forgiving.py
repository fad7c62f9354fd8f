"""Forgiving runs, still safe: a failed start leaves nothing, bookkeeping keys and more
students continue a run, any other change to a run that has trained is refused by name.

The runs are tiny (128 digits, 2 epochs); the session's shared run (two_generation_run) is
copied per test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    one_line_refusal,
    snapshot,
    tiny_recipe,
    two_generation_args,
    write_image_folder,
)

import fasttt.engine as engine
import fasttt.train as train_module
from beton_builders.__main__ import main as build_betons
from fasttt.betons import read_manifest
from fasttt.data import check_fits
from fasttt.recipe import BOOKKEEPING, SECTIONS, load_recipe
from fasttt.rundir import HISTORY, WEIGHTS, generation_dir, has_trained
from fasttt.rundir import RECIPE as RUN_RECIPE
from fasttt.train import main as train

NAME = "digits_d06"


# a digits run of seconds: 128 samples, 2 epochs, the patriarch and one student
args_for = two_generation_args


@pytest.fixture(scope="module")
def betons(two_generation_run) -> Path:
    """The digits betons the shared run's recipe names: a rerun of its copy names them too."""
    return two_generation_run / "digits"


@pytest.fixture(scope="module")
def trained(two_generation_run) -> Path:
    """A runs directory holding one finished run of args_for (its recipe names `betons`):
    the shared run's, to copy (copy_of), never to write into."""
    return two_generation_run / "runs"


def copy_of(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(runs directory, run directory) of a private copy of the trained run."""
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    return runs, runs / NAME


def weights(run: Path) -> dict[int, bytes]:
    """Each generation's last.safetensors, by generation."""
    return {m: (generation_dir(run, m) / WEIGHTS).read_bytes()
            for m in range(3) if (generation_dir(run, m) / WEIGHTS).is_file()}


def history(run: Path) -> list[dict]:
    """The changes recorded in the run's history.jsonl, without their times."""
    return [json.loads(line)["changed"] for line in (run / HISTORY).read_text().splitlines()]


def unknown_model(digits: Path, tmp_path: Path):
    """A model.name with a typo."""
    return {"model.name": "cifar_resnt20"}, (
        "unknown model 'cifar_resnt20' (closest: cifar_resnet20", "--set model.name=cifar_resnet20")


def missing_beton_dir(digits: Path, tmp_path: Path):
    """A beton directory that is not there (and no builtin to build it)."""
    return {"data.beton_dir": f'"{tmp_path / "nowhere"}"', "data.builtin": '""'}, (
        f"no manifest.json in {tmp_path / 'nowhere'}", "python -m beton_builders")


def missing_beton_file(digits: Path, tmp_path: Path):
    """Betons whose train split's file is gone."""
    betons = tmp_path / "betons"
    shutil.copytree(digits, betons)
    (betons / read_manifest(betons)["splits"]["train"]["file"]).unlink()
    return {"data.beton_dir": f'"{betons}"'}, (
        "is missing or not a file", "rebuild it with `python -m beton_builders digits")


def batch_above_the_split(digits: Path, tmp_path: Path):
    """A batch larger than the 128 training samples."""
    return {"optim.batch_size": 256}, (
        f"optim.batch_size = 256 exceeds the 128 training samples of {digits} "
        "(data.train_limit = 128): set optim.batch_size to at most 128",)


def k_above_the_classes(digits: Path, tmp_path: Path):
    """K = 11 on the 10 digit classes."""
    return {"generations.k": 11}, ("generations.k = 11 exceeds the 10 classes",)


@pytest.mark.parametrize("case", [unknown_model, missing_beton_dir, missing_beton_file,
                                  batch_above_the_split, k_above_the_classes])
def test_a_failed_start_leaves_no_run_directory_and_an_existing_one_unchanged(
        case, betons, trained, tmp_path):
    overrides, needles = case(betons, tmp_path)
    fresh = tmp_path / "fresh"
    one_line_refusal(lambda: train(args_for(betons, fresh, **overrides)), *needles)
    assert not fresh.exists()
    runs, _ = copy_of(trained, tmp_path)
    before = snapshot(runs)
    one_line_refusal(lambda: train(args_for(betons, runs, **overrides)), *needles)
    assert snapshot(runs) == before


def test_k_above_the_classes_of_a_two_class_dataset_is_refused_before_anything_is_written(
        tmp_path):
    write_image_folder(tmp_path / "src", corrupt=False)  # cat and dog
    build_betons(["imagefolder", str(tmp_path / "src"), str(tmp_path / "photos"),
                  "--max-resolution", "64", "--num-workers", "1"])
    args = args_for(tmp_path / "photos", tmp_path / "runs", **{
        "data.canvas_size": 64, "data.train_limit": 0, "optim.batch_size": 2,
        "augment.kind": "resized_crop", "generations.k": 5})
    one_line_refusal(lambda: train(args), "generations.k = 5 exceeds the 2 classes",
                     "set generations.k to at most 2")
    assert not (tmp_path / "runs").exists()


def test_a_batch_that_does_not_divide_over_the_processes_is_refused(digits):
    recipe = tiny_recipe(digits)
    one_line_refusal(
        lambda: check_fits(read_manifest(digits), recipe.data, recipe.augment, k=5,
                           batch_size=64, processes=3),
        "optim.batch_size = 64 does not divide evenly over 3 processes: set "
        "optim.batch_size to a multiple of 3, e.g. 63")


def test_a_run_directory_whose_start_failed_before_training_is_taken_over(
        digits, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "train_epoch", out_of_memory)
    runs, run = tmp_path / "runs", tmp_path / "runs" / NAME
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train(args_for(digits, runs, **{"generations.students": 0}))
    assert (run / RUN_RECIPE).is_file() and not has_trained(run)
    monkeypatch.undo()
    for seconds_of_figures in ("analyze_run", "write_report"):  # not what this test is about
        monkeypatch.setattr(train_module, seconds_of_figures, lambda *args: None)
    train(args_for(digits, runs, **{"generations.students": 0, "optim.batch_size": 32}))
    assert load_recipe(run / RUN_RECIPE).optim.batch_size == 32
    assert history(run) == [{"optim.batch_size": {"old": 64, "new": 32}}]
    assert has_trained(run)


def test_a_changed_bookkeeping_key_resumes_a_finished_run_and_is_recorded(
        betons, trained, tmp_path):
    runs, run = copy_of(trained, tmp_path)
    before = weights(run)
    train(args_for(betons, runs, **{"data.num_workers": 2}))
    assert weights(run) == before  # nothing retrained
    assert load_recipe(run / RUN_RECIPE).data.num_workers == 2
    assert history(run) == [{"data.num_workers": {"old": 1, "new": 2}}]
    entry = json.loads((run / HISTORY).read_text())
    assert entry["time"].endswith("+00:00")  # UTC


def test_more_students_train_only_the_new_generation(betons, trained, tmp_path):
    runs, run = copy_of(trained, tmp_path)
    before = weights(run)
    train(args_for(betons, runs, **{"generations.students": 2}))
    after = weights(run)
    assert {m: after[m] for m in (0, 1)} == before and 2 in after
    assert history(run) == [{"generations.students": {"old": 1, "new": 2}}]


def test_a_changed_result_key_and_fewer_students_than_finished_are_refused_by_name(
        betons, trained, tmp_path):
    runs, run = copy_of(trained, tmp_path)
    before = snapshot(runs)
    advice = f"; pick another run.name or delete {run}"
    message = one_line_refusal(
        lambda: train(args_for(betons, runs, **{"model.name": "cifar_resnet32"})))
    assert message == (f'{run} was made by a different recipe: model.name is "cifar_resnet8" '
                       f'in {run / RUN_RECIPE}, "cifar_resnet32" now{advice}')
    # Bookkeeping keys that differ as well are not counted among the refused ones.
    one_line_refusal(lambda: train(args_for(betons, runs, **{
        "model.name": "cifar_resnet32", "optim.lr": 0.05, "schedule.epochs": 3,
        "data.num_workers": 2})), '"cifar_resnet32" now (and 2 more keys differ)' + advice)
    message = one_line_refusal(
        lambda: train(args_for(betons, runs, **{"generations.students": 0})))
    assert message == (f"{run} has finished generations 0..1, more than generations.students "
                       "= 0 plans: set generations.students to at least 1, or pick another "
                       "run.name")
    assert snapshot(runs) == before


def test_every_bookkeeping_key_is_a_recipe_key():
    for name in BOOKKEEPING:
        section, key = name.split(".")
        assert key in {f.name for f in dataclasses.fields(SECTIONS[section]())}, name
