"""run.compile: a compiled run trains what the eager one trains, with the same checkpoints.

On a GPU the run is compiled for real and replays CUDA graphs ("reduce-overhead");
benchmarks/gpu_check.py runs this module there. On the CPU the graphs are captured and
differentiated as torch.compile does, without inductor's C++ code generation.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import RECIPE, tiny_run_flags
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend

from fasttt.engine import PERCENT
from fasttt.models import build_model, decide_compile
from fasttt.recipe import AugmentConfig, ModelConfig, RunConfig
from fasttt.rundir import METRICS, WEIGHTS
from fasttt.teachers import OnlineTeacher, ViewSchedule
from fasttt.train import main as train

COMPILED = {"run.compile": "true", "run.compile_mode": '"reduce-overhead"'}
WHOLE_STEP = {"run.compile": "true", "run.compile_mode": '"whole-step"'}
# A patriarch, then a student taught online: the compiled teacher's outputs must outlive
# the student's own forward and backward in the same step (CUDA graphs reuse memory).
RUN = {"data.train_limit": 128, "generations.students": 1, "cache.mode": '"online"'}


def test_a_compiled_run_trains_like_the_eager_one(digits, tmp_path, monkeypatch):
    # The model compiled, and the whole step's device work compiled as one graph (its
    # online teacher inside): each against the eager run.
    modes, compile_for_real = [], torch.compile

    def spy(function, **kwargs):
        modes.append((getattr(function, "__name__", ""), kwargs.get("mode")))
        if torch.cuda.is_available():
            return compile_for_real(function, **kwargs)
        # On the CPU inductor's C++ code generation alone would cost this suite ~75 s:
        # dynamo and AOTAutograd capture and differentiate the same graphs, run eagerly.
        return compile_for_real(function, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    rows, weights = {}, {}
    for name, settings in (("eager", {}), ("compiled", COMPILED), ("whole-step", WHOLE_STEP)):
        train([str(RECIPE), *tiny_run_flags(digits, **RUN, **settings), "--runs-dir",
               str(tmp_path / name)])
        run = tmp_path / name / "digits_d06"
        rows[name] = [json.loads(line) for gen in ("gen0", "gen1")
                      for line in (run / gen / METRICS).read_text().splitlines()]
        weights[name] = load_file(str(run / "gen1" / WEIGHTS))
    # the patriarch, its student, the teacher, and the models the report's analysis load;
    # then each generation's step, its device work and its update each as one graph (CUDA
    # graphs on a GPU)
    graphed = "reduce-overhead" if torch.cuda.is_available() else "default"
    steps = [(name, mode) for name, mode in modes if name in ("forward_loss", "sgd_update")]
    assert sorted(steps) == 2 * [("forward_loss", graphed)] + 2 * [("sgd_update", graphed)]
    models = [mode for name, mode in modes if name not in ("forward_loss", "sgd_update")]
    assert len(models) >= 3 and set(models) == {"reduce-overhead"}
    for name in ("compiled", "whole-step"):
        check_trains_like_eager(rows[name], rows["eager"], weights[name], weights["eager"])


def check_trains_like_eager(rows: list, eager_rows: list, weights: dict, eager_weights: dict):
    """A compiled run's metrics rows and last weights against the eager run's."""
    assert list(weights) == list(eager_weights)  # the same checkpoint keys
    assert [r["epoch"] for r in rows] == [1, 2, 1, 2]
    # Fused kernels sum in another order: close, not equal. Two epochs leave the models
    # near chance, where a small change flips many argmaxes of the val split: its top-1 is
    # left out, its loss compared loosely.
    for compiled, eager in zip(rows, eager_rows, strict=True):
        assert compiled.keys() == eager.keys()
        for key, value in eager.items():
            if key in PERCENT:  # of 128 training samples: within two of them
                assert math.isclose(compiled[key], value, abs_tol=100 * 2 / 128), key
            elif key.startswith("train_") or key == "teacher_top1_prob":
                assert math.isclose(compiled[key], value, rel_tol=2e-2), key
        assert math.isclose(compiled["val_loss"], eager["val_loss"], rel_tol=0.1)


@pytest.mark.parametrize("name,side", [("cifar_resnet20", 32), ("cifar_densenet_bc100", 32),
                                       ("resnet18", 64)])
def test_the_recipes_models_train_as_one_graph(name, side):
    # A graph break splits a CUDA graph and, where it reads a value, syncs with the host.
    model = build_model(ModelConfig(name=name), RunConfig(), 100, seed=0)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, side, side))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_one_run_compiles_one_training_and_one_evaluation_graph(digits, tmp_path, monkeypatch,
                                                                capsys):
    # Every generation has the same architecture and shapes: gen0's graphs serve each
    # student, each teacher's cache build, the evaluations and the analysis. A frozen
    # teacher or inference tensors would each compile a graph of their own.
    torch._dynamo.reset()
    counter, compile_for_real = CompileCounterWithBackend("aot_eager"), torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_for_real(
        function, backend=counter))
    train([str(RECIPE), *tiny_run_flags(digits, **{**RUN, **COMPILED,
                                                   "cache.mode": '"precomputed"'}),
           "--runs-dir", str(tmp_path)])
    torch._dynamo.reset()
    assert counter.frame_count == 2
    out = capsys.readouterr().out
    assert re.search(r"torch.compile \(reduce-overhead\): 2 graphs compiled in \S+, used by 2 "
                     r"generations and their teachers", out), out


def test_the_whole_steps_device_work_is_one_graph_for_every_epoch_and_student(
        digits, tmp_path, monkeypatch, capsys):
    # Three graphs for three generations of two epochs: the patriarch's step and the
    # students' (the key and view are inputs, not constants), no graph break, none per
    # view; and one SGD update for every optimizer and learning rate. A cache's rows are
    # read by the host index before the graph, which would otherwise trace its
    # memory-mapped arrays.
    torch._dynamo.reset()
    counter, compile_for_real = CompileCounterWithBackend("aot_eager"), torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_for_real(
        function, backend=counter))
    train([str(RECIPE), *tiny_run_flags(digits, **{**RUN, **WHOLE_STEP, "generations.students": 2,
                                                   "cache.mode": '"precomputed"'}),
           "--runs-dir", str(tmp_path)])
    torch._dynamo.reset()
    assert counter.frame_count == 3
    out = capsys.readouterr().out
    assert "teacher cache: 1/" in out  # the students were taught from a cache
    assert re.search(r"torch.compile \(whole-step\): 3 graphs compiled in \S+, used by 3 "
                     r"generations \(their training steps\)", out), out


@pytest.mark.parametrize("compile_, kind, device, decided", [
    ("auto", "pad_crop", "cuda", (True, "reduce-overhead")),
    ("auto", "pad_crop", "cpu", (False, "default")),
    ("auto", "resized_crop", "cuda", (False, "default")),  # photos: not measured to win
    (False, "pad_crop", "cuda", (False, "default")),
    (True, "resized_crop", "cpu", (True, "default")),
])
def test_compile_auto_is_decided_by_the_device_and_the_images(compile_, kind, device, decided):
    run = decide_compile(RunConfig(compile=compile_), kind, torch.device(device))
    assert (run.compile, run.compile_mode) == decided


class PooledOutputs(torch.nn.Module):
    """`model`, its outputs returned in memory shared with every other PooledOutputs of
    `pool`: as CUDA graph trees hand one pool to all of a device's graphs, where the next
    graph's replay overwrites what the last one returned."""

    def __init__(self, model: torch.nn.Module, pool: dict):
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        shared = self.pool.setdefault(out.shape, torch.empty(out.shape, dtype=out.dtype))
        shared.copy_(out.detach())
        return out if out.requires_grad else shared  # a student's keeps its autograd


def test_an_online_teachers_answers_outlive_the_students_forward_in_float32():
    # In float32 (run.mixed_precision = "no") `.float()` is the teacher's output itself: a
    # model compiled with CUDA graphs would have the student's forward overwrite it before
    # the loss reads it.
    torch.manual_seed(0)
    teacher_model, student = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
                              for _ in range(2))
    views = ViewSchedule(key=1, epochs=2, count=2, augment=AugmentConfig())
    shown, index = torch.randn(8, 3, 4, 4), torch.arange(8)
    pool = {}
    asked = OnlineTeacher(PooledOutputs(teacher_model, pool), views, 10, 1.0)
    answers = asked(index, 0, shown, None, shown)
    PooledOutputs(student, pool)(shown)  # the student's forward, replayed into the pool
    expected = OnlineTeacher(teacher_model, views, 10, 1.0)(index, 0, shown, None, shown)
    assert torch.equal(answers.values, expected.values)
    assert torch.equal(answers.log_partition, expected.log_partition)
