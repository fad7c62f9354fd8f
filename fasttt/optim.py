"""SGD and the learning rate as a pure function of the step (so resuming is just a step)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from fasttt.recipe import OptimConfig, ScheduleConfig


def peak_lr(optim: OptimConfig) -> float:
    """The recipe's lr after its explicit batch-size scaling rule."""
    if optim.lr_scaling == "linear":
        return optim.lr * optim.batch_size / optim.reference_batch_size
    return optim.lr


def lr_at(step: int, steps_per_epoch: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    """Learning rate for iteration `step` (0-based), per-iteration like FFCV's schedules."""
    epoch = step / steps_per_epoch  # fractional
    top = peak_lr(optim)
    if schedule.kind == "linear":
        start = 0.0 if schedule.peak_epoch > 0 else 1.0
        shape = np.interp(epoch, [0, schedule.peak_epoch, schedule.epochs],
                          [start, 1.0, schedule.end_lr_ratio])
        return float(top * shape)
    passed = sum(epoch >= m for m in schedule.milestones)
    lr = top * schedule.factor**passed
    if schedule.warmup_epochs > 0 and epoch < schedule.warmup_epochs:
        lr *= min(1.0, (step + 1) / (schedule.warmup_epochs * steps_per_epoch))
    return lr


def lr_schedule(optim: OptimConfig, schedule: ScheduleConfig,
                steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate as a function of the step alone, built once per generation."""
    return partial(lr_at, steps_per_epoch=steps_per_epoch, optim=optim, schedule=schedule)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum; norm weights and biases optionally free of decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": optim.weight_decay}]
    else:
        # By shape, as nanoGPT: matrices and kernels decay, vectors (norms, biases) do not.
        groups = [{"params": [p for p in params if p.ndim >= 2],
                   "weight_decay": optim.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # Fused (one kernel for every parameter) on a GPU; on the CPU the foreach update, as
    # the CPU's fused kernel rounds differently: every CPU result so far (the demo's numbers,
    # exact resume against them) was made with foreach.
    fused = all(p.is_cuda for p in params)  # the model must be on its device already
    return torch.optim.SGD(groups, lr=peak_lr(optim), momentum=optim.momentum,
                           nesterov=optim.nesterov and optim.momentum > 0,
                           fused=fused or None, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
