"""Failures a cluster, a full disk and bit rot cause: never a hang, never damaged data used,
always one line whose advice works (each test follows the advice and reruns).

This module: hangs, and recipes refused before anything is written. By concern beside it:
test_failures_damage.py (damaged or missing files, one writer per run),
test_failures_signals.py, test_failures_disk.py (full disks) and
test_failures_machines.py (several machines).
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import one_line_refusal, tiny_run_args, write_image_folder

from beton_builders.__main__ import main as build_betons
from fasttt.data import sequential_loader
from fasttt.train import main as train

NAME = "digits_d06"


# ---------------------------------------------------------------- hangs


def test_leaving_an_epoch_whose_reader_has_finished_returns_at_once(digits):
    loader = sequential_loader(digits, split="val", batch_size=64, num_workers=1)
    outcome = []

    def consume():
        try:
            for _ in loader:
                time.sleep(1)  # the reader queues the rest and waits to say "done"
                raise ValueError("a failing step")
        except ValueError:
            outcome.append("raised")

    worker = threading.Thread(target=consume, daemon=True)
    start = time.perf_counter()
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the loader's reader thread was left waiting forever"
    assert outcome == ["raised"] and time.perf_counter() - start < 10


@pytest.mark.parametrize("overrides,needles", [
    ({"generations.k": 11}, ("generations.k = 11 exceeds the 10 classes",
                             "set generations.k to at most 10")),
])
def test_a_recipe_that_cannot_fit_the_data_is_refused_before_anything_is_written(
        digits, tmp_path, overrides, needles):
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path / "runs", **overrides)), *needles)
    assert not (tmp_path / "runs").exists()
    train(tiny_run_args(digits, tmp_path / "runs", **{"generations.k": 10}))  # the advice works


def test_pad_crop_on_photos_is_refused_before_anything_is_written(tmp_path):
    write_image_folder(tmp_path / "src", corrupt=False)
    build_betons(["imagefolder", str(tmp_path / "src"), str(tmp_path / "photos"),
                  "--max-resolution", "64", "--num-workers", "1"])
    args = tiny_run_args(tmp_path / "photos", tmp_path / "runs", **{
        "data.canvas_size": 64, "data.train_limit": 0, "optim.batch_size": 2,
        "generations.k": 2})
    one_line_refusal(lambda: train(args), 'augment.kind = "pad_crop" is for fixed-size images',
                     'set augment.kind = "resized_crop"')
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- divergence


def test_divergence_stops_the_generation_before_anything_is_saved(digits, tmp_path):
    args = tiny_run_args(digits, tmp_path / "runs", **{"optim.lr": 1000})
    message = one_line_refusal(lambda: train(args), "gen0 diverged in epoch ",
                               "--set optim.lr=100", "run.name")
    epoch = int(message.split("diverged in epoch ")[1].split(":")[0])
    gen0 = tmp_path / "runs" / NAME / "gen0"
    assert not (gen0 / "eval.json").exists() and not (gen0 / f"ckpt-{epoch:04d}").exists()
    assert "non-finite" in message or "loss reached" in message
