"""One generation: train its epochs, evaluate each, checkpoint atomically, resume exactly.

Accelerate owns the device, the processes, mixed precision and gradient sync. FFCV
loaders are built per process (distributed when there are several); they do not pass
through `accelerator.prepare`, which would leave them untouched anyway. Random
augmentation is keyed by (generation key, sample, view) and FFCV's order by generation
key + epoch, so a resumed run replays exactly the batches and views an uninterrupted one
would have seen, and each generation sees its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console
from rich.progress import Progress
from torch.profiler import record_function as _named

from fasttt.augment import eval_images
from fasttt.checkpoint import drop_checkpoints, load_checkpoint, save_checkpoint, save_weights
from fasttt.data import generation_loaders
from fasttt.errors import UserError
from fasttt.files import write_json, write_text
from fasttt.models import build_model
from fasttt.optim import lr_schedule, make_optimizer, sgd_in_graph, step_optimizer
from fasttt.progress import Position, log_line, mean_epoch_seconds, progress_bar
from fasttt.recipe import (
    AugmentConfig,
    OptimConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
    derived_name,
)
from fasttt.rundir import EVAL, METRICS, WEIGHTS, best_and_last
from fasttt.teachers import KeyedView, TopKTeacher, ViewSchedule

# x ln C, chance level: a mean training loss above DIVERGED_LOSS, or a validation loss
# above DIVERGED_VAL_LOSS, has diverged. ln C is a model that learned nothing and says so
# (uniform); 100 x ln C means the true class trails the top logit by ~230 (C = 10) on
# average. The validation loss reads BatchNorm's running statistics, which one short first
# epoch leaves far off in a healthy network (a tiny DenseNet-BC-100 run: 440 x ln C in
# epoch 1), while statistics or weights that blew up give far more (optim.lr=3 on the
# digits: 6e8 x in epoch 1; optim.lr=1: 1.5e8 x in epoch 2). Healthy digits runs stay
# below 2 x (the demo's epochs 1-2 at 1.2 x; a 2-step tiny run at optim.lr=0.3, 9 x). Not
# chance accuracy: the healthy demo is at 14 % (chance 10 %) after its LR peak.
DIVERGED_LOSS = 100
DIVERGED_VAL_LOSS = 10_000
PERCENT = ("train_top1", "teacher_agreement")  # counts shown as % of the samples
# a metrics row's wall-clock fields: they differ from run to run, the others never do (CPU)
TIMINGS = ("images_per_s", "seconds", "loader_wait_s", "step_s")
# (logits, labels, teacher output or None) -> (loss, parts)
Objective = Callable[[torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, dict]]
# (host sample index, view, canvases, extent, the student's pixels) -> teacher output
Teacher = Callable[..., TopKTeacher]


@dataclass(frozen=True)
class GenerationSpec:
    """What distinguishes one generation: where it lives, its objective, views and teacher."""

    index: int
    directory: Path
    objective: Objective
    views: ViewSchedule
    teacher: Teacher | None = None
    order_key: int | None = None  # keys the batch order; None: the views' key

    def batch_order_key(self) -> int:
        """What seeds FFCV's shuffles: the views' key unless the teacher's run chose them."""
        return self.views.key if self.order_key is None else self.order_key


def forward_loss(model: torch.nn.Module, spec: GenerationSpec, images: torch.Tensor,
                 labels: torch.Tensor, index: torch.Tensor, host_index: torch.Tensor,
                 shows: KeyedView, teacher_view: int, extent: torch.Tensor | None,
                 target: TopKTeacher | None, ranges: Callable) -> tuple:
    """A step's device work up to its loss: the student's keyed view `shows`, the teacher's
    answers on `teacher_view` (unless given as `target`), the forward, the loss, and the
    batch's metric sums (`_step_sums`); (loss, sums).

    `ranges` names the phases for a profiler (a no-op outside one). With run.compile_mode =
    "whole-step" this is compiled as one graph, and its backward with it.
    """
    with ranges("fasttt.augment"):
        shown = spec.views.pixels(images, index, shows, extent)
    with ranges("fasttt.teacher"):
        if target is None and spec.teacher is not None:
            target = spec.teacher(host_index, teacher_view, images, extent, shown)
    with ranges("fasttt.forward_loss"):
        logits = model(shown)
        loss, parts = spec.objective(logits, labels, target)
    with ranges("fasttt.metrics"):
        return loss, _step_sums(loss, parts, logits, labels, target)


@dataclass(frozen=True)
class Learner:
    """The model in training, its optimizer, the learning rate as a function of the step,
    how a loss is backpropagated, the step's device work (`forward_loss`, or it compiled
    as one graph) and how the optimizer updates at a learning rate (torch's step, or it
    compiled as one graph)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]
    backward: Callable[[torch.Tensor], None]
    forward_loss: Callable[..., tuple] = forward_loss
    update: Callable[[torch.optim.Optimizer, float], None] = step_optimizer

    @property
    def whole_step(self) -> bool:
        """Whether the step's device work runs as one compiled graph."""
        return self.forward_loss is not forward_loss


def evaluate(model, loader, augment: AugmentConfig, accelerator: Accelerator) -> dict:
    """Loss, top-1 and top-5 accuracy (%) over the whole split, summed over every process."""
    model.eval()
    loss = top1 = top5 = torch.zeros((), device=accelerator.device)
    count = 0
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            logits = model(eval_images(batch, augment, accelerator.device)).float()
            labels = batch.label.to(accelerator.device, non_blocking=True)
            loss = loss + F.cross_entropy(logits, labels, reduction="sum")
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            top1, top5 = top1 + hits[:, 0].sum(), top5 + hits.any(dim=1).sum()
            count += len(labels)
    totals = torch.stack([loss.double(), top1.double(), top5.double(),
                          torch.tensor(count, dtype=torch.float64, device=top1.device)])
    loss, top1, top5, count = accelerator.reduce(totals, reduction="sum").tolist()
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count,
            "val_top5": 100 * top5 / count}


def _step_sums(loss: torch.Tensor, parts: dict, logits: torch.Tensor, labels: torch.Tensor,
               target: TopKTeacher | None) -> dict:
    """One batch's contributions to the epoch's sums, as device tensors (no host sync)."""
    n = len(labels)
    predicted = logits.detach().argmax(dim=1)
    sums = {"train_loss": loss.detach().float() * n,
            **{f"train_{name}": part.float() * n for name, part in parts.items()},
            "train_top1": (predicted == labels).sum()}
    if target is not None:  # does the student follow its teacher, and how sure is the teacher
        ids, probability = target.top1()
        sums["teacher_agreement"] = (predicted == ids).sum()
        sums["teacher_top1_prob"] = probability.float().sum()
    return sums


def _unnamed(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def prepare_learner(model: torch.nn.Module, optim: OptimConfig, schedule: ScheduleConfig,
                    steps_per_epoch: int, accelerator: Accelerator,
                    run: RunConfig | None = None) -> Learner:
    """A fresh model with its optimizer and LR schedule, prepared as every generation's is;
    with `run` compiling the whole step, its device work and update compiled (fp16's loss
    scaling keeps torch's update: its check for infinities reads the host)."""
    optimizer = make_optimizer(model.to(accelerator.device), optim)
    if accelerator.scaler is not None:  # fp16: each generation starts its own loss scale
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    backward = accelerator.backward
    if accelerator.scaler is None:
        # Only fp16's loss scaling needs Accelerate's optimizer wrapper and backward; they
        # add ~0.15 ms of Python to each step (benchmarks/host_overhead.py).
        optimizer, backward = optimizer.optimizer, torch.Tensor.backward
    lr = lr_schedule(optim, schedule, steps_per_epoch)
    if run is None or not run.whole_step:
        return Learner(model, optimizer, lr, backward, forward_loss)
    mode = "reduce-overhead" if accelerator.device.type == "cuda" else "default"  # CUDA graphs
    update = (step_optimizer if accelerator.scaler is not None
              else sgd_in_graph(accelerator.device, mode))
    # Dynamo keeps its graphs with forward_loss's code: a later generation's guards decide
    # whether they serve it.
    return Learner(model, optimizer, lr, backward, torch.compile(forward_loss, mode=mode), update)


def train_step(learner: Learner, batch, spec: GenerationSpec, epoch: int, step: int,
               accelerator: Accelerator) -> tuple[float, dict]:
    """One optimizer step on one batch: its learning rate and its sums (`_step_sums`)."""
    model, device, lr = learner.model, accelerator.device, learner.lr(step)
    # Named ranges so that a torch.profiler trace says where a step's time goes; entered
    # only under a profiler (six cost ~0.1 ms a step, benchmarks/host_overhead.py). FFCV's
    # ToDevice has copied image and label to the device already (the CPU's too), so their
    # copies below return them as they are; only the host index is copied here.
    record_function = _named if torch.autograd._profiler_enabled() else _unnamed
    images = batch.image.to(device, non_blocking=True)
    labels = batch.label.to(device, non_blocking=True)
    index = batch.index.to(device, non_blocking=True)
    shows, teacher_view = spec.views.keyed(spec.views.view(epoch)), spec.views.teacher_view(epoch)
    target, host_index, ranges = None, batch.index, record_function
    if learner.whole_step:
        ranges = _unnamed  # one graph: its phases are not apart
        host_index = index  # no host tensor inside the graph (CUDA graphs refuse one)
        # the key and view as inputs, not constants: one graph for every epoch and student
        shows = shows.on(device)
        if getattr(spec.teacher, "reads_host_memory", False):  # a cache's rows, by host index
            target = spec.teacher(batch.index, teacher_view)
    graph = record_function("fasttt.step_graph") if learner.whole_step else _unnamed("")
    with accelerator.autocast(), graph:
        loss, sums = learner.forward_loss(model, spec, images, labels, index, host_index,
                                          shows, teacher_view, batch.extent, target, ranges)
    with record_function("fasttt.backward"):
        learner.backward(loss)
    with record_function("fasttt.optimizer"):
        learner.update(learner.optimizer, lr)
    return lr, sums


def train_epoch(learner: Learner, loader, spec: GenerationSpec, epoch: int,
                accelerator: Accelerator, progress: Progress, label: str) -> dict:
    """One pass over the training loader; the epoch's metrics, summed over every process.

    Each loss part the objective returns, accuracy and the teacher diagnostics are summed
    on the device and reduced once at the end. `loader_wait_s` is the host's time blocked
    on the loader; `step_s` the rest, which on a GPU includes the final wait for the device.
    """
    learner.model.train()
    steps = len(loader)
    sums, count, waited = {}, 0, 0.0
    task = progress.add_task(label, total=steps, info="")
    start = ready = time.perf_counter()
    for i, batch in enumerate(loader):
        waited += time.perf_counter() - ready
        lr, step_sums = train_step(learner, batch, spec, epoch, epoch * steps + i, accelerator)
        for name, value in step_sums.items():
            # a copy: a CUDA graph's replay overwrites the outputs of the one before
            sums[name] = sums[name] + value if name in sums else value.clone()
        count += len(batch.label)
        progress.update(task, advance=1, info=f"lr {lr:.4g}")
        ready = time.perf_counter()
    progress.remove_task(task)
    names = list(sums)
    totals = torch.stack([*(sums[name].double() for name in names),
                          torch.tensor(count, dtype=torch.float64, device=accelerator.device)])
    *totals, count = accelerator.reduce(totals, reduction="sum").tolist()
    seconds = time.perf_counter() - start  # after the reduce, which waits for the device
    row = {"epoch": epoch + 1, "lr": lr}
    for name, total in zip(names, totals, strict=True):
        row[name] = total / count * (100 if name in PERCENT else 1)
    return row | {"images_per_s": count / seconds, "seconds": seconds,
                  "loader_wait_s": waited, "step_s": seconds - waited}


def check_converging(row: dict, model: torch.nn.Module, num_classes: int, generation: int,
                     lr: float, run_name: str) -> None:
    """Stop a diverged generation before its epoch is checkpointed or it is marked finished.

    Divergence: a non-finite parameter or buffer (BatchNorm's running variance overflows
    while the loss can still look finite), or a training or validation loss that is not
    finite or far above chance (ln C; the TSD, LSR and CP terms are bounded; the validation
    loss is cross-entropy whatever the objective). Blown-up BatchNorm statistics show in
    the validation loss alone: the training loss uses the batch's own.
    """
    floats = {name: value for name, value in model.state_dict().items()
              if value.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist()  # 1 sync
    broken = [name for name, ok in zip(floats, finite, strict=True) if not ok]
    bounds = {"train_loss": DIVERGED_LOSS, "val_loss": DIVERGED_VAL_LOSS}
    far = {name: row[name] for name, times in bounds.items()
           if not (math.isfinite(row[name]) and row[name] <= times * math.log(num_classes))}
    if not broken and not far:
        return
    if broken:
        what = f"{len(broken)} non-finite parameters or buffers (first: {broken[0]})"
    else:
        name, loss = next(iter(far.items()))
        what = (f"the {'training' if name == 'train_loss' else 'validation'} loss reached "
                f"{loss:.3g}, over {bounds[name]:,} x chance (ln {num_classes} = "
                f"{math.log(num_classes):.3g}), at val top-1 {row['val_top1']:.1f}%")
    lower = f"{lr / 10:g}"
    fresh = derived_name(run_name, f"-lr{lower}")
    raise UserError(f"gen{generation} diverged in epoch {row['epoch']}: {what}; nothing of "
                    f"that epoch was saved. Rerun the same command with --set optim.lr={lower} "
                    f"--set run.name={fresh} (the learning rate is part of the run's recipe), "
                    "or with --set run.mixed_precision=no and another run.name if it diverged "
                    "only in low precision")


def train_generation(spec: GenerationSpec, recipe: Recipe, num_classes: int,
                     accelerator: Accelerator, console: Console) -> dict:
    """Train (or resume) one generation to its last epoch; return its eval summary."""
    train, val = generation_loaders(recipe.data, recipe.optim.batch_size,
                                    spec.batch_order_key(), accelerator)
    learner = prepare_learner(build_model(recipe.model, recipe.run, num_classes,
                                          seed=recipe.run.seed + 1000 * spec.index),
                              recipe.optim, recipe.schedule, len(train), accelerator,
                              recipe.run)
    model, optimizer = learner.model, learner.optimizer
    spec.directory.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(spec.directory, accelerator.unwrap_model(model), optimizer,
                            accelerator.scaler) or {"epoch": 0, "history": []}
    if state["epoch"]:
        log_line(console, f"gen{spec.index}: resuming after epoch {state['epoch']}")
    main = accelerator.is_main_process
    epochs = recipe.schedule.epochs
    with progress_bar(main, console) as progress:
        for epoch in range(state["epoch"], epochs):
            position = Position(spec.index, recipe.generations.students, epoch + 1, epochs)
            label = position.label()
            if state["history"]:  # the bar also shows the time left, from the epochs so far
                done = Position(spec.index, recipe.generations.students, epoch, epochs)
                label += f" ({done.eta(mean_epoch_seconds(state['history']))})"
            train.set_epoch(epoch)
            row = train_epoch(learner, train, spec, epoch, accelerator, progress, label)
            # Unwrapped: DDP's forward would broadcast buffers, a collective per eval batch.
            row |= evaluate(accelerator.unwrap_model(model), val, recipe.augment, accelerator)
            check_converging(row, accelerator.unwrap_model(model), num_classes, spec.index,
                             recipe.optim.lr, recipe.run.name)
            state = {"epoch": epoch + 1, "history": [*state["history"], row]}
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(spec.directory, epoch + 1, accelerator.unwrap_model(model),
                                optimizer, accelerator.scaler, state)
                _write_metrics(spec.directory, state["history"])
                log_line(console, f"{position.label()}: {epoch_summary(row)}; "
                                  f"{position.eta(mean_epoch_seconds(state['history']))}")
            accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            accelerator.wait_for_everyone()
    summary = best_and_last(state["history"])
    if main:
        summary["weights_sha256"] = save_weights(accelerator.unwrap_model(model),
                                                 spec.directory / WEIGHTS)
        write_json(spec.directory / EVAL, summary)
        drop_checkpoints(spec.directory)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # let this generation's model and optimizer go
    return summary


def epoch_summary(row: dict) -> str:
    """An epoch's metrics row in a few words: loss, its parts, accuracies, teacher, speed."""
    parts = " + ".join(f"{k[6:]} {v:.3f}" for k, v in row.items()
                       if k.startswith("train_") and k not in ("train_loss", "train_top1"))
    teacher = (f", agrees with teacher {row['teacher_agreement']:.1f}% (teacher top-1 "
               f"p {row['teacher_top1_prob']:.2f})" if "teacher_agreement" in row else "")
    return (f"loss {row['train_loss']:.4f} ({parts}), train {row['train_top1']:.2f}%, val "
            f"{row['val_top1']:.2f}% (loss {row['val_loss']:.3f}){teacher}, "
            f"{row['seconds']:.1f} s ({row['loader_wait_s']:.1f} s waiting for data, "
            f"{row['images_per_s']:.0f} img/s)")


def _write_metrics(directory: Path, history: list[dict]) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run never duplicates
    # or loses a line.
    write_text(directory / METRICS, "".join(json.dumps(row) + "\n" for row in history))
