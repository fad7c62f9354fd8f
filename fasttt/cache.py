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
manifest, then renamed; one whose fingerprints (teacher weights, beton, views, JPEG
decoder) disagree with the run is refused.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch fasttt/cache.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fasttt.errors import exit_at_once_on_interrupt

    exit_at_once_on_interrupt()  # a signal during the imports below is no traceback

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from torch import Tensor

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
from fasttt.jpeg import FFCV_DECODER, decoder_name
from fasttt.models import last_epoch_model
from fasttt.processes import accelerator_and_console, main_value, on_main_process
from fasttt.progress import duration, log_line, progress_bar
from fasttt.recipe import CacheConfig, GenerationsConfig, Recipe, derived_name, load_recipe
from fasttt.rundir import (
    generation_dir,
    is_finished,
    lock_run_dir,
    teacher_cache,
    try_lock_run_dir,
    used_caches,
)
from fasttt.teachers import OnlineTeacher, TopKTeacher, ViewSchedule, log_partitions, top_logits

FORMAT_VERSION = 3  # 3: log-partitions at several temperatures
CACHE_MANIFEST = "manifest.json"
# how a refusal names a cache's other decoder
DECODER = "JPEG decoder (data.decode, data.gpu_decode_percent)"
CACHE_ARRAYS = ("values", "ids", "log_partition")  # a cache's arrays, as TopKTeacher's fields
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


def views_fingerprint(views: ViewSchedule) -> str:
    """sha256 of everything that decides a stored view's pixels."""
    # "spec" and "cycle" (R) are the names the first caches were fingerprinted under
    decides = {"spec": dataclasses.asdict(views.augment), "key": views.key,
               "cycle": views.count, "unaugmented": views.unaugmented_teacher,
               "sizes": [train_size(v, views.augment) for v in range(views.stored)]}
    return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What the cache of one teacher for one student holds: its manifest, and the student's T.

    A cache found on disk must match every manifest field but `temperatures`, which it only
    needs to serve: a new cache stores cache.temperatures, else the student's T.
    """

    teacher_sha256: str
    beton_sha256: str
    augment_sha256: str  # views_fingerprint
    samples: int
    classes: int
    views: int  # R: the student's epoch e shows view e mod R
    stored_views: int  # R, or 1 when the teacher labels the un-augmented image
    teacher_view: str  # "student" or "unaugmented"
    top_k: int
    dtype: str
    temperatures: tuple[float, ...]  # the log-partitions a new cache stores
    holdout: float
    temperature: float  # the student's, whose log-partition the cache serves (not stored)
    decoder: str = FFCV_DECODER  # who decoded the JPEGs the teacher saw (fasttt/jpeg.py)

    def __post_init__(self):
        log_partition_column(self.temperatures, self.top_k, self.classes, self.temperature,
                             "this recipe's cache")

    def manifest(self) -> dict:
        """The manifest of a cache built for this spec, before its checksums and seal."""
        fields = dataclasses.asdict(self)
        del fields["temperature"]
        if self.decoder == FFCV_DECODER:  # as caches built before data.decode: still valid
            del fields["decoder"]
        return {"format_version": FORMAT_VERSION, **fields,
                "temperatures": list(self.temperatures)}

    def column(self, found: dict, cache_dir: Path) -> int | None:
        """Where a found cache stores the student's log-partition; None: from its full logits."""
        return log_partition_column(found["temperatures"], self.top_k, self.classes,
                                    self.temperature, str(cache_dir))


def log_partition_column(stored: Sequence[float], top_k: int, classes: int,
                         temperature: float, holder: str) -> int | None:
    """Where `stored` holds the log-partition at `temperature`; None: from the full logits.

    A top-k cache (k < C) has no other way to it: a one-line refusal.
    """
    if temperature in stored:
        return list(stored).index(temperature)
    if top_k == classes:
        return None
    raise UserError(f"{holder} keeps the top {top_k} logits and log-partitions at T = "
                    f"{', '.join(f'{t:g}' for t in stored)}, so it cannot serve "
                    f"generations.temperature = {temperature:g}: use one of those, store it "
                    "too (cache.temperatures, before the cache is built) or set cache.mode = "
                    "\"online\"")


def check_cache_serves(cache: CacheConfig, temperature: float, classes: int) -> None:
    """Refuse, before any training, a recipe whose caches could not serve its students."""
    if cache.mode == "precomputed":
        log_partition_column(new_cache_temperatures(cache, temperature),
                             min(cache.top_k or classes, classes), classes, temperature,
                             "this recipe's cache")


def new_cache_temperatures(cache: CacheConfig, temperature: float) -> tuple[float, ...]:
    """The temperatures whose log-partitions a cache built now stores."""
    return tuple(sorted(set(cache.temperatures))) or (temperature,)


def cache_spec(teacher_weights: Path, beton: dict, samples: int, views: ViewSchedule,
               cache: CacheConfig, classes: int, temperature: float,
               holdout: float = 0.0, decoder: str = FFCV_DECODER) -> CacheSpec:
    """What the cache of these teacher weights holds for a student at `temperature`.

    `decoder`: fasttt.jpeg.decoder_name of the run's data.decode on its device.
    """
    return CacheSpec(
        teacher_sha256=sha256_file(teacher_weights),
        beton_sha256=beton["splits"]["train"]["sha256"],
        augment_sha256=views_fingerprint(views), samples=samples, classes=classes,
        views=views.count, stored_views=views.stored,
        teacher_view="unaugmented" if views.unaugmented_teacher else "student",
        top_k=min(cache.top_k or classes, classes), dtype=cache.dtype,
        temperatures=new_cache_temperatures(cache, temperature), holdout=holdout,
        temperature=temperature, decoder=decoder)


def array_specs(manifest: dict) -> dict:
    """name -> (shape, dtype) of each array a cache with this manifest holds."""
    v, n, k = manifest["stored_views"], manifest["samples"], manifest["top_k"]
    return {"values": ((v, n, k), np.dtype(manifest["dtype"])),
            "ids": ((v, n, k), id_dtype(manifest["classes"])),
            "log_partition": ((v, n, len(manifest["temperatures"])), np.dtype(np.float32))}


def _differences(found: dict, spec: CacheSpec) -> list[str]:
    names = {"teacher_sha256": "teacher weights", "beton_sha256": "beton",
             "augment_sha256": "augmentation"}
    differ = [names.get(key, key) for key, value in spec.manifest().items()
              if key not in ("temperatures", "decoder") and found.get(key) != value]
    if found.get("decoder", FFCV_DECODER) != spec.decoder:  # absent: FFCV's
        differ.append(DECODER)
    return differ


def _digest(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with a checksum of its own fields, so a damaged one is never trusted."""
    return {**manifest, SEAL: _digest(manifest)}


def read_cache_manifest(cache_dir: Path) -> dict:
    """A cache's manifest.json, or a one-line refusal saying what to do."""
    try:
        found = json.loads((cache_dir / CACHE_MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        found = None
    if not isinstance(found, dict):
        raise UserError(f"{cache_dir} has no readable {CACHE_MANIFEST}: delete {cache_dir} and "
                        "rerun the same command to rebuild it")
    return found


def open_arrays(cache_dir: Path, spec: CacheSpec) -> dict[str, np.ndarray]:
    """The cache's arrays, memory-mapped read-only, after checking it matches `spec`."""
    found = read_cache_manifest(cache_dir)
    if found.get("complete") is not True:
        raise UserError(f"{cache_dir} is an incomplete cache: delete {cache_dir} and rerun the "
                        "same command to rebuild it")
    if found.get(SEAL) != _digest(found):
        raise UserError(f"{cache_dir}/{CACHE_MANIFEST} is damaged (it does not match its own "
                        f"checksum): delete {cache_dir} and rerun the same command to rebuild "
                        "it")
    differ = _differences(found, spec)
    stored = found.get("temperatures")
    if not (isinstance(stored, list) and stored
            and all(isinstance(t, float) and 0.01 <= t <= 100 for t in stored)):
        differ.append("temperatures")
    if differ:
        raise UserError(f"{cache_dir} was built for another {', '.join(differ)}: delete "
                        f"{cache_dir} and rerun the same command to rebuild it for this run")
    arrays = {}
    for name, (shape, dtype) in array_specs(spec.manifest() | {"temperatures": stored}).items():
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


def overflow_advice(err: CacheOverflow, weights: Path, generations: GenerationsConfig,
                    run_name: str, lock_dir: Path | None) -> str:
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
    students = max(1, generations.students - taught)
    flags = " ".join(f"--set {shlex.quote(pair)}" for pair in (
        "cache.dtype=float32", f"generations.teacher={teacher}",
        f"generations.students={students}",
        f"run.name={derived_name(run_name, '-float32')}"))
    return (f"the teacher {teacher}'s logits reach {err.peak:.3g}, beyond cache.dtype = "
            f"\"{err.dtype}\" (at most {np.finfo(err.dtype).max:.0f}), so its cache cannot be "
            f"built (so confident a teacher may have diverged: check its metrics.jsonl). To "
            f"keep it, train its students in a new run that adopts it and stores float32 (the "
            f"cache's dtype is part of a run's recipe): rerun fasttt/train.py with the same "
            f"recipe and flags, adding {flags}")


def _fill_answers(teacher: OnlineTeacher, loader, arrays: dict, temperatures: list[float],
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
                # no_grad, as evaluate(): a compiled teacher reuses its eval graph (inference
                # tensors would compile another)
                with torch.no_grad(), accelerator.autocast():
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


def build_cache(cache_dir: Path, teacher: OnlineTeacher, spec: CacheSpec, loader,
                accelerator: Accelerator, console: Console = QUIET) -> None:
    """Build the cache at `cache_dir` unless a matching one is there; every rank calls this.

    `loader` is this rank's in-order slice of the training split.
    """
    if (cache_dir / CACHE_MANIFEST).is_file():
        open_arrays(cache_dir, spec)  # verified, or a one-line refusal
        return
    main = accelerator.is_main_process
    if main:  # a killed build's leftovers are never used: start again
        staging = staging_dir(cache_dir)
        for name, (shape, dtype) in array_specs(spec.manifest()).items():
            path = staging / f"{name}.npy"
            try:
                np.lib.format.open_memmap(path, "w+", dtype, shape).flush()
            except OSError as err:  # numpy's message names no file
                raise OSError(err.errno, err.strerror, str(path)) from None
            preallocate(path)
    accelerator.wait_for_everyone()
    staging = staging_path(cache_dir)
    arrays = {name: np.load(staging / f"{name}.npy", mmap_mode="r+") for name in CACHE_ARRAYS}
    _fill_answers(teacher, loader, arrays, spec.temperatures, accelerator, console)
    for array in arrays.values():
        array.flush()
    del arrays
    accelerator.wait_for_everyone()
    if main:
        arrays = {name: np.load(staging / f"{name}.npy", mmap_mode="r") for name in CACHE_ARRAYS}
        checksums = {name: [sha256_array(view) for view in array]
                     for name, array in arrays.items()}
        write_json(staging / CACHE_MANIFEST,
                   seal_manifest({**spec.manifest(), CHECKSUMS: checksums, "complete": True}))
        publish_dir(staging, cache_dir)
    accelerator.wait_for_everyone()


def ensure_cache(weights: Path, views: ViewSchedule, temperature: float, recipe: Recipe,
                 num_classes: int, accelerator: Accelerator, console: Console = QUIET,
                 lock_dir: Path | None = None) -> CacheSpec:
    """Build (or verify) the cache beside a teacher's verified weights; what it holds.

    `temperature`: the student's, whose log-partition the cache must serve.

    `lock_dir`: the teacher's run when it is not this one; the cache there is shared by
    every run that adopts the teacher, so a missing one is built under that run's lock.
    """
    beton = read_manifest(recipe.data.beton_dir)
    spec = cache_spec(weights, beton, train_samples(recipe.data, beton), views, recipe.cache,
                      num_classes, temperature, recipe.data.holdout,
                      decoder_name(recipe.data.decode, accelerator.device,
                                   recipe.data.gpu_decode_percent))
    cache_dir = teacher_cache(weights)
    lock = None if lock_dir is None else _teacher_run_lock(cache_dir, lock_dir, accelerator,
                                                           console)
    try:
        if lock_dir is not None and lock is None:  # built by another run: it must fit ours
            on_main_process(accelerator, _check_shared, cache_dir, spec, lock_dir)
        if not (cache_dir / CACHE_MANIFEST).is_file():
            model = last_epoch_model(weights, recipe.model, recipe.run, num_classes,
                                     accelerator.device)
            teacher = OnlineTeacher(model, views, spec.top_k, temperature)
            loader = split_loader(recipe.data, accelerator, "train", recipe.cache.batch_size,
                                  limit=spec.samples, rows=training_rows(recipe.data, beton))
            try:
                build_cache(cache_dir, teacher, spec, loader, accelerator, console)
            except CacheOverflow as err:
                raise UserError(overflow_advice(err, weights, recipe.generations,
                                                recipe.run.name, lock_dir)) from None
        else:
            log_line(console, f"teacher cache: reading {cache_dir}, built earlier (no "
                              "teacher pass)")
    finally:
        if lock is not None:
            lock.close()
    return spec


def _teacher_run_lock(cache_dir: Path, lock_dir: Path, accelerator: Accelerator,
                      console: Console):
    """None once the shared cache exists; else the teacher run's lock, on the main process.

    Every rank waits together, polling: a teacher run may hold its lock for hours while it
    trains, longer than a collective may wait.
    """
    waited = False
    while True:
        state, held = "present", None
        if accelerator.is_main_process and not (cache_dir / CACHE_MANIFEST).is_file():
            held = try_lock_run_dir(lock_dir)
            if held is None:
                state = "busy"
            elif (cache_dir / CACHE_MANIFEST).is_file():  # published as we took the lock: read it
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


def _check_shared(cache_dir: Path, spec: CacheSpec, lock_dir: Path) -> None:
    """Refuse a shared cache built for other students, without advising to delete it."""
    found = read_cache_manifest(cache_dir)
    differ = [key for key in _differences(found, spec)
              if key in ("augmentation", "views", "stored_views", "teacher_view", "top_k",
                         "dtype", DECODER)]
    if differ:
        raise UserError(f"{cache_dir} serves the students of {lock_dir}'s teacher with another "
                        f"{', '.join(differ)} than this recipe's: give this recipe their "
                        "[augment], schedule.epochs, data.decode and [cache] settings (views, "
                        "teacher_view, top_k, dtype), or set cache.mode = \"online\"")


def open_teacher(cache_dir: Path, spec: CacheSpec, device: torch.device) -> CachedTeacher:
    """A verified cache as its student's teacher; views' checksums checked at first use."""
    arrays = open_arrays(cache_dir, spec)
    found = read_cache_manifest(cache_dir)
    checksums = found.get(CHECKSUMS)
    if not (isinstance(checksums, dict) and all(
            isinstance(checksums.get(name), list) and len(checksums[name]) == spec.stored_views
            for name in CACHE_ARRAYS)):
        raise UserError(f"{cache_dir}/{CACHE_MANIFEST} has no checksums of its views: delete "
                        f"{cache_dir} and rerun the same command to rebuild it")
    return CachedTeacher(arrays, checksums, spec.temperature, spec.column(found, cache_dir),
                         device, cache_dir)


class CachedTeacher:
    """The teacher as a lookup: rows (view, sample) of verified cache arrays, host to device.

    Each view's slabs are checked against the checksums recorded at build the first time
    the view is used, so a damaged cache is refused rather than taught from, and the
    cost is one pass over the slab an epoch reads anyway, once per open.
    """

    # read by the host index before a compiled step's graph (engine.train_step), which
    # must not trace its memory-mapped arrays
    reads_host_memory = True

    def __init__(self, arrays: dict[str, np.ndarray], checksums: dict[str, list[str]],
                 temperature: float, column: int | None, device: torch.device, source: Path):
        """`column`: the stored log-partition at `temperature`; None: from the full logits."""
        self.arrays, self.checksums, self.source = arrays, checksums, source
        self.temperature, self.column, self.device = temperature, column, device
        self.verified: set[int] = set()

    def _verify(self, view: int) -> None:
        for name in CACHE_ARRAYS:
            if sha256_array(self.arrays[name][view]) != self.checksums[name][view]:
                raise UserError(f"{self.source / name}.npy is damaged (view {view} differs "
                                f"from its checksum): delete {self.source} and rerun the same "
                                "command to rebuild it from the teacher's verified weights")
        self.verified.add(view)

    def __call__(self, index: Tensor, view: int, images: Tensor | None = None,
                 extent: Tensor | None = None, shown: Tensor | None = None) -> TopKTeacher:
        """Outputs on view `view`, read from the cache by the samples' host `index`."""
        if view not in self.verified:
            self._verify(view)
        rows = index.cpu().numpy()
        values, ids = (torch.from_numpy(np.ascontiguousarray(self.arrays[name][view][rows]))
                       .to(self.device, non_blocking=True) for name in ("values", "ids"))
        if self.column is None:  # every class kept: the log-partition at any temperature
            log_partition = log_partitions(values, (self.temperature,))[:, 0]
        else:
            stored = self.arrays["log_partition"][view][rows, self.column]
            log_partition = torch.from_numpy(np.ascontiguousarray(stored)).to(
                self.device, non_blocking=True)
        return TopKTeacher(values, ids.long(), log_partition, self.temperature)


def describe(cache_dir: Path) -> str:
    """Manifest, size on disk and bytes per sample per view of a cache directory."""
    manifest = read_cache_manifest(Path(cache_dir))
    try:
        specs = array_specs(manifest)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{cache_dir}/{CACHE_MANIFEST} is damaged: delete {cache_dir} to rebuild "
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
        if len(argv) != 2 or not (Path(argv[1]) / CACHE_MANIFEST).is_file():
            raise UserError(f"usage: python -m fasttt.cache info CACHE_DIR (a directory "
                            f"holding {CACHE_MANIFEST})")
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
        print(describe(teacher_cache(weights)))


def drop_used_caches(run_dir: Path) -> int:
    """Delete the caches no one reads again (cache.keep = "last", rundir.used_caches); bytes."""
    freed = 0
    for cache_dir in used_caches(run_dir):
        freed += tree_bytes(cache_dir)
        remove_dir(cache_dir)
    return freed


if __name__ == "__main__":
    exit_on_user_error(main)
