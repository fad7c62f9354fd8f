"""benchmarks/gpu_check.py --tiny on this CPU: the one command prepared for a GPU machine
runs every step end to end and writes its JSON, so its bugs are found here, not there."""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import ROOT


def test_the_gpu_check_runs_every_step_tiny_and_writes_its_figures(tmp_path):
    # The test steps are left out: they would run part of this suite again inside it.
    packed = tmp_path / "back" / "gpu_check.tar.gz"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--skip",
                           "tests", "--skip", "compile", "--out", str(tmp_path), "--work",
                           str(tmp_path / "work"), "--archive", str(packed)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    with tarfile.open(packed) as tar:  # everything --out holds, in one file
        names = set(tar.getnames())
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
               if p.is_file() and not p.is_relative_to(tmp_path / "work")
               and not p.is_relative_to(packed.parent)}
    assert names == written and "gpu_check.json" in names and "logs/demo.log" in names
    assert any(name.endswith(".trace.json.gz") for name in names)  # small traces stay in
    assert result["tiny"] and len(result["commit"] or "x" * 40) == 40
    assert result["environment"]["cpu_cores"] >= 1 and "CPU cores" in result["environment_line"]
    assert {name: o["status"] for name, o in result["steps"].items()} == {
        "imagenet": 0, "cifar": 0, "demo": 0}
    for name in ("imagenet", "cifar"):
        rows = result["epochs_per_hour"][name]["rows"]
        assert all(rows[r]["images_per_s"] > 0 for r in ("loader", "patriarch_step",
                                                          "student_step_cache",
                                                          "student_step_online"))
        for row in ("patriarch_step", "student_step_cache"):
            check_profile(result, tmp_path / "profiles" / name, name, row)
    assert len(result["demo_val_top1"]) == 2  # patriarch and one student, through accelerate
    assert (tmp_path / "logs" / "demo.log").is_file()
    betons = list(tmp_path.rglob("*.beton"))  # data stays out of what comes back
    assert betons and all(p.is_relative_to(tmp_path / "work") for p in betons)
    assert "images/s" in done.stdout and "where a step's time goes" in done.stdout


def check_profile(result: dict, directory, name: str, row: str) -> None:
    """A row's profile files and its phase breakdown: each phase of a step once per step."""
    breakdown = result["phases"][f"{name} {row}"]
    phases = breakdown["phases"]
    assert list(phases) == ["fasttt.augment", "fasttt.teacher", "fasttt.forward_loss",
                            "fasttt.backward", "fasttt.optimizer", "fasttt.metrics"]
    assert all(p["calls_per_step"] == 1 for p in phases.values())
    assert phases["fasttt.forward_loss"]["host_ms_per_step"] > 0
    assert phases["fasttt.backward"]["host_ms_per_step"] > 0
    assert sum(p["host_ms_per_step"] for p in phases.values()) <= breakdown["wall_ms_per_step"]
    assert breakdown["steps"] == 2
    assert (breakdown["kernel_ms_per_step"] > 0) == (breakdown["device"] == "cuda")
    summary = result["epochs_per_hour"][name]["profile"][row]
    assert summary["phases"] == phases and len(summary["top_ops"]) == 15
    own = [op["self_device_ms_per_step" if breakdown["device"] == "cuda" else
              "self_cpu_ms_per_step"] for op in summary["top_ops"]]
    assert own == sorted(own, reverse=True) and own[0] > 0
    assert "Self CPU" in (directory / f"{row}.txt").read_text()
    # the file is written before the benchmark adds the unprofiled step's time
    written = json.loads((directory / f"{row}.json").read_text())
    assert written == {k: v for k, v in summary.items() if k != "timed_ms_per_step"}
    assert summary["timed_ms_per_step"] > 0
    trace = json.loads(gzip.decompress((directory / f"{row}.trace.json.gz").read_bytes()))
    assert {"fasttt.forward_loss", "fasttt.backward"} <= {e.get("name")
                                                          for e in trace["traceEvents"]}


def test_a_step_past_its_limit_is_stopped_and_the_rest_still_reported(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--skip",
                           "imagenet", "--skip", "cifar", "--skip", "tests", "--skip", "compile",
                           "--limit", "demo=4", "--out", str(tmp_path), "--work",
                           str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["steps"]["demo"]["status"] == "timeout"
    assert 4 <= result["steps"]["demo"]["seconds"] < 30
    assert "demo reached, at 4 s:" in done.stdout and "gpu_check --tiny" in done.stdout
    assert not processes_naming(tmp_path)  # the launcher's training process went with it


def processes_naming(path) -> list[str]:
    """Command lines of this machine's processes that mention `path`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(path) in line:
                found.append(line)
    return found


def test_the_readmes_speed_table_quotes_the_published_gpu_figures():
    published = json.loads((ROOT / "benchmarks/results/h200-2026-12-04.json").read_text())
    run = published["run1_as_landed"]
    assert run["project_commit"] == "f0e8bf9" and "H200" in run["machine"]
    readme = (ROOT / "README.md").read_text()
    for recipe, name in (("imagenet_r18_d06_fast", "imagenet"), ("cifar100_resnet56_d06", "cifar")):
        line = next(row for row in readme.splitlines() if f"(`{recipe}`)" in row)
        cells = [cell.strip() for cell in line.strip("|").split("|")[1:]]
        rows = run[f"epochs_per_hour_{name}"]["rows"]
        assert cells == [f"{rows[r]['images_per_s']:,.0f}" for r in (
            "loader", "patriarch_step", "student_step_cache", "student_step_online")] + [
            f"{rows['cache_build']['seconds_per_view']:.2f} s/view"]
    eager, graphs = (published["run2_inference_mode_patched"]["trainer_epochs"][key][-1]
                     for key in ("eager_gen0", "graphs_gen0"))
    for epoch in (eager, graphs):
        assert (f"{epoch['seconds']:.1f} s" in readme
                and f"{epoch['images_per_s']:,.0f} img/s" in readme), epoch
