"""Files that are never seen half-written: atomic files, staged directories, checksums.

Every file fasttt writes goes through `write_atomically` (a hidden temporary file,
fsynced, then renamed), and every directory that must appear whole (a checkpoint, a
teacher cache, a beton build) is filled under a hidden staging name and renamed once
complete. A process killed at any moment leaves only hidden leftovers, which the next
writer of the same name removes first.

Replacing a directory deletes what it held, so `replaceable_dir` decides first, for every
writer: never a file, a run, a directory holding a run, or the current directory. A
directory the user names (an export) must also be new, empty, or this writer's own earlier
output holding nothing else (its marker file lists what it wrote), and lie outside every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fasttt.errors import UserError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """Hex sha256 of a C-contiguous array's bytes (a memory-mapped slab is read, not copied)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or directory's contents to disk before a rename makes them final."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let `write` fill a hidden temporary file, fsync it, then rename it to `path`.

    A failure (a full disk, a signal) removes the temporary file; an OS error is raised
    again naming `path`, so the one-line message says which file could not be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


def copy_file(source: Path, path: Path) -> None:
    """Copy `source` to `path` atomically."""
    with open(source, "rb") as original:
        write_atomically(path, partial(shutil.copyfileobj, original))


def preallocate(path: Path) -> None:
    """Give a file all its blocks now, so a full disk fails here rather than on a later write.

    Pages of a sparse memory-mapped file are allocated when first written; on a full disk
    that is a SIGBUS that kills the process without a word.
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from None


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see `write_atomically`)."""
    write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (see `write_atomically`)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def tree_bytes(path: Path) -> int:
    """Bytes of the file at `path`, or of every file under it; 0 if absent."""
    if not path.is_dir():
        return path.lstat().st_size if path.is_file() else 0
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            # A live run replaces checkpoints as it goes: a file gone meanwhile holds nothing.
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name, in one atomic step.

    A kill during a plain rmtree would leave a final name holding part of its files.
    """
    path = Path(path)
    if path.exists():
        trash = path.with_name(f".{path.name}.trash")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash)


def staging_path(final: Path) -> Path:
    """The hidden sibling of `final` that a build of `final` fills."""
    return Path(final).with_name(f".{Path(final).name}.partial")


def staging_dir(final: Path) -> Path:
    """A new, empty `staging_path(final)` to build in (a killed build's is removed first)."""
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _is_run(path: Path) -> bool:
    """A run directory as fasttt.rundir lays one out: recipe.toml with inputs.json or .lock."""
    from fasttt.rundir import INPUTS, LOCK, RECIPE  # rundir builds on this module

    return (path / RECIPE).is_file() and ((path / INPUTS).is_file() or (path / LOCK).is_file())


def _run_below(path: Path) -> Path | None:
    """The first run directory under `path` (symbolic links not followed), or None."""
    for root, _, _ in os.walk(path):
        if _is_run(Path(root)):
            return Path(root)
    return None


def _cwd() -> Path | None:
    """The current directory, resolved; None if it was deleted."""
    try:
        return Path.cwd().resolve()
    except FileNotFoundError:
        return None


def _marked(final: Path, marker: str) -> set[str]:
    """The names `final/marker` says its writer put in `final`, the marker's own included."""
    try:
        files = json.loads((final / marker).read_bytes())["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return set()
    valid = isinstance(files, list) and all(isinstance(f, str) for f in files)
    return {*files, marker} if valid else set()


def replaceable_dir(final: Path, marker: str | None = None, command: str | None = None) -> Path:
    """`final` resolved, if replacing it deletes nothing its writer did not write; else refuse.

    Refused in one line for every writer: a run (`_is_run`), a directory holding one, a file,
    the current directory or one above it. `marker` is given for a directory the user names:
    it must then lie outside every run and be new, empty, or an earlier output holding its
    `marker` and only the files that lists. `command` (with NEW_DIR for the directory) is
    the refusal's advice. Without `marker` the directory is one fasttt names inside a run (a
    checkpoint, a teacher cache): its earlier version is replaced.
    """
    final = Path(final).resolve()
    advice = (f"choose a new or empty directory outside any run{f': {command}' if command else ''}"
              if marker else "move it out of the way and rerun the same command")

    def refuse(why: str) -> UserError:
        return UserError(f"refusing to replace {final}: {why}; nothing was changed: {advice}")

    if _is_run(final):
        raise refuse("it is a run directory, which replacing would delete")
    inside = next((p for p in final.parents if _is_run(p)), None) if marker else None
    if inside is not None:
        raise refuse(f"it lies inside the run {inside}, where only training writes")
    if final.exists() and not final.is_dir():
        raise refuse("it is a file, not a directory")
    cwd = _cwd()
    if cwd is not None and (cwd == final or final in cwd.parents):
        raise refuse("it is the current directory or holds it, which replacing would pull "
                     "from under your shell")
    entries = {p.name for p in final.iterdir()} if final.is_dir() else set()
    run = next((final / name for name in sorted(entries) if _is_run(final / name)), None)
    if run is not None:  # a runs directory: said before its other files
        raise refuse(f"it holds the run {run}, which replacing it would delete")
    strangers = sorted(entries - _marked(final, marker)) if marker else []
    if strangers and marker not in entries:
        raise refuse(f"it is not empty and holds no {marker}, so it is no earlier output of "
                     "this command; replacing it would delete its files")
    if strangers:
        more = f" and {len(strangers) - 3} more" if len(strangers) > 3 else ""
        raise refuse(f"it holds {', '.join(strangers[:3])}{more}, which its earlier output did "
                     "not write and replacing it would delete")
    run = _run_below(final) if entries else None
    if run is not None:
        raise refuse(f"it holds the run {run}, which replacing it would delete")
    return final


def publish_dir(staging: Path, final: Path, marker: str | None = None,
                command: str | None = None) -> None:
    """Make a complete staging directory `final` in one rename (replacing an older one).

    Only a `final` that `replaceable_dir` allows is replaced. With a `marker`, the
    directory gets that file first, listing what it holds, so a rerun may replace it.
    """
    final = replaceable_dir(final, marker, command)
    if marker is not None:
        names = sorted(p.name for p in Path(staging).iterdir())
        write_json(staging / marker, {"note": "written by fasttt, which may replace this "
                                              "directory while it holds only these files",
                                      "files": names})
    fsync_path(staging)
    remove_dir(final)
    os.replace(staging, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def staged_dir(final: Path, marker: str | None = None, command: str | None = None):
    """Yield a staging directory that becomes `final` if the block ends without an error.

    `final` is checked (`replaceable_dir`) before anything is written, and again as it is
    published.
    """
    final = replaceable_dir(final, marker, command)
    staging = staging_dir(final)
    try:
        yield staging
        publish_dir(staging, final, marker, command)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
