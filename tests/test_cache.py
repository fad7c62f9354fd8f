"""The teacher cache: same views as the online teacher, exact lookups, refusals, atomic builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from beton_builders.__main__ import main as build_betons
from fasttt.cache import CachedTeacher, describe, expected_manifest, open_arrays, teacher_views
from fasttt.engine import last_epoch_model
from fasttt.errors import UserError
from fasttt.losses import TopKTeacher
from fasttt.recipe import load_recipe
from fasttt.train import main as train
from fasttt.train import make_accelerator, precompute_cache

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_d06.toml"


def flags(digits: Path, **overrides) -> list[str]:
    """--set flags of a tiny run with a 3-view, all-class, float32 cache."""
    values = {"data.beton_dir": f'"{digits}"', "data.train_limit": 192, "data.num_workers": 1,
              "optim.batch_size": 64, "schedule.epochs": 2, "schedule.peak_epoch": 1,
              "generations.students": 0, "cache.views": 3, "cache.dtype": '"float32"',
              "cache.batch_size": 50} | overrides
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def patriarch(tmp_path_factory):
    """A trained tiny generation 0: (runs dir, beton dir)."""
    root = tmp_path_factory.mktemp("cache")
    build_betons(["digits", str(root / "digits")])
    train([str(RECIPE), *flags(root / "digits"), "--runs-dir", str(root / "runs")])
    return root / "runs", root / "digits"


def setup(patriarch, **overrides):
    """(recipe, accelerator, gen0 dir) for a run of the patriarch fixture."""
    runs, digits = patriarch
    recipe = load_recipe(RECIPE, [f for f in flags(digits, **overrides) if f != "--set"])
    return recipe, make_accelerator(recipe, Console(quiet=True)), runs / "digits_d06" / "gen0"


def test_cached_rows_are_the_teachers_outputs_on_the_students_views(patriarch, tmp_path):
    recipe, accelerator, gen0 = setup(patriarch)
    wanted = precompute_cache(gen0, recipe, accelerator)
    assert wanted["top_k"] == 10 and wanted["stored_views"] == 3
    teacher = CachedTeacher(gen0 / "cache", wanted, torch.device("cpu"))
    model = last_epoch_model(gen0, recipe, 10, accelerator.device).eval()
    from fasttt.data import sequential_loader

    batch = next(iter(sequential_loader(recipe.data.beton_dir, split="train", batch_size=192,
                                        num_workers=1)))
    order = torch.randperm(192, generator=torch.Generator().manual_seed(0))[:40]
    for epoch in (0, 4):  # epoch 4 shows view 1
        got = teacher(None, batch.index[order], epoch)
        views = teacher_views(batch.image[order], batch.index[order], epoch % 3, recipe, None)
        with torch.no_grad():
            want = TopKTeacher.from_logits(model(views), 10)
        assert torch.equal(got.ids, want.ids)
        assert torch.allclose(got.values, want.values, atol=1e-4)
        assert torch.allclose(got.log_partition, want.log_partition, atol=1e-4)
    assert "bytes per sample per view: 54" in describe(gen0 / "cache")  # 10 * (4 + 1) + 4


def test_a_student_from_the_cache_follows_the_online_students_trajectory(patriarch, tmp_path):
    _, digits = patriarch
    losses = {}
    for mode in ("online", "precomputed"):
        run = tmp_path / mode
        args = flags(digits, **{"generations.students": 1, "cache.mode": f'"{mode}"'})
        train([str(RECIPE), *args, "--runs-dir", str(run)])
        rows = (run / "digits_d06" / "gen1" / "metrics.jsonl").read_text().splitlines()
        losses[mode] = [json.loads(r)["train_loss"] for r in rows]
    assert len(losses["online"]) == 2
    assert np.allclose(losses["online"], losses["precomputed"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("change,what", [
    ({"augment.pad": 3}, "augmentation"),
    ({"run.seed": 5}, "augmentation"),
    ({"cache.top_k": 5}, "top_k"),
])
def test_a_cache_for_other_settings_is_refused(patriarch, change, what):
    recipe, accelerator, gen0 = setup(patriarch)
    precompute_cache(gen0, recipe, accelerator)
    other, _, _ = setup(patriarch, **change)
    wanted = expected_manifest(other, gen0 / "last.safetensors", 10)
    with pytest.raises(UserError, match=f"built for another {what}.*delete it"):
        open_arrays(gen0 / "cache", wanted)


def test_wrong_teacher_beton_incomplete_and_truncated_caches_are_refused(patriarch, tmp_path):
    recipe, accelerator, gen0 = setup(patriarch)
    wanted = precompute_cache(gen0, recipe, accelerator)
    cache = tmp_path / "cache"
    shutil.copytree(gen0 / "cache", cache)
    for key, what in (("teacher_sha256", "teacher weights"), ("beton_sha256", "beton")):
        with pytest.raises(UserError, match=f"another {what}"):
            open_arrays(cache, {**wanted, key: "0" * 64})
    values = cache / "values.npy"
    values.write_bytes(values.read_bytes()[:-100])
    with pytest.raises(UserError, match="values.npy is damaged or truncated"):
        open_arrays(cache, wanted)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UserError, match="incomplete cache"):
        open_arrays(cache, wanted)


def _cache_cli(args: list[str], launcher: list[str] | None = None, **kwargs):
    command = [*(launcher or [sys.executable]), str(ROOT / "fasttt" / "cache.py"), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def _fresh_run(patriarch, target: Path) -> Path:
    runs, _ = patriarch
    shutil.copytree(runs, target)
    shutil.rmtree(target / "digits_d06" / "gen0" / "cache", ignore_errors=True)
    return target


def test_two_ranks_build_the_same_bytes(patriarch, tmp_path):
    # Kills during a cache build: tests/test_faults.py.
    _, digits = patriarch
    args = [str(RECIPE), "--generation", "0", *flags(digits, **{"cache.views": 4})]
    one = _fresh_run(patriarch, tmp_path / "one")
    solo = _cache_cli([*args, "--runs-dir", str(one)])
    assert solo.wait(timeout=300) == 0, solo.stderr.read()
    two = _fresh_run(patriarch, tmp_path / "two")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    pair = _cache_cli([*args, "--runs-dir", str(two)], launch)
    assert pair.wait(timeout=300) == 0, pair.stderr.read()[-2000:]
    gen = Path("digits_d06") / "gen0" / "cache"
    for name in ("values.npy", "ids.npy", "log_partition.npy", "manifest.json"):
        assert (one / gen / name).read_bytes() == (two / gen / name).read_bytes(), name


def test_views_that_would_change_size_between_epochs_are_refused(patriarch):
    ramp = {"augment.min_size": 24, "augment.end_ramp": 2, "schedule.epochs": 3,
            "cache.views": 1}
    recipe, _, gen0 = setup(patriarch, **ramp)
    with pytest.raises(UserError, match="progressive resizing"):
        expected_manifest(recipe, gen0 / "last.safetensors", 10)
    recipe, _, _ = setup(patriarch, **{**ramp, "cache.views": 3})
    assert expected_manifest(recipe, gen0 / "last.safetensors", 10)["views"] == 3
