"""Synthetic data for the benchmarks: ImageNet-like JPEG trees and the betons built from them.

- `synthetic_photo`: one ImageNet-like photo (about 400x350; ~100 KB as a quality-90 JPEG);
- `write_photo_tree`: N such JPEGs in ImageNet layout, written in parallel with progress;
- `photo_options`: how a photo beton stores them, fasttt's default policy or FFCV's own;
- `build_photo_betons`: photo betons of a tree, through fasttt's imagefolder builder;
- `write_fixed_betons`: raw betons of random fixed-size images, as the CIFAR builder writes.

The benchmarks import it as `synthetic`: `python benchmarks/NAME.py` puts this folder first
on the path.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image

from beton_builders.imagefolder import PhotoOptions, build_imagefolder
from beton_builders.writing import (
    ImageRows,
    finish_manifest,
    progress_bar,
    raw_image_fields,
    staged_output,
    write_beton,
)
from fasttt.errors import leave_signals_to_the_parent

JPEG_QUALITY = 90
NOISE_SIDE = 600  # the photo noise tile; photos are cut from it at random offsets
VAL_SHARE = 50  # one val photo per this many train photos
# How the betons store the photos: fasttt's default (every image a JPEG, the longest side
# the recipe's canvas) and FFCV's for its ImageNet anchors (its examples/imagenet README:
# `write_dataset.sh 400 0.10 90`, longest side 400, 10 % JPEG, the rest raw pixels).
PHOTO_POLICIES = ("fasttt", "ffcv")
FFCV_POLICY = PhotoOptions(max_resolution=400, jpeg_quality=JPEG_QUALITY, write_mode="proportion",
                           compress_probability=0.10)

_noise: np.ndarray | None = None


def synthetic_photo(seed: int) -> np.ndarray:
    """An ImageNet-like HWC uint8 photo: about 400x350, smooth colour fields plus grain.

    The grain (luminance and colour noise cut from one tile per process) is what brings
    JPEG files at quality 90 to ImageNet's ~100 KB.
    """
    global _noise
    if _noise is None:
        rng = np.random.default_rng(12345)
        shape = (NOISE_SIDE, NOISE_SIDE)
        _noise = (rng.normal(0, 30, (*shape, 1)) + rng.normal(0, 24, (*shape, 3))).astype(np.int16)
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(300, 401)), int(rng.integers(350, 451))
    cells = rng.integers(0, 256, (int(rng.integers(4, 16)), int(rng.integers(4, 16)), 3),
                         dtype=np.uint8)
    base = np.asarray(Image.fromarray(cells).resize((width, height), Image.BICUBIC), np.int16)
    top, left = rng.integers(0, NOISE_SIDE - height), rng.integers(0, NOISE_SIDE - width)
    return (base + _noise[top:top + height, left:left + width]).clip(0, 255).astype(np.uint8)


def _save_photo(job: tuple[Path, int]) -> int:
    path, seed = job
    Image.fromarray(synthetic_photo(seed)).save(path, format="JPEG", quality=JPEG_QUALITY)
    return path.stat().st_size


def write_photo_tree(root: Path, images: int, classes: int, workers: int) -> float:
    """`images` train JPEGs (and 1 val per 50) in ImageNet layout under `root`; mean KB per file.

    Photo i is `synthetic_photo(i)` in class i mod `classes`, so a tree is reproducible.
    """
    val = max(1, images // VAL_SHARE)
    jobs = []
    for split, count, first in (("train", images, 0), ("val", val, images)):
        for c in range(min(classes, count)):
            (root / split / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
        jobs += [(root / split / f"class{i % classes:04d}" / f"img{first + i:07d}.JPEG",
                  first + i) for i in range(count)]
    sizes = []
    with progress_bar() as progress, multiprocessing.Pool(
            workers, initializer=leave_signals_to_the_parent) as pool:
        task = progress.add_task("synthetic JPEGs", total=len(jobs), info="")
        for size in pool.imap_unordered(_save_photo, jobs, chunksize=32):
            sizes.append(size)
            progress.advance(task)
    return sum(sizes) / len(sizes) / 1024


def photo_options(policy: str, canvas_size: int) -> PhotoOptions:
    """The storage of `policy` (PHOTO_POLICIES) for a recipe whose canvas is `canvas_size`."""
    if policy == "ffcv":
        return dataclasses.replace(FFCV_POLICY,
                                   max_resolution=min(FFCV_POLICY.max_resolution, canvas_size))
    return PhotoOptions(max_resolution=canvas_size, jpeg_quality=JPEG_QUALITY, write_mode="jpg")


def build_photo_betons(tree: Path, out: Path, options: PhotoOptions, workers: int) -> None:
    """Photo betons of `tree` in `out`, stored as `options` say."""
    with staged_output(out) as staging:
        finish_manifest(staging, *build_imagefolder(staging, tree, options, workers))


def write_fixed_betons(out: Path, images: int, side: int, classes: int) -> None:
    """Train (`images`) and val (1 per 5) betons of random side x side images, stored raw."""
    rng = np.random.default_rng(0)
    counts = {"train": images, "val": max(1, images // 5)}
    with staged_output(out) as staging:
        for split, count in counts.items():
            pixels = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
            rows = ImageRows(pixels, rng.integers(0, classes, count))
            write_beton(staging / f"{split}.beton", rows, raw_image_fields(), 1,
                        f"synthetic {split}")
        finish_manifest(staging, {
            "source": {"name": "synthetic", "images": images},
            "class_names": [f"class{c}" for c in range(classes)],
            "image_policy": {"kind": "fixed", "height": side, "width": side,
                             "write_mode": "raw"}}, counts)
