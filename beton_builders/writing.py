"""Atomic output directories, FFCV writing with rich progress, and the manifest."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

import ffcv.writer
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from beton_builders import BUILDER_VERSION
from fasttt.data import MANIFEST
from fasttt.errors import UserError
from fasttt.files import fsync_path, sha256_file, staged_dir, write_json
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
    out_dir = Path(out_dir)
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


def write_beton(path: Path, dataset, fields: dict, num_workers: int, description: str) -> None:
    """Write an indexable dataset of tuples (in `fields` order) to an FFCV beton at `path`.

    With one worker the bytes are a pure function of the data; with more, page order varies.
    """
    writer = DatasetWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=num_workers)
    original_bar = ffcv.writer.tqdm
    with progress_bar() as progress:
        ffcv.writer.tqdm = lambda total: _RichWriterProgress(progress, description, total)
        try:
            writer.from_indexed_dataset(dataset, chunksize=64)
        finally:
            ffcv.writer.tqdm = original_bar


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
