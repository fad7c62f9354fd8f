"""Teacher-output cache: each teacher labels every training sample's views once, on disk.

    accelerate launch fasttt/cache.py RECIPE.toml --generation M   # build or verify gen M's
    python -m fasttt.cache info runs/NAME/genM/cache                # what a cache holds

For each sample and each of R keyed views (view v is exactly the pixels a student sees
at any epoch e with e mod R = v; R = 0 keeps one un-augmented view, the "fixed
teacher"), the cache stores the teacher's top-k logits, their class ids and the
log-partition at the student's temperature, so the student step looks rows up instead
of running the teacher. Arrays are view-major .npy files ([V, N, k]), memory-mapped, so
an epoch reads one contiguous slab. A cache is built under a temporary name, sealed
with `complete: true` in its manifest, then renamed; one whose fingerprints (teacher
weights, beton, augmentation) disagree with the run is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch fasttt/cache.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from fasttt.augment import eval_view, train_size, train_view
from fasttt.checkpoint import sha256_file, write_json
from fasttt.data import read_manifest
from fasttt.engine import progress_bar, split_loader
from fasttt.errors import UserError, exit_on_user_error, one_line
from fasttt.losses import TopKTeacher
from fasttt.recipe import Recipe

FORMAT_VERSION = 1
ARRAYS = ("values", "ids", "log_partition")


def id_dtype(num_classes: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every class id."""
    return np.dtype(np.uint8 if num_classes <= 256 else
                    np.uint16 if num_classes <= 65536 else np.uint32)


def expected_manifest(recipe: Recipe, teacher_weights: Path, num_classes: int) -> dict:
    """Everything a cache for this run and teacher must agree on (all but `complete`)."""
    data, cache = recipe.data, recipe.cache
    beton = read_manifest(data.beton_dir)
    count = beton["splits"]["train"]["count"]
    samples = min(data.train_limit, count) if data.train_limit else count
    views = max(cache.views, 1)
    sizes = [train_size(e, recipe.augment) for e in range(recipe.schedule.epochs)]
    if cache.views and any(sizes[e] != sizes[e % cache.views] for e in range(len(sizes))):
        raise UserError("progressive resizing gives view v other sizes in later epochs: set "
                        "cache.views = schedule.epochs, or cache.mode = \"online\"")
    augment = {"spec": dataclasses.asdict(recipe.augment), "seed": recipe.run.seed,
               "views": cache.views,
               "sizes": [train_size(v, recipe.augment) for v in range(cache.views)]}
    augment_json = json.dumps(augment, sort_keys=True)
    return {
        "format_version": FORMAT_VERSION,
        "teacher_sha256": sha256_file(teacher_weights),
        "beton_sha256": beton["splits"]["train"]["sha256"],
        "augment_sha256": hashlib.sha256(augment_json.encode()).hexdigest(),
        "samples": samples, "classes": num_classes, "views": cache.views,
        "stored_views": views, "top_k": min(cache.top_k or num_classes, num_classes),
        "dtype": cache.dtype, "temperature": recipe.generations.temperature,
    }


def array_specs(manifest: dict) -> dict:
    """name -> (shape, dtype) of each array a cache with this manifest holds."""
    v, n, k = manifest["stored_views"], manifest["samples"], manifest["top_k"]
    return {"values": ((v, n, k), np.dtype(manifest["dtype"])),
            "ids": ((v, n, k), id_dtype(manifest["classes"])),
            "log_partition": ((v, n), np.dtype(np.float32))}


def _differences(found: dict, wanted: dict) -> list[str]:
    names = {"teacher_sha256": "teacher weights", "beton_sha256": "beton",
             "augment_sha256": "augmentation"}
    return [names.get(key, key) for key in wanted if found.get(key) != wanted[key]]


def read_cache_manifest(cache_dir: Path) -> dict:
    """A cache's manifest.json, or a one-line refusal saying what to do."""
    try:
        found = json.loads((cache_dir / "manifest.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        found = None
    if not isinstance(found, dict):
        raise UserError(f"{cache_dir} has no readable manifest.json: delete it to rebuild")
    return found


def open_arrays(cache_dir: Path, wanted: dict) -> dict[str, np.ndarray]:
    """The cache's arrays, memory-mapped read-only, after checking it matches `wanted`."""
    found = read_cache_manifest(cache_dir)
    if found.get("complete") is not True:
        raise UserError(f"{cache_dir} is an incomplete cache: delete it to rebuild")
    differ = _differences(found, wanted)
    if differ:
        raise UserError(f"{cache_dir} was built for another {', '.join(differ)}: delete it "
                        "to rebuild it for this run")
    arrays = {}
    for name, (shape, dtype) in array_specs(wanted).items():
        try:
            array = np.load(cache_dir / f"{name}.npy", mmap_mode="r")
        except Exception as err:  # a damaged header fails with several exception types
            raise UserError(f"{cache_dir / name}.npy is damaged or truncated ({one_line(err)}): "
                            "delete the cache to rebuild it") from None
        if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
            raise UserError(f"{cache_dir / name}.npy holds {array.dtype}{array.shape}, "
                            f"expected {dtype}{shape}: delete the cache to rebuild it")
        arrays[name] = array
    return arrays


class CachedTeacher:
    """The teacher as a lookup: rows (view, sample) of a verified cache, as a TopKTeacher."""

    def __init__(self, cache_dir: Path, wanted: dict, device: torch.device):
        self.arrays = open_arrays(cache_dir, wanted)
        self.views, self.temperature = wanted["views"], wanted["temperature"]
        self.device = device

    def view_of(self, epoch: int) -> int:
        """The stored view the student sees at `epoch` (0 for the fixed teacher)."""
        return epoch % self.views if self.views else 0

    def __call__(self, views: torch.Tensor, index: torch.Tensor, epoch: int) -> TopKTeacher:
        rows = index.cpu().numpy()
        v = self.view_of(epoch)
        values, ids, log_partition = (torch.from_numpy(np.ascontiguousarray(
            self.arrays[name][v][rows])) for name in ARRAYS)
        move = dict(device=self.device, non_blocking=True)
        return TopKTeacher(values.to(**move), ids.to(**move).long(),
                           log_partition.to(**move), self.temperature)


def teacher_views(images, index, view: int, recipe: Recipe, extent) -> torch.Tensor:
    """The pixels view `view` shows (the un-augmented evaluation view when R = 0)."""
    if recipe.cache.views == 0:
        return eval_view(images, size=recipe.augment.eval_size, spec=recipe.augment,
                         extent=extent)
    return train_view(images, index, seed=recipe.run.seed, view=view,
                      size=train_size(view, recipe.augment), spec=recipe.augment,
                      extent=extent)


def _label(model, recipe: Recipe, manifest: dict, arrays: dict, accelerator) -> None:
    """Fill this rank's slice of the arrays with the teacher's outputs on every view."""
    loader = split_loader(recipe, accelerator, "train", recipe.cache.batch_size,
                          limit=manifest["samples"])
    model.eval()
    with progress_bar(accelerator.is_main_process) as progress:
        task = progress.add_task("teacher cache", total=len(loader), info="")
        for batch in loader:
            images = batch.image.to(accelerator.device, non_blocking=True)
            index = batch.index.to(accelerator.device, non_blocking=True)
            rows = batch.index.numpy()
            for v in range(manifest["stored_views"]):
                with torch.inference_mode(), accelerator.autocast():
                    logits = model(teacher_views(images, index, v, recipe, batch.extent))
                top = TopKTeacher.from_logits(logits.float(), manifest["top_k"],
                                              manifest["temperature"])
                with np.errstate(over="ignore"):  # an overflow is refused just below
                    values = top.values.cpu().numpy().astype(arrays["values"].dtype)
                if not np.isfinite(values).all():
                    raise UserError(f"the teacher's logits do not fit cache.dtype = "
                                    f"\"{values.dtype}\" (or are not finite): set cache.dtype "
                                    "= \"float32\", or check the teacher's training")
                arrays["values"][v, rows] = values
                arrays["ids"][v, rows] = top.ids.cpu().numpy()
                arrays["log_partition"][v, rows] = top.log_partition.cpu().numpy()
            progress.advance(task)


def build_cache(cache_dir: Path, model: torch.nn.Module, wanted: dict, recipe: Recipe,
                accelerator) -> None:
    """Build the cache at `cache_dir` unless a matching one is there; every rank calls this."""
    if (cache_dir / "manifest.json").is_file():
        open_arrays(cache_dir, wanted)  # verified, or a one-line refusal
        return
    staging = cache_dir.with_name(f".{cache_dir.name}.partial")
    main = accelerator.is_main_process
    if main:  # a killed build's leftovers are never used: start again
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, (shape, dtype) in array_specs(wanted).items():
            np.lib.format.open_memmap(staging / f"{name}.npy", "w+", dtype, shape).flush()
    accelerator.wait_for_everyone()
    arrays = {name: np.load(staging / f"{name}.npy", mmap_mode="r+") for name in ARRAYS}
    _label(model, recipe, wanted, arrays, accelerator)
    for array in arrays.values():
        array.flush()
    del arrays
    accelerator.wait_for_everyone()
    if main:
        write_json(staging / "manifest.json", {**wanted, "complete": True})
        os.replace(staging, cache_dir)
    accelerator.wait_for_everyone()


def describe(cache_dir: Path) -> str:
    """Manifest, size on disk and bytes per sample per view of a cache directory."""
    manifest = read_cache_manifest(Path(cache_dir))
    try:
        specs = array_specs(manifest)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{cache_dir}/manifest.json is damaged: delete the cache to rebuild "
                        "it") from None
    per_row = sum(np.prod(shape[2:], dtype=np.int64) * dtype.itemsize
                  for shape, dtype in specs.values())
    size = sum((Path(cache_dir) / f"{name}.npy").stat().st_size for name in specs)
    lines = [f"{key}: {value}" for key, value in manifest.items()]
    lines += [f"size on disk: {size:,} bytes", f"bytes per sample per view: {per_row}"]
    return "\n".join(lines)


def _cli(argv: list[str]) -> None:
    if argv[:1] == ["info"]:
        if len(argv) != 2 or not (Path(argv[1]) / "manifest.json").is_file():
            raise UserError("usage: python -m fasttt.cache info CACHE_DIR (a directory "
                            "holding manifest.json)")
        print(describe(Path(argv[1])))
        return
    parser = argparse.ArgumentParser(description="build or verify one generation's cache")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    from rich.console import Console

    from fasttt.recipe import load_recipe
    from fasttt.train import make_accelerator, precompute_cache

    recipe = load_recipe(args.recipe, args.set)
    accelerator = make_accelerator(recipe, Console())
    gen_dir = args.runs_dir / recipe.run.name / f"gen{args.generation}"
    if not (gen_dir / "last.safetensors").is_file():
        raise UserError(f"{gen_dir} has no last.safetensors: train generation "
                        f"{args.generation} first")
    precompute_cache(gen_dir, recipe, accelerator)
    if accelerator.is_main_process:
        print(describe(gen_dir / "cache"))


if __name__ == "__main__":
    exit_on_user_error(lambda: _cli(sys.argv[1:]))
