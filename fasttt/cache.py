"""Teacher-output cache: each teacher labels every training sample's views once, on disk.

    accelerate launch fasttt/cache.py RECIPE.toml --generation M   # build or verify gen M's
    python -m fasttt.cache info runs/NAME/genM/cache                # what a cache holds

Generation M's cache holds its answers, as an online teacher gives them, for the views
of its student, generation M+1 (fasttt/teachers.py): for each sample and each stored
view, the top-k logits, their class ids and the log-partition at each temperature the
recipe stores (cache.temperatures, else the student's), so the student step looks rows
up instead of running the teacher. Arrays
are view-major .npy files ([V, N, k]), memory-mapped, so an epoch reads one contiguous
slab. A cache is built under a hidden name, sealed with `complete: true` in its
manifest, then renamed; one whose fingerprints (teacher weights, beton, views) disagree
with the run is refused.

A run that takes its teacher from another run (generations.teacher) reads that
generation's cache in place, read-only; one built for it is built under the teacher
run's lock, so students of several runs share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch fasttt/cache.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fasttt.errors import exit_at_once_on_interrupt

    exit_at_once_on_interrupt()  # a signal during the imports below is no traceback

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console

from fasttt.adopt import adopted_teacher, parse_teacher
from fasttt.augment import train_size
from fasttt.data import read_manifest, split_loader, train_samples, training_rows
from fasttt.errors import OneLineParser, UserError, exit_on_user_error, one_line
from fasttt.files import (
    preallocate,
    publish_dir,
    remove_dir,
    sha256_array,
    sha256_file,
    staging_dir,
    staging_path,
    tree_bytes,
    write_json,
)
from fasttt.models import last_epoch_model
from fasttt.processes import accelerator_and_console, main_value, on_main_process
from fasttt.progress import duration, log_line, progress_bar
from fasttt.recipe import CacheConfig, Recipe, derived_name, load_recipe
from fasttt.rundir import (
    CACHE,
    generation_dir,
    is_finished,
    lock_run_dir,
    try_lock_run_dir,
    used_caches,
)
from fasttt.teachers import (
    CACHE_ARRAYS,
    CachedTeacher,
    OnlineTeacher,
    ViewSchedule,
    log_partitions,
    top_logits,
)

FORMAT_VERSION = 3  # 3: log-partitions at several temperatures
MANIFEST = "manifest.json"
CHECKSUMS = "view_sha256"  # manifest: array name -> sha256 of each view's slab
SEAL = "manifest_sha256"  # manifest: sha256 of its other fields
LOCK_POLL_S = 2.0  # how often a run waiting for a teacher run's lock tries again
QUIET = Console(quiet=True)  # for callers that want no progress lines (tests, benchmarks)
USAGE = ("accelerate launch fasttt/cache.py RECIPE.toml --generation M [--set S.K=V] "
         "[--runs-dir DIR] | python -m fasttt.cache info CACHE_DIR")


def id_dtype(num_classes: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every class id."""
    return np.dtype(np.uint8 if num_classes <= 256 else
                    np.uint16 if num_classes <= 65536 else np.uint32)


def views_fingerprint(schedule: ViewSchedule) -> str:
    """sha256 of everything that decides a stored view's pixels."""
    views = {"spec": dataclasses.asdict(schedule.augment), "key": schedule.key,
             "cycle": schedule.cycle, "unaugmented": schedule.unaugmented_teacher,
             "sizes": [train_size(v, schedule.augment) for v in range(schedule.teacher_views)]}
    return hashlib.sha256(json.dumps(views, sort_keys=True).encode()).hexdigest()


def expected_manifest(teacher_weights: Path, beton: dict, samples: int, schedule: ViewSchedule,
                      cache: CacheConfig, num_classes: int, temperature: float,
                      holdout: float = 0.0) -> dict:
    """What a cache for this teacher and student holds (all but `complete` and checksums).

    A cache found on disk must match every key but "temperatures", which it only needs to
    serve (`temperature_column`): a new one stores cache.temperatures, else the student's T.
    """
    top_k = min(cache.top_k or num_classes, num_classes)
    temperatures = sorted(set(cache.temperatures)) or [temperature]
    return {
        "format_version": FORMAT_VERSION,
        "teacher_sha256": sha256_file(teacher_weights),
        "beton_sha256": beton["splits"]["train"]["sha256"],
        "augment_sha256": views_fingerprint(schedule),
        "samples": samples, "classes": num_classes, "views": schedule.cycle,
        "stored_views": schedule.teacher_views,
        "teacher_view": "unaugmented" if schedule.unaugmented_teacher else "student",
        "top_k": top_k, "dtype": cache.dtype, "temperatures": temperatures, "holdout": holdout,
    }


def array_specs(manifest: dict) -> dict:
    """name -> (shape, dtype) of each array a cache with this manifest holds."""
    v, n, k = manifest["stored_views"], manifest["samples"], manifest["top_k"]
    return {"values": ((v, n, k), np.dtype(manifest["dtype"])),
            "ids": ((v, n, k), id_dtype(manifest["classes"])),
            "log_partition": ((v, n, len(manifest["temperatures"])), np.dtype(np.float32))}


def _differences(found: dict, wanted: dict) -> list[str]:
    names = {"teacher_sha256": "teacher weights", "beton_sha256": "beton",
             "augment_sha256": "augmentation"}
    return [names.get(key, key) for key in wanted
            if key != "temperatures" and found.get(key) != wanted[key]]


def _digest(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with a checksum of its own fields, so a damaged one is never trusted."""
    return {**manifest, SEAL: _digest(manifest)}


def temperature_column(cache_dir: Path, manifest: dict, temperature: float) -> int | None:
    """Where a cache stores the log-partition at `temperature`; None: from its full logits.

    A top-k cache without that temperature cannot serve the student: a one-line refusal.
    """
    stored = manifest["temperatures"]
    if temperature in stored:
        return stored.index(temperature)
    if manifest["top_k"] == manifest["classes"]:
        return None
    raise UserError(f"{cache_dir} keeps the top {manifest['top_k']} logits and log-partitions "
                    f"at T = {', '.join(f'{t:g}' for t in stored)}, so it cannot serve "
                    f"generations.temperature = {temperature:g}: set it to one of those, or "
                    "set cache.mode = \"online\"")


def read_cache_manifest(cache_dir: Path) -> dict:
    """A cache's manifest.json, or a one-line refusal saying what to do."""
    try:
        found = json.loads((cache_dir / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        found = None
    if not isinstance(found, dict):
        raise UserError(f"{cache_dir} has no readable {MANIFEST}: delete {cache_dir} and "
                        "rerun the same command to rebuild it")
    return found


def open_arrays(cache_dir: Path, wanted: dict) -> dict[str, np.ndarray]:
    """The cache's arrays, memory-mapped read-only, after checking it matches `wanted`."""
    found = read_cache_manifest(cache_dir)
    if found.get("complete") is not True:
        raise UserError(f"{cache_dir} is an incomplete cache: delete {cache_dir} and rerun the "
                        "same command to rebuild it")
    if found.get(SEAL) != _digest(found):
        raise UserError(f"{cache_dir}/{MANIFEST} is damaged (it does not match its own "
                        f"checksum): delete {cache_dir} and rerun the same command to rebuild "
                        "it")
    differ = _differences(found, wanted)
    stored = found.get("temperatures")
    if not (isinstance(stored, list) and stored
            and all(isinstance(t, float) and 0.01 <= t <= 100 for t in stored)):
        differ.append("temperatures")
    if differ:
        raise UserError(f"{cache_dir} was built for another {', '.join(differ)}: delete "
                        f"{cache_dir} and rerun the same command to rebuild it for this run")
    arrays = {}
    for name, (shape, dtype) in array_specs(wanted | {"temperatures": stored}).items():
        try:
            array = np.load(cache_dir / f"{name}.npy", mmap_mode="r")
        except Exception as err:  # a damaged header fails with several exception types
            raise UserError(f"{cache_dir / name}.npy is damaged or truncated ({one_line(err)}): "
                            f"delete {cache_dir} and rerun the same command to rebuild "
                            "it") from None
        if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
            raise UserError(f"{cache_dir / name}.npy holds {array.dtype}{array.shape}, "
                            f"expected {dtype}{shape}: delete {cache_dir} and rerun the same "
                            "command to rebuild it")
        arrays[name] = array
    return arrays


class CacheOverflow(UserError):
    """The teacher's logits do not fit the cache's dtype, or are not finite at all."""

    def __init__(self, logits: np.ndarray, dtype: np.dtype):
        self.finite = bool(np.isfinite(logits).all())
        self.peak = float(np.abs(logits).max()) if self.finite else float("nan")
        self.dtype = np.dtype(dtype)
        if not self.finite:
            super().__init__("the teacher's logits are not finite: it diverged")
        else:
            super().__init__(f"the teacher's logits reach {self.peak:.3g}, beyond cache.dtype "
                             f"= \"{self.dtype}\" (at most {np.finfo(self.dtype).max:.0f})")


def overflow_advice(err: CacheOverflow, weights: Path, recipe: Recipe,
                    lock_dir: Path | None) -> str:
    """What to do when a finished teacher's cache cannot be built: a command that works.

    cache.dtype defines what the students learn from, so a run that trained keeps its own;
    the teacher need not train again: a new run adopts it (generations.teacher) and stores
    float32. Its students are the ones this run has still to train.
    """
    teacher = weights.parent
    if not err.finite:
        return (f"the teacher {teacher} gives non-finite logits on its student's views: it "
                "diverged; train it again with a lower optim.lr under another run.name")
    taught = 0 if lock_dir else parse_teacher(str(teacher))[1]  # its index in this run
    students = max(1, recipe.generations.students - taught)
    flags = " ".join(f"--set {shlex.quote(pair)}" for pair in (
        "cache.dtype=float32", f"generations.teacher={teacher}",
        f"generations.students={students}",
        f"run.name={derived_name(recipe.run.name, '-float32')}"))
    return (f"the teacher {teacher}'s logits reach {err.peak:.3g}, beyond cache.dtype = "
            f"\"{err.dtype}\" (at most {np.finfo(err.dtype).max:.0f}), so its cache cannot be "
            f"built (so confident a teacher may have diverged: check its metrics.jsonl). To "
            f"keep it, train its students in a new run that adopts it and stores float32 (the "
            f"cache's dtype is part of a run's recipe): rerun fasttt/train.py with the same "
            f"recipe and flags, adding {flags}")


def _label(teacher: OnlineTeacher, loader, arrays: dict, temperatures: list[float],
           accelerator: Accelerator, console: Console) -> None:
    """Fill this rank's rows of the arrays with the teacher's answers on every stored view.

    Batch by batch, every view of a batch at once (its pixels are decoded once); progress
    counts views x batches, and off a terminal a line marks each view's worth of work.
    """
    (views, _, k), batches = arrays["values"].shape, len(loader)
    started, done = time.perf_counter(), 0
    with progress_bar(accelerator.is_main_process, console) as progress:
        task = progress.add_task("teacher cache (views x batches)", total=batches * views,
                                 info="")
        for batch in loader:
            images = batch.image.to(accelerator.device, non_blocking=True)
            index = batch.index.to(accelerator.device, non_blocking=True)  # once for every view
            rows = batch.index.numpy()
            for v in range(views):
                with torch.inference_mode(), accelerator.autocast():
                    logits = teacher.logits(index, v, images, batch.extent)
                    top_values, top_ids = top_logits(logits, k)
                    partitions = log_partitions(logits, temperatures)
                exact = top_values.float().cpu().numpy()
                with np.errstate(over="ignore"):  # an overflow is refused just below
                    values = exact.astype(arrays["values"].dtype)
                if not np.isfinite(values).all():
                    raise CacheOverflow(exact, values.dtype)
                arrays["values"][v, rows] = values
                arrays["ids"][v, rows] = top_ids.cpu().numpy()
                arrays["log_partition"][v, rows] = partitions.cpu().numpy()
                progress.advance(task)
                done += 1
                if done % batches == 0 and not console.is_terminal:
                    seconds = time.perf_counter() - started
                    log_line(console, f"teacher cache: {done // batches}/{views} views' worth "
                                      f"labelled in {duration(seconds)}, ETA "
                                      f"{duration(seconds * (views * batches / done - 1))}")


def build_cache(cache_dir: Path, teacher: OnlineTeacher, wanted: dict, loader,
                accelerator: Accelerator, console: Console = QUIET) -> None:
    """Build the cache at `cache_dir` unless a matching one is there; every rank calls this.

    `loader` is this rank's in-order slice of the training split.
    """
    if (cache_dir / MANIFEST).is_file():
        open_arrays(cache_dir, wanted)  # verified, or a one-line refusal
        return
    main = accelerator.is_main_process
    if main:  # a killed build's leftovers are never used: start again
        staging = staging_dir(cache_dir)
        for name, (shape, dtype) in array_specs(wanted).items():
            path = staging / f"{name}.npy"
            try:
                np.lib.format.open_memmap(path, "w+", dtype, shape).flush()
            except OSError as err:  # numpy's message names no file
                raise OSError(err.errno, err.strerror, str(path)) from None
            preallocate(path)
    accelerator.wait_for_everyone()
    staging = staging_path(cache_dir)
    arrays = {name: np.load(staging / f"{name}.npy", mmap_mode="r+") for name in CACHE_ARRAYS}
    _label(teacher, loader, arrays, wanted["temperatures"], accelerator, console)
    for array in arrays.values():
        array.flush()
    del arrays
    accelerator.wait_for_everyone()
    if main:
        arrays = {name: np.load(staging / f"{name}.npy", mmap_mode="r") for name in CACHE_ARRAYS}
        checksums = {name: [sha256_array(view) for view in array]
                     for name, array in arrays.items()}
        write_json(staging / MANIFEST,
                   seal_manifest({**wanted, CHECKSUMS: checksums, "complete": True}))
        publish_dir(staging, cache_dir)
    accelerator.wait_for_everyone()


def ensure_cache(weights: Path, schedule: ViewSchedule, temperature: float, recipe: Recipe,
                 num_classes: int, accelerator: Accelerator, console: Console = QUIET,
                 lock_dir: Path | None = None) -> dict:
    """Build (or verify) the cache beside a teacher's verified weights; its manifest.

    `temperature`: the student's, whose log-partition the cache must serve.

    `lock_dir`: the teacher's run when it is not this one; the cache there is shared by
    every run that adopts the teacher, so a missing one is built under that run's lock.
    """
    beton = read_manifest(recipe.data.beton_dir)
    wanted = expected_manifest(weights, beton, train_samples(recipe.data, beton), schedule,
                               recipe.cache, num_classes, temperature, recipe.data.holdout)
    cache_dir = weights.parent / CACHE
    lock = None if lock_dir is None else _teacher_run_lock(cache_dir, lock_dir, accelerator,
                                                           console)
    try:
        if lock_dir is not None and lock is None:  # built by another run: it must fit ours
            on_main_process(accelerator, _check_shared, cache_dir, wanted, lock_dir)
        if not (cache_dir / MANIFEST).is_file():
            model = last_epoch_model(weights, recipe.model, recipe.run, num_classes,
                                     accelerator.device)
            teacher = OnlineTeacher(model, schedule, wanted["top_k"], temperature)
            loader = split_loader(recipe.data, accelerator, "train", recipe.cache.batch_size,
                                  limit=wanted["samples"],
                                  rows=training_rows(recipe.data, beton))
            try:
                build_cache(cache_dir, teacher, wanted, loader, accelerator, console)
            except CacheOverflow as err:
                raise UserError(overflow_advice(err, weights, recipe, lock_dir)) from None
        else:
            log_line(console, f"teacher cache: reading {cache_dir}, built earlier (no "
                              "teacher pass)")
    finally:
        if lock is not None:
            lock.close()
    return wanted


def _teacher_run_lock(cache_dir: Path, lock_dir: Path, accelerator: Accelerator,
                      console: Console):
    """None once the shared cache exists; else the teacher run's lock, on the main process.

    Every rank waits together, polling: a teacher run may hold its lock for hours while it
    trains, longer than a collective may wait.
    """
    waited = False
    while True:
        state, held = "present", None
        if accelerator.is_main_process and not (cache_dir / MANIFEST).is_file():
            held = try_lock_run_dir(lock_dir)
            if held is None:
                state = "busy"
            elif (cache_dir / MANIFEST).is_file():  # published as we took the lock: read it
                held.close()
                held = None
            else:
                state = "held"
        state = main_value(accelerator, state)
        if state != "busy":
            return held
        if not waited:
            log_line(console, f"waiting for {lock_dir}'s lock: another fasttt process trains "
                              "in it or builds the teacher cache there")
            waited = True
        time.sleep(LOCK_POLL_S)


def _check_shared(cache_dir: Path, wanted: dict, lock_dir: Path) -> None:
    """Refuse a shared cache built for other students, without advising to delete it."""
    found = read_cache_manifest(cache_dir)
    differ = [key for key in _differences(found, wanted)
              if key in ("augmentation", "views", "stored_views", "teacher_view", "top_k",
                         "dtype")]
    if differ:
        raise UserError(f"{cache_dir} serves the students of {lock_dir}'s teacher with another "
                        f"{', '.join(differ)} than this recipe's: give this recipe their "
                        "[augment], schedule.epochs and [cache] settings (views, teacher_view, "
                        "top_k, dtype), or set cache.mode = \"online\"")


def cached_teacher(weights: Path, schedule: ViewSchedule, temperature: float, recipe: Recipe,
                   num_classes: int, accelerator: Accelerator, console: Console = QUIET,
                   lock_dir: Path | None = None) -> CachedTeacher:
    """The teacher of these verified weights as a lookup into its cache, built if needed."""
    wanted = ensure_cache(weights, schedule, temperature, recipe, num_classes, accelerator,
                          console, lock_dir)
    return open_teacher(weights.parent / CACHE, wanted, temperature, accelerator.device)


def open_teacher(cache_dir: Path, wanted: dict, temperature: float,
                 device: torch.device) -> CachedTeacher:
    """A verified cache as a teacher at `temperature`; views' checksums checked at first use."""
    arrays = open_arrays(cache_dir, wanted)
    found = read_cache_manifest(cache_dir)
    checksums = found.get(CHECKSUMS)
    views = wanted["stored_views"]
    if not (isinstance(checksums, dict) and all(
            isinstance(checksums.get(name), list) and len(checksums[name]) == views
            for name in CACHE_ARRAYS)):
        raise UserError(f"{cache_dir}/{MANIFEST} has no checksums of its views: delete "
                        f"{cache_dir} and rerun the same command to rebuild it")
    return CachedTeacher(arrays, checksums, temperature,
                         temperature_column(cache_dir, found, temperature), device, cache_dir)


def describe(cache_dir: Path) -> str:
    """Manifest, size on disk and bytes per sample per view of a cache directory."""
    manifest = read_cache_manifest(Path(cache_dir))
    try:
        specs = array_specs(manifest)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{cache_dir}/{MANIFEST} is damaged: delete {cache_dir} to rebuild "
                        "it") from None
    per_row = sum(np.prod(shape[2:], dtype=np.int64) * dtype.itemsize
                  for shape, dtype in specs.values())
    size = sum((Path(cache_dir) / f"{name}.npy").stat().st_size for name in specs)
    lines = [f"{key}: {value}" for key, value in manifest.items()]
    lines += [f"size on disk: {size:,} bytes", f"bytes per sample per view: {per_row}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Build or verify one generation's cache, or describe a cache (`info`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"]:
        if len(argv) != 2 or not (Path(argv[1]) / MANIFEST).is_file():
            raise UserError(f"usage: python -m fasttt.cache info CACHE_DIR (a directory "
                            f"holding {MANIFEST})")
        print(describe(Path(argv[1])))
        return
    parser = OneLineParser(description="build or verify one generation's cache",
                           usage_line=USAGE)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    accelerator, console = accelerator_and_console(recipe.run.mixed_precision)
    run_dir = args.runs_dir / recipe.run.name
    gen_dir = generation_dir(run_dir, args.generation)
    if not is_finished(gen_dir):
        raise UserError(f"{gen_dir} has not finished training: train generation "
                        f"{args.generation} first (fasttt/train.py builds its cache too)")
    # The same lock as training: two builders would write one staging directory.
    lock = on_main_process(accelerator, lock_run_dir, run_dir)
    try:
        # Here, not at the top: this command sits above the planner, which builds on us.
        from fasttt.generation import generation_views, teacher_weights

        num_classes = len(read_manifest(recipe.data.beton_dir)["class_names"])
        # the cache generation M's student reads: an adopted gen0's is in the teacher's run
        student = args.generation + 1
        adopted = adopted_teacher(run_dir) if args.generation == 0 else None
        weights, lock_dir = teacher_weights(run_dir, student, adopted)
        ensure_cache(weights, generation_views(recipe, student, adopted),
                     recipe.generations.temperature, recipe, num_classes, accelerator,
                     console, lock_dir)
    finally:
        if lock is not None:
            lock.close()
    if accelerator.is_main_process:
        print(describe(weights.parent / CACHE))


def drop_used_caches(run_dir: Path) -> int:
    """Delete the caches no one reads again (cache.keep = "last", rundir.used_caches); bytes."""
    freed = 0
    for cache_dir in used_caches(run_dir):
        freed += tree_bytes(cache_dir)
        remove_dir(cache_dir)
    return freed


if __name__ == "__main__":
    exit_on_user_error(main)
