"""What data.decode = "gpu" costs the CPU: the JPEG bytes path beside FFCV's decode.

    python benchmarks/decode_path.py [--photos 1000] [--batch 64] [--canvas 512]
        [--workers N] [--device cpu] [--repeats 3] [--out bench_out/decode_path.json]

On ImageNet-like JPEGs (benchmarks/synthetic.py, about 400x350, ~100 KB), one epoch of
each path over the same beton, alternating, median of --repeats after a warm-up each:

1. ffcv: FFCV's threads decode each JPEG into a packed batch, ToDevice copies it, the
   loader's iterator unpacks it into canvases on --device (data.decode = "cpu", the
   default);
2. bytes only: FFCV's threads copy each JPEG's bytes into fixed-width rows, batched, and
   nothing decodes them: the CPU's whole share of data.decode = "gpu" on a GPU;
3. bytes + device decode: those rows decoded by torchvision on --device and placed on
   canvases in the loader's iterator (data.decode = "gpu"). On the CPU torchvision decodes
   in the consuming thread, one image after another, whatever --workers says, and the
   placement's small copies take torch's intra-op threads, which FFCV sets to --workers:
   on a machine whose cores are busy those wait on each other at every copy;
4. split: data.gpu_decode_percent = 50, half of the samples (by index) decoded by FFCV's
   threads onto canvases that are sent as in 1, the other half sent as bytes and decoded
   as in 3 onto those canvases: both decoders at once, the by-index split's overhead.

With the bytes each image sends to the device: on FFCV's path the packed photo with its
border (counted from what the loader copies, against the canvas it used to send), or its
compressed JPEG (nvJPEG reads each row up to the JPEG's length; the rows are the largest
JPEG wide on the host).
`--device cuda` times rows 1, 3 and 4 on a GPU (nvJPEG), the measurement data.decode = "auto"
waits for; it has not been run yet. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import synthetic  # benchmarks/synthetic.py: a script's folder comes first on the path
import torch
from rich.console import Console
from rich.table import Table

from fasttt.betons import image_storage, read_manifest, split_path
from fasttt.data import sequential_loader

CLASSES = 10
LABELS = {"ffcv": "FFCV decode, packed + ToDevice + unpack (data.decode = \"cpu\")",
          "bytes": "JPEG bytes into rows + batching (the CPU's share of \"gpu\")",
          "bytes_decoded": "bytes + torchvision decode + placement on the device (\"gpu\")",
          "split": "half by FFCV, half by torchvision, by sample index (gpu_decode_percent 50)"}


def epoch_seconds(batches, device: torch.device) -> float:
    """Seconds for one full pass over an iterable of batches, the device's work included."""
    start = time.perf_counter()
    for _ in batches:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_paths(betons: Path, args) -> dict[str, list[float]]:
    """Epoch seconds of each path, alternating so that drift hits all alike."""
    settings = dict(split="train", batch_size=args.batch, num_workers=args.workers,
                    canvas_size=args.canvas, device=args.device)
    ffcv = sequential_loader(betons, **settings)
    on_device = sequential_loader(betons, decode="gpu", **settings)
    split = sequential_loader(betons, decode="gpu", gpu_percent=50, **settings)
    passes = {"ffcv": ffcv, "bytes": on_device.loader, "bytes_decoded": on_device,
              "split": split}
    seconds = {name: [] for name in passes}
    for r in range(args.repeats + 1):
        for name, batches in passes.items():
            took = epoch_seconds(batches, args.device)
            if r:  # the first pass of each compiles its numba code and warms the page cache
                seconds[name].append(took)
    return seconds


def main() -> None:
    """Build the betons in a scratch directory, time the three paths, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000, help="ImageNet-like JPEGs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--canvas", type=int, default=512, help="canvas side, pixels")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_out/decode_path.json"))
    args = parser.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="fasttt-bench-") as scratch:
        work = Path(scratch)
        synthetic.write_photo_tree(work / "tree", args.photos, CLASSES, args.workers)
        synthetic.build_photo_betons(work / "tree", work / "photos",
                                     synthetic.photo_options("fasttt", args.canvas), args.workers)
        manifest = read_manifest(work / "photos")
        count = manifest["splits"]["train"]["count"]
        _, stored = image_storage(split_path(work / "photos", manifest, "train"), manifest,
                                  count)
        console.print(f"timing the four paths over {count} photos ...")
        seconds = time_paths(work / "photos", args)
        packed = sum(fields[0].numel() for fields in sequential_loader(
            work / "photos", split="train", batch_size=args.batch, num_workers=args.workers,
            canvas_size=args.canvas, device=args.device).loader) / count
    rates = {name: count / statistics.median(took) for name, took in seconds.items()}
    sent = {"canvas": args.canvas**2 * 3, "packed_mean": packed,
            "jpeg_mean": float(stored.mean()), "jpeg_row_width": int(stored.max())}
    table = Table(title=f"the decode path on the CPU: {count} ImageNet-like JPEGs, batch "
                        f"{args.batch}, {args.canvas}-pixel canvas, {args.workers} FFCV "
                        f"workers, on {args.device}, median of {args.repeats} epochs")
    for column in ("path", "images/s", "x ffcv"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, rate in rates.items():
        table.add_row(LABELS[name], f"{rate:,.0f}", f"{rate / rates['ffcv']:.2f}")
    Console().print(table)
    print(f"bytes per image to the device: canvas {sent['canvas']:,}; packed "
          f"{sent['packed_mean']:,.0f} on average (FFCV's path, "
          f"{sent['canvas'] / sent['packed_mean']:.2f}x fewer); JPEG "
          f"{sent['jpeg_mean']:,.0f} ({sent['canvas'] / sent['jpeg_mean']:.1f}x fewer), rows "
          f"{sent['jpeg_row_width']:,} wide on the host")
    result = {"benchmark": "decode_path",
              "hardware": {"cpu": platform.processor() or platform.machine(),
                           "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                           "gpu": (torch.cuda.get_device_name(args.device)
                                   if args.device.type == "cuda" else None)},
              "config": vars(args) | {"out": str(args.out), "device": str(args.device)},
              "images": count,
              "epoch_seconds": seconds, "images_per_s": rates, "bytes_per_image": sent}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
