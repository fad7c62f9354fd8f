"""A training step never reads the device from the host: what a whole-step CUDA graph needs.

A read such as `.item()`, `bool(tensor)`, `.tolist()` or a printed tensor waits for the
GPU and cannot be captured in a graph. On the CPU every tensor is on the host, so the
test intercepts the operations that make such a read (`aten._local_scalar_dense`, which
`.item()`, `float()`, `int()` and `bool()` use; `Tensor.tolist` and printing) and fails on any
inside `engine.train_step`; on a GPU it also runs under CUDA's own sync check.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_recipe
from torch.utils._python_dispatch import TorchDispatchMode

from fasttt.betons import read_manifest
from fasttt.cache import build_cache, cache_spec, open_teacher
from fasttt.checkpoint import save_weights
from fasttt.data import generation_loaders, split_loader, train_samples
from fasttt.engine import (
    TIMINGS,
    GenerationSpec,
    forward_loss,
    prepare_learner,
    train_epoch,
    train_step,
)
from fasttt.generation import generation_objective, generation_views
from fasttt.models import build_model
from fasttt.progress import progress_bar
from fasttt.recipe import WHOLE_STEP
from fasttt.teachers import OnlineTeacher

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default}


class NoHostReads(TorchDispatchMode):
    """Fails on any operation that copies a tensor's value to a Python number."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"a host read inside the step: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(monkeypatch, device: torch.device):
    """The step's scope: host reads fail (and on a GPU, any synchronisation)."""

    def read(name: str):
        def fail(self, *args):
            raise AssertionError(f"a host read inside the step: Tensor.{name}")
        return fail

    with monkeypatch.context() as patch:
        for name in ("tolist", "__repr__", "__format__"):  # printing reads past the dispatcher
            patch.setattr(torch.Tensor, name, read(name))
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            with NoHostReads():
                yield
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def test_the_mode_catches_the_reads_it_is_there_for(monkeypatch):
    tensor = torch.ones(3)
    for read in (lambda: tensor.sum().item(), lambda: bool(tensor[0]), lambda: tensor.tolist(),
                 lambda: str(tensor), lambda: f"{tensor[0]}", lambda: float(tensor[0])):
        with pytest.raises(AssertionError, match="host read"):
            with no_host_reads(monkeypatch, tensor.device):
                read()


@pytest.mark.parametrize("compile_mode", ["eager", WHOLE_STEP])
@pytest.mark.parametrize("teacher", [None, "online", "cache"])
def test_a_training_step_reads_nothing_back_from_the_device(digits, tmp_path, monkeypatch,
                                                            teacher, compile_mode):
    # The whole-step path: the key and view moved to the device, a cache read before the
    # graph. Under a dispatch mode dynamo runs the compiled function's Python eagerly, so
    # the mode sees every op of the path; that the graph itself holds no host read is its
    # having no graph break, which test_compile's count of graphs asserts (a read breaks it).
    compiled = {} if compile_mode == "eager" else {"run.compile": "true",
                                                   "run.compile_mode": f'"{WHOLE_STEP}"'}
    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_for_real(
        function, backend="aot_eager"))
    recipe = tiny_recipe(digits, **{"data.train_limit": 64, "optim.batch_size": 16,
                                    "schedule.epochs": 2, "cache.views": 2, **compiled})
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, classes = accelerator.device, 10
    m = 0 if teacher is None else 1
    views = generation_views(recipe, m)
    answers = None
    if teacher is not None:
        model = build_model(recipe.model, recipe.run, classes, seed=7).to(device)
        answers = OnlineTeacher(model, views, classes, recipe.generations.temperature)
    if teacher == "cache":
        save_weights(model, tmp_path / "teacher.safetensors")
        beton = read_manifest(digits)
        spec = cache_spec(tmp_path / "teacher.safetensors", beton,
                          train_samples(recipe.data, beton), views, recipe.cache, classes,
                          recipe.generations.temperature)
        build_cache(tmp_path / "cache", answers, spec,
                    split_loader(recipe.data, accelerator, "train", 32, limit=spec.samples),
                    accelerator)
        answers = open_teacher(tmp_path / "cache", spec, device)
    plan = GenerationSpec(m, tmp_path, generation_objective(recipe.generations, m), views,
                          answers)
    train, _ = generation_loaders(recipe.data, recipe.optim.batch_size, views.key, accelerator)
    learner = prepare_learner(build_model(recipe.model, recipe.run, classes, seed=1),
                              recipe.optim, recipe.schedule, len(train), accelerator,
                              recipe.run)
    assert learner.whole_step == (compile_mode == WHOLE_STEP)
    before = [p.detach().clone() for p in learner.model.parameters()]
    steps = 0
    for epoch in range(2):  # the second epoch reads the second stored view
        train.set_epoch(epoch)
        for step, batch in enumerate(train):
            with no_host_reads(monkeypatch, device):
                _, sums = train_step(learner, batch, plan, epoch, epoch * len(train) + step,
                                     accelerator)
            steps += 1
    assert steps == 8
    assert set(sums) >= {"train_loss", "train_top1"}
    assert ("teacher_agreement" in sums) == (teacher is not None)
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, learner.model.parameters(),
                                                          strict=True)]
    assert np.mean(moved) > 0.5  # the steps trained: the mode did not skip the update


def replaying(step_work):
    """`step_work` (engine.forward_loss) whose metric sums live in buffers that the next
    call overwrites, as a CUDA graph's outputs do when it is replayed."""
    buffers = {}

    def replay(*args):
        loss, sums = step_work(*args)
        for name, value in sums.items():
            buffers.setdefault(name, torch.empty_like(value)).copy_(value)
        return loss, {name: buffers[name] for name in sums}
    return replay


def test_an_epochs_metrics_hold_no_step_output_past_the_next_step(digits, tmp_path):
    # Under CUDA graphs (run.compile_mode = "whole-step" on a GPU) a step's outputs are
    # overwritten by the next replay: the epoch's sums must copy them, never keep them.
    recipe = tiny_recipe(digits, **{"data.train_limit": 64, "optim.batch_size": 16})
    accelerator = Accelerator(cpu=True)
    views = generation_views(recipe, 0)
    plan = GenerationSpec(0, tmp_path, generation_objective(recipe.generations, 0), views, None)
    train, _ = generation_loaders(recipe.data, recipe.optim.batch_size, views.key, accelerator)
    rows = []
    for step_work in (forward_loss, replaying(forward_loss)):
        learner = dataclasses.replace(
            prepare_learner(build_model(recipe.model, recipe.run, 10, seed=1), recipe.optim,
                            recipe.schedule, len(train), accelerator), forward_loss=step_work)
        train.set_epoch(0)
        row = train_epoch(learner, train, plan, 0, accelerator, progress_bar(False), "epoch")
        rows.append({name: value for name, value in row.items() if name not in TIMINGS})
    assert len(train) == 4 and rows[1] == rows[0]
