"""Shared test inputs: the digits betons, tiny-run flags, CIFAR releases, ImageFolder trees."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

import fasttt.engine as engine
from beton_builders.__main__ import main as build_betons
from fasttt.errors import UserError
from fasttt.files import sha256_file, write_json
from fasttt.recipe import Recipe, load_recipe
from fasttt.rundir import EVAL, WEIGHTS

if "PYTEST_XDIST_WORKER" in os.environ:  # one worker per core: each keeps to one thread
    os.environ["OMP_NUM_THREADS"] = "1"  # for the runs the tests start as subprocesses
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # read at the first torch.compile
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_d06.toml"  # the embedded demo recipe
# The devices present: tests of the code a GPU runs take each (benchmarks/gpu_check.py runs
# them on a GPU machine); CI has the CPU alone.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
RUN_DEVICE = DEVICES[-1]  # where Accelerate puts a run: the GPU when there is one
# A run of seconds on the digits: few samples and epochs, the patriarch alone, ResNet-8
# (a third of the demo's ResNet-20 compute: most of the suite's time is these runs). No
# trackers: the shared run's (TWO_GENERATIONS) are checked.
TINY_RUN = {"data.train_limit": 256, "data.num_workers": 1, "optim.batch_size": 64,
            "schedule.epochs": 2, "schedule.peak_epoch": 1, "generations.students": 0,
            "model.name": '"cifar_resnet8"', "run.log_with": "[]"}
# The patriarch and one student of the run several modules share (two_generation_run), 128
# samples, 2 epochs, TensorBoard on for tests/test_watching.py: a rerun of it, or of a copy,
# must pass the same keys (two_generation_args), or it is another recipe.
TWO_GENERATIONS = {"generations.students": 1, "run.log_with": '["tensorboard"]'}
# The modules taking a minute or more on 2 cores (fixtures included), started first: with
# --dist loadscope a worker takes whole modules in collection order, and a long one started
# last keeps one worker busy while the others idle.
LONG_MODULES = ("test_sweep.py", "test_faults.py", "test_cache.py", "test_bad_input.py",
                "test_failures_signals.py", "test_stopping.py", "test_readme.py",
                "test_failures_machines.py", "test_export.py", "test_compile.py")


def pytest_collection_modifyitems(items):
    """Long modules first, in LONG_MODULES' order; the rest as collected."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


def pytest_collection_finish(session):
    """Exempt what the imports made (torch, numba, FFCV: half a million objects) from the
    garbage collector, so that each test's collection scans what tests made: about 0.3 s
    less per test on 2 cores."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def collect_loaders():
    """Free each test's FFCV loaders when it ends, not at some later allocation.

    numba's finalizer raises when a loader is collected; under pytest, a collection that
    lands inside the AST parse of a late import (hypothesis's plugin imports hypothesis at
    session end) fails on Python 3.11.7 with "AST constructor recursion depth mismatch"
    (CPython gh-106905).
    """
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Let each test choose its own device and precision, as each run's process does.

    Accelerate keeps one state per process and refuses another device or precision
    later; on a GPU machine the tests mix CUDA bf16 runs with explicit CPU accelerators.
    Reset before the test too: a module fixture that made an Accelerator and then failed
    never reached the previous test's reset (the first H200 run).
    """
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def reset_accelerate_state() -> None:
    """Forget this process's Accelerate state: the next Accelerator chooses afresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The embedded digits betons, built once for the whole session.

    Shared by every module: read it, never write into it (copy it to damage a beton).
    The session's end checks that no test changed it.
    """
    out = tmp_path_factory.mktemp("digits") / "digits"
    build_betons(["digits", str(out)])
    before = snapshot(out)
    yield out
    assert snapshot(out) == before, "a test wrote into the shared digits betons"


def set_pairs(**values) -> list[str]:
    """`section.key=value` overrides, as load_recipe takes them (keys given as **{...})."""
    return [f"{key}={value}" for key, value in values.items()]


def set_flags(**values) -> list[str]:
    """The same overrides as command-line flags: --set section.key=value ..."""
    return [arg for pair in set_pairs(**values) for arg in ("--set", pair)]


def tiny_run_values(betons: Path, **overrides) -> dict:
    """TINY_RUN on the betons at `betons`, with `overrides` on top."""
    return {"data.beton_dir": f'"{betons}"', **TINY_RUN, **overrides}


def tiny_run_flags(betons: Path, **overrides) -> list[str]:
    """--set flags of a tiny run (TINY_RUN) on `betons`, with `overrides` on top."""
    return set_flags(**tiny_run_values(betons, **overrides))


def tiny_run_args(betons: Path, runs: Path, **overrides) -> list[str]:
    """train.py's arguments for a digits run of seconds (128 samples, 2 epochs) into `runs`."""
    flags = tiny_run_flags(betons, **{"data.train_limit": 128, **overrides})
    return [str(RECIPE), *flags, "--runs-dir", str(runs)]


def two_generation_args(betons: Path, runs: Path, **overrides) -> list[str]:
    """train.py's arguments for the shared run (TWO_GENERATIONS) on `betons` into `runs`."""
    return tiny_run_args(betons, runs, **{**TWO_GENERATIONS, **overrides})


@pytest.fixture(scope="session")
def two_generation_run(digits, tmp_path_factory) -> Path:
    """A finished patriarch and student (two_generation_args), trained once for the whole
    session by `python fasttt/train.py`, stdout to a pipe: a folder holding `digits/` (its
    betons, a copy), `runs/digits_d06/` and `stdout.txt` (what the run printed).

    pytest-xdist gives each worker a session of its own: the first worker to ask trains the
    run, under a file lock in the folder that holds every worker's temporary folder; the
    others wait for it, then read it. Read it, never write into it: copy it to change it (a
    copy of the whole folder is a run of its own once recipe.toml names the copy's betons).
    The session's end checks that no test changed it.
    """
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # this session's; without xdist, the parent outlives it
    root = shared / "two_generation_run"
    with open(shared / "two_generation_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if not (shared / "two_generation_run.done").exists():
            shutil.rmtree(root, ignore_errors=True)  # left by a worker whose run failed
            shutil.copytree(digits, root / "digits")
            done = subprocess.run([sys.executable, str(ROOT / "fasttt" / "train.py"),
                                   *two_generation_args(root / "digits", root / "runs")],
                                  capture_output=True, text=True, cwd=ROOT, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            (root / "stdout.txt").write_text(done.stdout)
            (shared / "two_generation_run.done").touch()
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "a test wrote into the shared two-generation run"


def tiny_recipe(betons: Path, recipe: Path = RECIPE, **overrides) -> Recipe:
    """`recipe` loaded with the tiny run's overrides on `betons`, as train.py would."""
    return load_recipe(recipe, set_pairs(**tiny_run_values(betons, **overrides)))


def mark_finished(gen_dir: Path, top1: float = 50.0) -> None:
    """Write eval.json of a finished generation whose last.safetensors is already there."""
    row = {"epoch": 1, "val_top1": float(top1), "val_top5": 100.0}
    write_json(gen_dir / EVAL, {"best": row, "last": row,
                                "weights_sha256": sha256_file(gen_dir / WEIGHTS)})


def write_cifar_release(root: Path, source: str, per_file: int = 6, seed: int = 0) -> Path:
    """A tiny CIFAR python release in the official pickle format (protocol 2, bytes keys)."""
    rng = np.random.default_rng(seed)
    if source == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta = {b"label_names": [f"class{i}".encode() for i in range(10)],
                b"num_cases_per_batch": per_file}
        meta_name = "batches.meta"
    else:
        folder = root / "cifar-100-python"
        files = ["train", "test"]
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
        meta_name = "meta"
    folder.mkdir(parents=True)
    for name in files:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_file)]}
        if source == "cifar10":
            batch[b"labels"] = rng.integers(0, 10, per_file).tolist()
        else:
            fine = rng.integers(0, 100, per_file)
            batch[b"fine_labels"] = fine.tolist()
            batch[b"coarse_labels"] = (fine % 20).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def cifar_images(folder: Path, names: list[str]) -> np.ndarray:
    """The HWC uint8 images stored in the given release files, in order."""
    arrays = []
    for name in names:
        with open(folder / name, "rb") as f:
            arrays.append(pickle.load(f, encoding="bytes")[b"data"])
    return np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _photo(rng, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return (base + rng.integers(0, 40, (height, width, 3))).clip(0, 255).astype(np.uint8)


def write_image_folder(root: Path, corrupt: bool = True) -> dict:
    """Two classes of mixed sizes and modes (RGB, gray, CMYK, PNG named .JPEG), one bad file.

    Returns {relative path: (height, width)} of the readable images.
    """
    rng = np.random.default_rng(1)
    sizes = {}
    plan = [("train", "cat", "a.JPEG", (40, 60), "RGB"),
            ("train", "cat", "b.JPEG", (64, 32), "L"),
            ("train", "dog", "c.JPEG", (50, 50), "CMYK"),
            ("train", "dog", "d.JPEG", (30, 70), "PNG"),
            ("val", "cat", "e.JPEG", (45, 45), "RGB"),
            ("val", "dog", "f.JPEG", (36, 48), "L")]
    for split, cls, name, (h, w), mode in plan:
        path = root / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_photo(rng, h, w))
        if mode == "PNG":
            img.save(path, format="PNG")
        else:
            img.convert(mode).save(path, format="JPEG", quality=90)
        sizes[f"{split}/{cls}/{name}"] = (h, w)
    if corrupt:
        (root / "train" / "dog" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return sizes


@pytest.fixture
def cifar10_release(tmp_path):
    """A tiny cifar-10-batches-py directory."""
    return write_cifar_release(tmp_path / "src", "cifar10")


@pytest.fixture
def cifar100_release(tmp_path):
    """A tiny cifar-100-python directory."""
    return write_cifar_release(tmp_path / "src", "cifar100", per_file=12)


def one_line_refusal(call, *needles: str) -> str:
    """Run `call`; it must raise a printable one-line UserError holding each needle."""
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert message.isprintable() and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def one_error_line(stderr: str) -> str:
    """The last line of stderr, which must be fasttt's one `error:` line."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def snapshot(root: Path) -> dict:
    """Every path under `root` with its kind, size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` for the block; skips the test where it cannot be."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root and mount(8) (CI runs as root)")
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def interrupt_at_evaluation(monkeypatch, call: int) -> None:
    """Make the `call`-th evaluation of this process raise KeyboardInterrupt (a kill)."""
    calls, evaluate = [], engine.evaluate

    def stop(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(engine, "evaluate", stop)
