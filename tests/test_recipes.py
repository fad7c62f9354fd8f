"""The paper's recipes: every number checked against METHOD.md, one tiny run per family."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_flags, write_cifar_release
from PIL import Image

from beton_builders.__main__ import main as build_betons
from fasttt.augment import train_size
from fasttt.betons import read_manifest
from fasttt.cache import array_specs, cache_spec
from fasttt.data import train_samples
from fasttt.errors import UserError, exit_on_user_error
from fasttt.losses import eta_from_u
from fasttt.optim import peak_lr
from fasttt.recipe import load_recipe
from fasttt.teachers import view_schedule
from fasttt.train import main as train

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# The paper's settings (METHOD.md), per family: model, epochs, batch, lr at that batch,
# milestones, momentum, Nesterov, weight decay, students after the patriarch (a baseline
# has none), betons, and images per training set (for the teacher cache's size).
PAPER = {
    "cifar100_resnet": dict(epochs=164, batch=128, lr=0.1, milestones=(82, 123), momentum=0.9,
                            nesterov=True, weight_decay=1e-4, students=10,
                            beton_dir="data/cifar100", train_images=50_000, classes=100),
    "cifar100_densenet": dict(epochs=300, batch=64, lr=0.1, milestones=(150, 225),
                              momentum=0.9, nesterov=True, weight_decay=1e-4, students=5,
                              beton_dir="data/cifar100", train_images=50_000, classes=100),
    "imagenet_r18": dict(epochs=100, batch=1024, lr=0.1, milestones=(30, 60, 90),
                         momentum=0.9, nesterov=True, weight_decay=1e-4, students=5,
                         beton_dir="data/imagenet", train_images=1_281_167, classes=1000),
}
MODELS = {"resnet20": "cifar_resnet20", "resnet56": "cifar_resnet56",
          "resnet110": "cifar_resnet110", "densenet100": "cifar_densenet_bc100",
          "densenet190": "cifar_densenet_bc190", "r18": "resnet18"}
# D(u, lambda) and the patriarch's loss, by the recipe name's last part.
PROCESSES = {"baseline": ("ce", 1.0, 0.0), "ban05": ("ce", 1.0, 0.5),
             "ban06": ("ce", 1.0, 0.6), "d06": ("tsd", 0.6, 0.6), "d07": ("tsd", 0.7, 0.6),
             "d08": ("tsd", 0.8, 0.6), "lsr06": ("lsr", 0.6, 0.6), "cp06": ("cp", 0.6, 0.6)}
SHIPPED = ([f"cifar100_{net}_{p}" for net in ("resnet20", "resnet56", "resnet110")
            for p in PROCESSES]
           + [f"cifar100_{net}_{p}" for net in ("densenet100", "densenet190")
              for p in ("baseline", "d06", "d07")]
           + ["imagenet_r18_baseline", "imagenet_r18_d06", "imagenet_r18_d06_fast"])
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# GB of one teacher's cache on the full training set, as the recipes' comments state.
CACHE_GB = {"cifar100_resnet": 2.49, "cifar100_densenet": 4.56, "imagenet_r18": 5.64,
            "imagenet_r18_d06_fast": 0.90}


def family(name: str) -> str:
    return next(f for f in PAPER if name.startswith(f))


def student_views(recipe):
    """The view schedule of the recipe's first student (generation 1)."""
    return view_schedule(recipe.run.seed, 1, recipe.schedule.epochs, recipe.augment,
                         recipe.cache)


def cache_bytes(recipe, samples: int, classes: int) -> int:
    """Bytes of one teacher's cache for this recipe on the full training set."""
    cache = recipe.cache
    manifest = {"stored_views": student_views(recipe).stored, "samples": samples,
                "classes": classes, "top_k": min(cache.top_k or classes, classes),
                "dtype": cache.dtype, "temperatures": [1.0]}
    return sum(math.prod(shape) * dtype.itemsize
               for shape, dtype in array_specs(manifest).values())


def test_every_paper_setting_is_a_recipe_with_a_unique_run_name():
    names = {path.stem: load_recipe(path).run.name for path in RECIPES.glob("*.toml")}
    assert set(SHIPPED) <= set(names)
    assert all(names[stem] == stem for stem in SHIPPED)
    assert len(set(names.values())) == len(names)
    for stem in SHIPPED:  # the opening comment says how to build the betons and run it
        text = (RECIPES / f"{stem}.toml").read_text()
        assert text.startswith("# ") and "python -m beton_builders " in text
        assert f"fasttt/train.py recipes/{stem}.toml" in text


@pytest.mark.parametrize("name", [n for n in SHIPPED if not n.endswith("_fast")])
def test_paper_recipe_matches_the_paper(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    paper = PAPER[family(name)]
    optim, schedule, augment = recipe.optim, recipe.schedule, recipe.augment
    assert recipe.model.name == MODELS[name.split("_")[1]]
    assert recipe.data.beton_dir == paper["beton_dir"]
    assert recipe.run.mixed_precision == "bf16"
    assert optim.batch_size == paper["batch"] and peak_lr(optim) == pytest.approx(paper["lr"])
    assert (optim.momentum, optim.nesterov, optim.weight_decay) == (
        paper["momentum"], paper["nesterov"], paper["weight_decay"])
    assert optim.decay_norm_and_bias
    assert (schedule.kind, schedule.epochs, schedule.milestones, schedule.factor,
            schedule.warmup_epochs) == ("step", paper["epochs"], paper["milestones"], 0.1, 0)
    assert augment.flip
    if name.startswith("cifar100"):  # pad 4, random 32x32 crop, flip; nothing at test time
        assert (augment.kind, augment.pad, augment.min_size, augment.max_size) == (
            "pad_crop", 4, 32, 32)
        assert (augment.eval_size, augment.eval_crop_ratio) == (32, 1.0)
        assert augment.mean == CIFAR100_MEAN and augment.std == CIFAR100_STD
    else:  # scale/aspect crops to 224 and flips; one centre crop, 224 from 256, at test
        assert (augment.kind, augment.scale, augment.min_size, augment.max_size) == (
            "resized_crop", (0.08, 1.0), 224, 224)
        assert augment.ratio == pytest.approx((3 / 4, 4 / 3))
        assert augment.eval_size == 224 and augment.eval_crop_ratio * 256 == 224
        assert augment.mean == IMAGENET_MEAN and augment.std == IMAGENET_STD
        assert recipe.data.canvas_size == 512  # the README's --max-resolution
    method = recipe.generations
    loss, u, lam = PROCESSES[name.split("_")[-1]]
    assert (method.patriarch_loss, method.u, method.lam) == (loss, u, lam)
    assert (method.k, method.temperature) == (5, 1.0)
    assert method.students == (0 if name.endswith("baseline") else paper["students"])
    if name.endswith("d06"):  # METHOD.md's example: u = 0.6, K = 5 gives eta = 0.75 / 1.75
        assert eta_from_u(method.u, method.k) == pytest.approx(0.75 / 1.75)
    # LSR and CP patriarchs: eta 0.9, which fits their Table 3 training confidences.
    assert method.eta == (0.9 if loss in ("lsr", "cp") else 0.0)


@pytest.mark.parametrize("name", [n for n in SHIPPED if not n.endswith("baseline")])
def test_teachers_label_the_students_own_views_and_fit_on_disk(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    paper = PAPER[family(name)]
    assert recipe.cache.mode == "precomputed" and recipe.cache.teacher_view == "student"
    # A fresh keyed view every student epoch, so the teacher labels the very pixels the
    # student sees at every epoch, at that epoch's size.
    assert recipe.cache.views in (0, recipe.schedule.epochs)
    views = student_views(recipe)
    assert views.count == views.stored == recipe.schedule.epochs
    assert [views.teacher_view(e) for e in range(recipe.schedule.epochs)] == list(
        range(recipe.schedule.epochs))
    size = cache_bytes(recipe, paper["train_images"], paper["classes"])
    assert round(size / 1e9, 2) == CACHE_GB.get(name, CACHE_GB[family(name)])
    if name.startswith("cifar100"):
        assert recipe.cache.top_k == 0  # every class: the exact KL of Eqn 2
    else:
        assert 2 * recipe.generations.k <= recipe.cache.top_k < paper["classes"]


def test_fast_imagenet_recipe_is_ffcvs_schedule_with_the_papers_method():
    paper = load_recipe(RECIPES / "imagenet_r18_d06.toml")
    fast = load_recipe(RECIPES / "imagenet_r18_d06_fast.toml")
    assert fast.generations == paper.generations  # D(0.6, 0.6), K = 5, five students
    assert (fast.model, fast.data) == (paper.model, paper.data)
    schedule, optim, augment = fast.schedule, fast.optim, fast.augment
    assert 16 <= schedule.epochs <= 32 and schedule.kind == "linear"
    assert (schedule.peak_epoch, schedule.end_lr_ratio) == (2, 0.0)
    assert optim.batch_size == 1024 and optim.lr_scaling == "linear"
    assert peak_lr(optim) == 0.5 and optim.lr / optim.reference_batch_size == 0.5 / 1024
    assert (optim.momentum, optim.weight_decay, optim.decay_norm_and_bias) == (0.9, 5e-5, False)
    sizes = [train_size(e, augment) for e in range(schedule.epochs)]
    assert sizes[0] == 160 and sizes[-1] == 192 and sizes == sorted(sizes)
    assert augment.eval_size in (224, 256) and augment.eval_crop_ratio * 256 == 224
    # progressive resizing: one view per epoch
    assert student_views(fast).count == schedule.epochs


# ---------------------------------------------------------------- one tiny run per family

def write_photo_folder(root: Path, classes: int = 6) -> Path:
    """An ImageNet-layout tree with one JPEG per class and split, of mixed sizes.

    Six classes, not conftest's two: the recipes' TSD patriarch needs K = 5 classes.
    """
    rng = np.random.default_rng(0)
    for c in range(classes):
        for split in ("train", "val"):
            height, width = 24 + 6 * c, 40 - 3 * c
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            path = root / split / f"class{c}" / f"{split}{c}.JPEG"
            path.parent.mkdir(parents=True)
            Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> Path:
    """CIFAR-100 betons of a tiny fake release: 8 training and 8 test images."""
    root = tmp_path_factory.mktemp("cifar100")
    release = write_cifar_release(root / "src", "cifar100", per_file=8)
    build_betons(["cifar100", str(release), str(root / "betons")])
    return root / "betons"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Image-folder betons of six small photo classes, one image per class and split."""
    root = tmp_path_factory.mktemp("photos")
    build_betons(["imagefolder", str(write_photo_folder(root / "src")), str(root / "betons"),
                  "--max-resolution", "48", "--num-workers", "1"])
    return root / "betons"


def tiny(betons: Path, **overrides) -> list[str]:
    """--set flags for a run of seconds: one epoch on a few samples, one student at most.

    The teacher cache keeps the recipes' rule, one view per student epoch.
    """
    return tiny_run_flags(betons, **{"data.train_limit": 4, "optim.batch_size": 2,
                                     "schedule.epochs": 1, "schedule.milestones": "[1]",
                                     "cache.views": 1, **overrides})


PHOTO_SIZES = {"data.canvas_size": 48, "augment.min_size": 32, "augment.max_size": 32,
               "augment.eval_size": 32}
RUNS = {  # recipe: (betons, overrides)
    "cifar100_resnet20_cp06": ("cifar100", {"generations.students": 1}),
    "cifar100_densenet100_d07": ("cifar100", {"generations.students": 0}),
    "imagenet_r18_d06": ("photos", PHOTO_SIZES | {"generations.students": 0}),
    # Two epochs whose crops grow from 32 to 64 pixels.
    "imagenet_r18_d06_fast": ("photos", PHOTO_SIZES | {
        "generations.students": 0, "schedule.epochs": 2, "schedule.milestones": "[]",
        "augment.max_size": 64, "augment.start_ramp": 0, "augment.end_ramp": 1}),
}


@pytest.mark.parametrize("name", RUNS)
def test_one_tiny_run_per_family(name, request, tmp_path, monkeypatch, capsys):
    fixture, overrides = RUNS[name]
    betons = request.getfixturevalue(fixture)
    # Python's own hook, not pytest's: numba's dispatcher finalizer raised KeyError as FFCV's
    # compiled photo pipelines were collected, printed as "Exception ignored in: <finalize".
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    exit_on_user_error(lambda: train([str(RECIPES / f"{name}.toml"), *tiny(betons, **overrides),
                                      "--runs-dir", str(tmp_path)]))
    assert "Exception ignored" not in capsys.readouterr().err
    run = tmp_path / name
    generations = 1 + load_recipe(run / "recipe.toml").generations.students
    epochs = load_recipe(run / "recipe.toml").schedule.epochs
    for m in range(generations):
        result = json.loads((run / f"gen{m}" / "eval.json").read_text())
        assert set(result) == {"best", "last", "weights_sha256"}
        assert 0 <= result["last"]["val_top1"] <= 100
        assert len((run / f"gen{m}" / "metrics.jsonl").read_text().splitlines()) == epochs
    assert not (run / f"gen{generations}").exists()
    if generations > 1:
        cache = json.loads((run / "gen0" / "cache" / "manifest.json").read_text())
        assert cache["complete"] and cache["views"] == cache["stored_views"] == epochs


def test_fast_recipes_progressive_resizing_is_accepted_by_the_teacher_cache(photos, tmp_path):
    weights = tmp_path / "last.safetensors"
    weights.write_bytes(b"teacher")
    recipe = load_recipe(RECIPES / "imagenet_r18_d06_fast.toml", [f'data.beton_dir="{photos}"'])
    beton = read_manifest(photos)
    wanted = cache_spec(weights, beton, train_samples(recipe.data, beton),
                        student_views(recipe), recipe.cache, 6, recipe.generations.temperature)
    assert (wanted.views, wanted.stored_views, wanted.top_k) == (16, 16, 6)
    fewer = load_recipe(RECIPES / "imagenet_r18_d06_fast.toml",
                        [f'data.beton_dir="{photos}"', "cache.views=8"])
    with pytest.raises(UserError, match="progressive resizing"):  # one view for two sizes
        student_views(fewer)
