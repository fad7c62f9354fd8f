"""benchmarks/gpu_check.py --tiny on this CPU: the one command prepared for a GPU machine
runs every step end to end and writes its JSON, so its bugs are found here, not there."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_every_step_tiny_and_writes_its_figures(tmp_path):
    # The tests step is left out: it would run part of this suite again inside it.
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--skip",
                           "tests", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tiny"] and len(result["commit"] or "x" * 40) == 40
    assert result["environment"]["cpu_cores"] >= 1 and "CPU cores" in result["environment_line"]
    assert {name: o["status"] for name, o in result["steps"].items()} == {
        "imagenet": 0, "cifar": 0, "demo": 0}
    for name in ("imagenet", "cifar"):
        rows = result["epochs_per_hour"][name]["rows"]
        assert all(rows[r]["images_per_s"] > 0 for r in ("loader", "patriarch_step",
                                                          "student_step_cache",
                                                          "student_step_online"))
    assert len(result["demo_val_top1"]) == 2  # patriarch and one student, through accelerate
    assert (tmp_path / "logs" / "demo.log").is_file()
    assert "images/s" in done.stdout
