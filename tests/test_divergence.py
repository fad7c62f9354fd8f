"""A generation that diverged is stopped before it is saved, and a teacher whose logits
overflow the cache's float16 is kept: each refusal's advice is followed and trains."""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import mark_finished, one_line_refusal, tiny_run_args
from safetensors.torch import load_file, save_file

import fasttt.train as train_module
from fasttt.engine import DIVERGED_VAL_LOSS, check_converging
from fasttt.rundir import EVAL, METRICS, WEIGHTS
from fasttt.train import main as train

NAME = "digits_d06"


@contextlib.contextmanager
def training_only():
    """train.py without its analysis and report (seconds each; not what is tested here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "analyze_run", lambda *args: None)
        patch.setattr(train_module, "write_report", lambda run_dir, console: run_dir)
        yield


def advised_flags(message: str, before: str, after: str | None = None) -> list[str]:
    """The command-line flags a refusal advises, between `before` and `after`."""
    text = message.split(before, 1)[1]
    return shlex.split(text.split(after, 1)[0] if after else text)


@pytest.fixture(scope="module")
def advised(digits, tmp_path_factory) -> tuple[str, list[str], Path]:
    """(the refusal of a run that diverged, the command its advice gives, the runs dir),
    the advice followed once: its run finished."""
    runs = tmp_path_factory.mktemp("diverged") / "runs"
    # optim.lr=1 blows up ResNet-20's BatchNorm running statistics in epoch 2: the training
    # loss (batch statistics) stays below 2 x chance while the validation loss reaches 1e8.
    args = tiny_run_args(digits, runs, **{"optim.lr": 1, "model.name": '"cifar_resnet20"'})
    message = one_line_refusal(lambda: train(args), "gen0 diverged in epoch 2: ")
    gen0 = runs / NAME / "gen0"  # epoch 1 claimed the run: the advice names another
    assert (gen0 / "ckpt-0001").is_dir()
    assert not (gen0 / "ckpt-0002").exists() and not (gen0 / EVAL).exists()
    rerun = args + advised_flags(message, "Rerun the same command with ", " (")
    with training_only():
        train(rerun)
    return message, rerun, runs


def test_a_validation_loss_far_above_chance_stops_the_generation_and_the_advice_trains(
        advised):
    message, _, runs = advised
    for needle in ("gen0 diverged in epoch 2: the validation loss reached ",
                   "over 10,000 x chance (ln 10 = 2.3)", "nothing of that epoch was saved",
                   f"Rerun the same command with --set optim.lr=0.1 --set run.name={NAME}-lr0.1 "):
        assert needle in message, (needle, message)
    rows = [json.loads(line) for line in (runs / f"{NAME}-lr0.1" / "gen0" / METRICS)
            .read_text().splitlines()]
    assert len(rows) == 2 and all(r["val_loss"] < DIVERGED_VAL_LOSS * math.log(10) for r in rows)


def test_the_divergence_bound_leaves_a_model_that_learned_nothing_alone():
    model = torch.nn.Linear(2, 100)
    row = {"epoch": 1, "train_loss": 4.6, "val_top1": 1.0}
    # chance, well above it, and a short first epoch's BatchNorm statistics (a tiny DenseNet)
    for healthy in (math.log(100), 10 * math.log(100), 2.03e3):
        check_converging(row | {"val_loss": healthy}, model, 100, 0, 0.1, "r")
    for diverged in (10_001 * math.log(100), math.nan, math.inf):
        one_line_refusal(lambda v=diverged: check_converging(row | {"val_loss": v}, model, 100,
                                                             2, 0.1, "r"),
                         "gen2 diverged in epoch 1: the validation loss reached",
                         "--set optim.lr=0.01 --set run.name=r-lr0.01")


def test_a_teacher_too_confident_for_float16_is_kept_by_the_run_the_advice_starts(
        advised, tmp_path):
    _, command, finished = advised
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs)
    command = [runs if arg == str(finished) else arg for arg in command]
    name = f"{NAME}-lr0.1"
    gen0 = runs / name / "gen0"
    state = load_file(gen0 / WEIGHTS)  # its logits x 1e5: beyond float16's 65504
    state["fc.weight"], state["fc.bias"] = state["fc.weight"] * 1e5, state["fc.bias"] * 1e5
    save_file(state, gen0 / WEIGHTS)
    mark_finished(gen0)
    students = [*map(str, command), "--set", "generations.students=1"]
    message = one_line_refusal(lambda: train(students), f"the teacher {gen0}'s logits reach ",
                               'beyond cache.dtype = "float16" (at most 65504)',
                               "--set cache.dtype=float32",
                               f"--set generations.teacher={gen0}",
                               "--set generations.students=1", f"--set run.name={name}-float32")
    # what the advice said before: refused, as the claimed run keeps its recipe's dtype
    one_line_refusal(lambda: train([*students, "--set", "cache.dtype=float32"]),
                     "cache.dtype is \"float16\"", "pick another run.name")
    with training_only():
        train(students + advised_flags(message, "adding "))
    assert (runs / f"{name}-float32" / "gen1" / EVAL).is_file()
    assert json.loads((gen0 / "cache" / "manifest.json").read_text())["dtype"] == "float32"
