"""One generation: train its epochs, evaluate each, checkpoint atomically, resume exactly.

Accelerate owns the device, the processes, mixed precision and gradient sync. FFCV
loaders are built per process (distributed when there are several); they do not pass
through `accelerator.prepare`, which would leave them untouched anyway. Random
augmentation is keyed by (seed, sample, epoch), and FFCV's order by seed + epoch, so a
resumed run replays exactly the batches and views an uninterrupted one would have seen.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fasttt.augment import eval_view, train_size, train_view
from fasttt.checkpoint import (
    drop_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    write_json,
    write_text,
)
from fasttt.data import sequential_loader, train_loader
from fasttt.errors import UserError
from fasttt.models import create_model
from fasttt.optim import lr_at, make_optimizer, set_lr
from fasttt.recipe import Recipe

# (logits, labels, teacher output or None) -> (loss, parts)
Objective = Callable[[torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class GenerationSpec:
    """What distinguishes one generation: where it lives, its objective, its teacher."""

    index: int
    directory: Path
    objective: Objective
    teacher: Callable | None = None  # (views, CPU sample index, epoch) -> teacher output
    view_cycle: int = 0  # R: epoch e shows view e mod R (a cache's views); 0: view e


class OnlineTeacher:
    """A frozen model labelling the student's own views, one forward pass per step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.model(views)


def build_model(recipe: Recipe, num_classes: int, seed: int) -> torch.nn.Module:
    """A freshly initialised model of the recipe's architecture, seeded."""
    torch.manual_seed(seed)
    model = create_model(recipe.model.name, num_classes)
    if recipe.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe.run.compile:
        model.compile()  # in place: state_dict keys (and so checkpoints) stay unchanged
    return model


def last_epoch_model(gen_dir: Path, recipe: Recipe, num_classes: int,
                     device: torch.device) -> torch.nn.Module:
    """A generation's LAST-epoch weights (never its best epoch), on `device`."""
    model = build_model(recipe, num_classes, seed=0)
    load_weights(model, gen_dir / "last.safetensors")
    return model.to(device)


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar drawn by the main process only."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                    disable=not enabled, transient=True)


def is_finished(directory: Path) -> bool:
    """A generation is finished once its eval.json exists (written last)."""
    return (directory / "eval.json").is_file()


def _loader_settings(recipe: Recipe, accelerator: Accelerator) -> dict:
    data = recipe.data
    device = accelerator.device if accelerator.device.type == "cuda" else None
    return dict(num_workers=data.num_workers, os_cache=data.os_cache,
                canvas_size=data.canvas_size or None, device=device)


def split_loader(recipe: Recipe, accelerator: Accelerator, split: str, batch_size: int,
                 limit: int = 0):
    """This process's in-order slice of a split: evaluation, analysis and the cache pass."""
    return sequential_loader(recipe.data.beton_dir, split=split, batch_size=batch_size,
                             rank=accelerator.process_index,
                             world_size=accelerator.num_processes, limit=limit,
                             **_loader_settings(recipe, accelerator))


def loaders(recipe: Recipe, accelerator: Accelerator):
    """This process's train loader (its shard) and val loader (its slice)."""
    processes = accelerator.num_processes
    if recipe.optim.batch_size % processes:
        raise UserError(f"optim.batch_size {recipe.optim.batch_size} must divide evenly over "
                        f"{processes} processes")
    per_process = recipe.optim.batch_size // processes
    train = train_loader(recipe.data.beton_dir, batch_size=per_process, seed=recipe.run.seed,
                         distributed=processes > 1, limit=recipe.data.train_limit,
                         **_loader_settings(recipe, accelerator))
    return train, split_loader(recipe, accelerator, "val", 2 * per_process)


def eval_images(batch, recipe: Recipe, device: torch.device) -> torch.Tensor:
    """A batch's un-augmented evaluation view, on `device`."""
    return eval_view(batch.image.to(device, non_blocking=True), size=recipe.augment.eval_size,
                     spec=recipe.augment, extent=batch.extent)


def evaluate(model, loader, recipe: Recipe, accelerator: Accelerator) -> dict:
    """Top-1 and top-5 accuracy (%) over the whole split, summed over every process."""
    model.eval()
    top1 = top5 = torch.zeros((), device=accelerator.device)
    count = 0
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            logits = model(eval_images(batch, recipe, accelerator.device)).float()
            labels = batch.label.to(accelerator.device, non_blocking=True)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            top1, top5 = top1 + hits[:, 0].sum(), top5 + hits.any(dim=1).sum()
            count += len(labels)
    totals = torch.stack([top1, top5, torch.tensor(count, device=top1.device)]).double()
    top1, top5, count = accelerator.reduce(totals, reduction="sum").tolist()
    return {"val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


def train_epoch(model, optimizer, loader, spec: GenerationSpec, recipe: Recipe, epoch: int,
                accelerator: Accelerator, progress: Progress) -> dict:
    """One pass over the training loader; returns the epoch's metrics (all ranks summed)."""
    model.train()
    steps = len(loader)
    loss_sum = correct = torch.zeros((), device=accelerator.device)
    count = 0
    size = train_size(epoch, recipe.augment)
    view = epoch % spec.view_cycle if spec.view_cycle else epoch
    task = progress.add_task(f"gen{spec.index} epoch {epoch + 1}", total=steps, info="")
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        lr = lr_at(epoch * steps + i, steps, recipe.optim, recipe.schedule)
        set_lr(optimizer, lr)
        index = batch.index.to(accelerator.device, non_blocking=True)
        labels = batch.label.to(accelerator.device, non_blocking=True)
        views = train_view(batch.image.to(accelerator.device, non_blocking=True), index,
                           seed=recipe.run.seed, view=view, size=size, spec=recipe.augment,
                           extent=batch.extent)
        with accelerator.autocast():
            logits = model(views)
            target = spec.teacher(views, batch.index, epoch) if spec.teacher else None
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
    if not math.isfinite(loss_sum):
        raise UserError(f"gen{spec.index}: the loss became non-finite in epoch {epoch + 1}: "
                        "lower optim.lr or use mixed_precision = \"no\"")
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / count,
            "train_top1": 100 * correct / count, "images_per_s": count / seconds,
            "seconds": seconds}


def _summary(history: list[dict]) -> dict:
    best = max(history, key=lambda row: row["val_top1"])
    pick = ("epoch", "val_top1", "val_top5")
    return {"best": {k: best[k] for k in pick}, "last": {k: history[-1][k] for k in pick}}


def train_generation(spec: GenerationSpec, recipe: Recipe, num_classes: int,
                     accelerator: Accelerator, console: Console) -> dict:
    """Train (or resume) one generation to its last epoch; return its eval summary."""
    model = build_model(recipe, num_classes, recipe.run.seed + 1000 * spec.index)
    optimizer = make_optimizer(model.to(accelerator.device), recipe.optim)
    if accelerator.scaler is not None:  # fp16: each generation starts its own loss scale
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    train, val = loaders(recipe, accelerator)
    spec.directory.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(spec.directory, accelerator.unwrap_model(model), optimizer,
                            accelerator.scaler) or {"epoch": 0, "history": []}
    if state["epoch"]:
        console.print(f"gen{spec.index}: resuming after epoch {state['epoch']}")
    main = accelerator.is_main_process
    with progress_bar(main) as progress:
        for epoch in range(state["epoch"], recipe.schedule.epochs):
            train.set_epoch(epoch)
            row = train_epoch(model, optimizer, train, spec, recipe, epoch, accelerator,
                               progress)
            # Unwrapped: DDP's forward would broadcast buffers, a collective per eval batch.
            row |= evaluate(accelerator.unwrap_model(model), val, recipe, accelerator)
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
        save_weights(accelerator.unwrap_model(model), spec.directory / "last.safetensors")
        write_json(spec.directory / "eval.json", summary)
        drop_checkpoints(spec.directory)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # let this generation's model and optimizer go
    return summary


def _write_metrics(directory: Path, history: list[dict]) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run never duplicates
    # or loses a line.
    write_text(directory / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
