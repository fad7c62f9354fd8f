"""What predict makes of unusual image files: 16-bit and 12-bit pixels, huge headers, floats.

The model is an untrained export written here (no run trained): what matters is that
an image and its 8-bit copy reach it as the same pixels, and so get the same top-5.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, one_line_refusal
from PIL import Image

from fasttt.checkpoint import save_weights
from fasttt.export import CONFIG, WEIGHTS, pretrained_cfg
from fasttt.files import write_json
from fasttt.models import create_model
from fasttt.predict import main as predict_cli
from fasttt.predict import read_image
from fasttt.recipe import AugmentConfig

SIZE = (40, 48)  # (H, W): not the model's 32 x 32, so the evaluation view crops and resizes


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """An export of an untrained cifar_resnet20 on 10 classes, laid out as fasttt.export's."""
    out = tmp_path_factory.mktemp("export") / "model"
    out.mkdir()
    torch.manual_seed(0)
    save_weights(create_model("cifar_resnet20", 10), out / WEIGHTS)
    write_json(out / CONFIG, {
        "architecture": "cifar_resnet20", "num_classes": 10,
        "label_names": [f"class{i}" for i in range(10)],
        "pretrained_cfg": pretrained_cfg(AugmentConfig(eval_size=32), 10),
        "fasttt": {"run": "untrained", "generations": [0], "outputs": "logits"}})
    return out


def eight_bit(channels: int) -> np.ndarray:
    """8-bit ramps across the whole range 0..255: (H, W) or (H, W, 3)."""
    rows, cols = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    pixels = np.stack([(rows * 6 + cols * k) % 256 for k in (5, 2, 7)], axis=-1)
    return (pixels[..., 0] if channels == 1 else pixels).astype(np.uint8)


def to_16_bit(pixels: np.ndarray, noise: bool) -> np.ndarray:
    """value * 257 (the 16-bit copy), with low bits each side of it when `noise`."""
    wide = pixels.astype(np.int64) * 257
    if noise:
        wide += np.random.default_rng(0).integers(-128, 129, wide.shape)
    return wide.clip(0, 65535).astype(np.uint16)


def write(path: Path, pixels: np.ndarray) -> Path:
    """8-bit pixels through Pillow; 16-bit grey through Pillow, 16-bit RGB through OpenCV."""
    if pixels.dtype == np.uint16 and pixels.ndim == 3:  # Pillow has no 16-bit RGB mode
        assert cv2.imwrite(str(path), np.ascontiguousarray(pixels[..., ::-1]))
    else:
        Image.fromarray(pixels).save(path)
    return path


def tiff_12_bit(path: Path, values: np.ndarray) -> Path:
    """A grey TIFF of 12 bits per sample (two pixels in three bytes), as cameras write."""
    height, width = values.shape
    flat = values.astype(np.int64).ravel()
    packed = bytearray()
    for a, b in zip(flat[0::2], flat[1::2], strict=True):
        packed += bytes([a >> 4, (a & 15) << 4 | b >> 8, b & 255])
    tags = [(256, 3, width), (257, 3, height), (258, 3, 12), (259, 3, 1), (262, 3, 1),
            (273, 4, 8), (277, 3, 1), (278, 3, height), (279, 4, len(packed))]
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + len(packed)) + packed
                     + struct.pack("<H", len(tags))
                     + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                for tag, kind, value in tags) + b"\0\0\0\0")
    return path


def predictions(exported: Path, paths: list[Path], capsys, *flags: str) -> list[str]:
    """predict's top-5 for each image, without the image's name."""
    capsys.readouterr()
    predict_cli([str(exported), *map(str, paths), *flags])
    return [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_image_reads_as_its_8_bit_copy(exported, tmp_path, capsys, channels, suffix):
    # A 16-bit grey PNG was clipped at 255 (99.6 % white) and got another top-5, exit 0.
    pixels = eight_bit(channels)
    copy = write(tmp_path / f"8bit{suffix}", pixels)
    wide = write(tmp_path / f"16bit{suffix}", to_16_bit(pixels, noise=False))
    noisy = write(tmp_path / f"16bit_noisy{suffix}", to_16_bit(pixels, noise=True))
    assert cv2.imread(str(wide), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16 bits
    expected = read_image(copy)
    assert torch.equal(read_image(wide), expected)
    difference = (read_image(noisy).int() - expected.int()).abs()
    assert difference.max() <= 1  # 1/255: rounding, whatever the low byte
    first, second = predictions(exported, [copy, wide], capsys)
    assert first == second


def test_16_bit_pgm_and_12_bit_tiff_scale_by_their_own_depth(exported, tmp_path, capsys):
    pixels = eight_bit(1)
    copy = write(tmp_path / "8bit.png", pixels)
    pgm = write(tmp_path / "16bit.pgm", to_16_bit(pixels, noise=False))  # Pillow: mode I
    twelve = tiff_12_bit(tmp_path / "12bit.tif", np.rint(pixels * (4095 / 255)))
    assert Image.open(twelve).getextrema() == (0, 4095)
    for path in (pgm, twelve):
        assert torch.equal(read_image(path), read_image(copy)), path
    assert len(set(predictions(exported, [copy, pgm, twelve], capsys))) == 1


@pytest.mark.parametrize("dtype, mode", [(np.float32, "F"), (np.int32, "I")])
def test_pixels_of_unknown_range_are_refused_in_one_line(exported, tmp_path, dtype, mode):
    path = tmp_path / "wide.tif"
    Image.fromarray(eight_bit(1).astype(dtype)).save(path)
    one_line_refusal(lambda: predict_cli([str(exported), str(path)]), str(path),
                     f"Pillow mode {mode}", "save it as an 8- or 16-bit PNG")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height 8-bit RGB pixels and holds almost none of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_in_one_line_from_its_header(exported, tmp_path,
                                                                      monkeypatch):
    # It was a 24-line DecompressionBombError traceback.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    limit = 2 * Image.MAX_IMAGE_PIXELS

    def no_decoding(*args):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    one_line_refusal(lambda: predict_cli([str(exported), str(bomb)]), str(bomb),
                     "20000 x 20000 = 400,000,000 pixels", f"limit of {limit:,}",
                     "rerun with --max-pixels 400000000")
    assert Image.MAX_IMAGE_PIXELS == limit // 2  # Pillow's own limit is left as it was


def test_the_advice_to_raise_the_pixel_limit_works(exported, tmp_path, capsys):
    path = write(tmp_path / "photo.png", eight_bit(3))
    message = one_line_refusal(lambda: predict_cli([str(exported), str(path), "--max-pixels",
                                                    "1000"]),
                               "48 x 40 = 1,920 pixels", "limit of 1,000",
                               "rerun with --max-pixels 1920")
    advice = message.split("rerun with ")[1].split()
    assert predictions(exported, [path], capsys, *advice) == predictions(exported, [path],
                                                                         capsys)
    one_line_refusal(lambda: predict_cli([str(exported), str(path), "--max-pixels", "0"]),
                     "--max-pixels 0: must be at least 1")


def test_predict_and_export_start_without_ffcv():
    # They read manifests, never betons: importing FFCV would compile numba's typed dict
    # (2.5 s of a 7 s start) for nothing.
    code = ("import sys, fasttt.export, fasttt.predict; "
            "print(sorted(m for m in ('ffcv', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
