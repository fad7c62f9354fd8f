"""Loader throughput: fasttt's FFCV loader against the usual PyTorch loaders, side by side.

    python benchmarks/loader_throughput.py [--images 2000] [--workers 2] [--out result.json]

Generates an ImageFolder tree of ImageNet-like JPEGs (about 400x350, ~100 KB each),
builds a beton from it with fasttt's builder, then times one epoch of each loader on
the same images and the same number of workers (median of --repeats, after a warm-up):

- fasttt:       the FFCV beton, each photo decoded onto the canvas (what training reads)
- imagefolder:  torchvision ImageFolder + PIL decode, placed on the same canvas, DataLoader
- decode_jpeg:  DataLoader reading bytes, torchvision.io.decode_jpeg, same canvas
- ceiling:      libjpeg-turbo (decode_jpeg) decoding the same bytes from memory, nothing else
- fasttt_shrink: fasttt with a canvas smaller than the photos (DCT + area downscale)
- fasttt_raw32: the raw-mode beton of 50,000 CIFAR-size (32x32) images

The canvas holds each photo unresampled at its top-left (fasttt/canvas.py), so the
baselines do the same work: decode, then place on a canvas of the same size. The
fasttt_shrink row does more (a DCT-domain and area downscale), so its ratios to the
full-size decode ceiling only show what a too-small canvas costs.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import synthetic  # benchmarks/synthetic.py: a script's folder comes first on the path
import torch
import torchvision.transforms.v2.functional as TF
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.io import decode_jpeg

from fasttt.data import sequential_loader
from fasttt.errors import leave_signals_to_the_parent

CLASSES = 10
MAX_RESOLUTION = 512  # the beton's longest side: the photos (at most 450 px) stay unresampled


def timed_epochs(make_iter, repeats: int) -> list[float]:
    """Seconds for each of `repeats` full passes, after one untimed warm-up pass."""
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for _ in make_iter():
            pass
        if r:
            times.append(time.perf_counter() - start)
    return times


def on_canvas(image: torch.Tensor, size: int) -> torch.Tensor:
    """A CHW uint8 image placed at the top-left of a size x size canvas (rest unset, as ours)."""
    canvas = torch.empty((3, size, size), dtype=torch.uint8)
    canvas[:, : image.shape[1], : image.shape[2]] = image[:, :size, :size]
    return canvas


class JpegBytes(Dataset):
    """Files read as bytes, decoded by torchvision.io.decode_jpeg, placed on the canvas."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = torch.frombuffer(bytearray(self.paths[i].read_bytes()), dtype=torch.uint8)
        return on_canvas(decode_jpeg(data), self.size)


def pil_on_canvas(size: int):
    """ImageFolder transform: PIL image -> CHW uint8 tensor on the canvas."""
    return lambda image: on_canvas(TF.pil_to_tensor(image.convert("RGB")), size)


_CEILING_BYTES: list[torch.Tensor] = []


def _decode_slice(bounds: tuple[int, int]) -> int:
    for data in _CEILING_BYTES[bounds[0]:bounds[1]]:
        decode_jpeg(data)
    return bounds[1] - bounds[0]


def ceiling_epochs(paths: list[Path], workers: int, repeats: int) -> list[float]:
    """libjpeg-turbo alone: forked workers decode in-memory bytes, nothing else."""
    _CEILING_BYTES[:] = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                         for p in paths]
    cuts = np.linspace(0, len(paths), workers * 8 + 1).astype(int)
    slices = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))
    torch.set_num_threads(1)
    with multiprocessing.get_context("fork").Pool(
            workers, initializer=leave_signals_to_the_parent) as pool:
        return timed_epochs(lambda: pool.imap_unordered(_decode_slice, slices), repeats)


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Run every loader once per repeat and return images/s per loader."""
    console = Console(stderr=True)
    tree, w, n, size = work / "tree", args.workers, args.images, args.canvas
    mean_kb = synthetic.write_photo_tree(tree, n, CLASSES, w)
    console.print(f"mean JPEG {mean_kb:.0f} KB; building betons ...")
    synthetic.build_photo_betons(tree, work / "photos",
                                 synthetic.photo_options("fasttt", MAX_RESOLUTION), w)
    paths = sorted(tree.glob("train/*/*.JPEG"))
    def fasttt(canvas_size):
        return lambda: sequential_loader(work / "photos", split="train",
                                         batch_size=args.batch_size, num_workers=w,
                                         canvas_size=canvas_size)

    loaders = {
        "fasttt": fasttt(size),
        "imagefolder": lambda: DataLoader(
            ImageFolder(str(tree / "train"), transform=pil_on_canvas(size)),
            batch_size=args.batch_size, num_workers=w, persistent_workers=True),
        "decode_jpeg": lambda: DataLoader(JpegBytes(paths, size), batch_size=args.batch_size,
                                          num_workers=w, persistent_workers=True),
        "fasttt_shrink": fasttt(args.shrink_canvas),
    }
    seconds = {}
    for name, make in loaders.items():
        console.print(f"timing {name} ...")
        loader = make()
        seconds[name] = timed_epochs(lambda loader=loader: iter(loader), args.repeats)
    console.print("timing ceiling ...")
    seconds["ceiling"] = ceiling_epochs(paths, w, args.repeats)
    torch.set_num_threads(w)
    console.print("timing raw CIFAR-size beton ...")
    seconds["fasttt_raw32"], raw_count = raw_small_images(work, w, args)
    counts = {name: n for name in seconds} | {"fasttt_raw32": raw_count}
    return {"mean_jpeg_kb": mean_kb, "seconds": seconds, "counts": counts}


def raw_small_images(work: Path, workers: int, args: argparse.Namespace):
    """Epoch times of fasttt's loader over a raw beton of 32x32 images (CIFAR's shape)."""
    count = 50_000
    out = work / "raw32"
    synthetic.write_fixed_betons(out, count, 32, CLASSES)
    loader = sequential_loader(out, split="train", batch_size=512, num_workers=workers)
    return timed_epochs(lambda: iter(loader), args.repeats), count


def report(result: dict, args: argparse.Namespace) -> dict:
    """Turn epoch times into images/s and ratios; print the table."""
    rates = {name: result["counts"][name] / statistics.median(times)
             for name, times in result["seconds"].items()}
    rows = []
    table = Table(title=f"loader throughput, {args.images} JPEGs on a {args.canvas}px canvas, "
                        f"{args.workers} workers, median of {args.repeats}")
    for column in ("loader", "images/s", "vs ceiling", "vs imagefolder+PIL"):
        table.add_column(column, justify="right" if column != "loader" else "left")
    for name, rate in rates.items():
        row = {"loader": name, "images_per_s": rate}
        if name != "fasttt_raw32":
            row |= {"vs_ceiling": rate / rates["ceiling"],
                    "vs_imagefolder": rate / rates["imagefolder"]}
        rows.append(row)
        table.add_row(name, f"{rate:,.0f}", f"{row.get('vs_ceiling', 0):.2f}"
                      if "vs_ceiling" in row else "-",
                      f"{row['vs_imagefolder']:.2f}" if "vs_imagefolder" in row else "-")
    Console().print(table)
    return {
        "benchmark": "loader_throughput",
        "hardware": {"cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "python": platform.python_version(),
                     "torch": torch.__version__},
        "config": vars(args) | {"out": str(args.out)},
        "mean_jpeg_kb": result["mean_jpeg_kb"],
        "epoch_seconds": result["seconds"],
        "rows": rows,
    }


def main() -> None:
    """Parse flags, measure in a scratch directory, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--canvas", type=int, default=512, help="canvas side, pixels")
    parser.add_argument("--shrink-canvas", type=int, default=256,
                        help="canvas side for the fasttt_shrink row, pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_out/loader_throughput.json"))
    args = parser.parse_args()
    if args.images < 100 or args.repeats < 1 or args.workers < 1:
        parser.error("--images must be >= 100, --repeats and --workers >= 1")
    with tempfile.TemporaryDirectory(prefix="fasttt-bench-") as work:
        result = report(measure(args, Path(work)), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
