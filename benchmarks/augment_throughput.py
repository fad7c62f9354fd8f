"""Augmentation throughput on this machine's CPU (or --device), side by side in one run.

    python benchmarks/augment_throughput.py [--device cpu] [--repeats 20] [--out FILE]

Times fasttt.augment's train and eval views on the two batch shapes that matter: a
256-image CIFAR batch (32x32, pad-4 crop + flip) and a 64-image photo batch on a 512
canvas cropped to 224 (random-resized-crop + flip; centre crop for eval). Prints a
table of images/s (median over repeats, after a warm-up) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fasttt.augment import eval_view, train_view
from fasttt.recipe import AugmentConfig


def time_call(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` calls after two warm-up calls."""
    times = []
    for r in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(device: torch.device) -> dict:
    """name -> (batch size, thunk) for every measured case."""
    g = torch.Generator().manual_seed(0)
    cifar = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
    photos = torch.randint(0, 256, (64, 3, 512, 512), dtype=torch.uint8, generator=g)
    cifar = cifar.to(device).contiguous(memory_format=torch.channels_last)
    photos = photos.to(device).contiguous(memory_format=torch.channels_last)
    extent = torch.tensor([[375, 500], [500, 333]] * 32, device=device)
    pad_crop = AugmentConfig()
    resized = AugmentConfig(kind="resized_crop", eval_crop_ratio=0.875)
    dtype = torch.bfloat16
    return {
        "cifar train (pad-crop, flip) 256x32": (256, lambda: train_view(
            cifar, torch.arange(256), seed=0, view=1, size=32, augment=pad_crop, dtype=dtype)),
        "cifar eval 256x32": (256, lambda: eval_view(cifar, size=32, augment=pad_crop,
                                                      dtype=dtype)),
        "photo train (rrc, flip) 64 -> 224": (64, lambda: train_view(
            photos, torch.arange(64), seed=0, view=1, size=224, augment=resized, extent=extent,
            dtype=dtype)),
        "photo eval (centre crop) 64 -> 224": (64, lambda: eval_view(
            photos, size=224, augment=resized, extent=extent, dtype=dtype)),
    }


def main() -> None:
    """Measure every case, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench_out/augment_throughput.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    table = Table(title=f"fasttt.augment on {device} ({torch.get_num_threads()} threads), "
                        f"median of {args.repeats}")
    for column in ("case", "batch", "ms/batch", "images/s"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, (batch, thunk) in cases(device).items():
        seconds = time_call(thunk, args.repeats, device)
        rows.append({"case": name, "batch": batch, "seconds": seconds,
                     "images_per_s": batch / seconds})
        table.add_row(name, str(batch), f"{seconds * 1e3:.1f}", f"{batch / seconds:,.0f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "augment_throughput", "device": str(device),
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
