"""The teacher cache: same views as the online teacher, exact lookups, refusals, atomic builds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RECIPE, ROOT, RUN_DEVICE, tiny_recipe, tiny_run_flags
from rich.console import Console

from fasttt.augment import eval_view, generation_key, train_size, train_view
from fasttt.betons import read_manifest
from fasttt.cache import CacheSpec, cache_spec, describe, ensure_cache, open_arrays, open_teacher
from fasttt.cache import main as cache_cli
from fasttt.data import split_loader, train_samples
from fasttt.errors import UserError, exit_on_user_error
from fasttt.models import last_epoch_model
from fasttt.processes import make_accelerator
from fasttt.rundir import CACHE, WEIGHTS
from fasttt.teachers import OnlineTeacher, TopKTeacher, view_schedule
from fasttt.train import main as train

# A tiny run whose students keep 2 views for 3 epochs (epoch 2 shows view 0 again), in
# an all-class float32 cache.
CACHE_RUN = {"data.train_limit": 192, "schedule.epochs": 3, "cache.views": 2,
             "cache.dtype": '"float32"', "cache.batch_size": 50}


# The cache against a teacher run at hand: on a GPU both run in bf16 (the recipe's), in
# batches of other sizes, for which cuDNN may pick other kernels: a few bf16 steps apart.
CLOSE = {"cpu": {"rtol": 0, "atol": 1e-4}, "cuda": {"rtol": 2**-5, "atol": 0.02}}
RTOL = {"cpu": 1e-6, "cuda": 0.02}  # a student's losses from the cache and from the teacher


def flags(digits: Path, **overrides) -> list[str]:
    """--set flags of the tiny CACHE_RUN on the digits."""
    return tiny_run_flags(digits, **{**CACHE_RUN, **overrides})


@pytest.fixture(scope="module")
def patriarch(digits, tmp_path_factory) -> Path:
    """The runs directory of a trained tiny generation 0."""
    runs = tmp_path_factory.mktemp("cache") / "runs"
    train([str(RECIPE), *flags(digits), "--runs-dir", str(runs)])
    return runs


def setup(patriarch: Path, digits: Path, **overrides):
    """(recipe, accelerator, gen0 dir, the views of gen0's student) of the patriarch's run."""
    recipe = tiny_recipe(digits, **{**CACHE_RUN, **overrides})
    views = view_schedule(recipe.run.seed, 1, recipe.schedule.epochs, recipe.augment,
                          recipe.cache)
    accelerator = make_accelerator(recipe.run.mixed_precision, Console(quiet=True))
    return recipe, accelerator, patriarch / "digits_d06" / "gen0", views


def wanted_for(recipe, views, teacher_dir: Path) -> CacheSpec:
    """What a cache of `teacher_dir` must hold for this recipe's student."""
    beton = read_manifest(recipe.data.beton_dir)
    return cache_spec(teacher_dir / WEIGHTS, beton, train_samples(recipe.data, beton), views,
                      recipe.cache, 10, recipe.generations.temperature)


def first_samples(recipe, accelerator):
    """The run's 192 training samples as one batch, in order."""
    (batch,) = list(split_loader(recipe.data, accelerator, "train", 192, limit=192))
    return batch


def test_cached_rows_are_the_teachers_outputs_on_the_students_views(patriarch, digits):
    recipe, accelerator, gen0, views = setup(patriarch, digits)
    device = accelerator.device.type
    wanted = ensure_cache(gen0 / WEIGHTS, views, 1.0, recipe, 10, accelerator)
    assert (wanted.top_k, wanted.views, wanted.stored_views) == (10, 2, 2)
    assert wanted.teacher_view == "student" and wanted.samples == 192
    teacher = open_teacher(gen0 / CACHE, wanted, accelerator.device)
    model = last_epoch_model(gen0 / WEIGHTS, recipe.model, recipe.run, 10,
                             accelerator.device).eval()
    online = OnlineTeacher(model, views, 10, recipe.generations.temperature)
    batch = first_samples(recipe, accelerator)
    order = torch.randperm(192, generator=torch.Generator().manual_seed(0))[:40]
    images, index = batch.image[order], batch.index[order]
    for epoch in range(3):  # epoch 2 shows view 0 again
        view = views.teacher_view(epoch)
        assert view == epoch % 2
        # The student's pixels: generation 1's key, view e mod R, that view's size.
        shown = train_view(images, index, seed=generation_key(recipe.run.seed, 1), view=view,
                           size=train_size(view, recipe.augment), augment=recipe.augment,
                           extent=None)
        assert torch.equal(shown, views.student_pixels(images, index, epoch, None))
        with torch.no_grad(), accelerator.autocast():
            want = TopKTeacher.from_logits(model(shown), 10)
        with torch.no_grad(), accelerator.autocast():  # as the training loop calls it
            answered = online(index, view, images, None)
        for got in (teacher(index, view), answered):
            assert torch.equal(got.ids, want.ids)
            assert torch.allclose(got.values.float(), want.values.float(), **CLOSE[device])
            assert torch.allclose(got.log_partition, want.log_partition, **CLOSE[device])
    assert "bytes per sample per view: 54" in describe(gen0 / CACHE)  # 10 * (4 + 1) + 4


def test_an_unaugmented_teacher_labels_one_plain_view_for_every_epoch(patriarch, digits,
                                                                     tmp_path):
    recipe, accelerator, gen0, views = setup(
        patriarch, digits, **{"cache.teacher_view": '"unaugmented"'})
    device = accelerator.device.type
    teacher_dir = tmp_path / "gen0"
    teacher_dir.mkdir()
    shutil.copy2(gen0 / WEIGHTS, teacher_dir / WEIGHTS)
    wanted = ensure_cache(teacher_dir / WEIGHTS, views, 1.0, recipe, 10, accelerator)
    assert (wanted.views, wanted.stored_views, wanted.teacher_view) == (2, 1, "unaugmented")
    assert [views.teacher_view(e) for e in range(3)] == [0, 0, 0]
    assert [views.view(e) for e in range(3)] == [0, 1, 0]  # the student's own views
    teacher = open_teacher(teacher_dir / CACHE, wanted, accelerator.device)
    model = last_epoch_model(gen0 / WEIGHTS, recipe.model, recipe.run, 10,
                             accelerator.device).eval()
    batch = first_samples(recipe, accelerator)
    plain = eval_view(batch.image, size=recipe.augment.eval_size, augment=recipe.augment,
                      extent=None)
    with torch.no_grad(), accelerator.autocast():
        want = TopKTeacher.from_logits(model(plain), 10)
    got = teacher(batch.index, 0)
    assert torch.equal(got.ids, want.ids)
    assert torch.allclose(got.values.float(), want.values.float(), **CLOSE[device])
    # The student's pixels are ignored: an online teacher labels the plain view too.
    shown = views.student_pixels(batch.image, batch.index, 1, None)
    with torch.no_grad(), accelerator.autocast():
        online = OnlineTeacher(model, views, 10, 1.0)(batch.index, 0, batch.image, None,
                                                         shown)
    assert torch.allclose(online.values.float(), want.values.float(), **CLOSE[device])


def test_a_student_from_the_cache_follows_the_online_students_trajectory(digits, tmp_path):
    losses = {}
    for mode in ("online", "precomputed"):
        run = tmp_path / mode
        args = flags(digits, **{"generations.students": 1, "cache.mode": f'"{mode}"'})
        train([str(RECIPE), *args, "--runs-dir", str(run)])
        rows = (run / "digits_d06" / "gen1" / "metrics.jsonl").read_text().splitlines()
        losses[mode] = [json.loads(r)["train_loss"] for r in rows]
    assert len(losses["online"]) == 3
    assert np.allclose(losses["online"], losses["precomputed"], rtol=RTOL[RUN_DEVICE], atol=0)


@pytest.mark.parametrize("change,what", [
    ({"augment.pad": 3}, "augmentation"),
    ({"run.seed": 5}, "augmentation"),
    ({"cache.views": 3}, "augmentation"),
    ({"cache.teacher_view": '"unaugmented"'}, "augmentation"),
    ({"cache.top_k": 5}, "top_k"),
])
def test_a_cache_for_other_settings_is_refused(patriarch, digits, change, what):
    recipe, accelerator, gen0, views = setup(patriarch, digits)
    ensure_cache(gen0 / WEIGHTS, views, 1.0, recipe, 10, accelerator)
    other, _, _, other_views = setup(patriarch, digits, **change)
    with pytest.raises(UserError, match=f"built for another {what}.*rerun the same command"):
        open_arrays(gen0 / CACHE, wanted_for(other, other_views, gen0))


def test_wrong_teacher_beton_incomplete_and_truncated_caches_are_refused(patriarch, digits,
                                                                        tmp_path):
    recipe, accelerator, gen0, views = setup(patriarch, digits)
    wanted = ensure_cache(gen0 / WEIGHTS, views, 1.0, recipe, 10, accelerator)
    cache = tmp_path / "cache"
    shutil.copytree(gen0 / CACHE, cache)
    for key, what in (("teacher_sha256", "teacher weights"), ("beton_sha256", "beton")):
        with pytest.raises(UserError, match=f"another {what}"):
            open_arrays(cache, dataclasses.replace(wanted, **{key: "0" * 64}))
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


def _fresh_run(patriarch: Path, target: Path) -> Path:
    shutil.copytree(patriarch, target)
    shutil.rmtree(target / "digits_d06" / "gen0" / CACHE, ignore_errors=True)
    return target


def test_two_ranks_build_the_same_bytes(patriarch, digits, tmp_path):
    # Kills during a cache build: tests/test_faults.py.
    args = [str(RECIPE), "--generation", "0", *flags(digits, **{"cache.views": 3})]
    one = _fresh_run(patriarch, tmp_path / "one")
    solo = _cache_cli([*args, "--runs-dir", str(one)])
    assert solo.wait(timeout=300) == 0, solo.stderr.read()
    two = _fresh_run(patriarch, tmp_path / "two")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    pair = _cache_cli([*args, "--runs-dir", str(two)], launch)
    assert pair.wait(timeout=300) == 0, pair.stderr.read()[-2000:]
    gen = Path("digits_d06") / "gen0" / CACHE
    assert json.loads((one / gen / "manifest.json").read_text())["stored_views"] == 3
    for name in ("values.npy", "ids.npy", "log_partition.npy", "manifest.json"):
        assert (one / gen / name).read_bytes() == (two / gen / name).read_bytes(), name


def test_the_cache_cli_refuses_bad_arguments_and_untrained_generations_in_one_line(
        patriarch, digits, capsys):
    for args, needle in ((["--generation", "0"], "usage: accelerate launch fasttt/cache.py"),
                         ([str(RECIPE), "--generation", "5", *flags(digits), "--runs-dir",
                           str(patriarch)], "train generation 5 first")):
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(partial(cache_cli, args))  # as `fasttt/cache.py` runs it
        err = capsys.readouterr().err
        assert stop.value.code == 2, err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err


def test_views_that_would_change_size_between_epochs_are_refused(patriarch, digits):
    ramp = {"augment.min_size": 24, "augment.end_ramp": 2, "schedule.epochs": 3}
    recipe, _, gen0, views = setup(patriarch, digits, **ramp, **{"cache.views": 3})
    assert wanted_for(recipe, views, gen0).views == 3
    one_view = tiny_recipe(digits, **{**CACHE_RUN, **ramp, "cache.views": 1})
    with pytest.raises(UserError, match="progressive resizing"):
        view_schedule(one_view.run.seed, 1, 3, one_view.augment, one_view.cache)
    # The patriarch sees a fresh view every epoch, whatever the cache keeps.
    assert view_schedule(one_view.run.seed, 0, 3, one_view.augment, one_view.cache).count == 3
