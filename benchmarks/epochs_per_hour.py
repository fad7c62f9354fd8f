"""Epochs per hour of a recipe on this machine, with and without the teacher cache.

    python benchmarks/epochs_per_hour.py RECIPE.toml [--synthetic N] [--steps 10] [--warmup 2]
        [--photo-policy fasttt|ffcv] [--compiled auto|off|MODE] [--repeats 3] [--set ...]
        [--data-dir DIR] [--out FILE] [--profile DIR [--profile-steps 6]]
    accelerate launch --num_processes 8 benchmarks/epochs_per_hour.py RECIPE.toml  # 8 GPUs

Steady-state throughput of the recipe's model, train size, batch size, precision and
loader settings, measured side by side in one run with the trainer's own code
(`fasttt.engine.train_epoch`, `fasttt.data.generation_loaders`, `fasttt.models.build_model`,
`fasttt.cache.build_cache`, `fasttt.teachers`, `fasttt.processes.accelerator_and_console`):

1. loader alone: the FFCV train loader through the steps' own window, nothing done per
   batch (the ceiling: no step row reads faster, beyond noise);
2. patriarch step: loader + keyed augmentation + forward/backward/SGD, patriarch loss;
3. student step reading a teacher cache (the teacher: the patriarch after its steps);
4. student step with the online teacher (one teacher forward per step);
5. cache build: teacher inference over the keyed views (seconds per view of the split);
6. the cached student again, its cache build shared over the generation's epochs;
   and with a compile mode (`--compiled`; "auto", the default, is what a run of the
   recipe decides on this device: CUDA graphs for a fixed-size recipe on a GPU, none on
   the CPU), rows 2 and 3 again with the model compiled, each right after its eager row,
   and the graphs compiled in all rounds and the seconds that took;
7. with `--profile DIR`, after the rounds and outside their timings: `--profile-steps`
   steps of the patriarch and of the cached student (and of both compiled, with a
   compile mode), after one warm-up step, under torch.profiler
   (`benchmarks/step_profile.py`): `DIR/<row>.txt` (the op table),
   `DIR/<row>.trace.json.gz` (a Chrome trace) and `DIR/<row>.json`, whose summary (wall
   and loader wait per step, each `fasttt.*` phase of `train_epoch` per step, the top
   ops, on a GPU every kernel's ms per step and per 1024 images) also goes under
   "profile" in the JSON result and is printed as a table.

A row times `--steps` steps after `--warmup` untimed ones, the device synchronised at
both ends, and the time each step spent blocked waiting for its next batch. Between the
two it drops, untimed, the 4 batches FFCV can have decoded ahead (3 queued, 1 held by
its reader): steps slower than the decode, as the first ones are, let it fill up, and
those batches would cost the window nothing. Every window thus starts with nothing
decoded ahead, as the loader alone's does. A row bound by its step rather than by the
decode pays for that one batch's decode at most, and, where the decode shares the
step's cores (a CPU), the decode of the batches FFCV reads ahead again. Rounds
(`--repeats`) run every row in turn, so all rows share the machine's load; the table
shows medians over rounds. Epochs per hour are for the recipe's whole train split.
Every row reads the same first (warmup + 4 + steps) x batch samples, in one epoch when
the split has them (a new epoch allocates FFCV's batch buffers again), which the cache
covers; progressive resizing is pinned to the recipe's final train size; the cache is
built with at most two of the recipe's views (its cost per view does not depend on how
many there are).

`--synthetic N` first writes N generated images of the recipe's kind into --data-dir
(reused when already there): ImageNet-like JPEGs (about 400x350, ~100 KB, up to 1000
classes) through the imagefolder builder for photo recipes, else raw square images of
the recipe's train size in 100 classes. `--photo-policy ffcv` stores the photos as FFCV's
own ImageNet betons do (longest side 400, 10 % JPEG, the rest raw pixels), so that a loader
figure compares like for like with FFCV's published ones. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import get_args, get_type_hints

import synthetic  # benchmarks/synthetic.py: a script's folder comes first on the path
import torch
from rich.console import Console
from rich.table import Table
from step_profile import phase_table, save_profile, step_profiler  # benchmarks/step_profile.py

from beton_builders.digits import build_digits_dir
from beton_builders.imagefolder import default_workers
from fasttt.augment import train_size
from fasttt.betons import read_manifest
from fasttt.cache import CacheSpec, build_cache, cache_spec, open_teacher
from fasttt.checkpoint import save_weights
from fasttt.data import ensure_betons, generation_loaders, split_loader, train_samples
from fasttt.engine import GenerationSpec, prepare_learner, train_epoch
from fasttt.errors import UserError, exit_on_user_error
from fasttt.files import write_json
from fasttt.generation import generation_objective, generation_views
from fasttt.models import build_model, compiled_so_far, decide_compile
from fasttt.processes import accelerator_and_console
from fasttt.progress import progress_bar as steps_bar
from fasttt.recipe import Recipe, RunConfig, load_recipe
from fasttt.teachers import OnlineTeacher

BUILT_VIEWS = 2  # of the recipe's R; with one, loading each batch would be charged to one view
PHOTO_CLASSES, FIXED_CLASSES = 1000, 100
LOADER_PREFETCH = 3  # FFCV Loader's batches_ahead, which fasttt.data leaves at its default
# Batches FFCV can hold decoded before they are asked for: its queue of batches_ahead,
# and the one its reader thread decoded and waits to put there.
READ_AHEAD = LOADER_PREFETCH + 1

# ---------------------------------------------------------------- synthetic data


def synthetic_spec(recipe: Recipe, images: int, policy: str = "fasttt") -> dict:
    """What `--synthetic` builds for this recipe: photos on its canvas, stored as `policy`
    says (synthetic.PHOTO_POLICIES), or fixed-size images."""
    if recipe.augment.kind == "resized_crop" and recipe.data.canvas_size > 0:
        options = synthetic.photo_options(policy, recipe.data.canvas_size)
        return {"kind": "photo", "images": images, "max_resolution": options.max_resolution,
                "classes": min(PHOTO_CLASSES, max(10, images // 10)),
                **({"policy": policy, **dataclasses.asdict(options)} if policy != "fasttt"
                   else {})}
    return {"kind": "fixed", "images": images, "side": recipe.augment.max_size,
            "classes": FIXED_CLASSES}


def default_data_dir(spec: dict) -> Path:
    """bench_out/synthetic/<kind><pixels>[_<policy>]_n<N>."""
    pixels = spec.get("max_resolution") or spec["side"]
    policy = f"_{spec['policy']}" if "policy" in spec else ""
    return (Path("bench_out") / "synthetic"
            / f"{spec['kind']}{pixels}{policy}_n{spec['images']}")


def synthetic_betons(spec: dict, data_dir: Path, console: Console) -> Path:
    """The betons of `spec` under `data_dir`, built unless a finished build is there."""
    stamp, betons = data_dir / "synthetic.json", data_dir / "betons"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**spec, "complete": True}:
        console.print(f"reusing the synthetic betons in {betons}")
        return betons
    if stamp.is_file():  # ours, for another N or an unfinished build: start again
        shutil.rmtree(data_dir)
    elif data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise UserError(f"{data_dir} exists and was not made by --synthetic: "
                        "choose another --data-dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {**spec, "complete": False})
    if spec["kind"] == "photo":
        tree, workers = data_dir / "jpegs", default_workers()
        kb = synthetic.write_photo_tree(tree, spec["images"], spec["classes"], workers)
        console.print(f"{spec['images']} JPEGs, {kb:.0f} KB each on average")
        options = synthetic.photo_options(spec.get("policy", "fasttt"), spec["max_resolution"])
        synthetic.build_photo_betons(tree, betons, options, workers)
        shutil.rmtree(tree)  # the beton holds every image
    else:
        synthetic.write_fixed_betons(betons, spec["images"], spec["side"], spec["classes"])
    write_json(stamp, {**spec, "complete": True})
    return betons


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """What one row measured after its warm-up: images, wall seconds, seconds blocked on data."""

    images: int = 0
    seconds: float = 0.0
    waited: float = 0.0


class TimedLoader:
    """`warmup` batches of a train loader, then `steps` timed ones (across epochs if need be).

    Between the two it drops the READ_AHEAD batches FFCV may have decoded meanwhile, so
    that every row's window starts with the loader's read-ahead empty. Times the `steps`:
    wall time between device synchronisations, and the time spent blocked inside the
    loader for the next batch. With `profiler`, marks the end of every step for its
    schedule: the warm-up's last after the drop, the timed last after its synchronisation.
    """

    def __init__(self, loader, warmup: int, steps: int, batch_size: int, device: torch.device,
                 profiler: torch.profiler.profile | None = None):
        self.loader, self.warmup, self.steps = loader, warmup, steps
        self.device, self.timing = device, Timing(images=steps * batch_size)
        self.profiler = profiler

    def __len__(self) -> int:
        return self.warmup + self.steps

    def _batches(self):
        """The loader's batches, epoch after epoch."""
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def _step_ended(self) -> None:
        """Mark the end of a yielded step for the profiler's schedule."""
        if self.profiler is not None:
            self.profiler.step()

    def __iter__(self):
        batches = self._batches()
        try:
            for i in range(self.warmup):
                yield next(batches)
                if i < self.warmup - 1:
                    self._step_ended()
            # While a step is slower than the decode (the first ones always are), FFCV
            # decodes ahead: timed, those batches would cost the window nothing, and steps
            # that outrun the decode would read faster than the loader alone. Dropped after
            # the device catches up (the reader keeps decoding while it does), they leave
            # every row's window starting as the loader alone's: the reader just handed
            # over its last batch, nothing decoded ahead.
            synchronize(self.device)
            for _ in range(READ_AHEAD):
                next(batches)
            if self.profiler is not None:  # nor their copies to the device in its steps
                synchronize(self.device)
            self._step_ended()  # the last warm-up step's, so a profile leaves the drop out
            start = time.perf_counter()
            for step in range(self.steps):
                asked = time.perf_counter()
                batch = next(batches)
                self.timing.waited += time.perf_counter() - asked
                yield batch
                if step == self.steps - 1:
                    synchronize(self.device)
                    self.timing.seconds = time.perf_counter() - start
                self._step_ended()
        finally:
            # Stopping FFCV half way through an epoch joins its thread (~0.5 s): a cost
            # the trainer never pays, so it falls outside the timing.
            batches.close()


class ForwardClock(torch.nn.Module):
    """Passes calls on to `model`, timing them from call `skip` on (images and start time)."""

    def __init__(self, model: torch.nn.Module, skip: int, device: torch.device):
        super().__init__()
        self.model, self.skip, self.device = model, skip, device
        self.calls, self.images, self.start = 0, 0, 0.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.calls == self.skip:
            synchronize(self.device)
            self.start = time.perf_counter()
        if self.calls >= self.skip:
            self.images += len(images)
        self.calls += 1
        return self.model(images)


# ---------------------------------------------------------------- the rows


def compiled_mode(recipe: Recipe, choice: str, device: torch.device) -> str | None:
    """The torch.compile mode of the compiled rows (--compiled), or None for no such rows.

    "auto" is what a run of the recipe decides on this device (models.decide_compile).
    """
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    run = decide_compile(replace(recipe.run, compile="auto"), recipe.augment.kind, device)
    return run.compile_mode if run.compile else None


def read_batches(args) -> int:
    """Batches each row reads: its warm-up, the dropped read-ahead, its timed steps."""
    return args.warmup + READ_AHEAD + args.steps


def measured_recipe(recipe: Recipe, epoch_samples: int, batches: int) -> Recipe:
    """The recipe as measured: its first `batches` batches of samples, one train size."""
    size = train_size(recipe.schedule.epochs - 1, recipe.augment)
    limit = min(epoch_samples, batches * recipe.optim.batch_size)
    return replace(
        recipe, data=replace(recipe.data, train_limit=limit),
        augment=replace(recipe.augment, min_size=size, max_size=size, start_ramp=0, end_ramp=0),
        cache=replace(recipe.cache, views=min(recipe_views(recipe), BUILT_VIEWS)))


def recipe_views(recipe: Recipe) -> int:
    """How many views the recipe's teachers label (its caches' stored views)."""
    return generation_views(recipe, 1).stored


def loader_alone(train, args, recipe: Recipe, accelerator) -> Timing:
    """The train loader through the steps' own TimedLoader window, nothing done per batch."""
    device = accelerator.device
    timed = TimedLoader(train, args.warmup, args.steps, recipe.optim.batch_size, device)
    with steps_bar(accelerator.is_main_process) as progress:
        task = progress.add_task("loader alone", total=len(timed), info="")
        for batch in timed:
            # train_step's copies: image and label are on the device already (ToDevice),
            # so only the host index is copied.
            for tensor in (batch.image, batch.label, batch.index):
                tensor.to(device, non_blocking=True)
            progress.advance(task)
    return timed.timing


def last_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Make the model's normalisation layers keep the statistics of the last batch they saw.

    A fresh deep network's eval-mode logits overflow the cache's float16 (about 1e5 for
    ResNet-56, 1e8 for ResNet-110) while its running statistics are still near their
    initial values; from the last batch's they are a trained teacher's. The step's work is
    unchanged: only the weight of each running-statistics update (momentum 1). Not a
    cumulative average (momentum None): that reads each layer's batch count on the host,
    one GPU sync per layer per step, which the trainer's steps never pay.
    """
    for module in model.modules():
        if getattr(module, "track_running_stats", False):
            module.momentum = 1.0


def training_steps(spec: GenerationSpec, timed: TimedLoader, recipe: Recipe, num_classes: int,
                   accelerator) -> torch.nn.Module:
    """Train a fresh model with `spec` over the batches of `timed` through `train_epoch`."""
    model = build_model(recipe.model, recipe.run, num_classes, seed=1 + spec.index)
    last_batch_norm_statistics(model)
    learner = prepare_learner(model, recipe.optim, recipe.schedule, len(timed.loader),
                              accelerator, recipe.run)
    with steps_bar(accelerator.is_main_process) as progress:
        train_epoch(learner, timed, spec, 0, accelerator, progress, "timed epoch")
    accelerator.free_memory()
    return accelerator.unwrap_model(learner.model)


def profile_steps(rows: dict[str, tuple[GenerationSpec, Recipe]], train, args,
                  num_classes: int, accelerator, console: Console) -> dict[str, dict]:
    """Profile `--profile-steps` steps of each row's spec, trained as its recipe says (eager
    or compiled), after a warm-up step; their summaries.

    Every process runs the steps (a distributed backward needs them all); the main one
    writes its profiles and returns their summaries.
    """
    console.print(f"profiling {args.profile_steps} steps of: {', '.join(rows)}")
    summaries = {}
    for name, (spec, recipe) in rows.items():
        with step_profiler(accelerator.device, args.profile_steps) as profiler:
            timed = TimedLoader(train, 1, args.profile_steps, recipe.optim.batch_size,
                                accelerator.device, profiler)
            training_steps(spec, timed, recipe, num_classes, accelerator)
        if accelerator.is_main_process:
            summaries[name] = save_profile(profiler, args.profile, name, args.profile_steps,
                                           timed.timing, accelerator.device)
    return summaries


def cache_build(cache_dir: Path, teacher, views, spec: CacheSpec, recipe: Recipe,
                accelerator) -> Timing:
    """Build the cache with `build_cache`, timed after its first batch of views."""
    per_process = math.ceil(spec.samples / accelerator.num_processes)
    skip = spec.stored_views if per_process > recipe.cache.batch_size else 0
    clock = ForwardClock(teacher, skip, accelerator.device)
    loader = split_loader(recipe.data, accelerator, "train", recipe.cache.batch_size,
                          limit=spec.samples)
    online = OnlineTeacher(clock, views, spec.top_k, spec.temperature)
    build_cache(cache_dir, online, spec, loader, accelerator)
    synchronize(accelerator.device)
    return Timing(images=clock.images * accelerator.num_processes,
                  seconds=time.perf_counter() - clock.start)


def measure(recipe: Recipe, num_classes: int, epoch_samples: int, args, accelerator,
            console: Console, work: Path) -> tuple[dict[str, list[Timing]], dict, partial]:
    """Every row, once per round: rounds interleave the rows so they share the same load.

    The teacher is the patriarch as the first round leaves it, as each student is taught
    by the last weights of the generation before. With a compile mode (--compiled), the
    patriarch and cached-student steps run again with the model compiled, right after
    their eager rows; the compilation (in the first round's warm-up steps) is counted
    apart. Also returns what profiles the patriarch and cached-student steps, and with a
    compile mode their compiled rows (`profile_steps` with their specs and loader).
    """
    # Every row reads within one epoch when the split allows: a new epoch allocates FFCV's
    # batch buffers again (on a GPU, ~4 GB pinned for ImageNet's canvases).
    bench = measured_recipe(recipe, epoch_samples, read_batches(args))
    method, device = bench.generations, accelerator.device
    beton = read_manifest(bench.data.beton_dir)
    patriarch_views, views = (generation_views(bench, m) for m in (0, 1))
    train, _ = generation_loaders(bench.data, bench.optim.batch_size, views.key, accelerator)
    patriarch = GenerationSpec(0, work, generation_objective(method, 0), patriarch_views)
    student = generation_objective(method, 1)
    timings = {name: [] for name in ("loader", "patriarch_step", "cache_build",
                                     "student_step_cache", "student_step_online")}
    mode = compiled_mode(bench, args.compiled, device)
    if mode:
        timings |= {f"{name}_compiled": [] for name in COMPILED_ROWS}
    compile_before, compiling = compiled_so_far(), {"mode": mode}
    compiled = replace(bench, run=replace(bench.run, compile=True, compile_mode=mode))

    def step_rows(name: str, spec: GenerationSpec) -> torch.nn.Module:
        """Time row `name`'s steps eagerly, then compiled right after where it has that row."""
        timed = TimedLoader(train, args.warmup, args.steps, bench.optim.batch_size, device)
        model = training_steps(spec, timed, bench, num_classes, accelerator)
        timings[name].append(timed.timing)
        if f"{name}_compiled" in timings:
            timed = TimedLoader(train, args.warmup, args.steps, bench.optim.batch_size, device)
            training_steps(spec, timed, compiled, num_classes, accelerator)
            timings[f"{name}_compiled"].append(timed.timing)
        return model

    teacher = students = None
    for r in range(args.repeats):
        console.print(f"round {r + 1} of {args.repeats}: loader alone, patriarch, cache build, "
                      "cached student, online student")
        timings["loader"].append(loader_alone(train, args, bench, accelerator))
        model = step_rows("patriarch_step", patriarch)
        if teacher is None:
            teacher = model
            if accelerator.is_main_process:
                save_weights(teacher, work / "teacher.safetensors")
            accelerator.wait_for_everyone()
            wanted = cache_spec(work / "teacher.safetensors", beton,
                                train_samples(bench.data, beton), views, bench.cache,
                                num_classes, method.temperature)
        cache_dir = work / f"cache{r}"
        timings["cache_build"].append(cache_build(cache_dir, teacher, views, wanted, bench,
                                                  accelerator))
        students = students or {
            "student_step_cache": GenerationSpec(1, work, student, views, open_teacher(
                cache_dir, wanted, device)),
            "student_step_online": GenerationSpec(1, work, student, views, OnlineTeacher(
                teacher, views, num_classes, method.temperature))}
        for name, spec in students.items():
            step_rows(name, spec)
    if mode:  # over every round: what the first round's warm-ups compiled, and any recompile
        graphs, seconds = (now - before for now, before in zip(
            compiled_so_far(), compile_before, strict=True))
        compiling |= {"graphs": graphs, "seconds": seconds}
    profiled = {"patriarch_step": patriarch, "student_step_cache": students["student_step_cache"]}
    rows = {name: (spec, bench) for name, spec in profiled.items()}
    if mode:
        rows |= {f"{name}_compiled": (spec, compiled) for name, spec in profiled.items()}
    return timings, compiling, partial(profile_steps, rows, train, args, num_classes,
                                       accelerator, console)


# ---------------------------------------------------------------- report


def machine(accelerator) -> dict:
    """CPU model and cores, GPU, library versions and the load while measuring."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = accelerator.device
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "device": str(device), "processes": accelerator.num_processes,
            "python": platform.python_version(), "torch": torch.__version__}


COMPILED_ROWS = ("patriarch_step", "student_step_cache")  # measured compiled too (--compiled)
KERNEL_IMAGES = 1024  # a profile's GPU kernel time is also given per this many images
COMPILE_MODES = get_args(get_type_hints(RunConfig)["compile_mode"])  # the recipe's run.compile_mode
LABELS = {  # the table's rows, in order
    "loader": "loader alone (ceiling)",
    "patriarch_step": "patriarch step",
    "patriarch_step_compiled": "patriarch step, compiled",
    "student_step_cache": "student step, teacher cache",
    "student_step_cache_compiled": "student step, teacher cache, compiled",
    "student_step_online": "student step, online teacher",
    "cache_build": "cache build (teacher, per view)",
    "student_cache_with_build": "student, cache incl. its build",
}


def rows_from(timings: dict[str, list[Timing]], epoch_images: int, epoch_samples: int,
              recipe: Recipe) -> dict:
    """images/s, epochs/hour, ratio to the loader and loader wait: medians over the rounds."""
    rates = {name: [t.images / t.seconds for t in ts] for name, ts in timings.items()}
    ceiling = statistics.median(rates["loader"])
    rows = {}
    for name, ts in timings.items():
        rate = statistics.median(rates[name])
        # The build labels every sample once per view: its "epoch" is one view of the split.
        per_epoch = epoch_samples if name == "cache_build" else epoch_images
        rows[name] = {"images_per_s": rate, "epochs_per_hour": 3600 * rate / per_epoch,
                      "vs_loader": rate / ceiling, "images_per_s_rounds": rates[name],
                      "measured_images": ts[0].images}
        if name == "cache_build":
            rows[name]["seconds_per_view"] = per_epoch / rate
        else:
            rows[name]["loader_wait_fraction"] = statistics.median(
                t.waited / t.seconds for t in ts)
    views, epochs = recipe_views(recipe), recipe.schedule.epochs
    shared = views * rows["cache_build"]["seconds_per_view"] / epochs
    seconds = epoch_images / rows["student_step_cache"]["images_per_s"] + shared
    rows["student_cache_with_build"] = {
        "images_per_s": epoch_images / seconds, "epochs_per_hour": 3600 / seconds,
        "vs_loader": epoch_images / seconds / ceiling, "build_seconds_per_epoch": shared}
    return {name: rows[name] for name in LABELS if name in rows}


def print_table(result: dict, console: Console) -> None:
    """The rows as a rich table, then a line for any step that waited on its loader."""
    s, rows = result["settings"], result["rows"]
    table = Table(title=f"epochs per hour: {result['recipe']['path']} on "
                        f"{result['machine']['gpu'] or result['machine']['cpu']} "
                        f"({s['train_images_per_epoch']:,} images/epoch, batch "
                        f"{s['batch_size']}, {s['train_size']}px; median of {s['repeats']} x "
                        f"{s['steps']} steps after {s['warmup']})")
    for column in ("row", "images/s", "min-max of rounds", "epochs/hour", "x loader",
                   "waits on loader", "note"):
        table.add_column(column, justify="left" if column in ("row", "note") else "right")
    for name, row in rows.items():
        wait, rounds = row.get("loader_wait_fraction"), row.get("images_per_s_rounds")
        spread = f"{min(rounds):,.0f}-{max(rounds):,.0f}" if rounds else ""
        note = {"loader": f"the steps' window, {s['read_ahead_dropped']} batches decoded "
                          "ahead dropped first",
                "cache_build": f"{row.get('seconds_per_view', 0):.1f} s per view of the split",
                "student_cache_with_build": f"{s['recipe_views']} views built once "
                                            f"for {s['epochs']} epochs"}.get(name, "")
        if name.endswith("_compiled"):
            eager = rows[name.removesuffix("_compiled")]["images_per_s"]
            compiling = result["compile"]
            note = (f"{row['images_per_s'] / eager:.2f} x eager; {compiling['mode']}: "
                    f"{compiling['graphs']} graphs compiled in {compiling['seconds']:.0f} s")
        table.add_row(LABELS[name], f"{row['images_per_s']:,.0f}", spread,
                      f"{row['epochs_per_hour']:,.1f}", f"{row['vs_loader']:.3g}",
                      "" if wait is None or name == "loader" else f"{100 * wait:.1f} %", note)
    console.print(table)
    for name in ("patriarch_step", "student_step_cache", "student_step_online"):
        if rows[name]["loader_wait_fraction"] > 0.05:
            console.print(f"[yellow]{LABELS[name]} waited on the loader "
                          f"{100 * rows[name]['loader_wait_fraction']:.0f} % of the time: "
                          "raise data.num_workers[/]")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    """RECIPE.toml and the options the module docstring lists, checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="generate N training images of the recipe's kind first")
    parser.add_argument("--photo-policy", choices=synthetic.PHOTO_POLICIES, default="fasttt",
                        help="how --synthetic stores photos: fasttt's (all JPEG, the canvas's "
                        "side) or FFCV's ImageNet policy (side 400, 10 %% JPEG, the rest raw)")
    parser.add_argument("--compiled", default="auto",
                        choices=("auto", "off", *COMPILE_MODES),
                        help="also time the patriarch and cached-student steps with the model "
                        "compiled in this mode; auto: as a run of the recipe decides here")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every row, interleaved; the table shows medians")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--data-dir", type=Path,
                        help="where --synthetic builds (default bench_out/synthetic/...)")
    parser.add_argument("--out", type=Path,
                        help="JSON result (default bench_out/epochs_per_hour_<recipe>.json)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="then profile the patriarch and cached-student steps into DIR")
    parser.add_argument("--profile-steps", type=int, default=6, metavar="N",
                        help="profiled steps per row, after one warm-up step")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.repeats, args.profile_steps) < 1 or args.synthetic < 0:
        raise UserError("--steps, --warmup, --repeats and --profile-steps must be >= 1 (the "
                        "first steps pay compilation), --synthetic >= 0")
    return args


def prepare_data(recipe: Recipe, args, accelerator, console: Console) -> Recipe:
    """With --synthetic: build (or reuse) the synthetic betons and point the recipe at them."""
    if not args.synthetic:
        return recipe
    if args.synthetic < recipe.optim.batch_size:
        raise UserError(f"--synthetic {args.synthetic} is fewer images than one batch of "
                        f"{recipe.optim.batch_size}")
    spec = synthetic_spec(recipe, args.synthetic, args.photo_policy)
    data_dir = args.data_dir or default_data_dir(spec)
    if accelerator.is_main_process:
        synthetic_betons(spec, data_dir, console)
    accelerator.wait_for_everyone()
    betons = str(data_dir / "betons")
    return replace(recipe, data=replace(recipe.data, beton_dir=betons, builtin=""))


def settings(recipe: Recipe, args, accelerator, epoch_samples: int) -> dict:
    """What was measured: the run's sizes, the benchmark's flags, the numerics."""
    batch = recipe.optim.batch_size
    return {
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "synthetic": args.synthetic, "photo_policy": args.photo_policy,
        "beton_dir": recipe.data.beton_dir, "batch_size": batch,
        "train_size": train_size(recipe.schedule.epochs - 1, recipe.augment),
        "train_samples": epoch_samples,
        # the train loader drops the last partial batch of every epoch
        "train_images_per_epoch": epoch_samples // batch * batch,
        "measured_samples": min(epoch_samples, read_batches(args) * batch),
        "read_ahead_dropped": READ_AHEAD,
        "recipe_views": recipe_views(recipe),
        "built_views": min(recipe_views(recipe), BUILT_VIEWS), "epochs": recipe.schedule.epochs,
        "mixed_precision": accelerator.mixed_precision, "channels_last": recipe.run.channels_last,
        "compile": recipe.run.compile, "num_workers": recipe.data.num_workers}


def result_of(recipe: Recipe, args, accelerator, epoch_samples: int,
              timings: dict[str, list[Timing]], compiling: dict, load_before: tuple) -> dict:
    """The JSON result: the machine and its load, the recipe, the settings, the rows, and
    what compiling the compiled rows' model took."""
    setup = settings(recipe, args, accelerator, epoch_samples)
    return {
        "benchmark": "epochs_per_hour",
        "machine": machine(accelerator) | {"load_average_before": load_before,
                                           "load_average_after": os.getloadavg()},
        "recipe": {"path": str(args.recipe), "set": args.set,
                   "resolved": dataclasses.asdict(recipe)},
        "settings": setup,
        "rows": rows_from(timings, setup["train_images_per_epoch"], epoch_samples, recipe),
        "compile": compiling,
    }


def main(argv: list[str] | None = None) -> None:
    """Measure every row, print the table, write the JSON; then profile, and write it again."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.recipe, args.set)
    accelerator, console = accelerator_and_console(recipe.run.mixed_precision)
    recipe = prepare_data(recipe, args, accelerator, console)
    beton = ensure_betons(recipe.data, accelerator, build_digits_dir)
    epoch_samples = train_samples(recipe.data, beton)
    out = args.out or Path("bench_out") / f"epochs_per_hour_{args.recipe.stem}.json"
    # Teacher weights and caches, in one place for every process (each would get its own
    # temporary directory); removed afterwards.
    work = out.parent / f".{out.stem}.work"
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    accelerator.wait_for_everyone()
    load_before = os.getloadavg()
    timings, compiling, profile = measure(recipe, len(beton["class_names"]), epoch_samples,
                                          args, accelerator, console, work)
    main_process, result = accelerator.is_main_process, {}
    if main_process:
        result = result_of(recipe, args, accelerator, epoch_samples, timings, compiling,
                           load_before)
        print_table(result, console)
        write_json(out, result)  # already: a time limit may stop the profile
    if args.profile:
        profiles = profile()
        if main_process:
            batch = result["settings"]["batch_size"]
            for name, summary in profiles.items():  # the same step unprofiled, for comparison
                summary["timed_ms_per_step"] = round(1000 * batch
                                                      / result["rows"][name]["images_per_s"], 3)
                # comparable across recipes and batch sizes (ImageNet's issue states it so)
                summary["kernel_ms_per_1024_images"] = round(
                    summary["kernel_ms_per_step"] * KERNEL_IMAGES / batch, 3)
            result["profile"] = profiles
            console.print(phase_table(f"profile ({args.profile})", profiles))
            write_json(out, result)
    accelerator.wait_for_everyone()
    if main_process:
        shutil.rmtree(work)
        console.print(f"wrote {out}")


if __name__ == "__main__":
    exit_on_user_error(main)
