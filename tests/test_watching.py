"""Watching a long run: metrics that explain it, trackers, log lines a person can follow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPE, ROOT, one_line_refusal, tiny_run_flags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from fasttt.train import main as train

NAME = "digits_d06"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def piped(two_generation_run) -> tuple[Path, str]:
    """A patriarch and one student trained by `python fasttt/train.py`, stdout to a pipe,
    TensorBoard on (the shared run: read it, never write into it): (its run directory, what
    it printed)."""
    return two_generation_run / "runs" / NAME, (two_generation_run / "stdout.txt").read_text()


def metrics(run: Path, m: int) -> list[dict]:
    """Generation m's metrics.jsonl rows."""
    return [json.loads(line) for line in (run / f"gen{m}" / "metrics.jsonl").open()]


def test_each_epoch_records_loss_parts_validation_loss_teacher_and_time(piped):
    run, _ = piped
    for m, parts in ((0, ("train_ce", "train_tsd")), (1, ("train_ce", "train_kl"))):
        for row in metrics(run, m):
            assert all(row[p] >= 0 for p in (*parts, "val_loss", "loader_wait_s", "step_s"))
            assert row["loader_wait_s"] + row["step_s"] == pytest.approx(row["seconds"])
            teacher = ("teacher_agreement", "teacher_top1_prob")
            assert all((k in row) == (m > 0) for k in teacher), row
    for row in metrics(run, 1):  # lam CE + (1 - lam) KL at T = 1, lam = 0.6
        assert row["train_loss"] == pytest.approx(0.6 * row["train_ce"] + 0.4 * row["train_kl"],
                                                  rel=1e-4)
        assert 0 <= row["teacher_agreement"] <= 100 and 0 < row["teacher_top1_prob"] <= 1
    assert (run / "figures" / "loss_components.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert "figures/loss_components.png" in summary["figures"]


def test_tensorboard_holds_one_run_per_generation_with_every_metric(piped):
    run, _ = piped
    runs = {p.parent.relative_to(run.parent) for p in run.rglob("events.out.tfevents.*")}
    assert runs == {Path(NAME, "gen0"), Path(NAME, "gen1")}, runs  # as --logdir names them
    for m in (0, 1):
        events = EventAccumulator(str(run / f"gen{m}"))
        events.Reload()
        rows = metrics(run, m)
        for key in ("train_loss", "train_ce", "val_loss", "val_top1", "loader_wait_s"):
            points = events.Scalars(key)
            assert [p.step for p in points] == [r["epoch"] for r in rows]
            assert [p.value for p in points] == pytest.approx([r[key] for r in rows], rel=1e-6)
        values = hparams_of(events)
        assert values["generation"] == m and values["generations.lam"] == pytest.approx(0.6)


def hparams_of(events: EventAccumulator) -> dict:
    """The hyperparameters TensorBoard's HParams dashboard shows for a run."""
    raw = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = HParamsPluginData.FromString(raw).session_start_info
    return {key: getattr(value, value.WhichOneof("kind"))
            for key, value in start.hparams.items()}


def test_piped_output_is_one_timestamped_line_per_epoch_with_position_and_eta(piped):
    _, stdout = piped
    lines = [line for line in stdout.splitlines() if re.match(rf"{STAMP} gen \d/1 epoch", line)]
    assert [line.split(" ", 5)[2:5] for line in lines] == [
        ["gen", "0/1", "epoch"], ["gen", "0/1", "epoch"], ["gen", "1/1", "epoch"],
        ["gen", "1/1", "epoch"]]
    assert all(re.search(r"ETA gen \d+:\d\d:\d\d, run \d+:\d\d:\d\d$", line) for line in lines)
    assert "epoch 2/2" in lines[1] and "agrees with teacher" in lines[3]
    views = [line for line in stdout.splitlines() if re.match(rf"{STAMP} teacher cache: ", line)]
    assert [line.split()[4] for line in views] == ["1/2", "2/2"], views  # one per view
    bars = [line for line in stdout.splitlines() if "epoch" in line and line not in lines]
    assert not [line for line in bars if re.search(r"gen \d/1 epoch", line)], bars  # no bars


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(digits,
                                                                                tmp_path):
    args = [str(RECIPE), *tiny_run_flags(digits, **{"run.log_with": '["tensorboard", "aim"]'}),
            "--runs-dir", str(tmp_path / "runs")]
    one_line_refusal(lambda: train(args), "run.log_with names aim, not installed here",
                     "pip install aim", """--set 'run.log_with=["tensorboard"]'""")
    assert not (tmp_path / "runs").exists()


def test_asking_a_cpu_only_launch_for_two_processes_gives_the_line_that_starts_two(digits,
                                                                                   tmp_path):
    # Without --multi_gpu, accelerate's launcher starts ONE process on a CPU-only machine.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "fasttt" / "train.py"), str(RECIPE), *tiny_run_flags(digits),
               "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert ("error: accelerate launch was asked for 2 processes, but on a machine without GPUs"
            in done.stderr), done.stderr
    assert "run `accelerate launch --multi_gpu --num_processes 2 --num_machines 1" in done.stderr
    assert not (tmp_path / "runs").exists()
