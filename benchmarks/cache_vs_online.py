"""Teacher cache against the online teacher, side by side in one run on this machine.

    python benchmarks/cache_vs_online.py [--recipe recipes/digits_d06.toml] [--epochs 3]
                                         [--views 12] [--out FILE]

Same model, data and keyed views for every row: a patriarch epoch (no teacher), a
student epoch reading the cache, a student epoch running the online teacher, the cache
build per view, and cache lookups (rows/s). Epoch rows are medians over --epochs epochs
after one warm-up epoch. Prints a table of ratios to the patriarch epoch and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from beton_builders.__main__ import main as build_betons
from fasttt.betons import read_manifest
from fasttt.cache import build_cache, cache_spec, open_teacher
from fasttt.checkpoint import save_weights
from fasttt.data import generation_loaders, split_loader, train_samples
from fasttt.engine import GenerationSpec, prepare_learner, train_epoch
from fasttt.generation import generation_objective, generation_views
from fasttt.models import build_model
from fasttt.processes import make_accelerator
from fasttt.progress import progress_bar
from fasttt.recipe import load_recipe
from fasttt.teachers import OnlineTeacher


def epoch_seconds(spec, recipe, accelerator, num_classes, epochs: int) -> float:
    """Median seconds of a training epoch of a fresh model with this spec."""
    train, _ = generation_loaders(recipe.data, recipe.optim.batch_size, spec.views.key,
                                  accelerator)
    learner = prepare_learner(build_model(recipe.model, recipe.run, num_classes, seed=1),
                              recipe.optim, recipe.schedule, len(train), accelerator)
    times = []
    with progress_bar(False) as progress:
        for epoch in range(epochs + 1):
            train.set_epoch(epoch)
            start = time.perf_counter()
            train_epoch(learner, train, spec, epoch, accelerator, progress, f"epoch {epoch + 1}")
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Every row of the table, in seconds or rows/s."""
    overrides = [f"cache.views={args.views}",
                 f'data.beton_dir="{work / "digits"}"', *args.set]
    recipe = load_recipe(args.recipe, overrides)
    build_betons(["digits", recipe.data.beton_dir])
    accelerator = make_accelerator(recipe.run.mixed_precision, Console(quiet=True))
    beton = read_manifest(recipe.data.beton_dir)
    num_classes, samples = len(beton["class_names"]), train_samples(recipe.data, beton)
    method = recipe.generations
    patriarch_views, views = (generation_views(recipe, m) for m in (0, 1))
    teacher_model = build_model(recipe.model, recipe.run, num_classes, seed=0)
    teacher_model = teacher_model.to(accelerator.device)
    save_weights(teacher_model, work / "teacher.safetensors")
    wanted = cache_spec(work / "teacher.safetensors", beton, samples, views, recipe.cache,
                               num_classes, method.temperature)
    loader = split_loader(recipe.data, accelerator, "train", recipe.cache.batch_size,
                          limit=samples)
    online = OnlineTeacher(teacher_model, views, wanted.top_k, wanted.temperature)
    start = time.perf_counter()
    build_cache(work / "cache", online, wanted, loader, accelerator)
    build = time.perf_counter() - start
    cached = open_teacher(work / "cache", wanted, accelerator.device)
    student = generation_objective(method, 1)
    specs = {
        "patriarch epoch": GenerationSpec(0, work, generation_objective(method, 0),
                                          patriarch_views),
        "student epoch, cache": GenerationSpec(1, work, student, views, cached),
        "student epoch, online teacher": GenerationSpec(
            1, work, student, views, OnlineTeacher(teacher_model, views, num_classes,
                                                   method.temperature)),
    }
    seconds = {name: epoch_seconds(spec, recipe, accelerator, num_classes, args.epochs)
               for name, spec in specs.items()}
    seconds["cache build, per view"] = build / wanted.stored_views
    rows = np.random.default_rng(0).permutation(wanted.samples)
    start = time.perf_counter()
    for i in range(0, len(rows) - 127, 128):
        cached(torch.from_numpy(rows[i:i + 128]), i % wanted.stored_views)
    lookups = (len(rows) // 128) * 128 / (time.perf_counter() - start)
    return {"seconds": seconds, "lookup_rows_per_s": lookups, "samples": wanted.samples,
            "bytes_per_sample_per_view": sum(
                a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
                for a in cached.arrays.values())}


def report(result: dict, args: argparse.Namespace) -> dict:
    """Ratios and targets; prints the table."""
    s = result["seconds"]
    patriarch = s["patriarch epoch"]
    checks = {
        "cached student / patriarch (target <= 1.05)":
            s["student epoch, cache"] / patriarch,
        "build per view / training epoch (target <= 0.4)":
            s["cache build, per view"] / patriarch,
        "(build + cached) / online, per view (target <= 1)":
            (s["cache build, per view"] + s["student epoch, cache"])
            / s["student epoch, online teacher"],
    }
    table = Table(title=f"teacher cache vs online teacher ({result['samples']} samples, "
                        f"{args.views} views, median of {args.epochs} epochs)")
    for column in ("row", "seconds", "vs patriarch epoch"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for name, value in s.items():
        table.add_row(name, f"{value:.3f}", f"{value / patriarch:.2f}")
    table.add_row("cache lookup", f"{result['lookup_rows_per_s']:,.0f} rows/s", "")
    for name, value in checks.items():
        table.add_row(name, "", f"{value:.2f}")
    Console().print(table)
    return {"benchmark": "cache_vs_online",
            "hardware": {"cpu": platform.processor() or platform.machine(),
                         "cores": os.cpu_count(), "torch": torch.__version__,
                         "cuda": torch.cuda.is_available()},
            "config": {"recipe": str(args.recipe), "epochs": args.epochs, "views": args.views,
                       "set": args.set},
            **result, "ratios": checks}


def main() -> None:
    """Measure in a scratch directory, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/digits_d06.toml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("bench_out/cache_vs_online.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fasttt-cache-bench-") as work:
        result = report(measure(args, Path(work)), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
