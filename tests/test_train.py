"""The generation loop end to end on tiny digits runs: files, teacher choice, finished runs.

Kills at any moment and two processes: tests/test_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECIPE, ROOT, tiny_run_flags
from safetensors.torch import load_file

import fasttt.cache as cache_module
import fasttt.engine as engine
import fasttt.generation as generation_module
from fasttt.errors import UserError
from fasttt.train import main as train


def tiny(digits: Path, **overrides) -> list[str]:
    """--set flags for a run of seconds: few samples, few epochs, one student."""
    return tiny_run_flags(digits, **{"generations.students": 1, **overrides})


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    """Start `python fasttt/train.py ...` as a user would."""
    return subprocess.Popen([sys.executable, str(ROOT / "fasttt" / "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_two_generations_write_the_run_directory_and_teach_with_the_last_epoch(
        digits, tmp_path, monkeypatch):
    epoch_weights, loaded = {}, []
    save = engine.save_checkpoint

    def keep_every_epoch(gen_dir, epoch, model, *rest):
        save(gen_dir, epoch, model, *rest)
        epoch_weights[(gen_dir.name, epoch)] = {k: v.clone() for k, v in
                                                model.state_dict().items()}

    original_teacher = generation_module.last_epoch_model

    def spy_teacher(*args):
        model = original_teacher(*args)
        loaded.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(engine, "save_checkpoint", keep_every_epoch)
    # The teacher is loaded by the planner (online) or by the cache build (precomputed).
    monkeypatch.setattr(generation_module, "last_epoch_model", spy_teacher)
    monkeypatch.setattr(cache_module, "last_epoch_model", spy_teacher)
    train([str(RECIPE), *tiny(digits), "--runs-dir", str(tmp_path)])

    run = tmp_path / "digits_d06"
    assert (run / "recipe.toml").is_file()
    for gen in ("gen0", "gen1"):
        rows = [json.loads(line) for line in (run / gen / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        assert {"lr", "train_loss", "train_top1", "val_top1", "val_top5", "images_per_s",
                "seconds"} <= set(rows[0])
        evaluation = json.loads((run / gen / "eval.json").read_text())
        assert set(evaluation) == {"best", "last", "weights_sha256"}
        assert (run / gen / "last.safetensors").is_file()
        assert not list((run / gen).glob("ckpt-*"))  # finished: its weights are enough
    summary = json.loads((run / "summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [0, 1]
    # The student's teacher is generation 0 as it ended, not any earlier epoch.
    (teacher,) = loaded
    last, first = epoch_weights[("gen0", 2)], epoch_weights[("gen0", 1)]
    assert all(torch.equal(teacher[k], last[k]) for k in last)
    assert not all(torch.equal(teacher[k], first[k]) for k in first)
    saved = load_file(str(run / "gen0" / "last.safetensors"))
    assert all(torch.equal(saved[k], last[k].cpu()) for k in last)  # saved: on the host


def test_a_finished_run_is_kept_and_a_different_recipe_is_refused(digits, tmp_path):
    args = [str(RECIPE), *tiny(digits, **{"generations.students": 0}), "--runs-dir",
            str(tmp_path)]
    train(args)
    weights = (tmp_path / "digits_d06" / "gen0" / "last.safetensors").read_bytes()
    train(args)  # nothing left to do: the finished generation is not retrained
    assert (tmp_path / "digits_d06" / "gen0" / "last.safetensors").read_bytes() == weights
    with pytest.raises(UserError, match="made by a different recipe: generations.lam is 0.6 in "
                                        ".*recipe.toml, 0.5 now; pick another run.name"):
        train([*args, "--set", "generations.lam=0.5"])
