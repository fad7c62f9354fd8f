"""Classify images with an exported model: its top-5 classes, named, with probabilities.

    python -m fasttt.predict OUT_DIR IMAGE [IMAGE ...]

Each image is shown to the model in the run's evaluation view (fasttt.augment.eval_view:
a centre crop of `crop_pct` of the shorter side, resized to the input size, normalised
with the run's mean and std), read from the export's config.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fasttt.augment import eval_view
from fasttt.errors import OneLineParser, UserError, exit_on_user_error
from fasttt.export import load_export
from fasttt.recipe import AugmentConfig

USAGE = "python -m fasttt.predict OUT_DIR IMAGE [IMAGE ...]"


def read_image(path: Path) -> torch.Tensor:
    """An image file as a (1, 3, H, W) uint8 tensor, or a one-line refusal."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read {path} as an image ({err.__class__.__name__}): give "
                        "a JPEG, PNG or another format Pillow reads") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]


def top5(model: torch.nn.Module, config: dict, image: torch.Tensor) -> list[tuple[str, float]]:
    """The five likeliest classes of one image and their probabilities, likeliest first."""
    cfg = config["pretrained_cfg"]
    view = AugmentConfig(eval_size=cfg["input_size"][-1], eval_crop_ratio=cfg["crop_pct"],
                         mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    with torch.no_grad():
        out = model(eval_view(image, size=view.eval_size, spec=view)).float()
    probabilities = out if config["fasttt"]["outputs"] == "probabilities" else out.softmax(1)
    best = probabilities[0].topk(min(5, probabilities.shape[1]))
    return [(config["label_names"][i], p) for p, i in zip(best.values.tolist(),
                                                          best.indices.tolist(), strict=True)]


def main(argv: list[str] | None = None) -> None:
    """Print each image's top-5 classes with their probabilities."""
    parser = OneLineParser(prog="python -m fasttt.predict", description=__doc__.splitlines()[0],
                           usage_line=USAGE)
    parser.add_argument("out_dir", type=Path, help="a directory made by python -m fasttt.export")
    parser.add_argument("images", type=Path, nargs="+")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    model, config = load_export(args.out_dir)
    for path in args.images:
        ranked = top5(model, config, read_image(path))
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))


if __name__ == "__main__":
    exit_on_user_error(main)
