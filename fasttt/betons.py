"""A beton directory: its manifest's format, and the checks that make its betons safe for FFCV.

beton_builders writes one `.beton` per split and a `manifest.json` (source, class names, image
policy, each split's file and count); the loaders (fasttt/data.py) and every later stage read
them back through `read_manifest`, `split_path` and `beton_fields`, which turn a missing or
damaged file into one line that says how to rebuild it. The lowest layer of the data path: it
imports nothing of fasttt but its errors, so the builders and the loaders both stand on it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from fasttt.errors import UserError

BUILD_HINT = "build it with `python -m beton_builders SOURCE [SRC] OUT_DIR`"
MANIFEST = "manifest.json"
PHOTO_OPTIONS = ("max_resolution", "jpeg_quality", "write_mode", "compress_probability")


def read_manifest(beton_dir: Path) -> dict:
    """The checked manifest.json of a beton directory, or a one-line error saying what to do."""
    path = Path(beton_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {beton_dir}: {BUILD_HINT}")
    try:
        manifest = json.loads(path.read_bytes())
        splits = manifest["splits"].values()
        names = manifest["class_names"]
        valid = (all(_plain_file_name(s["file"]) and _is_count(s["count"]) for s in splits)
                 and isinstance(names, list) and all(isinstance(n, str) for n in names)
                 and len(names) > 0
                 and isinstance(manifest["source"]["name"], str)
                 and manifest["image_policy"]["kind"] in ("fixed", "photo")
                 and all(_is_count(manifest["image_policy"].get(key, 0))
                         for key in ("height", "width", "max_resolution")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        valid = False
    if not valid:
        raise UserError(f"{path} is damaged: rebuild it with --force ({BUILD_HINT})")
    return manifest


def is_photo(manifest: dict) -> bool:
    """True for variable-size photo betons (decoded to a canvas, sizes stored)."""
    return manifest["image_policy"]["kind"] == "photo"


def split_path(beton_dir: Path, manifest: dict, split: str) -> Path:
    """The beton file of one split, or a one-line refusal when the split or its file is missing."""
    if split not in manifest["splits"]:
        raise UserError(f"{beton_dir} has no {split!r} split: it has {list(manifest['splits'])}")
    path = Path(beton_dir) / manifest["splits"][split]["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing or not a file: {rebuild_hint(beton_dir, manifest)}")
    return path


def rebuild_hint(beton_dir: Path, manifest: dict) -> str:
    """Advice that rebuilds `beton_dir` from the source its manifest records, as one command."""
    try:
        source = manifest["source"]
        name = source["name"]
        command = ["python", "-m", "beton_builders", name,
                   *([] if name == "digits" else [source["path"]]), str(beton_dir), "--force"]
        if name == "imagefolder":
            policy = manifest["image_policy"]
            for option in PHOTO_OPTIONS:
                command += [f"--{option.replace('_', '-')}", str(policy[option])]
        return f"rebuild it with `{shlex.join(command)}`"
    except (KeyError, TypeError):
        return f"rebuild it with --force ({BUILD_HINT})"


def beton_fields(path: Path, manifest: dict, count: int) -> list[str]:
    """The beton's field names, once the structures FFCV follows blindly are checked.

    FFCV trusts a beton's header, per-sample metadata and allocation table: damage there
    surfaces inside its loader threads, as a crash or a consumer that waits forever.
    Hashing the file against the manifest's sha256 would catch more but reads every byte
    (seconds per GB) on every open. These checks read only what FFCV's own Reader reads
    (header, metadata, allocation table: O(samples), some MB for ImageNet), so they catch
    truncation and damage to anything FFCV follows; damaged image bytes pass, as raw
    pixels merely change and the JPEG decoder writes only within its buffer.
    """
    fmt = _ffcv_format()
    try:
        header = np.fromfile(path, fmt.HeaderType, count=1)
        problem = _header_problem(path, header, count)
        if problem is None:
            descriptors = np.fromfile(path, fmt.FieldDescType, count=int(header[0]["num_fields"]),
                                      offset=fmt.HeaderType.itemsize)
            problem = (_fields_problem(descriptors, manifest)
                       or _samples_problem(path, header[0], descriptors, manifest))
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror})") from None
    if problem:
        raise UserError(f"{path} is damaged ({problem}): {rebuild_hint(path.parent, manifest)}")
    return _field_names(descriptors)


def train_labels(beton_dir: Path, manifest: dict) -> np.ndarray:
    """Every training sample's label, read from the beton's checked metadata (no decoding)."""
    path = split_path(beton_dir, manifest, "train")
    count = manifest["splits"]["train"]["count"]
    beton_fields(path, manifest, count)  # checked before its metadata is trusted
    _, descriptors = _checked_layout(path)
    return _sample_fields(path, descriptors, count)["label"].astype(np.int64)


def image_storage(path: Path, manifest: dict, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's image mode (FFCV's: 0 JPEG, 1 raw pixels) and stored bytes, in row order."""
    beton_fields(path, manifest, count)  # checked before its metadata and table are trusted
    header, descriptors = _checked_layout(path)
    table = np.fromfile(path, _ffcv_format().ALLOC_TABLE_TYPE,
                        offset=int(header["alloc_table_ptr"]))
    # one allocation per sample, its image (beton_fields checked it)
    stored = table["size"][np.argsort(table["sample_id"], kind="stable")]
    return _sample_fields(path, descriptors, count)["image"]["mode"], stored


def _ffcv_format():
    """FFCV's beton format (its header, field and table types), imported at a beton's first
    check rather than with this module: importing FFCV compiles numba's typed dict (2.5 s),
    which the commands that read manifests alone (report, export, predict) never need."""
    import ffcv.types

    return ffcv.types


def _checked_layout(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The header and field descriptors of a beton that beton_fields has checked."""
    fmt = _ffcv_format()
    header = np.fromfile(path, fmt.HeaderType, count=1)[0]
    descriptors = np.fromfile(path, fmt.FieldDescType, count=int(header["num_fields"]),
                              offset=fmt.HeaderType.itemsize)
    return header, descriptors


def _field_names(descriptors: np.ndarray) -> list[str]:
    return [bytes(d["name"]).decode("ascii").split("\0")[0] for d in descriptors]


def _header_problem(path: Path, header: np.ndarray, count: int) -> str | None:
    fmt = _ffcv_format()
    if len(header) == 0:
        return "shorter than its header"
    version, samples, page, table_at = (int(header[0][k]) for k in (
        "version", "num_samples", "page_size", "alloc_table_ptr"))
    fields = int(header[0]["num_fields"])
    metadata_at = fmt.HeaderType.itemsize + fields * fmt.FieldDescType.itemsize
    size = path.stat().st_size
    if version != fmt.CURRENT_VERSION:
        return f"FFCV format {version}, expected {fmt.CURRENT_VERSION}"
    if samples != count:
        return f"it holds {samples} samples, {MANIFEST} says {count}"
    if page <= 0 or page & (page - 1):
        return f"page size {page} is not a power of two"
    if not metadata_at <= table_at <= size or (size - table_at) % fmt.ALLOC_TABLE_TYPE.itemsize:
        return "truncated, or its allocation table is misplaced"
    return None


def _fields_problem(descriptors: np.ndarray, manifest: dict) -> str | None:
    if not all(bytes(d["name"]).isascii() for d in descriptors):
        return "a field name is not ASCII"
    names = _field_names(descriptors)
    kinds = dict(zip(names, descriptors["type_id"].tolist(), strict=True))
    # fasttt's betons hold one RGB image field (FFCV type 2), the rest are integers (type 1).
    wanted = {"image", "label", "index"} | ({"height", "width"} if is_photo(manifest) else set())
    if (len(kinds) != len(names) or not wanted <= set(kinds)
            or any(kind != (2 if name == "image" else 1) for name, kind in kinds.items())):
        return f"unexpected fields {kinds}"
    return None


def _samples_problem(path: Path, header, descriptors: np.ndarray, manifest: dict) -> str | None:
    fmt = _ffcv_format()
    samples, table_at = int(header["num_samples"]), int(header["alloc_table_ptr"])
    metadata_at = fmt.HeaderType.itemsize + descriptors.nbytes
    dtype = fmt.get_metadata_type(fmt.get_handlers(descriptors))
    if metadata_at + samples * dtype.itemsize > table_at:
        return "its sample metadata is cut short"
    field = _sample_fields(path, descriptors, samples)
    metadata_bytes = samples * dtype.itemsize
    image, policy = field["image"], manifest["image_policy"]
    longest = np.maximum(image["height"], image["width"])
    if not np.array_equal(field["index"], np.arange(samples)):
        return "its index field is not 0..N-1"
    if ((field["label"] < 0) | (field["label"] >= len(manifest["class_names"]))).any():
        return "a label lies outside the class names"
    if (image["mode"] > 1).any() or not (image["width"].all() and image["height"].all()):
        return "an image header is invalid"
    if policy["kind"] == "fixed" and any((image[side] != policy.get(side, image[side])).any()
                                         for side in ("height", "width")):
        return "an image size differs from the manifest's"
    if policy["kind"] == "photo" and (longest > policy.get("max_resolution", 2**16)).any():
        return "an image is larger than the manifest's max_resolution"
    table = np.fromfile(path, fmt.ALLOC_TABLE_TYPE, offset=table_at)
    table = table[np.argsort(table["sample_id"], kind="stable")]
    ptr, length, page = table["ptr"], table["size"], int(header["page_size"])
    if not (np.array_equal(table["sample_id"], np.arange(samples))
            and np.array_equal(ptr, image["data_ptr"])):
        return "its allocation table does not match its samples"
    if ((ptr < metadata_at + metadata_bytes) | (ptr > table_at) | (length == 0)
            | (length > table_at - ptr)).any() or (ptr // page != (ptr + length - 1) // page).any():
        return "an image lies outside its data page"
    raw = image["mode"] == 1
    if (length[raw] != image["width"][raw].astype(np.uint64) * image["height"][raw] * 3).any():
        return "a raw image's size does not match its width and height"
    return None


def _sample_fields(path: Path, descriptors: np.ndarray, samples: int) -> dict[str, np.ndarray]:
    """Each field's per-sample metadata (FFCV's table after the header), by field name."""
    fmt = _ffcv_format()
    metadata = np.fromfile(path, fmt.get_metadata_type(fmt.get_handlers(descriptors)),
                           count=samples, offset=fmt.HeaderType.itemsize + descriptors.nbytes)
    return {name: metadata[f"f{i}"] for i, name in enumerate(_field_names(descriptors))}


def _plain_file_name(name) -> bool:
    """True for a printable file name inside the beton directory (no path, no parent)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and name.isprintable())


def _is_count(count) -> bool:
    return isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**63
