"""Atomic output directories, FFCV writing with rich progress, and the manifest."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import multiprocessing.queues
import queue
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import ffcv.writer
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from beton_builders import BUILDER_VERSION
from fasttt.betons import MANIFEST
from fasttt.errors import UserError, one_line
from fasttt.files import fsync_path, replaceable_dir, sha256_file, staged_dir, write_json
from fasttt.progress import progress_bar as fasttt_progress_bar

SPLITS = ("train", "val")
PAGE_SIZE = 2**21  # FFCV's minimum; its 8 MiB default bloats small betons
console = Console(stderr=True)


def progress_bar() -> Progress:
    """fasttt's progress bar, on stderr, left on screen when done."""
    return fasttt_progress_bar(console=console, transient=False)


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """Hold an advisory lock for one build of `out_dir`; a killed build releases it."""
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another build of {out_dir} is running: wait for it") from None
        yield


@contextlib.contextmanager
def staged_output(out_dir: Path):
    """Yield a hidden sibling directory to build in; on success it becomes `out_dir` at once.

    A build killed half way leaves only the hidden directory, which the next build
    removes first, so no file ever carries a final name with partial content.
    """
    out_dir = replaceable_dir(out_dir)  # before the lock: "." would lock "..lock"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file: choose a new or empty OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UserError(f"{out_dir} exists and is not a beton directory: "
                        "choose a new or empty OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir), staged_dir(out_dir) as staging:
        yield staging


class ImageRows:
    """Indexable (image, label, index) rows over uint8 HWC images, as FFCV's writer wants."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, coarse: np.ndarray | None = None):
        self.images, self.labels, self.coarse = images, labels, coarse

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple:
        row = (self.images[i], int(self.labels[i]), i)
        return row if self.coarse is None else (*row, int(self.coarse[i]))


class _RichWriterProgress:
    """Stands in for the tqdm bar FFCV's DatasetWriter draws, drawing a rich bar instead."""

    def __init__(self, progress: Progress, description: str, total: int):
        self.progress = progress
        self.task = progress.add_task(description, total=total, info="")

    def update(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        self.progress.refresh()


def _cannot_write(path: Path, code: int | None, what: str) -> UserError:
    """The one-line error for a beton that could not be written, saying what to do next."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        todo = ("free space on that disk and rerun the same command, "
                "or build into an OUT_DIR on another disk")
    else:
        todo = "rerun the same command once that is fixed"
    return UserError(f"cannot write {path}: {what}: {todo}")


def _report_failure(failures: multiprocessing.SimpleQueue, job, *args) -> None:
    """Run FFCV's worker `job`; if it raises, send (errno, message) to the parent and exit 1.

    Exiting rather than raising keeps the worker's traceback off the user's screen:
    the parent reports the failure as one line.
    """
    try:
        job(*args)
    except Exception as err:
        what = getattr(err, "strerror", None) or f"{type(err).__name__}: {one_line(err)}"
        failures.put((getattr(err, "errno", None), what))
        sys.exit(1)


class _WatchedQueue(multiprocessing.queues.Queue):
    """FFCV's work and allocation queues, whose blocking get gives up once a worker failed."""

    def __init__(self, check):
        super().__init__(ctx=multiprocessing.get_context())
        self.check = check

    def get(self):
        """The next item, raising (through `check`) instead of waiting for a dead worker's."""
        while True:
            try:
                return super().get(timeout=0.1)
            except queue.Empty:
                self.check()


class _WriterWorkers:
    """FFCV's writer processes, watched so that one failing ends the write instead of hanging it.

    FFCV's parent process waits for a shared counter, then for one allocation list per
    worker, and a dead worker advances neither. Stand-ins for the `Process`, `Queue` and
    `sleep` of ffcv.writer let both waits notice the failure.
    """

    def __init__(self, path: Path):
        self.path = path
        self.failures = multiprocessing.SimpleQueue()
        self.processes: list[multiprocessing.Process] = []
        self.queues: list[_WatchedQueue] = []

    def process(self, target, args) -> multiprocessing.Process:
        """Stands in for ffcv.writer.Process: a worker that reports its failure."""
        process = multiprocessing.Process(target=_report_failure,
                                          args=(self.failures, target, *args))
        self.processes.append(process)
        return process

    def queue(self) -> _WatchedQueue:
        """Stands in for ffcv.writer.Queue."""
        watched = _WatchedQueue(self.check)
        self.queues.append(watched)
        return watched

    def sleep(self, seconds: float) -> None:
        """Stands in for ffcv.writer.sleep, which FFCV calls while it polls its sample counter."""
        time.sleep(seconds)
        self.check()

    def check(self) -> None:
        """Raise once a worker has exited with an error; a no-op in a worker, which has none."""
        status = next((p.exitcode for p in self.processes if p.exitcode), None)
        if status is None:
            return
        if self.failures.empty():  # killed outright, by the OOM killer say
            raise _cannot_write(self.path, None, f"a writer process exited with status {status}")
        raise _cannot_write(self.path, *self.failures.get())

    def stop(self) -> None:
        """End and reap every worker: one still running may wait forever for a dead one's page."""
        for watched in self.queues:
            watched.cancel_join_thread()  # work no worker will read must not block our exit
        for process in self.processes:
            # SIGKILL, not SIGTERM: a forked worker inherits any SIGTERM handler of ours, and
            # FFCV's cleanup turns the exception it raises into another wait for a page turn.
            process.kill()
            process.join()


@contextlib.contextmanager
def _patched(module, **replacements):
    """Replace globals of `module` for the duration of the block."""
    originals = {name: getattr(module, name) for name in replacements}
    vars(module).update(replacements)
    try:
        yield
    finally:
        vars(module).update(originals)


def _free_metadata(writer: DatasetWriter) -> None:
    """Release the writer's shared-memory metadata, which FFCV frees only after a success."""
    memory = getattr(writer, "metadata_sm", None)
    if isinstance(memory, shared_memory.SharedMemory):  # FFCV first sets a placeholder int
        memory.close()
        memory.unlink()


def write_beton(path: Path, dataset, fields: dict, num_workers: int, description: str) -> None:
    """Write an indexable dataset of tuples (in `fields` order) to an FFCV beton at `path`.

    With one worker the bytes are a pure function of the data; with more, page order varies.
    A worker's failure, or a failed write here, is one UserError naming `path`, raised
    within a fraction of a second; no worker outlives the call.
    """
    writer = DatasetWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=num_workers)
    workers = _WriterWorkers(path)
    with progress_bar() as progress, _patched(
            ffcv.writer, tqdm=lambda total: _RichWriterProgress(progress, description, total),
            Process=workers.process, Queue=workers.queue, sleep=workers.sleep):
        try:
            writer.from_indexed_dataset(dataset, chunksize=64)
        except BaseException as err:
            workers.stop()
            _free_metadata(writer)
            if isinstance(err, OSError):  # FFCV's own writes here: header, metadata, page table
                raise _cannot_write(path, err.errno, err.strerror or one_line(err)) from None
            raise


def label_fields(coarse: bool = False, photo: bool = False) -> dict:
    """The integer fields every sample carries after its image, in tuple order."""
    fields = {"label": IntField(), "index": IntField()}
    if coarse:
        fields["coarse_label"] = IntField()
    if photo:
        fields["height"] = IntField()
        fields["width"] = IntField()
    return fields


def raw_image_fields(**extra) -> dict:
    """Fields for fixed-size images stored uncompressed, followed by the label fields."""
    return {"image": RGBImageField(write_mode="raw"), **label_fields(**extra)}


def finish_manifest(staging: Path, manifest: dict, counts: dict) -> dict:
    """Add version, counts and checksums to `manifest` and write it last into `staging`."""
    for split in SPLITS:
        fsync_path(staging / f"{split}.beton")
    manifest = {
        "format": "fasttt-betons",
        "builder_version": BUILDER_VERSION,
        **manifest,
        "splits": {
            split: {
                "file": f"{split}.beton",
                "count": counts[split],
                "sha256": sha256_file(staging / f"{split}.beton"),
            }
            for split in SPLITS
        },
    }
    write_json(staging / MANIFEST, manifest)
    return manifest


def print_summary(out_dir: Path, manifest: dict) -> None:
    """Print a table of what a beton directory holds."""
    table = Table(title=f"{manifest['source']['name']} betons in {out_dir}")
    for column in ("split", "samples", "file", "sha256"):
        table.add_column(column)
    for split, info in manifest["splits"].items():
        table.add_row(split, str(info["count"]), info["file"], info["sha256"][:16] + "…")
    Console().print(table)
    names = manifest["class_names"]
    shown = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
    Console().print(f"{len(names)} classes: {shown}; image policy: {manifest['image_policy']}")
