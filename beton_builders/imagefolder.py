"""ImageNet-layout trees (`SRC/train/<class>/*`, `SRC/val/<class>/*`) as photo betons.

Unreadable images are skipped, not fatal: one build of ImageNet should not die on one
bad file. They are counted, the first few named in one warning, and all listed in the
manifest. A split left with no readable image is an error.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ffcv.fields import RGBImageField
from PIL import Image
from rich.markup import escape

from beton_builders.writing import console, label_fields, progress_bar, write_beton
from fasttt.errors import UserError, leave_signals_to_the_parent

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif"}
SHOWN_BAD_PATHS = 5


@dataclass(frozen=True)
class PhotoOptions:
    """How photos are stored (see FFCV's RGBImageField)."""

    max_resolution: int = 512  # longest side after downscaling, pixels
    jpeg_quality: int = 90
    write_mode: str = "jpg"  # raw | jpg | proportion
    compress_probability: float = 0.5  # share stored as JPEG when write_mode = proportion


def list_split(split_dir: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """(path, label) of every image file under `split_dir/<class>/`, in sorted order."""
    items = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if class_dir.is_dir():
            items += [(p, label) for p in sorted(class_dir.iterdir())
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return items


# torchvision's ImageNet dataset unpacks ILSVRC2012's flat val/ into one folder per class
# (its wnid), from the devkit's ground truth, when it finds both archives in its root.
SORT_VAL = "python -c \"import torchvision; torchvision.datasets.ImageNet('{src}', split='val')\""


def check_layout(src: Path) -> list[str]:
    """Class names (sorted train folders) after checking the ImageNet layout of `src`."""
    hint = "expected SRC/train/<class>/*.JPEG and SRC/val/<class>/*"
    for split in ("train", "val"):
        if not (src / split).is_dir():
            raise UserError(f"{src} has no {split}/ folder: {hint}")
    class_names = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    if not class_names:
        raise UserError(f"{src / 'train'} has no class folders: {hint}")
    extra = sorted({p.name for p in (src / "val").iterdir() if p.is_dir()} - set(class_names))
    if extra:
        raise UserError(f"{src / 'val'} has classes not in train ({', '.join(extra[:3])}): {hint}")
    if not any(p.is_dir() for p in (src / "val").iterdir()):
        raise UserError(f"{src / 'val'} has no class folders (a flat ImageNet val?): {hint}; "
                        f"to sort ILSVRC2012's, move {src / 'val'} aside, put "
                        f"ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in {src} and "
                        f"run `{SORT_VAL.format(src=shlex.quote(str(src)))}`")
    return class_names


def probe_image(path: Path) -> tuple[int, int] | str:
    """(height, width) of a decodable image, or the reason it cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # cheap full decode
            img.load()
        return height, width
    except Exception as err:  # any decoder failure makes the file unreadable, nothing more
        return f"{type(err).__name__}: {err}"


def probe_all(items: list[tuple[Path, int]], num_workers: int, description: str) -> list:
    """probe_image over every item, in parallel, with a progress bar."""
    paths = [p for p, _ in items]
    with progress_bar() as progress, multiprocessing.Pool(
            num_workers, initializer=leave_signals_to_the_parent) as pool:
        task = progress.add_task(description, total=len(paths), info="")
        results = []
        for result in pool.imap(probe_image, paths, chunksize=32):
            results.append(result)
            progress.advance(task)
    return results


class PhotoRows:
    """Indexable (image, label, index, height, width) rows that FFCV's writer reads."""

    def __init__(self, items: list[tuple[Path, int, int, int]], errors_path: Path):
        self.items, self.errors_path = items, errors_path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        path, label, height, width = self.items[i]
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
        except Exception as err:
            # An exception here would kill an FFCV worker and hang the writer, so the
            # failure is recorded for the parent and the build fails after writing.
            with open(self.errors_path, "a") as f:
                f.write(f"{path}: {type(err).__name__}: {err}\n")
            image = np.zeros((8, 8, 3), np.uint8)
        return image, label, i, height, width


def _warn_unreadable(split: str, bad: list[tuple[str, str]]) -> None:
    shown = escape("; ".join(f"{p} ({why})" for p, why in bad[:SHOWN_BAD_PATHS]))
    more = f" and {len(bad) - SHOWN_BAD_PATHS} more" if len(bad) > SHOWN_BAD_PATHS else ""
    console.print(f"[yellow]warning:[/] skipped {len(bad)} unreadable {split} image(s): "
                  f"{shown}{more} (all listed in manifest.json)", highlight=False, soft_wrap=True)


def build_imagefolder(staging: Path, src: Path, options: PhotoOptions,
                      num_workers: int) -> tuple[dict, dict]:
    """Write photo train/val betons into `staging`; return (manifest, counts)."""
    class_names = check_layout(src)
    image_field = RGBImageField(write_mode=options.write_mode,
                                max_resolution=options.max_resolution,
                                jpeg_quality=options.jpeg_quality,
                                compress_probability=options.compress_probability)
    fields = {"image": image_field, **label_fields(photo=True)}
    counts, skipped = {}, {}
    for split in ("train", "val"):
        items = list_split(src / split, class_names)
        probed = probe_all(items, num_workers, f"checking {split} images")
        good = [(p, label, *hw) for (p, label), hw in zip(items, probed, strict=True)
                if isinstance(hw, tuple)]
        bad = [(str(p), why) for (p, _), why in zip(items, probed, strict=True)
               if isinstance(why, str)]
        if bad:
            _warn_unreadable(split, bad)
        if not good:
            raise UserError(f"{src / split} holds no readable image: check the folder")
        errors_path = staging / f".{split}.errors"
        write_beton(staging / f"{split}.beton", PhotoRows(good, errors_path), fields,
                    num_workers, f"imagefolder {split}")
        if errors_path.exists():
            first = errors_path.read_text().splitlines()[0]
            raise UserError(f"an image failed to decode while writing ({first}): "
                            "remove or replace that file and rerun")
        counts[split], skipped[split] = len(good), [p for p, _ in bad]
    manifest = {
        "source": {"name": "imagefolder", "path": str(src.resolve())},
        "class_names": class_names,
        "image_policy": {"kind": "photo", **vars(options),
                         "note": "height/width fields hold each source image's original size"},
        "skipped_unreadable": skipped,
    }
    return manifest, counts


def default_workers() -> int:
    """Worker processes for building: every core this process may use."""
    return max(1, len(os.sched_getaffinity(0)))
