"""One generation: train its epochs, evaluate each, checkpoint atomically, resume exactly.

Accelerate owns the device, the processes, mixed precision and gradient sync. FFCV
loaders are built per process (distributed when there are several); they do not pass
through `accelerator.prepare`, which would leave them untouched anyway. Random
augmentation is keyed by (generation key, sample, view) and FFCV's order by generation
key + epoch, so a resumed run replays exactly the batches and views an uninterrupted one
would have seen, and each generation sees its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import Progress

from fasttt.augment import eval_images
from fasttt.checkpoint import drop_checkpoints, load_checkpoint, save_checkpoint, save_weights
from fasttt.data import generation_loaders
from fasttt.errors import UserError
from fasttt.files import write_json, write_text
from fasttt.models import build_model
from fasttt.optim import lr_schedule, make_optimizer, set_lr
from fasttt.progress import progress_bar
from fasttt.recipe import AugmentConfig, Recipe
from fasttt.rundir import EVAL, METRICS, WEIGHTS
from fasttt.teachers import TopKTeacher, ViewSchedule

DIVERGED_LOSS = 100  # x ln C, chance level: a mean epoch loss above it has diverged
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


@dataclass(frozen=True)
class Learner:
    """The model in training, its optimizer, and the learning rate as a function of the step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]


def evaluate(model, loader, augment: AugmentConfig, accelerator: Accelerator) -> dict:
    """Top-1 and top-5 accuracy (%) over the whole split, summed over every process."""
    model.eval()
    top1 = top5 = torch.zeros((), device=accelerator.device)
    count = 0
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            logits = model(eval_images(batch, augment, accelerator.device)).float()
            labels = batch.label.to(accelerator.device, non_blocking=True)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            top1, top5 = top1 + hits[:, 0].sum(), top5 + hits.any(dim=1).sum()
            count += len(labels)
    totals = torch.stack([top1, top5, torch.tensor(count, device=top1.device)]).double()
    top1, top5, count = accelerator.reduce(totals, reduction="sum").tolist()
    return {"val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


def train_epoch(learner: Learner, loader, spec: GenerationSpec, epoch: int,
                accelerator: Accelerator, progress: Progress) -> dict:
    """One pass over the training loader; returns the epoch's metrics (all ranks summed)."""
    model, optimizer, device = learner.model, learner.optimizer, accelerator.device
    model.train()
    steps = len(loader)
    loss_sum = correct = torch.zeros((), device=device)
    count = 0
    teacher_view = spec.views.teacher_view(epoch)
    task = progress.add_task(f"gen{spec.index} epoch {epoch + 1}", total=steps, info="")
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        lr = learner.lr(epoch * steps + i)
        set_lr(optimizer, lr)
        images = batch.image.to(device, non_blocking=True)
        labels = batch.label.to(device, non_blocking=True)
        shown = spec.views.student_pixels(images, batch.index.to(device, non_blocking=True),
                                          epoch, batch.extent)
        with accelerator.autocast():
            logits = model(shown)
            target = (spec.teacher(batch.index, teacher_view, images, batch.extent, shown)
                      if spec.teacher else None)
            loss, _ = spec.objective(logits, labels, target)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Sums stay on the device: no host synchronisation inside the step loop.
        loss_sum = loss_sum + loss.detach().float() * len(labels)
        correct = correct + (logits.detach().argmax(dim=1) == labels).sum()
        count += len(labels)
        progress.update(task, advance=1, info=f"lr {lr:.4g}")
    progress.remove_task(task)
    totals = torch.stack([loss_sum.double(), correct.double(),
                          torch.tensor(count, dtype=torch.float64, device=correct.device)])
    loss_sum, correct, count = accelerator.reduce(totals, reduction="sum").tolist()
    seconds = time.perf_counter() - start  # after the reduce, which waits for the device
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / count,
            "train_top1": 100 * correct / count, "images_per_s": count / seconds,
            "seconds": seconds}


def check_converging(row: dict, model: torch.nn.Module, num_classes: int, generation: int,
                     lr: float) -> None:
    """Stop a diverged generation before its epoch is checkpointed or it is marked finished.

    Divergence: a non-finite loss, a loss far above chance (ln C; the TSD, LSR and CP
    terms are bounded), or a non-finite parameter or buffer (BatchNorm's running
    variance overflows while the loss can still look finite).
    """
    floats = {name: value for name, value in model.state_dict().items()
              if value.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist()  # 1 sync
    broken = [name for name, ok in zip(floats, finite, strict=True) if not ok]
    loss = row["train_loss"]
    if math.isfinite(loss) and loss <= DIVERGED_LOSS * math.log(num_classes) and not broken:
        return
    what = (f"{len(broken)} non-finite parameters or buffers (first: {broken[0]})" if broken
            else f"the training loss reached {loss:.3g}")
    raise UserError(f"gen{generation} diverged in epoch {row['epoch']}: {what}; nothing of "
                    f"that epoch was saved. Rerun the same command with --set "
                    f"optim.lr={lr / 10:g} and another --set run.name (the learning rate is "
                    "part of the run's recipe), or with --set run.mixed_precision=no if it "
                    "diverged only in low precision")


def _summary(history: list[dict]) -> dict:
    best = max(history, key=lambda row: row["val_top1"])
    pick = ("epoch", "val_top1", "val_top5")
    return {"best": {k: best[k] for k in pick}, "last": {k: history[-1][k] for k in pick}}


def train_generation(spec: GenerationSpec, recipe: Recipe, num_classes: int,
                     accelerator: Accelerator, console: Console) -> dict:
    """Train (or resume) one generation to its last epoch; return its eval summary."""
    model = build_model(recipe.model, recipe.run, num_classes,
                        seed=recipe.run.seed + 1000 * spec.index)
    optimizer = make_optimizer(model.to(accelerator.device), recipe.optim)
    if accelerator.scaler is not None:  # fp16: each generation starts its own loss scale
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    train, val = generation_loaders(recipe.data, recipe.optim.batch_size, spec.views.key,
                                    accelerator)
    learner = Learner(model, optimizer, lr_schedule(recipe.optim, recipe.schedule, len(train)))
    spec.directory.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(spec.directory, accelerator.unwrap_model(model), optimizer,
                            accelerator.scaler) or {"epoch": 0, "history": []}
    if state["epoch"]:
        console.print(f"gen{spec.index}: resuming after epoch {state['epoch']}")
    main = accelerator.is_main_process
    with progress_bar(main) as progress:
        for epoch in range(state["epoch"], recipe.schedule.epochs):
            train.set_epoch(epoch)
            row = train_epoch(learner, train, spec, epoch, accelerator, progress)
            check_converging(row, accelerator.unwrap_model(model), num_classes, spec.index,
                             recipe.optim.lr)
            # Unwrapped: DDP's forward would broadcast buffers, a collective per eval batch.
            row |= evaluate(accelerator.unwrap_model(model), val, recipe.augment, accelerator)
            state = {"epoch": epoch + 1, "history": [*state["history"], row]}
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(spec.directory, epoch + 1, accelerator.unwrap_model(model),
                                optimizer, accelerator.scaler, state)
                _write_metrics(spec.directory, state["history"])
                console.print(f"gen{spec.index} epoch {row['epoch']}: loss {row['train_loss']:.4f}"
                              f" train {row['train_top1']:.2f}% val {row['val_top1']:.2f}%"
                              f" ({row['images_per_s']:.0f} img/s)")
            accelerator.wait_for_everyone()
    summary = _summary(state["history"])
    if main:
        summary["weights_sha256"] = save_weights(accelerator.unwrap_model(model),
                                                 spec.directory / WEIGHTS)
        write_json(spec.directory / EVAL, summary)
        drop_checkpoints(spec.directory)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # let this generation's model and optimizer go
    return summary


def _write_metrics(directory: Path, history: list[dict]) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run never duplicates
    # or loses a line.
    write_text(directory / METRICS, "".join(json.dumps(row) + "\n" for row in history))
