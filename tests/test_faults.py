"""Faults: SIGKILL at any moment loses nothing, one writer per run directory, changed inputs.

The kill test runs a real three-generation digits run (beton build, epochs,
checkpoints, teacher caches, analysis, report) as a subprocess, SIGKILLs it at moments
drawn by a seeded generator, reruns the same command until it finishes, and compares
every result with an uninterrupted run: the suite's one end-to-end check that a resumed
run gives identical results (tests/test_failures_signals.py checks that signals stop a
run and its rerun goes on; tests/test_devices.py that a resumed student reads the same
batches and views). A Python audit hook, installed in the subprocesses through
`sitecustomize`, records every file fasttt opens for writing, renames or removes, so the
test also checks that nothing is ever written under a final name: only under hidden
temporary names that are then renamed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPE, ROOT, tiny_run_flags, write_cifar_release
from safetensors.numpy import load_file

from beton_builders.__main__ import main as build_betons
from fasttt.engine import TIMINGS
from fasttt.errors import UserError
from fasttt.files import sha256_file
from fasttt.rundir import lock_run_dir
from fasttt.train import main as train

SEED = 20261126
KILLS = 8  # SIGKILLs per CI run: each phase (DELAYS) once, then drawn again; seeded delays

AUDIT_HOOK = textwrap.dedent("""
    import os, sys
    _root, _log = os.environ["FASTTT_AUDIT_ROOT"], os.environ["FASTTT_AUDIT_LOG"]
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _rank = os.environ.get("RANK", "0")

    def _record(event, path):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_root):
            os.write(_fd, f"{_rank}\\t{event}\\t{path}\\n".encode())

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
                _record("write", args[0])
        elif event == "os.rename":
            _record("rename", args[1])
        elif event == "shutil.rmtree":  # unlinking one file is atomic; a tree's removal is not
            _record("remove", args[0])

    sys.addaudithook(_hook)
""")


def tiny_args(tmp: Path, **overrides) -> list[str]:
    """A three-generation digits run of seconds; the betons are built by the run itself."""
    flags = tiny_run_flags(tmp / "data" / "digits",
                           **{"generations.students": 2, "cache.views": 2, **overrides})
    return [str(RECIPE), *flags, "--runs-dir", str(tmp / "runs")]


def audited_env(tmp: Path) -> dict:
    """Environment for a subprocess whose writes under `tmp` are logged to tmp/audit.log."""
    hook_dir = tmp / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
            # Extended, not replaced: a caller's own path (the GPU kit's FFCV) must stay.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), str(ROOT),
                                                        os.environ.get("PYTHONPATH")])),
            "FASTTT_AUDIT_ROOT": str(tmp.resolve()), "FASTTT_AUDIT_LOG": str(tmp / "audit.log")}


def start(tmp: Path, args: list[str]) -> subprocess.Popen:
    """`python fasttt/train.py ...` in its own process group, audited, stdout piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "fasttt" / "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=audited_env(tmp), start_new_session=True)


def first_line_seen(process: subprocess.Popen) -> threading.Event:
    """An event set once the process prints its first line (its imports are done)."""
    seen = threading.Event()

    def drain():
        for _ in process.stdout:
            seen.set()
        seen.set()

    threading.Thread(target=drain, daemon=True).start()
    return seen


def hidden(path: Path, root: Path) -> bool:
    """True if some component of `path` below `root` is a hidden (temporary) name."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def unsafe_writes(tmp: Path) -> list[str]:
    """Writes and removals under final names recorded by the audit hook."""
    root = tmp.resolve()
    bad = []
    for line in (tmp / "audit.log").read_text().splitlines():
        _, event, path = line.split("\t")
        path = Path(path)
        if event in ("write", "remove") and not hidden(path, root) and path.parent != root:
            bad.append(line)
    return bad


def final_files_are_whole(tmp: Path) -> None:
    """Every non-hidden file is complete: JSON parses, weights and arrays load, betons hash."""
    root = tmp.resolve()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or hidden(path, root) or path.parent in (root, root / "hook"):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), path
        elif path.suffix == ".beton":
            manifest = json.loads((path.parent / "manifest.json").read_text())
            (split,) = [s for s in manifest["splits"].values() if s["file"] == path.name]
            assert sha256_file(path) == split["sha256"], path
    for latest in root.rglob("latest.json"):
        ckpt = latest.parent / json.loads(latest.read_text())["dir"]
        assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "state.pt",
                                                     "train_state.json"}, ckpt


def evals(run: Path) -> int:
    """How many generations of the run are finished."""
    return len(list(run.glob("gen*/eval.json")))


def possible_phases(tmp: Path) -> list[str]:
    """The phases the run has still to pass through."""
    run = tmp / "runs" / "digits_d06"
    phases = [] if (tmp / "data" / "digits" / "manifest.json").exists() else ["beton build"]
    if evals(run) < 3:
        phases += ["mid-epoch", "checkpoint write", "between generations"]
    if len(list(run.glob("gen*/cache/manifest.json"))) < 2:
        phases.append("cache build")
    if not (run / "summary.json").exists():
        phases.append("analysis and report")
    return phases


def phase_reached(phase: str, tmp: Path, since: float, finished_before: int) -> bool:
    """Whether the run has reached `phase` in this attempt (started at `since`), on disk."""
    run = tmp / "runs" / "digits_d06"
    if phase == "beton build":
        return (tmp / "data" / ".digits.partial").exists()
    if phase == "mid-epoch":  # a checkpoint written by this attempt: epochs are under way
        return any(p.stat().st_mtime > since for p in run.glob("gen*/latest.json"))
    if phase == "checkpoint write":
        return any(run.glob("gen*/.ckpt-*.partial"))
    if phase == "cache build":
        return any(run.glob("gen*/.cache.partial"))
    if phase == "between generations":
        return evals(run) > finished_before
    return evals(run) == 3  # analysis and report


def kill_moment(run: subprocess.Popen, phase: str, tmp: Path, rng: random.Random,
                since: float, finished_before: int) -> str | None:
    """Wait for the moment to kill `run` in `phase`; None if the run ends first.

    If the phase does not come, the kill lands at a random time after the imports, or at
    the latest once every generation is finished (the report's seconds are all that is
    left, and a run that ended unkilled would leave the chain a kill short).
    """
    started, fallback, deadline = first_line_seen(run), rng.uniform(0, 25), None
    while run.poll() is None:
        if phase_reached(phase, tmp, since, finished_before):
            time.sleep(rng.uniform(0, DELAYS[phase]))
            return phase
        if deadline is None and started.is_set():
            deadline = time.time() + fallback
        if deadline is not None and time.time() > deadline:
            return f"random time ({phase} missed)"
        if evals(tmp / "runs" / "digits_d06") == 3:
            return f"the report ({phase} missed)"
        time.sleep(0.001)
    return None


DELAYS = {"beton build": 0.3, "mid-epoch": 0.5, "checkpoint write": 0.0, "cache build": 0.3,
          "between generations": 0.0, "analysis and report": 2.0}  # seconds after the phase
RESULTS = ("gen{m}/last.safetensors", "gen{m}/eval.json", "gen{m}/metrics.jsonl",
           "gen{m}/analysis.json", "gen{m}/second_class.npy")


def comparable(path: Path) -> bytes:
    """A result file's bytes, minus the wall-clock timings metrics.jsonl records."""
    if path.name != "metrics.jsonl":
        return path.read_bytes()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return json.dumps([{k: v for k, v in r.items() if k not in TIMINGS}
                       for r in rows]).encode()


def test_sigkill_at_seeded_moments_then_rerun_gives_identical_results(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    reference = start(whole, tiny_args(whole))  # runs beside the killed chain
    rng, kills, attempts, log, chosen = random.Random(SEED), 0, 0, [], set()
    while True:
        attempts += 1
        assert attempts <= 2 * KILLS, f"the run never finished: {log}"
        phases = possible_phases(killed) if kills < KILLS else []
        # The beton build happens once, at the start: kill there first, then elsewhere.
        phases = phases[:1] if attempts == 1 else [p for p in phases if p != "beton build"]
        # Every other phase once, then at phases drawn again; the analysis, which comes
        # after every generation, is the last kill.
        last = kills == KILLS - 1
        phases = [p for p in phases if (p == "analysis and report") == last] or phases
        phase = rng.choice([p for p in phases if p not in chosen] or phases or [None])
        chosen.add(phase)
        since, finished_before = time.time(), evals(killed / "runs" / "digits_d06")
        run = start(killed, tiny_args(killed))
        moment = phase and kill_moment(run, phase, killed, rng, since, finished_before)
        if moment:
            os.killpg(run.pid, signal.SIGKILL)
            kills += 1
            left = sorted(p.name for p in killed.rglob(".*") if not p.name.endswith(".lock"))
            log.append(f"{moment} (left {', '.join(left) or 'nothing'})")
        _, err = run.communicate(timeout=300)
        final_files_are_whole(killed)
        if run.returncode == 0:
            break
        assert run.returncode == -signal.SIGKILL, err[-2000:]
    print("\n".join(log))
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]
    assert kills == KILLS and set(DELAYS) <= chosen, log
    run_a, run_b = whole / "runs" / "digits_d06", killed / "runs" / "digits_d06"
    for m in range(3):
        for name in RESULTS:
            rel = name.format(m=m)
            assert comparable(run_a / rel) == comparable(run_b / rel), f"{rel} after {log}"
    for m in range(2):
        for array in sorted((run_a / f"gen{m}" / "cache").iterdir()):
            assert array.read_bytes() == (run_b / f"gen{m}" / "cache" / array.name).read_bytes()
    for name in ("summary.json", "ensemble.json", "inputs.json"):
        assert (run_a / name).read_bytes() == (run_b / name).read_bytes(), name
    assert unsafe_writes(whole) == [] and unsafe_writes(killed) == []
    # Temporaries of killed writes are cleaned up by the runs that follow.
    assert [p.name for p in killed.rglob(".*") if not p.name.endswith(".lock")] == []


def quick_args(digits: Path, runs: Path, epochs: int = 1) -> list[str]:
    """A one-generation run on `digits` of about a second per epoch."""
    flags = tiny_run_flags(digits, **{"data.train_limit": 128, "schedule.epochs": epochs})
    return [str(RECIPE), *flags, "--runs-dir", str(runs)]


def test_a_run_directory_in_use_is_refused_and_a_killed_holder_leaves_no_stale_lock(
        digits, tmp_path):
    holder = lock_run_dir(tmp_path / "runs" / "digits_d06")
    with pytest.raises(UserError, match="in use by another fasttt process"):
        train(quick_args(digits, tmp_path / "runs"))
    holder.close()
    # A process killed while holding the lock: the kernel releases it.
    hold = ("import pathlib, sys, time\nfrom fasttt.rundir import lock_run_dir\n"
            "lock = lock_run_dir(pathlib.Path(sys.argv[1]))\nprint('locked', flush=True)\n"
            "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "runs" / "digits_d06")],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match="in use"):
        lock_run_dir(tmp_path / "runs" / "digits_d06")
    child.send_signal(signal.SIGKILL)
    child.wait()
    train(quick_args(digits, tmp_path / "runs"))
    assert (tmp_path / "runs" / "digits_d06" / "gen0" / "eval.json").is_file()


def test_a_beton_that_changed_under_a_run_is_refused(digits, tmp_path):
    betons = tmp_path / "digits"
    shutil.copytree(digits, betons)  # rebuilt below: a copy, not the shared betons
    args = quick_args(betons, tmp_path / "runs")
    train(args)
    # Other data of the same shape (10 classes, 32x32) rebuilt into the run's beton_dir.
    release = write_cifar_release(tmp_path / "release", "cifar10", per_file=30)
    build_betons(["cifar10", str(release), str(betons), "--force"])
    with pytest.raises(UserError, match="train beton .* changed since .*its count differs.*"
                                        "another run.name"):
        train(args)
    inputs = json.loads((tmp_path / "runs" / "digits_d06" / "inputs.json").read_text())
    assert inputs["betons"]["train"]["count"] == 1437


def test_two_processes_write_only_from_rank_0_except_their_cache_rows(digits, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(ROOT / "fasttt" / "train.py"),
              *quick_args(digits, tmp_path / "runs", epochs=2), "--set", "generations.students=1",
              "--set", "cache.views=2"]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                            env=audited_env(tmp_path), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [line.split("\t") for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert {rank for rank, _, _ in events} == {"0", "1"}
    foreign = [(event, path) for rank, event, path in events
               if rank != "0" and not ("/.cache.partial/" in path and path.endswith(".npy"))]
    assert foreign == []
    run = tmp_path / "runs" / "digits_d06"
    for gen in ("gen0", "gen1"):
        rows = (run / gen / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert result.stdout.count("gen 1/1 epoch 2/2:") == 1
    assert unsafe_writes(tmp_path) == []
