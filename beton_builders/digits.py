"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits as 32x32 RGB betons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beton_builders.writing import (
    ImageRows,
    finish_manifest,
    print_summary,
    raw_image_fields,
    staged_output,
    write_beton,
)

SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def upsample_digits(pixels: np.ndarray) -> np.ndarray:
    """(N, 8, 8) intensities in 0..16 -> (N, 32, 32, 3) uint8, bilinear, gray replicated to RGB."""
    gray = torch.from_numpy(pixels.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    big = F.interpolate(gray, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    big = big.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
    return np.repeat(big[..., None], 3, axis=-1)


def build_digits(staging: Path) -> tuple[dict, dict]:
    """Write the digits train/val betons into `staging`; return (manifest, counts)."""
    # Imported here: scikit-learn costs a second, and fasttt/train.py imports this module.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = upsample_digits(digits.images)
    rows = np.arange(len(images))
    train_rows, val_rows = train_test_split(
        rows, test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    counts = {}
    for split, split_rows in (("train", np.sort(train_rows)), ("val", np.sort(val_rows))):
        data = ImageRows(images[split_rows], digits.target[split_rows])
        write_beton(staging / f"{split}.beton", data, raw_image_fields(), 1,
                    f"digits {split}")
        counts[split] = len(split_rows)
    manifest = {
        "source": {"name": "digits", "origin": "sklearn.datasets.load_digits"},
        "class_names": [str(d) for d in range(10)],
        "image_policy": {"kind": "fixed", "height": SIZE, "width": SIZE, "write_mode": "raw",
                         "note": "8x8 digits upsampled bilinearly to 32x32, gray as RGB"},
        "split_policy": {"kind": "stratified", "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED},
    }
    return manifest, counts


def build_digits_dir(out_dir: Path) -> dict:
    """`python -m beton_builders digits OUT_DIR` for a missing OUT_DIR, as a function.

    Builds atomically, prints the summary, and returns the manifest; the entry points call it
    to build the embedded default on first use.
    """
    with staged_output(out_dir) as staging:
        manifest = finish_manifest(staging, *build_digits(staging))
    print_summary(out_dir, manifest)
    return manifest
