"""Damaged data is never used: a damaged or missing weight, checkpoint, cache or beton is
refused in one line whose advice works (each test follows it and reruns), and a run has
one writer at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    RECIPE,
    interrupt_at_evaluation,
    one_line_refusal,
    tiny_run_args,
    two_generation_args,
    write_cifar_release,
)
from rich.console import Console

from beton_builders.__main__ import main as build_betons
from fasttt.cache import main as cache_cli
from fasttt.report import write_report
from fasttt.rundir import lock_run_dir
from fasttt.train import main as train

NAME = "digits_d06"


def advised_paths(message: str) -> list[Path]:
    """The paths a refusal says to delete ("delete A B and rerun ...")."""
    words = message.split("delete ", 1)[1].split(" and rerun", 1)[0].split()
    return [Path(w) for w in words]


def follow_delete_advice(message: str) -> None:
    """Do what a refusal advises: delete what it names (then the caller reruns)."""
    for path in advised_paths(message):
        assert path.exists(), (path, message)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture
def finished(two_generation_run) -> Path:
    """The shared finished two-generation run's folder (its betons, its runs): copy it."""
    return two_generation_run


def copy_of(finished: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """(the run's command line, its run directory) of a private copy of `finished`."""
    root = tmp_path / "copy"
    shutil.copytree(finished, root)
    recipe = root / "runs" / NAME / "recipe.toml"  # it names its betons: the copy's
    recipe.write_text(recipe.read_text().replace(str(finished / "digits"), str(root / "digits")))
    return two_generation_args(root / "digits", root / "runs"), root / "runs" / NAME


def flip_low_bits(path: Path, every: int = 101, skip: int = 0) -> None:
    """Flip the lowest bit of every `every`-th byte after the first `skip` (bit rot)."""
    data = bytearray(path.read_bytes())
    for i in range(skip, len(data), every):
        data[i] ^= 1
    path.write_bytes(bytes(data))


def test_damaged_or_missing_final_weights_are_refused_and_the_advice_retrains(
        finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    good = (run / "gen1" / "last.safetensors").read_bytes()
    flip_low_bits(run / "gen0" / "last.safetensors", skip=1024)
    message = one_line_refusal(lambda: train(args), "gen0/last.safetensors is damaged",
                               "rerun the same command")
    assert advised_paths(message) == [run / "gen0", run / "gen1"]
    follow_delete_advice(message)
    train(args)
    # Retrained bit for bit on the CPU: the later generation comes back the same.
    assert (run / "gen1" / "last.safetensors").read_bytes() == good
    (run / "gen1" / "last.safetensors").unlink()
    message = one_line_refusal(lambda: train(args), "gen1/last.safetensors is missing")
    follow_delete_advice(message)
    train(args)
    (run / "gen1" / "eval.json").write_text('{"best": {"epoch"')
    message = one_line_refusal(lambda: train(args), "gen1/eval.json is damaged")
    follow_delete_advice(message)
    train(args)
    assert (run / "gen1" / "last.safetensors").read_bytes() == good


def test_a_damaged_checkpoint_is_refused_and_the_advice_retrains(digits, tmp_path,
                                                                  monkeypatch):
    args = tiny_run_args(digits, tmp_path / "runs")
    interrupt_at_evaluation(monkeypatch, call=2)  # killed in epoch 2: ckpt-0001 remains
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.undo()
    ckpt = tmp_path / "runs" / NAME / "gen0" / "ckpt-0001"
    flip_low_bits(ckpt / "model.safetensors", skip=1024)
    message = one_line_refusal(lambda: train(args), "ckpt-0001/model.safetensors is damaged",
                               "trains again from its first epoch")
    follow_delete_advice(message)
    train(args)
    assert (tmp_path / "runs" / NAME / "gen0" / "eval.json").is_file()


def test_a_damaged_cache_is_refused_and_rebuilt_from_verified_weights(finished, tmp_path,
                                                                       monkeypatch):
    args, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "gen1")
    interrupt_at_evaluation(monkeypatch, call=2)  # gen1 killed in its second epoch
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.undo()
    values = np.load(run / "gen0" / "cache" / "values.npy", mmap_mode="r+")
    values[:] = values[..., ::-1].copy()  # the logits in reverse order: no longer the teacher's
    values.flush()
    del values
    message = one_line_refusal(lambda: train(args), "cache/values.npy is damaged (view 1 differs",
                               "from the teacher's verified weights")
    follow_delete_advice(message)
    train(args)
    assert (run / "gen1" / "eval.json").is_file()


def test_a_damaged_cache_manifest_is_refused_and_the_advice_rebuilds_it(finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "gen1")
    manifest = run / "gen0" / "cache" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    message = one_line_refusal(lambda: train(args), "cache has no readable manifest.json",
                               "rerun the same command to rebuild it")
    follow_delete_advice(message)
    train(args)
    assert (run / "gen1" / "eval.json").is_file() and manifest.is_file()


def test_the_report_refuses_betons_rebuilt_as_another_dataset(finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    betons = tmp_path / "copy" / "digits"
    release = write_cifar_release(tmp_path / "release", "cifar10", per_file=30)
    build_betons(["cifar10", str(release), str(betons), "--force"])
    one_line_refusal(lambda: write_report(run, None), "beton in", "changed since",
                     "restore the betons the run used")
    build_betons(["digits", str(betons), "--force"])  # restored: digits builds are exact
    assert write_report(run, Console(quiet=True)).is_file()


def test_the_cache_builder_takes_the_run_directory_lock(finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "gen0" / "cache")
    holder = lock_run_dir(run)
    cli = [str(RECIPE), "--generation", "0", *args[1:]]
    one_line_refusal(lambda: cache_cli(cli), "in use by another fasttt process")
    holder.close()
    cache_cli(cli)
    assert (run / "gen0" / "cache" / "manifest.json").is_file()
