"""What the trainer's step adds on the host: `train_epoch` against a bare loop, same batches.

    python benchmarks/host_overhead.py [--recipe recipes/digits_d06.toml] [--model test_vit]
        [--batch 8] [--steps 50] [--rounds 15] [--threads 1] [--betons DIR] [--out FILE]

A model small enough that the host's per-step Python shows (timm's `test_vit`, about 7 ms
a step at batch 8 on one core; the recipe's ResNet-20 takes ~30 ms and hides it), and the
recipe's optimizer, schedule, views and patriarch objective. `--steps` batches are read
once from the real FFCV train loader (the digits betons, built in a scratch directory
unless --betons names them) and cloned into a list that feeds every row: the loader is no
part of any of them. A round times one pass over the list per row, rows in an order
rotated round by round, after an untimed warm-up round. Rows:

- bare: per batch the keyed augmentation (`student_pixels`: work the recipe asks for,
  not overhead), forward, the objective, `loss.backward()`, the plain optimizer's step
  and `zero_grad(set_to_none=True)`: nothing else. A fresh model of the same seed and the
  optimizer of `fasttt.optim.make_optimizer`, neither passed through Accelerate.
- bare, no augmentation: the same on each batch's pixels augmented once beforehand.
- trainer: `fasttt.engine.train_epoch` on `prepare_learner`'s model and optimizer, its
  progress bar drawn (into memory) as on a terminal; trainer, bar off: the bar disabled.
  Their difference is the bar's cost: its updates, its redraws (2 Hz) on a thread of
  its own, and one redraw a pass as `train_epoch` adds its task (once an epoch).
- bare + X: the bare loop plus one piece of `train_step`/`train_epoch` (its six
  `record_function` ranges, `accelerator.autocast()` and `.backward`, the optimizer
  wrapped in Accelerate's `AcceleratedOptimizer`, `_step_sums` summed as `train_epoch`
  sums them, the LR schedule and `set_lr`), then all five together.

`trainer_vs_bare` is the median over rounds of the trainer's seconds per step over the
bare loop's in the same round. Each suspect is then timed alone too, microseconds per
call in a hot loop (median of 7 repeats), beside what it adds in the loop (the median
over rounds of its row minus bare): between a model's forward and backward, with cold
caches, the same Python costs several times more. Seconds are the process's CPU time on
a CPU (a shared machine's waits for a core left out), wall time with the device
synchronised on a GPU. `--threads` intra-op threads (default one: the host's Python runs
on one core anyway, and one thread keeps the timings steady). Prints two tables and
writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.optimizer import AcceleratedOptimizer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch.profiler import record_function

from beton_builders.__main__ import main as build_betons
from fasttt.data import Batch, generation_loaders
from fasttt.engine import GenerationSpec, Learner, _step_sums, prepare_learner, train_epoch
from fasttt.generation import generation_objective, generation_views
from fasttt.models import build_model
from fasttt.optim import make_optimizer, set_lr
from fasttt.processes import make_accelerator
from fasttt.progress import progress_bar
from fasttt.recipe import Recipe, load_recipe

SEED = 1
REPEATS = 7  # of each suspect's timing alone
RANGES = ("augment", "teacher", "forward_loss", "backward", "optimizer", "metrics")
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
# each "bare + X" row: the suspect it measures in the loop, and what it adds to bare
EXTRAS = {"record_function ranges (x6)": "ranges",
          "accelerator.autocast() and .backward()": "accelerate",
          "AcceleratedOptimizer step+zero_grad": "wrapper",
          "_step_sums and their accumulation": "sums",
          "lr schedule and set_lr": "lr"}
ROWS = ("bare", "bare, no augmentation", "trainer", "trainer, bar off",
        *(f"bare + {name}" for name in EXTRAS), "bare + all five")
PROGRESS = "progress bar: update (in the loop: and redraws)"  # trainer - trainer, bar off
NO_RANGE = contextlib.nullcontext()  # the bare rows' six empty ranges: ~2 us a step


@dataclass(frozen=True)
class Bare:
    """The bare loop's objects: one model and optimizer for every bare row."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    wrapped: AcceleratedOptimizer  # the same optimizer, as Accelerate's prepare wraps it
    spec: GenerationSpec
    accelerator: object
    precision: contextlib.AbstractContextManager  # the run's autocast, or none on a CPU
    lr: Callable[[int], float]


def terminal_bar() -> Progress:
    """train.py's progress bar as a terminal shows it, drawn into memory."""
    return progress_bar(True, Console(file=io.StringIO(), force_terminal=True, width=120))


def read_batches(recipe: Recipe, spec: GenerationSpec, accelerator, steps: int) -> list[Batch]:
    """The first `steps` train batches (of later epochs too if need be), cloned out of the
    buffers FFCV reuses."""
    train, _ = generation_loaders(recipe.data, recipe.optim.batch_size, spec.views.key,
                                  accelerator)
    batches, epoch = [], 0
    while len(batches) < steps:
        train.set_epoch(epoch)
        for batch in train:
            batches.append(Batch(*(None if t is None else t.clone() for t in batch)))
            if len(batches) == steps:
                break
        epoch += 1
    return batches


def bare_pass(bare: Bare, batches, epoch: int, extras: frozenset[str] = frozenset(),
              shown: list[torch.Tensor] | None = None) -> None:
    """The loop with nothing else but `extras` (the values of EXTRAS): augment (unless
    `shown` holds each batch's pixels), forward and loss, backward, step, zero_grad."""
    spec, accelerator, sums = bare.spec, bare.accelerator, {}
    ranges = record_function if "ranges" in extras else lambda name: NO_RANGE
    optimizer = bare.wrapped if "wrapper" in extras else bare.optimizer
    backward = accelerator.backward if "accelerate" in extras else torch.Tensor.backward
    bare.model.train()
    for i, batch in enumerate(batches):
        if "lr" in extras:
            set_lr(optimizer, bare.lr(epoch * len(batches) + i))
        with ranges("fasttt.augment"):
            pixels = (spec.views.student_pixels(batch.image, batch.index, epoch, batch.extent)
                      if shown is None else shown[i])
        with accelerator.autocast() if "accelerate" in extras else bare.precision:
            with ranges("fasttt.teacher"):
                pass
            with ranges("fasttt.forward_loss"):
                logits = bare.model(pixels)
                loss, parts = spec.objective(logits, batch.label, None)
        with ranges("fasttt.backward"):
            backward(loss)
        with ranges("fasttt.optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with ranges("fasttt.metrics"):
            if "sums" in extras:
                for name, value in _step_sums(loss, parts, logits, batch.label, None).items():
                    sums[name] = sums[name] + value if name in sums else value


def stopwatch(run: Callable[[int], object], device: torch.device,
              clock: Callable[[], float]) -> Callable[[int], float]:
    """`run` (a pass, a function of the epoch) returning its seconds, the device synchronised."""
    def timed(epoch: int) -> float:
        start = clock()
        run(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start
    return timed


def make_loops(recipe: Recipe, spec: GenerationSpec, batches, accelerator, num_classes: int,
               clock: Callable[[], float]) -> tuple[dict[str, Callable[[int], float]], Learner]:
    """Each row's timed pass over the batches, a function of the epoch; the trainer's learner."""
    device = accelerator.device
    model = build_model(recipe.model, recipe.run, num_classes, SEED).to(device)
    optimizer = make_optimizer(model, recipe.optim)
    learner = prepare_learner(build_model(recipe.model, recipe.run, num_classes, SEED),
                              recipe.optim, recipe.schedule, len(batches), accelerator)
    low = LOW_PRECISION.get(accelerator.mixed_precision)  # "no" on a CPU
    bare = Bare(model, optimizer,
                AcceleratedOptimizer(optimizer, device_placement=False,
                                     scaler=accelerator.scaler),
                spec, accelerator,
                contextlib.nullcontext() if low is None else torch.autocast(device.type, low),
                learner.lr)
    shown = [spec.views.student_pixels(b.image, b.index, 0, b.extent) for b in batches]
    drawn, off = terminal_bar(), progress_bar(False)

    def trainer(progress: Progress) -> Callable[[int], float]:
        timed = stopwatch(lambda epoch: train_epoch(learner, batches, spec, epoch, accelerator,
                                                    progress, f"epoch {epoch + 1}"),
                          device, clock)

        def run(epoch: int) -> float:
            # a drawn bar redraws on its own thread, as in train.py; started and
            # stopped (once a generation there) outside the timing
            with progress:
                return timed(epoch)
        return run

    loops = {"bare": stopwatch(lambda epoch: bare_pass(bare, batches, epoch), device, clock),
             "bare, no augmentation": stopwatch(
                 lambda epoch: bare_pass(bare, batches, epoch, shown=shown), device, clock),
             "trainer": trainer(drawn), "trainer, bar off": trainer(off)}
    for name, extra in [*EXTRAS.items(), ("all five", frozenset(EXTRAS.values()))]:
        extras = frozenset([extra]) if isinstance(extra, str) else extra
        loops[f"bare + {name}"] = stopwatch(
            lambda epoch, extras=extras: bare_pass(bare, batches, epoch, extras), device, clock)
    return loops, learner


def time_rounds(loops: dict, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each row in each round, rows rotated round by round."""
    names = list(loops)
    seconds = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            took = loops[name](r)
            if r:  # round 0 warms every row up
                seconds[name].append(took / steps)
    return seconds


def per_call_us(call: Callable[[], object], number: int, clock: Callable[[], float]) -> float:
    """Median over REPEATS of the microseconds one `call()` takes, `number` calls a repeat."""
    times = []
    for _ in range(REPEATS):
        start = clock()
        for _ in range(number):
            call()
        times.append((clock() - start) / number * 1e6)
    return statistics.median(times)


def alone(learner: Learner, batches, spec: GenerationSpec, accelerator) -> dict:
    """Each suspect's calls of one step, and the bare loop's own calls to subtract (or None).

    "of which" entries are parts of the entry above them."""
    device, optimizer, batch = accelerator.device, learner.optimizer, batches[0]
    logits = learner.model(spec.views.student_pixels(batch.image, batch.index, 0, batch.extent))
    loss, parts = spec.objective(logits, batch.label, None)
    total = {}
    progress = terminal_bar()
    task = progress.add_task("suspects", total=10**9, info="")
    weight = torch.ones(16, requires_grad=True, device=device)
    plain = getattr(optimizer, "optimizer", optimizer)

    def ranges():
        for name in RANGES:
            with record_function(f"fasttt.{name}"):
                pass

    def accelerate(wrapped: bool):  # the context entered and a one-op graph's backward
        def call():
            with accelerator.autocast() if wrapped else NO_RANGE:
                loss = (weight * 2).sum()
            accelerator.backward(loss) if wrapped else loss.backward()
        return call

    def step(opt):  # no gradients: the step's own cost, no parameter updated
        def call():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return call

    def step_sums():
        for name, value in _step_sums(loss, parts, logits, batch.label, None).items():
            total[name] = total[name] + value if name in total else value

    def copies():
        batch.image.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)
        batch.index.to(device, non_blocking=True)

    step_lr = len(batches) // 2
    return {
        "record_function ranges (x6)": (ranges, None),
        "accelerator.autocast() and .backward()":
            (accelerate(True), accelerate(False)),
        "AcceleratedOptimizer step+zero_grad": (step(optimizer), step(plain)),
        # accelerate's is_lomo_available(), an uncached importlib find_spec, twice a step
        "of which find_spec('lomo_optim') x2": (lambda: (
            importlib.util.find_spec("lomo_optim"), importlib.util.find_spec("lomo_optim")),
            None),
        "of which inspect.signature(zero_grad)":
            (lambda: inspect.signature(plain.zero_grad), None),
        "_step_sums and their accumulation": (step_sums, None),
        "lr schedule and set_lr": (lambda: set_lr(optimizer, learner.lr(step_lr)), None),
        PROGRESS: (lambda: progress.update(task, advance=1, info="lr 0.1"), None),
        "batch .to(device) x3": (copies, None),
    }


def suspects(calls: dict, number: int, clock: Callable[[], float], in_loop: dict) -> dict:
    """Microseconds per step of each suspect alone, and in the loop where a row measured it."""
    result = {}
    for name, (call, own) in calls.items():
        us = per_call_us(call, number, clock)
        if own is not None:
            us -= per_call_us(own, number, clock)
        result[name] = {"alone_us_per_step": us, "in_loop_us_per_step": in_loop.get(name),
                        "in_sum": not name.startswith("of which")}
    return result


def measure(args: argparse.Namespace, betons: Path) -> dict:
    """Every row's seconds per step in every round, and the suspects."""
    overrides = [f'data.beton_dir="{betons}"', f"optim.batch_size={args.batch}",
                 f'model.name="{args.model}"', "data.num_workers=1", *args.set]
    recipe = load_recipe(args.recipe, overrides)
    if not (betons / "manifest.json").is_file():
        build_betons(["digits", str(betons)])
    accelerator = make_accelerator(recipe.run.mixed_precision, Console(quiet=True))
    device = accelerator.device
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    num_classes = len(json.loads((betons / "manifest.json").read_text())["class_names"])
    spec = GenerationSpec(0, betons, generation_objective(recipe.generations, 0),
                          generation_views(recipe, 0))
    batches = read_batches(recipe, spec, accelerator, args.steps)
    loops, learner = make_loops(recipe, spec, batches, accelerator, num_classes, clock)
    seconds = time_rounds(loops, args.steps, args.rounds)
    added = {name: 1e6 * statistics.median(a - b for a, b in zip(s, seconds["bare"],
                                                                   strict=True))
             for name, s in seconds.items()}
    in_loop = {name: added[f"bare + {name}"] for name in EXTRAS}
    in_loop[PROGRESS] = added["trainer"] - added["trainer, bar off"]
    return {"clock": "wall" if clock is time.perf_counter else "process CPU",
            "device": device.type, "seconds_per_step": seconds, "added_us_per_step": added,
            "suspects": suspects(alone(learner, batches, spec, accelerator),
                                 max(args.steps, 200), clock, in_loop)}


def summarise(result: dict) -> dict:
    """Median ms per step and ratio to bare per row (ratios per round), the gap to explain."""
    s = result["seconds_per_step"]
    ratios = {name: statistics.median(a / b for a, b in zip(v, s["bare"], strict=True))
              for name, v in s.items()}
    return {"trainer_vs_bare": ratios["trainer"], "vs_bare": ratios,
            "median_ms_per_step": {name: 1000 * statistics.median(v) for name, v in s.items()},
            "gap_us_per_step": result["added_us_per_step"]["trainer"],
            "unexplained_us_per_step": result["added_us_per_step"]["trainer"]
            - result["added_us_per_step"]["bare + all five"]
            - result["suspects"][PROGRESS]["in_loop_us_per_step"]}


def report(result: dict, summary: dict, args: argparse.Namespace) -> None:
    """Print the rows, then the suspects alone and in the loop."""
    table = Table(title=f"trainer vs bare loop: {args.model}, batch {args.batch}, "
                        f"{args.steps} steps, median of {args.rounds} rounds, "
                        f"{args.threads} thread(s), {result['clock']} time")
    for column in ("row", "ms per step", "vs bare", "+us per step"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for name in ROWS:
        table.add_row(name, f"{summary['median_ms_per_step'][name]:.3f}",
                      f"{summary['vs_bare'][name]:.3f}",
                      f"{result['added_us_per_step'][name]:.0f}")
    table.add_row("trainer_vs_bare (goal <= 1.05)", "", f"{summary['trainer_vs_bare']:.3f}", "")
    Console().print(table)
    table = Table(title="the suspects: microseconds per step")
    for column in ("suspect", "alone", "in the loop"):
        table.add_column(column, justify="left" if column == "suspect" else "right")
    for name, row in result["suspects"].items():
        loop = row["in_loop_us_per_step"]
        table.add_row(name if row["in_sum"] else f"  {name}", f"{row['alone_us_per_step']:.1f}",
                      "" if loop is None else f"{loop:.0f}")
    table.add_row("the rest: trainer - (bare + all five) - the bar", "",
                  f"{summary['unexplained_us_per_step']:.0f}")
    table.add_row("measured gap, trainer - bare", "", f"{summary['gap_us_per_step']:.0f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    """Measure (the betons built in a scratch directory unless given), print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/digits_d06.toml"))
    parser.add_argument("--model", default="test_vit", help="any timm or fasttt model name")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--betons", type=Path, help="digits betons to read (built if absent)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("bench_out/host_overhead.json"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.betons is not None:
            result = measure(args, args.betons)
        else:
            with tempfile.TemporaryDirectory(prefix="fasttt-host-bench-") as work:
                result = measure(args, Path(work) / "digits")
    finally:
        torch.set_num_threads(threads)
    summary = summarise(result)
    report(result, summary, args)
    out = {"benchmark": "host_overhead",
           "hardware": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "torch": torch.__version__},
           "config": vars(args) | {"recipe": str(args.recipe), "out": str(args.out),
                                   "betons": args.betons and str(args.betons)},
           **summary, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
