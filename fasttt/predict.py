"""Classify images with an exported model: its top-5 classes, named, with probabilities.

    python -m fasttt.predict EXPORT_DIR IMAGE [IMAGE ...] [--max-pixels N]

Each image is shown to the model in the run's evaluation view (fasttt.augment.eval_view:
a centre crop of `crop_pct` of the shorter side, resized to the input size, normalised
with the run's mean and std), read from the export's config.json. Images of 16 bits per
channel (PNG, TIFF, PGM; 12-bit TIFF too) are scaled to 8 bits by their own bit depth, as
the 8-bit copy of the image would read; images of more than Pillow's decompression-bomb
limit of pixels (2 x Image.MAX_IMAGE_PIXELS) are refused before they are decoded, unless
--max-pixels allows them.

A model loaded by timm sees the same view through `preprocess`:

    model = timm.create_model("local-dir:EXPORT_DIR", pretrained=True).eval()
    logits = model(preprocess(read_image(path), timm.data.resolve_data_config(model=model)))
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fasttt.augment import eval_view
from fasttt.errors import OneLineParser, UserError, exit_on_user_error
from fasttt.export import load_export
from fasttt.recipe import AugmentConfig

USAGE = "python -m fasttt.predict EXPORT_DIR IMAGE [IMAGE ...] [--max-pixels N]"
# One channel of unsigned integers wider than 8 bits; Pillow's convert() clips them at 255.
WIDE_GREY = {"I;16", "I;16L", "I;16B", "I;16N"}
BITS_PER_SAMPLE = 258  # the TIFF tag


def default_max_pixels() -> int | None:
    """Pillow's own limit: it refuses an image of more than 2 x MAX_IMAGE_PIXELS pixels."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


@contextlib.contextmanager
def _size_checked_here():
    """Pillow's decompression-bomb check off while opening: read_image checks the size itself.

    (Pillow keeps its limit in a module global; predict runs one image at a time.)
    """
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _grey_bits(image: Image.Image) -> int | None:
    """The bit depth of a one-channel image Pillow holds in 16 or 32 bits; None if unknown."""
    if image.mode in WIDE_GREY:
        if image.format == "TIFF":  # a 12-bit TIFF reads as values 0..4095
            bits = image.tag_v2.get(BITS_PER_SAMPLE, 16)
            bits = bits[0] if isinstance(bits, tuple) else bits
            return bits if 8 < bits <= 16 else 16
        return 16
    if image.mode == "I" and image.format in ("PNG", "PPM"):  # PGM: scaled to 0..65535
        return 16
    return None  # 32-bit integers, signed 16-bit TIFF, floating point


def _rgb8(path: Path, image: Image.Image) -> np.ndarray:
    """An open image's pixels as (H, W, 3) uint8, scaled by its own bit depth."""
    if image.mode not in WIDE_GREY and image.mode not in ("I", "F"):
        return np.asarray(image.convert("RGB"))  # 16-bit RGB(A): Pillow keeps the high byte
    bits = _grey_bits(image)
    if bits is None:
        raise UserError(f"{path} holds pixels of Pillow mode {image.mode} (32-bit or signed "
                        "integers, or floating point), whose range predict cannot tell: save "
                        "it as an 8- or 16-bit PNG")
    grey = np.asarray(image).astype(np.float64) * (255 / (2 ** bits - 1))
    return np.repeat(np.rint(grey).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def read_image(path: Path, max_pixels: int | None = None) -> torch.Tensor:
    """An image file as a (1, 3, H, W) uint8 tensor, or a one-line refusal.

    `max_pixels` (default: Pillow's limit) refuses larger images from their header alone.
    """
    limit = default_max_pixels() if max_pixels is None else max_pixels
    try:
        with _size_checked_here(), Image.open(path) as image:
            pixels = image.width * image.height
            if limit is not None and pixels > limit:
                raise UserError(f"{path} is {image.width} x {image.height} = {pixels:,} "
                                f"pixels, more than the limit of {limit:,} (Pillow's guard "
                                "against decompression bombs): if you trust the file, rerun "
                                f"with --max-pixels {pixels}")
            array = _rgb8(path, image)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"cannot read {path} as an image ({err.__class__.__name__}): give "
                        "a JPEG, PNG or another format Pillow reads") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def preprocess(images: torch.Tensor, data_config: Mapping) -> torch.Tensor:
    """uint8 images (B, 3, H, W) in the run's evaluation view: what the model saw in eval.

    `data_config`: an export's pretrained_cfg, `model.pretrained_cfg` or timm's
    resolve_data_config(model=model). A centre crop of crop_pct of the shorter side, then
    an antialiased bilinear resize to input_size, in float (timm resizes first, then crops).
    """
    size, mode = data_config["input_size"][-1], data_config.get("crop_mode", "center")
    if data_config.get("interpolation") != "bilinear" or mode != "center":
        raise UserError(f"a data config of {data_config.get('interpolation')} interpolation "
                        f"and crop mode {mode} is not a fasttt export's: give the export's "
                        "pretrained_cfg, or the data config of a model loaded from it")
    view = AugmentConfig(eval_size=size, eval_crop_ratio=data_config["crop_pct"],
                         mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))
    return eval_view(images, size=size, augment=view)


def top5(model: torch.nn.Module, config: dict, image: torch.Tensor) -> list[tuple[str, float]]:
    """The five likeliest classes of one image and their probabilities, likeliest first."""
    with torch.no_grad():
        out = model(preprocess(image, config["pretrained_cfg"])).float()
    probabilities = out if config["fasttt"]["outputs"] == "probabilities" else out.softmax(1)
    best = probabilities[0].topk(min(5, probabilities.shape[1]))
    return [(config["label_names"][i], p) for p, i in zip(best.values.tolist(),
                                                          best.indices.tolist(), strict=True)]


def main(argv: list[str] | None = None) -> None:
    """Print each image's top-5 classes with their probabilities."""
    parser = OneLineParser(prog="python -m fasttt.predict", description=__doc__.splitlines()[0],
                           usage_line=USAGE)
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR",
                        help="a directory made by python -m fasttt.export")
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                        help="an image file Pillow reads (JPEG, PNG, ...); several are classified "
                             "in turn")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="refuse images of more pixels (default: Pillow's limit, "
                             f"{default_max_pixels() or 'none'})")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UserError(f"--max-pixels {args.max_pixels}: must be at least 1")
    if not args.export_dir.is_dir():
        raise UserError(f"{args.export_dir}: no such directory (give a directory made by "
                        "python -m fasttt.export)")
    missing = next((path for path in args.images if not path.exists()), None)
    if missing is not None:  # before the model loads, and before any image is classified
        raise UserError(f"{missing}: no such file")
    model, config = load_export(args.export_dir)
    for path in args.images:
        ranked = top5(model, config, read_image(path, args.max_pixels))
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))


if __name__ == "__main__":
    exit_on_user_error(main)
