"""What FFCV's ToDevice costs a CPU run: the loaders with and without it, side by side.

    python benchmarks/cpu_device_copy.py [--images 50000] [--photos 1000] [--workers 2]
        [--repeats 5] [--out bench_out/cpu_device_copy.json]

fasttt's loaders copy every batch to its device with FFCV's ToDevice on the CPU as on a
GPU, so that a CPU run takes the GPU's pipeline steps (the first H200 run died in a step
the CPU skipped). This times one epoch of the same loader over the same beton with that
copy and with it replaced by nothing, alternating the two (median of --repeats, after a
warm-up each): a raw beton of 32x32 images (CIFAR's shape, what CPU users train) and
ImageNet-like JPEGs on a 512-pixel canvas (the costliest copy per image). Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import synthetic  # benchmarks/synthetic.py: a script's folder comes first on the path
import torch
from ffcv.pipeline.operation import Operation
from rich.console import Console
from rich.table import Table

import fasttt.data
from fasttt.data import sequential_loader

CLASSES = 10


class NoCopy(Operation):
    """ToDevice's place in the pipeline, passing the batch through (the old CPU path)."""

    def __init__(self, device, non_blocking=True):
        super().__init__()

    def generate_code(self):
        return lambda batch, destination: batch

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state), None


def epoch_seconds(loader) -> float:
    """Seconds for one full pass over `loader`."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def compare(make_loader, repeats: int) -> dict[str, list[float]]:
    """Epoch seconds with and without the copy, alternating so drift hits both alike."""
    with mock.patch.object(fasttt.data, "ToDevice", NoCopy):
        without = make_loader()  # FFCV builds its pipeline here
    loaders = {"to_device": make_loader(), "no_copy": without}
    seconds = {name: [] for name in loaders}
    for r in range(repeats + 1):
        for name, loader in loaders.items():
            took = epoch_seconds(loader)
            if r:  # the first pass of each compiles its numba code and warms the page cache
                seconds[name].append(took)
    return seconds


def main() -> None:
    """Build the betons in a scratch directory, time both loaders on each, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="32x32 raw images")
    parser.add_argument("--photos", type=int, default=1000, help="ImageNet-like JPEGs")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_out/cpu_device_copy.json"))
    args = parser.parse_args()
    console = Console(stderr=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fasttt-bench-") as scratch:
        work = Path(scratch)
        synthetic.write_fixed_betons(work / "raw32", args.images, 32, CLASSES)
        synthetic.write_photo_tree(work / "tree", args.photos, CLASSES, args.workers)
        synthetic.build_photo_betons(work / "tree", work / "photos",
                                     synthetic.photo_options("fasttt", 512), args.workers)
        cases = {
            "raw 32x32, batch 512": (args.images, lambda: sequential_loader(
                work / "raw32", split="train", batch_size=512, num_workers=args.workers)),
            "JPEG on a 512 canvas, batch 64": (args.photos, lambda: sequential_loader(
                work / "photos", split="train", batch_size=64, num_workers=args.workers,
                canvas_size=512)),
        }
        for name, (count, make_loader) in cases.items():
            console.print(f"timing {name} ...")
            seconds = compare(make_loader, args.repeats)
            rate = {k: count / statistics.median(v) for k, v in seconds.items()}
            rows.append({"beton": name, "images": count, "epoch_seconds": seconds,
                         "images_per_s": rate, "ratio": rate["to_device"] / rate["no_copy"]})
    table = Table(title=f"FFCV's ToDevice on the CPU, {args.workers} workers, median of "
                        f"{args.repeats} epochs")
    for column in ("beton", "with ToDevice (img/s)", "without (img/s)", "ratio"):
        table.add_column(column, justify="left" if column == "beton" else "right")
    for row in rows:
        table.add_row(row["beton"], f"{row['images_per_s']['to_device']:,.0f}",
                      f"{row['images_per_s']['no_copy']:,.0f}", f"{row['ratio']:.3f}")
    Console().print(table)
    result = {"benchmark": "cpu_device_copy",
              "hardware": {"cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count(), "torch": torch.__version__},
              "config": vars(args) | {"out": str(args.out)}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
