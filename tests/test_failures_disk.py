"""A full disk anywhere is one line naming the file that could not be written, exit 2, with
what was already written intact; freed, the same command finishes.

The disks are small tmpfs mounts the tests make (CI runs as root); where mounting is not
allowed the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    RECIPE,
    ROOT,
    one_error_line,
    small_disk,
    snapshot,
    tiny_run_args,
    two_generation_args,
)

from fasttt.cache import main as cache_cli
from fasttt.errors import exit_on_user_error
from fasttt.report import main as report_cli
from fasttt.train import main as train

NAME = "digits_d06"


@pytest.fixture
def finished(two_generation_run) -> Path:
    """The shared finished two-generation run's folder (its betons, its runs): copy it."""
    return two_generation_run


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but for `leave` bytes; the filler's path (delete it to free the space)."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stats.f_bavail * stats.f_frsize - leave)
    return filler


def test_a_full_disk_while_checkpointing_names_the_file_and_a_rerun_finishes(digits, tmp_path,
                                                                            capsys):
    with small_disk(tmp_path / "disk", "16m") as disk:
        filler = fill(disk, leave=450_000)  # room for ResNet-8's weights, not its optimizer state
        args = tiny_run_args(digits, disk / "runs")
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(lambda: train(args))  # as the CLI runs it
        line = one_error_line(capsys.readouterr().err)
        assert stop.value.code == 2
        assert line.startswith("error: No space left on device: ") and "state.pt" in line, line
        assert "free space on that disk, then rerun the same command" in line
        filler.unlink()
        train(args)
        assert (disk / "runs" / NAME / "gen0" / "eval.json").is_file()


def test_a_full_disk_while_building_a_cache_is_one_line_not_a_bus_error(finished, tmp_path):
    with small_disk(tmp_path / "disk", "16m") as disk:
        shutil.copytree(finished / "runs" / NAME, disk / NAME)
        shutil.rmtree(disk / NAME / "gen0" / "cache")
        filler = fill(disk, leave=8192)
        command = [sys.executable, str(ROOT / "fasttt" / "cache.py"), str(RECIPE),
                   "--generation", "0", *tiny_run_args(finished / "digits", disk)[1:]]
        failed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert failed.returncode == 2, (failed.returncode, failed.stderr)  # not 135 (SIGBUS)
        line = one_error_line(failed.stderr)
        assert line.startswith("error: No space left on device: ") and ".npy" in line, line
        assert not (disk / NAME / "gen0" / "cache").exists()
        filler.unlink()
        cache_cli(command[2:])  # the same command, in this process
        assert (disk / NAME / "gen0" / "cache" / "manifest.json").is_file()


def test_a_full_disk_during_analysis_or_report_names_the_file_and_a_rerun_finishes(
        finished, tmp_path, capsys):
    def fails_on_a_full_disk_then_finishes(rerun, written: Path) -> None:
        def files() -> dict:
            return {p: v for p, v in snapshot(run).items() if not v[0]}

        written.unlink()
        kept = files()
        filler = fill(disk, leave=0)
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(rerun)  # as the CLI runs it
        line = one_error_line(capsys.readouterr().err)
        assert stop.value.code == 2
        assert line.startswith(f"error: No space left on device: {run}/"), line
        assert "free space on that disk, then rerun the same command" in line
        assert files() == kept  # nothing half written, nothing lost
        filler.unlink()
        rerun()
        assert written.is_file()

    with small_disk(tmp_path / "disk", "16m") as disk:
        run = disk / NAME
        shutil.copytree(finished / "runs" / NAME, run)
        (run / "gen1" / "second_class.npy").unlink()
        args = two_generation_args(finished / "digits", disk)
        fails_on_a_full_disk_then_finishes(lambda: train(args), run / "gen1" / "analysis.json")
        fails_on_a_full_disk_then_finishes(lambda: report_cli([str(run)]), run / "summary.md")
