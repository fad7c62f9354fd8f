"""A tiny run on the device this machine trains on, and the cache's rows on every device.

The run trains where Accelerate puts it: the CPU in CI, the GPU on a GPU machine, where
benchmarks/gpu_check.py runs this module first. A cached student is killed in its first
epoch and resumed; the resume must replay exactly the batches and views an uninterrupted
run reads. On the CPU its numbers are equal to the bit. On a GPU, cuDNN picks its kernels
per process (fasttt/processes.py turns its autotuner on) and some sum in another order,
so there the numbers must be close instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, RECIPE, RUN_DEVICE, interrupt_at_evaluation, tiny_run_flags

from fasttt import engine
from fasttt.cache import CacheSpec, open_teacher, read_cache_manifest
from fasttt.engine import PERCENT, TIMINGS
from fasttt.rundir import CACHE, METRICS
from fasttt.train import main as train

# A patriarch and one student reading a 2-view all-class cache, 2 epochs of 128 samples.
CACHED_STUDENT = {"data.train_limit": 128, "generations.students": 1, "cache.views": 2,
                  "cache.dtype": '"float32"'}
# How far a resumed run's numbers may drift: relatively, and in accuracies (% of 128
# samples) by two samples, as one argmax may flip near chance.
RELATIVE = {"cpu": 0.0, "cuda": 0.05}
SAMPLES = {"cpu": 0.0, "cuda": 100 * 2 / 128}


def recorded_run(digits: Path, runs: Path, monkeypatch) -> list[tuple]:
    """Train the cached student's run into `runs`; (generation key, view, batch) of each
    training step, as the step's device work (engine.forward_loss) was given them."""
    seen, forward_loss = [], engine.forward_loss

    def spy(model, spec, images, labels, index, host_index, shows, *rest):
        seen.append((shows.key, shows.view, tuple(index.tolist())))
        return forward_loss(model, spec, images, labels, index, host_index, shows, *rest)

    monkeypatch.setattr(engine, "forward_loss", spy)
    train([str(RECIPE), *tiny_run_flags(digits, **CACHED_STUDENT), "--runs-dir", str(runs)])
    return seen


def numbers(gen_dir: Path) -> list[dict]:
    """A generation's metrics rows without their wall-clock fields."""
    rows = [json.loads(line) for line in (gen_dir / METRICS).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    """(run directory, batches read) of the cached student's run, trained in one go."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        runs = tmp_path_factory.mktemp("device") / "runs"
        seen = recorded_run(digits, runs, monkeypatch)
    return runs / "digits_d06", seen


def test_a_killed_cached_student_resumes_with_the_same_batches_and_views(
        digits, uninterrupted, tmp_path, monkeypatch):
    run, seen = uninterrupted
    interrupt_at_evaluation(monkeypatch, call=3)  # gen0's 2 epochs, then gen1's first
    with pytest.raises(KeyboardInterrupt):
        recorded_run(digits, tmp_path, monkeypatch)
    monkeypatch.undo()
    resumed = recorded_run(digits, tmp_path, monkeypatch)
    steps = len(seen) // 4  # 2 generations x 2 epochs
    assert steps and len(seen) == 4 * steps
    assert resumed == seen[2 * steps:]  # gen1 from its first epoch, batch for batch
    assert len({key for key, _, _ in seen}) == 2  # each generation its own views
    for gen in ("gen0", "gen1"):
        ours, theirs = numbers(tmp_path / "digits_d06" / gen), numbers(run / gen)
        assert [r["epoch"] for r in ours] == [1, 2]
        for mine, other in zip(ours, theirs, strict=True):
            assert mine.keys() == other.keys()
            for name, value in mine.items():
                accuracy = name in PERCENT or name.startswith("val_top")
                slack = (SAMPLES if accuracy else RELATIVE)[RUN_DEVICE]
                assert math.isclose(value, other[name], rel_tol=RELATIVE[RUN_DEVICE],
                                    abs_tol=slack), (gen, name, value, other)


@pytest.mark.parametrize("device", DEVICES)
def test_the_cache_serves_its_stored_rows_on_every_device(uninterrupted, device):
    cache_dir = uninterrupted[0] / "gen0" / CACHE
    manifest = read_cache_manifest(cache_dir)
    stored = {f.name for f in dataclasses.fields(CacheSpec)} - {"temperature", "temperatures"}
    # a cache of FFCV's decoder has no "decoder" key: the field's default
    spec = CacheSpec(**{key: manifest[key] for key in stored if key in manifest},
                     temperature=1.0, temperatures=tuple(manifest["temperatures"]))
    teacher = open_teacher(cache_dir, spec, torch.device(device))
    stored = {name: np.load(cache_dir / f"{name}.npy") for name in ("values", "ids")}
    index = torch.tensor([127, 3, 64, 3, 0])  # any order, repeats allowed
    for view in range(manifest["stored_views"]):
        got = teacher(index, view)
        assert got.values.device.type == got.ids.device.type == device
        assert torch.equal(got.values.cpu(), torch.from_numpy(stored["values"][view][index]))
        assert torch.equal(got.ids.cpu(), torch.from_numpy(stored["ids"][view][index]).long())
        # every class kept: the log-partition is the stored logits' logsumexp
        expected = torch.from_numpy(stored["values"][view][index]).logsumexp(dim=1)
        torch.testing.assert_close(got.log_partition.cpu(), expected, rtol=1e-6, atol=1e-6)


# In a process of its own: Accelerate's state is per process and refuses to move to the
# CPU once a CUDA Accelerator exists, whatever ran before in this test worker.
LAUNCHED_WITH_CPU = """
import torch
from rich.console import Console
from fasttt.processes import make_accelerator
torch.cuda.is_available = lambda: True  # a GPU is pretended where there is none
console = Console(record=True, width=200)
accelerator = make_accelerator("bf16", console)
print(accelerator.device.type, accelerator.mixed_precision, console.export_text().strip())
"""


def test_accelerate_launch_cpu_trains_on_the_cpu_in_float32_beside_a_gpu():
    # `accelerate launch --cpu` says so through ACCELERATE_USE_CPU
    done = subprocess.run([sys.executable, "-c", LAUNCHED_WITH_CPU], capture_output=True,
                          text=True, timeout=120, env=os.environ | {"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == ("cpu no training on the CPU: float32 instead of "
                                            "bf16"), done.stdout
