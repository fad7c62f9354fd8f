"""Builders write real FFCV betons that read back exactly; bad input is one line, exit 2."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cifar_images, small_disk, write_image_folder
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToTensor

from beton_builders.__main__ import main
from fasttt.betons import read_manifest
from fasttt.data import sequential_loader
from fasttt.errors import exit_on_user_error


def build(*args: str) -> None:
    """Run the builder CLI in this process."""
    main([str(a) for a in args])


def read_all(beton_dir, split, canvas_size=None):
    """Every sample of a split, in order, as numpy arrays: images, labels, indices, extents."""
    images, labels, indices, extents = [], [], [], []
    for batch in sequential_loader(beton_dir, split=split, batch_size=8, num_workers=1,
                                   canvas_size=canvas_size):
        images.append(batch.image.permute(0, 2, 3, 1).numpy().copy())
        labels.append(batch.label.numpy().copy())
        indices.append(batch.index.numpy().copy())
        if batch.extent is not None:
            extents.append(batch.extent.numpy().copy())
    extents = np.concatenate(extents) if extents else None
    return np.concatenate(images), np.concatenate(labels), np.concatenate(indices), extents


def stored_sizes(beton_dir, split) -> np.ndarray | None:
    """The (height, width) each sample's height and width fields hold; None without them."""
    reader = Reader(str(beton_dir / read_manifest(beton_dir)["splits"][split]["file"]))
    if not {"height", "width"} <= set(reader.field_names):
        return None
    field = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    return np.stack([field["height"], field["width"]], axis=1)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m beton_builders` as a user would."""
    return subprocess.run([sys.executable, "-m", "beton_builders", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def expect_one_line_error(capsys, *args) -> str:
    """Run the CLI in-process; assert exit status 2 and a single stderr line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: build(*args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cifar10_round_trip(cifar10_release, tmp_path):
    out = tmp_path / "cifar10"
    build("cifar10", cifar10_release, out)
    manifest = read_manifest(out)
    assert manifest["splits"]["train"]["count"] == 30 and manifest["splits"]["val"]["count"] == 6
    assert manifest["class_names"][3] == "class3" and len(manifest["class_names"]) == 10
    images, labels, indices, extents = read_all(out, "train")
    expected = cifar_images(cifar10_release, [f"data_batch_{i}" for i in range(1, 6)])
    assert np.array_equal(images, expected)
    assert np.array_equal(indices, np.arange(30)) and extents is None
    assert stored_sizes(out, "train") is None  # fixed-size images store no sizes
    batch1 = np.load(cifar10_release / "data_batch_1", allow_pickle=True, encoding="bytes")
    assert labels[:6].tolist() == batch1[b"labels"]


def test_cifar100_keeps_coarse_labels_and_map(cifar100_release, tmp_path):
    out = tmp_path / "cifar100"
    build("cifar100", cifar100_release, out)
    manifest = read_manifest(out)
    assert manifest["coarse_class_names"] == [f"coarse{i}" for i in range(20)]
    images, fine, _, extents = read_all(out, "val")
    assert np.array_equal(images, cifar_images(cifar100_release, ["test"]))
    assert extents is None  # the beton's coarse_label field must not leak into the batch
    loader = Loader(str(out / "val.beton"), batch_size=64, num_workers=1, drop_last=False,
                    order=OrderOption.SEQUENTIAL,
                    pipelines={"coarse_label": [IntDecoder(), ToTensor()], "image": None,
                               "label": None, "index": None})
    (coarse,) = next(iter(loader))
    assert coarse.flatten().tolist() == (fine % 20).tolist()
    fine_to_coarse = manifest["fine_to_coarse"]
    for f in set(fine.tolist()):
        assert fine_to_coarse[f] == f % 20


def test_digits_embedded_default(digits):
    manifest = read_manifest(digits)  # built by `build("digits", OUT)` (tests/conftest.py)
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    assert sum(counts.values()) == 1797 and 0.18 < counts["val"] / 1797 < 0.22
    images, labels, indices, _ = read_all(digits, "val")
    assert images.shape == (counts["val"], 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # gray replicated to RGB
    assert np.bincount(labels, minlength=10).min() >= 34  # stratified: every digit present
    assert np.array_equal(indices, np.arange(counts["val"]))


def test_digits_rebuild_is_byte_identical(digits, tmp_path):
    build("digits", tmp_path / "again")
    for split in ("train", "val"):
        assert (tmp_path / "again" / f"{split}.beton").read_bytes() == (
            digits / f"{split}.beton").read_bytes()
    sha = [read_manifest(d)["splits"]["train"]["sha256"] for d in (digits, tmp_path / "again")]
    assert sha[0] == sha[1]


def test_imagefolder_mixed_modes_and_a_bad_file(tmp_path, capsys):
    sizes = write_image_folder(tmp_path / "tree")
    out = tmp_path / "photos"
    build("imagefolder", tmp_path / "tree", out, "--num-workers", "2", "--max-resolution", "48")
    err = capsys.readouterr().err
    assert "skipped 1 unreadable train image" in err and "broken.JPEG" in err
    manifest = read_manifest(out)
    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["count"] == 4 and manifest["splits"]["val"]["count"] == 2
    assert manifest["skipped_unreadable"]["train"][0].endswith("broken.JPEG")
    images, labels, indices, extents = read_all(out, "train", canvas_size=24)
    assert images.shape == (4, 24, 24, 3)
    expected = [sizes[k] for k in sorted(sizes) if k.startswith("train/")]
    assert stored_sizes(out, "train").tolist() == [list(s) for s in expected]  # originals
    # 40x60, 64x32, 50x50 and 30x70 shrunk onto the 24-pixel canvas, aspect ratios kept.
    assert extents.tolist() == [[16, 24], [24, 12], [24, 24], [10, 24]]
    assert labels.tolist() == [0, 0, 1, 1] and indices.tolist() == [0, 1, 2, 3]
    assert images.reshape(4, -1).std(axis=1).min() > 5  # real pictures, not blank fallbacks


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec"])
def test_cifar_refuses_code_in_pickles(cifar10_release, tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    module, name = payload.split(".")
    command = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w').close()"
    evil = _reduce_pickle(module, name, command)
    pickle.loads(evil)  # a plain unpickler really runs it
    assert marker.exists()
    marker.unlink()
    (cifar10_release / "data_batch_2").write_bytes(evil)
    err = expect_one_line_error(capsys, "cifar10", cifar10_release, tmp_path / "out")
    assert f"{name} is not allowed" in err and "data_batch_2" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _reduce_pickle(module: str, name: str, argument: str) -> bytes:
    """A protocol-2 pickle that calls module.name(argument) when loaded by a plain unpickler."""

    class Exploit:
        def __reduce__(self):
            return getattr(importlib.import_module(module), name), (argument,)

    return pickle.dumps(Exploit(), protocol=2)


def test_killed_build_leaves_no_final_names_and_rerun_succeeds(cifar10_release, tmp_path):
    out = tmp_path / "cifar10"
    # The writer's worker process kills the builder half way through the val beton.
    driver = f"""
import os, signal, sys
import beton_builders.writing as writing
from beton_builders.__main__ import main
original = writing.ImageRows.__getitem__
def dying(self, i):
    if len(self) == 6 and i == 3:
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(1)
    return original(self, i)
writing.ImageRows.__getitem__ = dying
main(["cifar10", {str(cifar10_release)!r}, {str(out)!r}])
"""
    killed = subprocess.run([sys.executable, "-c", driver], capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert not out.exists()
    leftovers = [p for p in tmp_path.rglob("*") if ".cifar10.partial" not in p.parts]
    assert not [p for p in leftovers if p.name in ("manifest.json", "train.beton", "val.beton")]
    assert (tmp_path / ".cifar10.partial").exists()  # the killed build's leftovers, hidden
    rerun = run_cli("cifar10", cifar10_release, out)
    assert rerun.returncode == 0, rerun.stderr
    assert not (tmp_path / ".cifar10.partial").exists()
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["count"] == 6


def group_ends(group: int, within: float) -> bool:
    """Whether process group `group` is empty within `within` seconds.

    Not at once: multiprocessing's resource tracker exits only once it sees its parent gone,
    and then waits for init to reap it.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# The CLI with the last page of each beton written half a second late: after FFCV has seen
# every sample counted, so it is waiting for the workers' allocations, not on its counter.
LATE_LAST_PAGE = """
import sys, time
from ffcv.memory_allocator import MemoryAllocator
from beton_builders.__main__ import main
from fasttt.errors import exit_on_user_error
write_last_page = MemoryAllocator.__exit__
def late(self, *exc):
    time.sleep(0.5)
    return write_last_page(self, *exc)
MemoryAllocator.__exit__ = late
exit_on_user_error(lambda: main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("size", "command", "beton"), [
    ("1m", ["-m", "beton_builders"], "train.beton"),  # full part way through the train beton
    ("10m", ["-c", LATE_LAST_PAGE], "val.beton"),  # the train beton fits, val's one page not
])
def test_full_disk_is_one_line_not_a_hang(tmp_path, size, command, beton):
    with small_disk(tmp_path / "disk", size) as disk:
        # Its own session, so that every process it starts can be found, and killed, by group.
        cli = subprocess.Popen([sys.executable, *command, "digits", str(disk / "digits")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        try:
            _, err = cli.communicate(timeout=30)
            assert group_ends(cli.pid, within=5), "a process of the build outlived it"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        assert cli.returncode == 2, err
        *bars, line = err.strip().splitlines()
        assert all("digits " in bar for bar in bars), err  # only the progress bars, then
        assert line.startswith(f"error: cannot write {disk / '.digits.partial' / beton}: "
                               "No space left on device: free space on that disk")
        assert [p.name for p in disk.iterdir()] == [".digits.lock"]  # no betons, no staging
        # The advice works: with space freed, the same command builds the betons.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        main(["digits", str(disk / "digits")])
        assert read_manifest(disk / "digits")["splits"]["val"]["count"] == 360


def test_unknown_source_via_real_cli(tmp_path):
    result = run_cli("mnist", tmp_path / "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown source 'mnist': choose one of digits, cifar10, cifar100, imagefolder"]


def test_missing_source_and_wrong_layout(tmp_path, capsys):
    err = expect_one_line_error(capsys, "cifar100", tmp_path / "nope", tmp_path / "out")
    assert "is not a directory" in err and "cs.toronto.edu" in err
    (tmp_path / "cifar").mkdir()
    err = expect_one_line_error(capsys, "cifar100", tmp_path / "cifar", tmp_path / "out")
    assert "missing train, test, meta" in err
    flat = tmp_path / "flat"
    (flat / "train" / "cat").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "val" / "x.JPEG").write_bytes(b"")
    err = expect_one_line_error(capsys, "imagefolder", flat, tmp_path / "out")
    assert "flat ImageNet val" in err and "torchvision.datasets.ImageNet(" in err
    err = expect_one_line_error(capsys, "digits", tmp_path / "a", tmp_path / "b")
    assert "digits takes OUT_DIR" in err
    assert not (tmp_path / "out").exists()


def test_truncated_cifar_pickle_is_one_line(cifar10_release, tmp_path, capsys):
    batch = cifar10_release / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    err = expect_one_line_error(capsys, "cifar10", cifar10_release, tmp_path / "out")
    assert "not a plain CIFAR pickle" in err


def test_existing_foreign_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = expect_one_line_error(capsys, "digits", out)
    assert "not a beton directory" in err and (out / "notes.txt").read_text() == "keep me"


def test_rerun_keeps_a_build_and_refuses_a_different_one(digits, cifar10_release, tmp_path,
                                                        capsys):
    out = tmp_path / "betons"
    shutil.copytree(digits, out)  # a finished digits build
    sha = read_manifest(out)["splits"]["train"]["sha256"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    build("digits", out)
    assert "already built" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # kept as it was
    err = expect_one_line_error(capsys, "cifar10", cifar10_release, out)
    assert "holds another build (digits" in err and "--force" in err
    assert read_manifest(out)["splits"]["train"]["sha256"] == sha


def test_force_rebuilds_over_a_damaged_manifest(digits, tmp_path, capsys):
    out = tmp_path / "digits"
    shutil.copytree(digits, out)  # a copy: the shared betons stay intact
    (out / "manifest.json").write_text("{")
    capsys.readouterr()
    err = expect_one_line_error(capsys, "digits", out)
    assert "damaged" in err and "--force" in err
    build("digits", out, "--force")
    assert read_manifest(out)["splits"]["val"]["count"] == 360
    assert not list(tmp_path.glob(".digits.p*"))  # no staging or previous copy left


def test_out_dir_that_is_a_file_and_misplaced_flags_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file" in expect_one_line_error(capsys, "digits", tmp_path / "file")
    err = expect_one_line_error(capsys, "digits", tmp_path / "d", "--jpeg-quality", "80")
    assert "--jpeg-quality only apply to imagefolder" in err


def test_building_into_the_current_directory_is_refused_and_leaves_nothing(capsys, tmp_path,
                                                                           monkeypatch):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    err = expect_one_line_error(capsys, "digits", ".")
    assert "current directory" in err
    assert not list(tmp_path.rglob("*lock*")) and not any(work.iterdir())
