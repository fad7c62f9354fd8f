"""The README as a newcomer reads it: its map of the code names what is there, and its
commands run as written after `make demo`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from PIL import Image


def test_the_layout_table_lists_every_module_of_fasttt():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    listed = set()
    for row in layout.splitlines():
        if row.startswith("| `fasttt/"):
            first = row.split("|")[1]
            listed |= {name.removeprefix("fasttt/") for name in re.findall(r"`([\w/]+\.py)`",
                                                                             first)}
    modules = {p.name for p in (ROOT / "fasttt").glob("*.py") if p.name != "__init__.py"}
    assert listed == modules


def test_the_first_screens_map_points_at_code_that_is_there():
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[:readme.index("## Setting up")]
    pointers = re.findall(r"`(fasttt/\w+\.py)`(?: \(`(\w+)`\))?", first_screen)
    assert len(pointers) >= 5
    for path, name in pointers:
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^(def|class) {name}\b", source, re.M), (path, name)


def readme_commands_on_the_demo() -> list[str]:
    """The README's cheap command lines that work on what `make demo` leaves (runs/digits_d06)."""
    readme = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            on_the_demo = "runs/digits_d06" in command or "fasttt.predict" in command
            # the ONNX export takes a minute: tests/test_export.py checks it
            if command.startswith("python -m ") and on_the_demo and "--onnx" not in command:
                lines.append(command)
    return lines


def test_the_readmes_commands_run_as_written_after_the_demo(two_generation_run, tmp_path):
    commands = readme_commands_on_the_demo()
    assert len(commands) >= 6 and any("fasttt.status" in c for c in commands)
    shutil.copytree(two_generation_run / "runs", tmp_path / "runs")
    for name in ("some.png", "other.jpg"):
        Image.new("RGB", (40, 30), (200, 30, 90)).save(tmp_path / name)
    # `source .venv/bin/activate`, as the README says: its python first on the PATH
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
