"""Each generation's own views and order, one schedule for every teacher, honest labels.

The view schedule (fasttt/teachers.py) is what the student loop, the cache build and the
online teacher share; these tests pin what it promises.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from fasttt.betons import read_manifest
from fasttt.cache import build_cache, cache_spec, open_arrays, open_teacher
from fasttt.checkpoint import save_weights
from fasttt.data import generation_loaders, sequential_loader, train_samples
from fasttt.errors import UserError
from fasttt.models import build_model
from fasttt.paper import match_paper, paper_patriarch
from fasttt.recipe import CacheConfig, load_recipe
from fasttt.report import method_title
from fasttt.teachers import OnlineTeacher, view_schedule

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_d06.toml"


def recipe_for(digits: Path, *overrides: str):
    """The digits recipe on the shared betons, with `section.key=value` overrides."""
    return load_recipe(RECIPE, [f'data.beton_dir="{digits}"', "data.num_workers=1",
                                "data.train_limit=128", "schedule.epochs=4", *overrides])


def first_batch(digits: Path, size: int = 64):
    """The first `size` training samples, in order."""
    return next(iter(sequential_loader(digits, split="train", batch_size=size, num_workers=1)))


def schedules(recipe, *generations):
    """The recipe's view schedule of each generation."""
    return [view_schedule(recipe.run.seed, m, recipe.schedule.epochs, recipe.augment,
                          recipe.cache) for m in generations]


def test_each_generation_draws_its_own_crops(digits):
    recipe = recipe_for(digits)
    batch = first_batch(digits)
    gen1, gen2 = schedules(recipe, 1, 2)
    assert gen1.key != gen2.key
    for epoch in range(recipe.schedule.epochs):
        one = gen1.student_pixels(batch.image, batch.index, epoch, batch.extent)
        two = gen2.student_pixels(batch.image, batch.index, epoch, batch.extent)
        again = gen1.student_pixels(batch.image, batch.index, epoch, batch.extent)
        assert torch.equal(one, again)  # keyed: the same generation sees the same pixels
        differ = (one != two).flatten(1).any(dim=1)
        assert differ.float().mean() > 0.5, f"epoch {epoch}: generations share their crops"


def test_each_generation_has_its_own_batch_order(digits):
    recipe = recipe_for(digits, "optim.batch_size=32")
    accelerator = Accelerator(cpu=True)
    orders = []
    for views in schedules(recipe, 0, 1, 1):
        train, _ = generation_loaders(recipe.data, recipe.optim.batch_size, views.key,
                                      accelerator)
        train.set_epoch(3)
        orders.append(np.concatenate([b.index.numpy() for b in train]))
    assert sorted(orders[0]) == sorted(orders[1])  # the same samples ...
    assert not np.array_equal(orders[0], orders[1])  # ... in another order
    assert np.array_equal(orders[1], orders[2])  # and the same order when replayed


def test_the_default_cache_shows_a_fresh_view_every_epoch_like_the_online_teacher(digits):
    assert (CacheConfig().views, CacheConfig().teacher_view) == (0, "student")
    recipe = recipe_for(digits, "cache.views=0")
    (views,) = schedules(recipe, 1)
    assert [views.view(e) for e in range(4)] == [0, 1, 2, 3]
    assert [views.teacher_view(e) for e in range(4)] == [0, 1, 2, 3]
    assert views.stored == 4
    assert "fresh one every epoch" in views.describe()


def test_fewer_views_and_the_unaugmented_view_are_explicit_and_stated(digits):
    (fewer,) = schedules(recipe_for(digits, "cache.views=2"), 1)
    assert [fewer.view(e) for e in range(4)] == [0, 1, 0, 1]
    assert "2 per sample for 4 epochs" in fewer.describe()
    (fixed,) = schedules(recipe_for(digits, 'cache.teacher_view="unaugmented"'), 1)
    assert [fixed.view(e) for e in range(4)] == [0, 1, 2, 3]  # the student's views stay fresh
    assert [fixed.teacher_view(e) for e in range(4)] == [0, 0, 0, 0]
    assert fixed.stored == 1 and "un-augmented" in fixed.describe()
    (patriarch,) = schedules(recipe_for(digits, "cache.views=2"), 0)
    assert patriarch.count == 4  # no teacher, nothing cached: a fresh view every epoch


def test_switching_the_cache_mode_keeps_the_students_views(digits):
    precomputed, = schedules(recipe_for(digits, "cache.views=2"), 1)
    online, = schedules(recipe_for(digits, "cache.views=2", 'cache.mode="online"'), 1)
    assert precomputed == online


def test_views_that_would_change_size_between_epochs_are_refused(digits):
    recipe = recipe_for(digits, "cache.views=2", "augment.min_size=16", "augment.max_size=32",
                        "augment.start_ramp=1", "augment.end_ramp=3")
    with pytest.raises(UserError, match="progressive resizing"):
        schedules(recipe, 1)
    assert schedules(recipe, 0)[0].count == 4  # one view per epoch is always consistent


def test_the_cache_answers_what_the_online_teacher_answers_on_the_students_views(
        digits, tmp_path):
    recipe = recipe_for(digits, 'cache.dtype="float32"', "cache.views=3")
    accelerator = Accelerator(cpu=True)
    model = build_model(recipe.model, recipe.run, 10, seed=3).eval()
    save_weights(model, tmp_path / "teacher.safetensors")
    (views,) = schedules(recipe, 2)
    beton = read_manifest(digits)
    samples = train_samples(recipe.data, beton)
    wanted = cache_spec(tmp_path / "teacher.safetensors", beton, samples, views, recipe.cache,
                        10, 1.0)
    online = OnlineTeacher(model, views, 10, 1.0)
    loader = sequential_loader(digits, split="train", batch_size=50, num_workers=1,
                               limit=samples)
    build_cache(tmp_path / "cache", online, wanted, loader, accelerator)
    cached = open_teacher(tmp_path / "cache", wanted, torch.device("cpu"))
    batch = first_batch(digits)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:24]
    for epoch in range(recipe.schedule.epochs):  # epoch 3 shows view 0 again
        shown = views.student_pixels(batch.image[order], batch.index[order], epoch, None)
        want = online(batch.index[order], views.teacher_view(epoch), batch.image[order], None,
                      shown)
        got = cached(batch.index[order], views.teacher_view(epoch))
        assert torch.equal(got.ids, want.ids)
        assert torch.allclose(got.values, want.values, atol=1e-5)
        assert torch.allclose(got.log_partition, want.log_partition, atol=1e-5)
    # Every class kept: the cache serves a student of any temperature, T = 4 here.
    hot = open_teacher(tmp_path / "cache", dataclasses.replace(wanted, temperature=4.0),
                       torch.device("cpu"))
    assert hot.column is None and wanted.temperatures == (1.0,)
    want = OnlineTeacher(model, views, 10, 4.0)(batch.index[order], 0, batch.image[order], None)
    got = hot(batch.index[order], 0)
    assert got.temperature == 4.0
    assert torch.allclose(got.log_partition, want.log_partition, atol=1e-5)
    # Another generation's views are another cache: the fingerprint refuses it.
    (other,) = schedules(recipe, 3)
    other_wanted = cache_spec(tmp_path / "teacher.safetensors", beton, samples, other,
                              recipe.cache, 10, 1.0)
    with pytest.raises(UserError, match="built for another augmentation"):
        open_arrays(tmp_path / "cache", other_wanted)


@pytest.mark.parametrize("loss", ["lsr", "cp"])
def test_an_lsr_or_cp_patriarch_with_an_explicit_eta_is_labelled_by_its_loss(digits, loss):
    recipe = recipe_for(digits, f'generations.patriarch_loss="{loss}"', "generations.u=1.0",
                        "generations.eta=0.5", "generations.lam=0.6")
    assert paper_patriarch(recipe.generations) == loss
    assert f"{loss.upper()} patriarch" in method_title(recipe.generations, recipe.model.name,
                                                       "digits")
    assert not [s for s in match_paper(recipe.generations, "cifar_resnet110", 100)
                if s.patriarch == "ce"]
    plain = recipe_for(digits, f'generations.patriarch_loss="{loss}"', "generations.u=1.0")
    assert paper_patriarch(plain.generations) == "ce"  # eta derived from u = 1 is plain CE


def test_nothing_imports_the_entry_point():
    importers = []
    for folder in ("fasttt", "beton_builders", "benchmarks"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                else:
                    continue
                if "fasttt.train" in names:
                    importers.append(str(path.relative_to(ROOT)))
    assert importers == []
