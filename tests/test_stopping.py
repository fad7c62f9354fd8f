"""When to stop generations: the holdout no generation trains on and no cache labels, and
the saturation rule, which stops one tiny run early and, given more patience, lets it go
on to its last planned generation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from accelerate import Accelerator
from conftest import one_line_refusal, tiny_recipe, tiny_run_args

from fasttt.betons import read_manifest, train_labels
from fasttt.data import check_fits, generation_loaders, holdout_rows
from fasttt.status import run_status
from fasttt.stopping import stop_after
from fasttt.train import main as train

NAME = "digits_d06"
# 128 digits, 10 % held out: 11 samples, about one per class
SATURATION = {"data.holdout": 0.1, "generations.stop": '"saturation"', "generations.students": 3,
              "generations.patience": 1, "generations.min_delta": 100}


@pytest.fixture(scope="module")
def stopped(digits, tmp_path_factory):
    """A run whose rule cannot see an improvement of 100 points: it stops after gen 1 of 3."""
    runs = tmp_path_factory.mktemp("stopping")
    train(tiny_run_args(digits, runs, **SATURATION))
    return runs


def test_the_saturation_rule():
    assert stop_after([50.0, 60.0, 60.5, 60.2], patience=1, min_delta=1.0) == 2
    assert stop_after([50.0, 60.0, 60.5, 62.0], patience=2, min_delta=1.0) is None
    assert stop_after([50.0, 49.0, 52.0, 51.0, 51.5], patience=2, min_delta=0.0) == 4
    assert stop_after([50.0], patience=1, min_delta=0.0) is None


def test_the_holdout_is_stratified_fixed_and_never_trained_on(digits):
    recipe = tiny_recipe(digits, **{"data.holdout": 0.1, "data.train_limit": 0})
    manifest = read_manifest(digits)
    held = holdout_rows(recipe.data, manifest)
    labels = train_labels(digits, manifest)
    per_class = np.bincount(labels)
    assert np.array_equal(np.bincount(labels[held], minlength=10),
                          np.round(per_class * 0.1).astype(int))
    assert np.array_equal(held, holdout_rows(tiny_recipe(digits, **{
        "data.holdout": 0.1, "data.train_limit": 0, "run.seed": 7}).data, manifest))
    train_loader, _ = generation_loaders(recipe.data, 128, 3, Accelerator(cpu=True))
    seen = np.concatenate([batch.index.numpy() for batch in train_loader])
    assert len(seen) == (len(labels) - len(held)) // 128 * 128
    assert not np.isin(seen, held).any()


def test_the_rule_stops_before_the_last_planned_generation(stopped, digits):
    run = stopped / NAME
    assert [p.name for p in sorted(run.glob("gen*"))] == ["gen0", "gen1"]
    record = json.loads((run / "stopping.json").read_text())
    assert record["stopped_after"] == 1 and record["holdout_samples"] == 11
    assert [g["generation"] for g in record["generations"]] == [0, 1]
    assert all(0 < g["train_top1_confidence"] <= 1 and 0 <= g["ensemble_top1"] <= 100
               for g in record["generations"])
    # the cache never labels the holdout: its rows stay as the build allocated them
    manifest = read_manifest(digits)
    held = holdout_rows(tiny_recipe(digits, **SATURATION, **{"data.train_limit": 128}).data,
                        manifest)
    values = np.load(run / "gen0" / "cache" / "values.npy")
    assert not values[:, held].any() and values[:, np.setdiff1d(np.arange(128), held)].any()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopping"] == record
    markdown = (run / "summary.md").read_text()
    assert "The saturation rule stopped after gen 1." in markdown
    assert "## When to stop (holdout)" in markdown
    facts = run_status(run)
    assert facts["state"] == "finished" and facts["stopped_after"] == 1
    train(tiny_run_args(digits, stopped, **SATURATION))  # a rerun stops at the same place
    assert not (run / "gen2").exists()


def test_with_more_patience_the_run_goes_on_to_its_last_generation(stopped, digits, tmp_path):
    shutil.copytree(stopped, tmp_path / "runs")
    run = tmp_path / "runs" / NAME
    before = (run / "gen1" / "last.safetensors").read_bytes()
    train(tiny_run_args(digits, tmp_path / "runs", **{**SATURATION, "generations.patience": 5}))
    record = json.loads((run / "stopping.json").read_text())
    assert record["stopped_after"] is None and len(record["generations"]) == 4
    assert (run / "gen1" / "last.safetensors").read_bytes() == before  # kept, not retrained
    assert (run / "gen3" / "eval.json").is_file()
    history = (run / "history.jsonl").read_text()
    assert '"generations.patience": {"old": 1, "new": 5}' in history


def test_a_saturation_rule_without_a_holdout_is_refused(digits):
    one_line_refusal(lambda: tiny_recipe(digits, **{"generations.stop": '"saturation"'}),
                     "decides on a holdout", "data.holdout")
    tiny = tiny_recipe(digits, **{"data.holdout": 0.01, "data.train_limit": 128})
    one_line_refusal(lambda: check_fits(read_manifest(digits), tiny.data, tiny.augment, k=5,
                                        batch_size=64, processes=1),
                     "data.holdout = 0.01 sets aside no sample of the 128 training samples")
    small = tiny_recipe(digits, **{"data.holdout": 0.5, "data.train_limit": 128})
    one_line_refusal(lambda: check_fits(read_manifest(digits), small.data, small.augment, k=5,
                                        batch_size=100, processes=1),
                     "(data.train_limit = 128, less the", "held out by data.holdout)")
