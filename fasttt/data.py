"""FFCV loaders over the betons: train (shuffled), and sequential passes for eval and caching.

Every loader yields `Batch(image, label, index, size)` as CPU torch tensors (or on
`device`, copied without blocking): `image` is the uint8 canvas as an NCHW view of
NHWC memory (channels_last), `label` and `index` are int64 of shape (B,), `size` is
the original (height, width) of photos and None for fixed-size sources. Random
augmentation happens later on the device (fasttt/augment.py), keyed by `index`.
FFCV reuses a few batch buffers in turn: use or copy a batch before asking for the
next few.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from fasttt.canvas import CanvasExtentDecoder, CanvasRGBImageDecoder
from fasttt.errors import UserError

BUILD_HINT = "build it with `python -m beton_builders SOURCE [SRC] OUT_DIR`"
MANIFEST = "manifest.json"


class Batch(NamedTuple):
    """One loader batch; photos add `size` and `extent`, (B, 2) int (height, width) rows.

    `size` is the photo's original size; `extent` the top-left region of the canvas it
    occupies (the same aspect ratio). Fixed-size sources fill the canvas: both are None.
    """

    image: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    size: torch.Tensor | None = None
    extent: torch.Tensor | None = None


def read_manifest(beton_dir: Path) -> dict:
    """The checked manifest.json of a beton directory, or a one-line error saying what to do."""
    path = Path(beton_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {beton_dir}: {BUILD_HINT}")
    try:
        manifest = json.loads(path.read_bytes())
        splits = manifest["splits"].values()
        valid = (all(isinstance(s["file"], str) and s["count"] >= 0 for s in splits)
                 and isinstance(manifest["class_names"], list)
                 and isinstance(manifest["source"]["name"], str)
                 and manifest["image_policy"]["kind"] in ("fixed", "photo"))
    except (ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise UserError(f"{path} is damaged: rebuild with --force ({BUILD_HINT})")
    return manifest


def is_photo(manifest: dict) -> bool:
    """True for variable-size photo betons (decoded to a canvas, sizes stored)."""
    return manifest["image_policy"]["kind"] == "photo"


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous, disjoint slice of sample rows that `rank` owns; the slices cover all."""
    return np.array_split(np.arange(num_samples), world_size)[rank]


def _integer(to_device: list) -> list:
    return [IntDecoder(), ToTensor(), Squeeze(1), *to_device]


def _pipelines(manifest: dict, field_names: list[str], canvas_size: int | None,
               device: torch.device | None) -> dict:
    """One pipeline per Batch field, in Batch order; every other beton field is skipped."""
    to_device = [] if device is None else [ToDevice(torch.device(device), non_blocking=True)]
    if is_photo(manifest):
        if not canvas_size:
            raise UserError("photo betons need a canvas size (data.canvas_size, e.g. 512)")
        decoder = CanvasRGBImageDecoder(canvas_size)
    else:
        decoder = SimpleRGBImageDecoder()
    pipelines = {
        "image": [decoder, ToTensor(), *to_device, ToTorchImage(channels_last=True)],
        "label": _integer(to_device),
        "index": _integer(to_device),
    }
    if is_photo(manifest):
        pipelines["height"] = _integer(to_device)
        pipelines["width"] = _integer(to_device)
        pipelines["extent"] = PipelineSpec("image", CanvasExtentDecoder(canvas_size),
                                           [ToTensor(), *to_device])
    # FFCV decodes every field it is not told to skip, in an order of its own.
    return pipelines | {name: None for name in field_names if name not in pipelines}


class BetonLoader:
    """An FFCV Loader over one split whose iteration yields `Batch`es."""

    def __init__(self, loader: Loader, photo: bool):
        self.loader, self.photo = loader, photo

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch`: FFCV seeds each epoch's order with seed + epoch."""
        self.loader.next_epoch = epoch

    def __iter__(self):
        epoch = iter(self.loader)
        try:
            for fields in epoch:
                if self.photo:
                    image, label, index, height, width, extent = fields
                    yield Batch(image, label, index, torch.stack([height, width], 1), extent)
                else:
                    yield Batch(*fields)
        finally:
            # An epoch left half way would leak FFCV's reader thread (ffcv #345, #393).
            epoch.close()
            epoch.join()


def _open(beton_dir: Path, split: str, canvas_size, device, indices=None,
          **loader_args) -> BetonLoader:
    manifest = read_manifest(beton_dir)
    if split not in manifest["splits"]:
        raise UserError(f"{beton_dir} has no {split!r} split: it has {list(manifest['splits'])}")
    path = Path(beton_dir) / manifest["splits"][split]["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing: rebuild with --force ({BUILD_HINT})")
    if callable(indices):
        indices = indices(manifest["splits"][split]["count"])
    field_names = Reader(str(path)).field_names
    pipelines = _pipelines(manifest, field_names, canvas_size, device)
    loader = Loader(str(path), pipelines=pipelines, indices=indices, **loader_args)
    return BetonLoader(loader, is_photo(manifest))


def train_loader(beton_dir: Path, *, batch_size: int, seed: int, num_workers: int = 2,
                 distributed: bool = False, os_cache: bool = True, split: str = "train",
                 canvas_size: int | None = None, device=None, limit: int = 0) -> BetonLoader:
    """Shuffled, drop_last loader; distributed=True shards it over the process group.

    `limit` > 0 keeps only the first `limit` samples (quick runs and tests).
    """
    # QUASI_RANDOM keeps memory low when the beton is not in the page cache, but FFCV
    # does not implement it for distributed loaders.
    order = OrderOption.RANDOM if os_cache or distributed else OrderOption.QUASI_RANDOM
    loader = _open(beton_dir, split, canvas_size, device, batch_size=batch_size,
                   num_workers=num_workers, order=order, os_cache=os_cache,
                   distributed=distributed, seed=seed, drop_last=True,
                   indices=(lambda count: np.arange(min(limit, count))) if limit else None)
    if len(loader) == 0:
        raise UserError(f"{beton_dir} {split} has fewer samples than one batch of {batch_size} "
                        "per process: lower the batch size")
    return loader


def sequential_loader(beton_dir: Path, *, split: str, batch_size: int, num_workers: int = 2,
                      rank: int = 0, world_size: int = 1, os_cache: bool = True,
                      canvas_size: int | None = None, device=None,
                      limit: int = 0) -> BetonLoader:
    """In-order loader over `rank`'s disjoint slice: every sample exactly once across ranks.

    Serves evaluation and the teacher-cache pass. Unlike FFCV's distributed sampler it
    pads nothing, so no sample is seen twice and nothing needs de-duplication. `limit`
    > 0 covers only the first `limit` samples, as `train_loader`'s does.
    """
    def indices(count: int) -> np.ndarray:
        return shard_indices(min(limit, count) if limit else count, rank, world_size)

    return _open(beton_dir, split, canvas_size, device, batch_size=batch_size,
                 num_workers=num_workers, order=OrderOption.SEQUENTIAL, os_cache=os_cache,
                 indices=indices, drop_last=False)
