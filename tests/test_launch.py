"""A user error under `accelerate launch` as `make demo` runs it: fasttt's one line alone.

accelerate's launcher exits 1 whenever its child fails, so the child's exit status 2 does
not pass through; without -q it adds its own traceback, and without every launch setting
a warning listing the ones it defaulted (README, Training).
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from fasttt.rundir import try_lock_run_dir


def demo_launch() -> list[str]:
    """`make demo`'s command line, with this venv's accelerate for `$(BIN)/accelerate`."""
    rule = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()[1:]
    recipe = itertools.takewhile(lambda line: line.startswith("\t"), rule)
    command = " ".join(line.strip().removesuffix("\\") for line in recipe)
    return shlex.split(command.replace("$(BIN)", str(Path(sys.executable).parent)))


def launch_demo(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`make demo`'s launch with `args` appended, run from the repository."""
    # An accelerate config in this machine's HF_HOME would fill in settings the demo leaves
    # out (a multi-GPU config: torchrun): the test is of the launch as fasttt ships it.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    return subprocess.run([*demo_launch(), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def the_one_line(done: subprocess.CompletedProcess) -> str:
    """stderr's only line, which must be fasttt's `error:` line; the launcher's status 1."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.returncode == 1, (done.returncode, done.stderr)
    return lines[0]


def test_a_recipe_key_typo_is_one_line(tmp_path):
    runs = tmp_path / "runs"
    done = launch_demo(["--set", "run.nme=x", "--runs-dir", str(runs)], tmp_path)
    line = the_one_line(done)
    assert "(with --set): unknown key run.nme (did you mean run.name?" in line, line
    assert not runs.exists()


def test_a_run_name_in_use_is_one_line(digits, tmp_path):
    run_dir = tmp_path / "runs" / "digits_d06"
    held = try_lock_run_dir(run_dir)  # as the process that trains the run holds it
    try:
        done = launch_demo(["--set", f'data.beton_dir="{digits}"', "--runs-dir",
                            str(run_dir.parent)], tmp_path)
    finally:
        held.close()
    line = the_one_line(done)
    assert line == (f"error: {run_dir} is in use by another fasttt process: wait for it to "
                    "end, or give this run another run.name"), line
