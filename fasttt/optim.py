"""SGD and the learning rate as a pure function of the step (so resuming is just a step).

A step's update is torch's SGD (`step_optimizer`), or under run.compile_mode = "whole-step"
the same update as one compiled graph (`sgd_in_graph`) with the learning rate a device
tensor, so that no step reads it from the host or compiles again when it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import Tensor

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


def step_optimizer(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One update at learning rate `lr`, then the gradients dropped."""
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Per parameter group: its parameters, their gradients, their momentum buffers (None
# without momentum), weight decay, momentum and Nesterov.
SGDGroup = tuple[list[Tensor], list[Tensor], "list[Tensor] | None", float, float, bool]


def sgd_update(groups: list[SGDGroup], lr: Tensor) -> None:
    """torch.optim.SGD's update (no dampening) with `lr` a tensor it never reads on the host."""
    with torch.no_grad():
        for params, grads, buffers, decay, momentum, nesterov in groups:
            if decay:
                grads = torch._foreach_add(grads, params, alpha=decay)
            if buffers is not None:
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
            torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


def sgd_in_graph(device: torch.device, mode: str) -> Callable[[torch.optim.SGD, float], None]:
    """`step_optimizer` as one graph compiled in torch.compile's `mode` on `device`.

    The optimizer keeps its state as torch's SGD does, so checkpoints are the same either
    way. Its momentum buffers start as zeros rather than at the first gradient (the same
    numbers: 0 x momentum + gradient), so that every step is one graph. Dynamo keeps the
    graph with `sgd_update`'s code and guards on the tensors' shapes, not their identity:
    every generation's optimizer steps with the first one's.
    """
    update = torch.compile(sgd_update, mode=mode)
    lr_on_device = torch.zeros((), device=device)

    def step(optimizer: torch.optim.SGD, lr: float) -> None:
        set_lr(optimizer, lr)  # kept in the state dict, as torch's step would read it
        lr_on_device.fill_(lr)
        groups = [_sgd_group(optimizer, group) for group in optimizer.param_groups]
        # torch's foreach ops refuse empty lists; torch's step skips such a group too
        update([group for group in groups if group[0]], lr_on_device)
        optimizer.zero_grad(set_to_none=True)

    return step


def _sgd_group(optimizer: torch.optim.SGD, group: dict) -> SGDGroup:
    params = [p for p in group["params"] if p.grad is not None]  # as torch skips them
    buffers = None
    if group["momentum"]:
        buffers = []
        for p in params:
            state = optimizer.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            # Updated in place by the graph, so a CUDA graph keeps it rather than a copy; a
            # resumed or new optimizer's buffers are elsewhere: re-recorded, not recompiled.
            torch._dynamo.mark_static_address(state["momentum_buffer"], guard=False)
            buffers.append(state["momentum_buffer"])
    return (params, [p.grad for p in params], buffers, group["weight_decay"],
            group["momentum"], group["nesterov"])
