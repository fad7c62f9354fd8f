"""Files that are never seen half-written: atomic files, staged directories, checksums.

Every file fasttt writes goes through `write_atomically` (a hidden temporary file,
fsynced, then renamed), and every directory that must appear whole (a checkpoint, a
teacher cache, a beton build) is filled under a hidden staging name and renamed once
complete. A process killed at any moment leaves only hidden leftovers, which the next
writer of the same name removes first.
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


def publish_dir(staging: Path, final: Path) -> None:
    """Make a complete staging directory `final` in one rename (replacing an older one)."""
    fsync_path(staging)
    remove_dir(final)
    os.replace(staging, final)
    fsync_path(Path(final).parent)


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a staging directory that becomes `final` if the block ends without an error."""
    staging = staging_dir(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, final)
