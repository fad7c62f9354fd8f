"""CIFAR-10/100 from the official python pickle release, read with a restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from beton_builders.writing import ImageRows, raw_image_fields, write_beton
from fasttt.errors import UserError, one_line

DOWNLOAD_HINT = "download and extract the python version from https://www.cs.toronto.edu/~kriz/cifar.html"

# The only globals the official files (and numpy re-pickles of them) need.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}

LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "val": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "val": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside the few numpy ones CIFAR files use."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    """Load one CIFAR pickle safely; anything but plain data is refused before it runs."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as err:  # damaged pickles fail with many types, MemoryError included
        raise UserError(f"refusing {path}: not a plain CIFAR pickle ({type(err).__name__}: "
                        f"{one_line(err)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"refusing {path}: expected a dict, found {type(obj).__name__}")
    return obj


def _field(batch: dict, key: bytes, path: Path):
    if key not in batch:
        raise UserError(f"{path} has no {key.decode()} entry: is it from the official release?")
    return batch[key]


def _names(meta: dict, key: bytes, path: Path) -> list[str]:
    names = _field(meta, key, path)
    try:
        if isinstance(names, list) and names and all(isinstance(n, bytes) for n in names):
            return [n.decode() for n in names]
    except UnicodeDecodeError:
        pass
    raise UserError(f"{path}: {key.decode()} is not a list of UTF-8 names: "
                    "is it from the official release?")


def _labels(batch: dict, key: bytes, path: Path, count: int, classes: int) -> np.ndarray:
    try:
        labels = np.asarray(_field(batch, key, path), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = None
    if labels is None or labels.shape != (count,):
        raise UserError(f"{path}: {key.decode()} is not a list of {count} integers, one per image")
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(f"{path}: {key.decode()} values lie outside 0..{classes - 1}")
    return labels


def _read_split(src: Path, files: list[str], layout: dict, classes: tuple[int, int]):
    images, labels, coarse_labels = [], [], []
    for name in files:
        path = src / name
        batch = load_pickle(path)
        try:
            data = np.asarray(_field(batch, b"data", path))
        except ValueError:  # ragged nested lists
            data = np.zeros(0, np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{path}: data is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(_labels(batch, layout["label_key"], path, len(data), classes[0]))
        if classes[1]:
            coarse_labels.append(_labels(batch, b"coarse_labels", path, len(data), classes[1]))
    join = np.concatenate
    return join(images), join(labels), (join(coarse_labels) if coarse_labels else None)


def _fine_to_coarse(fine: np.ndarray, coarse: np.ndarray, num_fine: int) -> list[int]:
    mapping = [-1] * num_fine
    for f, c in set(zip(fine.tolist(), coarse.tolist(), strict=True)):
        if mapping[f] not in (-1, c):
            raise UserError(f"fine class {f} appears under two coarse classes: corrupt labels")
        mapping[f] = c
    return mapping


def check_layout(src: Path, source: str) -> dict:
    """Return the layout of `source` after checking that `src` holds every file it needs."""
    layout = LAYOUTS[source]
    if not src.is_dir():
        raise UserError(f"{src} is not a directory: {DOWNLOAD_HINT} ({layout['folder']})")
    missing = [n for n in layout["train"] + layout["val"] + [layout["meta"]]
               if not (src / n).is_file()]
    if missing:
        raise UserError(f"{src} is not a {layout['folder']} directory (missing "
                        f"{', '.join(missing)}): {DOWNLOAD_HINT}")
    return layout


def build_cifar(staging: Path, src: Path, source: str) -> tuple[dict, dict]:
    """Write CIFAR train/val betons into `staging`; return (manifest, counts)."""
    layout = check_layout(src, source)
    coarse = source == "cifar100"
    meta_path = src / layout["meta"]
    meta = load_pickle(meta_path)
    class_names = _names(meta, layout["names_key"], meta_path)
    coarse_names = _names(meta, b"coarse_label_names", meta_path) if coarse else []
    classes = (len(class_names), len(coarse_names))
    # Read and check every file before writing anything, so bad input fails fast.
    splits = {split: _read_split(src, layout[split], layout, classes) for split in ("train", "val")}
    manifest = {
        "source": {"name": source, "path": str(src.resolve())},
        "class_names": class_names,
        "image_policy": {"kind": "fixed", "height": 32, "width": 32, "write_mode": "raw"},
    }
    if coarse:
        manifest["coarse_class_names"] = coarse_names
        fine, coarse_labels = (np.concatenate([s[i] for s in splits.values()]) for i in (1, 2))
        manifest["fine_to_coarse"] = _fine_to_coarse(fine, coarse_labels, len(class_names))
    for split, rows in splits.items():
        write_beton(staging / f"{split}.beton", ImageRows(*rows),
                    raw_image_fields(coarse=coarse), 1, f"{source} {split}")
    return manifest, {split: len(rows[1]) for split, rows in splits.items()}
