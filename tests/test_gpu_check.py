"""benchmarks/gpu_check.py on this CPU: the one command prepared for a GPU machine, so that
its bugs are found here, not there. Its orchestration (limits, a failed step, gpu_check.json
after every step, the archive, the tables) runs with stub steps, commands of milliseconds;
one real --tiny step, the CIFAR speeds with their profiles, proves the commands it runs."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import signal
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT

NAME = "digits_d06"


def _load_gpu_check():
    # As `python benchmarks/gpu_check.py` does, so that it finds benchmarks/step_profile.py.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def python(code: str, *argv) -> list[str]:
    """A stub step's command: `python -c CODE ARGV...`, without torch or FFCV."""
    return [sys.executable, "-c", code, *map(str, argv)]


def check(argv: list, monkeypatch, capsys, **stubs) -> tuple[int, dict, str]:
    """`gpu_check.py --tiny ARGV` in this process, each step named in `stubs` running the
    command stubs[name](work), the others gpu_check's own: (exit status, gpu_check.json,
    what it printed)."""
    steps = gpu_check.steps

    def stubbed(args, work):
        for name, command in steps(args, work):
            yield name, stubs[name](work) if name in stubs else command

    monkeypatch.setattr(gpu_check, "steps", stubbed)
    handler = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM a KeyboardInterrupt
    try:
        status = gpu_check.main(["--tiny", *map(str, argv)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out = Path(argv[argv.index("--out") + 1])
    return status, json.loads((out / "gpu_check.json").read_text()), capsys.readouterr().out


def test_every_tiny_step_is_made_in_order_from_files_that_are_there(tmp_path):
    made = dict(gpu_check.steps(argparse.Namespace(tiny=True, skip=[], out=tmp_path),
                                tmp_path / "work"))
    assert list(made) == list(gpu_check.STEP_LIMITS)  # the speed first, the compile test last
    for command in made.values():
        named = [arg for arg in command if arg.endswith((".py", ".toml"))]
        assert named and all((ROOT / arg).is_file() for arg in named), command
    full = gpu_check.steps(argparse.Namespace(tiny=False, skip=["demo", "tests"], out=tmp_path),
                           tmp_path / "work")
    assert [name for name, _ in full] == ["imagenet", "imagenet_gpu_decode",
                                          "imagenet_ffcv_policy", "imagenet_split_decode",
                                          "imagenet_ffcv_policy_gpu_decode", "cifar",
                                          "cifar_whole_step", "cifar_resnet110",
                                          "cifar_densenet100", "compile"]
    data_dirs = [command[command.index("--data-dir") + 1] for _, command in
                 gpu_check.steps(argparse.Namespace(tiny=False, skip=["demo", "tests"],
                                                    out=tmp_path), tmp_path / "work")
                 if "--data-dir" in command]
    # the CPU-, GPU- and split-decode steps read one beton, the CIFAR steps another, FFCV's
    # policy its own under either decoder
    assert data_dirs[0] == data_dirs[1] == data_dirs[3] and data_dirs[2] == data_dirs[4]
    assert len(set(data_dirs[5:])) == 1 and len(set(data_dirs)) == 3
    # ResNet-18 compiled by inductor once, where FFCV decodes; the CIFAR steps as runs
    # decide, and ResNet-56's whole step as one graph
    compiled = {name: command[command.index("--compiled") + 1] for name, command in
                gpu_check.steps(argparse.Namespace(tiny=False, skip=["demo", "tests"],
                                                   out=tmp_path), tmp_path / "work")
                if "--compiled" in command}
    assert compiled == {"imagenet": "default", "imagenet_gpu_decode": "auto",
                        "imagenet_ffcv_policy": "auto", "imagenet_split_decode": "auto",
                        "imagenet_ffcv_policy_gpu_decode": "auto", "cifar": "auto",
                        "cifar_whole_step": "whole-step", "cifar_resnet110": "auto",
                        "cifar_densenet100": "auto"}
    assert {c[c.index("--compiled") + 1] for c in made.values() if "--compiled" in c} == {
        "auto"}  # --tiny: no inductor C++ on a CPU
    # the parts of a remote run split the steps between them, each within 10 minutes
    assert sorted(sum(gpu_check.PARTS.values(), ())) == sorted(gpu_check.STEP_LIMITS)
    assert all(sum(gpu_check.STEP_LIMITS[n] for n in part) <= 540
               for part in gpu_check.PARTS.values())


def test_the_gpu_check_runs_its_steps_and_archives_what_they_wrote(
        two_generation_run, tmp_path, monkeypatch, capsys):
    # The CIFAR step for real; the ImageNet step stubbed (the same benchmark on photos,
    # tests/test_epochs_per_hour.py runs that path); the demo's stub leaves a finished run
    # (the shared run, copied) where the demo leaves its own; the test steps are left out:
    # they would run part of this suite again inside it.
    finished = two_generation_run / "runs" / NAME
    packed = tmp_path / "back" / "gpu_check.tar.gz"
    status, result, printed = check(
        ["--skip", "tests", "--skip", "compile", "--skip", "imagenet_gpu_decode", "--skip",
         "imagenet_ffcv_policy", "--skip", "imagenet_split_decode", "--skip",
         "imagenet_ffcv_policy_gpu_decode", "--skip", "cifar_whole_step", "--skip",
         "cifar_resnet110", "--skip", "cifar_densenet100",
         "--out", tmp_path, "--work", tmp_path / "work", "--archive",
         packed], monkeypatch, capsys,
        imagenet=lambda work: python("print('imagenet: a stub')"),
        demo=lambda work: python("import shutil, sys; shutil.copytree(*sys.argv[1:])",
                                 finished, work / "runs" / NAME))
    assert status == 0, printed[-3000:]
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
    assert list(result["epochs_per_hour"]) == ["cifar"]  # the stub wrote no figures
    rows = result["epochs_per_hour"]["cifar"]["rows"]
    assert all(rows[r]["images_per_s"] > 0 for r in ("loader", "patriarch_step",
                                                      "student_step_cache",
                                                      "student_step_online"))
    for row in ("patriarch_step", "student_step_cache"):
        check_profile(result, tmp_path / "profiles" / "cifar", "cifar", row)
    # patriarch and one student, read from the run's report
    report = json.loads((finished / "summary.json").read_text())
    assert result["demo_val_top1"] == [100 - g["last_top1_error"] for g in report["generations"]]
    assert len(result["demo_val_top1"]) == 2
    betons = list(tmp_path.rglob("*.beton"))  # data stays out of what comes back
    assert betons and all(p.is_relative_to(tmp_path / "work") for p in betons)
    assert "images/s" in printed and "where a step's time goes" in printed


def test_the_kernel_time_per_1024_images_is_said_eager_against_compiled_on_a_gpu():
    def profile(device, ms):
        return {"device": device, "kernel_ms_per_1024_images": ms}

    phases = {"imagenet patriarch_step": profile("cuda", 96.0),
              "imagenet patriarch_step_compiled": profile("cuda", 64.0),
              "imagenet student_step_cache": profile("cuda", 97.0),
              "cifar patriarch_step": profile("cpu", 0.0),
              "cifar patriarch_step_compiled": profile("cpu", 0.0)}
    assert gpu_check.compiled_kernels(phases) == [
        "imagenet patriarch_step: GPU kernels per 1024 images, eager 96.0 ms, compiled "
        "64.0 ms (1.50x)"]


def check_profile(result: dict, directory, name: str, row: str) -> None:
    """A row's profile files and its phase breakdown: each phase of a step once per step."""
    breakdown = result["phases"][f"{name} {row}"]
    phases = breakdown["phases"]
    assert list(phases) == ["fasttt.augment", "fasttt.teacher", "fasttt.forward_loss",
                            "fasttt.metrics", "fasttt.backward", "fasttt.optimizer"]
    assert all(p["calls_per_step"] == 1 for p in phases.values())
    assert phases["fasttt.forward_loss"]["host_ms_per_step"] > 0
    assert phases["fasttt.backward"]["host_ms_per_step"] > 0
    assert sum(p["host_ms_per_step"] for p in phases.values()) <= breakdown["wall_ms_per_step"]
    assert breakdown["steps"] == 2
    assert (breakdown["kernel_ms_per_step"] > 0) == (breakdown["device"] == "cuda")
    assert breakdown["kernel_ms_per_1024_images"] == pytest.approx(
        breakdown["kernel_ms_per_step"] * 1024 / result["epochs_per_hour"][name]["settings"][
            "batch_size"], abs=1e-3)
    summary = result["epochs_per_hour"][name]["profile"][row]
    assert summary["phases"] == phases and len(summary["top_ops"]) == 15
    own = [op["self_device_ms_per_step" if breakdown["device"] == "cuda" else
              "self_cpu_ms_per_step"] for op in summary["top_ops"]]
    assert own == sorted(own, reverse=True) and own[0] > 0
    assert "Self CPU" in (directory / f"{row}.txt").read_text()
    # the file is written before the benchmark adds the unprofiled step's time and the
    # kernel time per 1024 images
    written = json.loads((directory / f"{row}.json").read_text())
    assert written == {k: v for k, v in summary.items()
                       if k not in ("timed_ms_per_step", "kernel_ms_per_1024_images")}
    assert summary["timed_ms_per_step"] > 0
    trace = json.loads(gzip.decompress((directory / f"{row}.trace.json.gz").read_bytes()))
    assert {"fasttt.forward_loss", "fasttt.backward"} <= {e.get("name")
                                                          for e in trace["traceEvents"]}


# A step that never ends: it prints which steps gpu_check.json held as it started, starts a
# child that outlives it unless its process group is killed (as accelerate launch's
# training process would), and waits.
HANGS = """
import json, subprocess, sys, time
print("in gpu_check.json before this step:", *json.load(open(sys.argv[1])).get("steps"))
subprocess.Popen((sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]))
print("started a child", flush=True)
time.sleep(60)
"""


def test_a_step_past_its_limit_is_stopped_and_the_rest_still_reported(tmp_path, monkeypatch,
                                                                      capsys):
    status, result, printed = check(
        ["--part", "imagenet", "--part", "checks", "--skip", "tests", "--skip", "compile",
         "--skip", "imagenet_gpu_decode", "--skip", "imagenet_ffcv_policy", "--limit", "demo=4",
         "--out", tmp_path, "--work", tmp_path / "work"], monkeypatch, capsys,
        imagenet=lambda work: python("import sys; print('imagenet fails'); sys.exit(3)"),
        demo=lambda work: python(HANGS, tmp_path / "gpu_check.json"))
    assert status == 1, printed[-3000:]
    assert result["steps"]["imagenet"]["status"] == 3 and "imagenet: FAILED (3)" in printed
    assert result["steps"]["demo"]["status"] == "timeout"
    assert 4 <= result["steps"]["demo"]["seconds"] < 30
    assert "demo reached, at 4 s:" in printed and "gpu_check --tiny" in printed
    # the step's last lines: gpu_check.json was written after the step before it
    assert "in gpu_check.json before this step: imagenet" in printed
    assert "started a child" in printed
    assert not processes_naming(tmp_path)  # the step's child went with it


def test_a_part_runs_its_steps_only(tmp_path, monkeypatch, capsys):
    status, result, printed = check(
        ["--part", "checks", "--skip", "tests", "--skip", "compile", "--out", tmp_path,
         "--work", tmp_path / "work"], monkeypatch, capsys,
        demo=lambda work: python("print('demo: a stub')"))
    assert status == 0 and list(result["steps"]) == ["demo"], printed[-3000:]


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
