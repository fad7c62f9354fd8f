"""What verifying a teacher cache costs: sha256 of one view's slabs, as a student epoch reads it.

    python benchmarks/cache_verify.py [--repeats 5] [--out bench_out/cache_verify.json]

A cache records a sha256 of every view's slab of each array at build; a student checks a
view's slabs the first time it uses that view (fasttt/teachers.py), so a generation pays
one hash pass over each view, once per open. This times `fasttt.files.sha256_array` on
in-memory slabs shaped like one view of two real caches (ImageNet's extrapolated from its
rows, the hash being linear in bytes), and sets the time beside a student epoch: the
CIFAR-100 ResNet-56 goal of issue #13 on an H200 (1.5 s) and FFCV's published ResNet-18
rate on one A100 (about 10,000 images/s, 128 s for ImageNet's 1,281,167). Those epoch
times are stated figures, not measurements of this machine. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fasttt.cache import id_dtype
from fasttt.files import sha256_array, write_json

# name: (samples, kept logits k, classes, epoch seconds it is set beside, where from)
CACHES = {
    "CIFAR-100, all 100 logits": (50_000, 100, 100, 1.5, "issue #13's H200 goal"),
    "ImageNet, top-10 logits": (1_281_167, 10, 1000, 1_281_167 / 10_000,
                                "FFCV's ResNet-18, ~10,000 img/s on an A100"),
}
MEASURED_ROWS = 200_000  # ImageNet's view is timed on this many rows, then scaled


def view_slabs(samples: int, k: int, classes: int) -> dict[str, np.ndarray]:
    """One view of each cache array, filled with random bytes."""
    rng = np.random.default_rng(0)
    return {"values": rng.standard_normal((samples, k)).astype(np.float16),
            "ids": rng.integers(0, classes, (samples, k)).astype(id_dtype(classes)),
            "log_partition": rng.standard_normal(samples).astype(np.float32)}


def seconds_per_view(samples: int, k: int, classes: int, repeats: int) -> tuple[float, int]:
    """Median seconds to verify one view of `samples` rows, and that view's bytes."""
    rows = min(samples, MEASURED_ROWS)
    slabs = view_slabs(rows, k, classes)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for slab in slabs.values():
            sha256_array(slab)
        times.append(time.perf_counter() - start)
    per_row_bytes = sum(s.nbytes for s in slabs.values()) / rows
    return statistics.median(times) * samples / rows, int(per_row_bytes * samples)


def main() -> None:
    """Time each cache's view verification, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_out/cache_verify.json"))
    args = parser.parse_args()
    table = Table(title=f"verifying one cache view ({platform.processor() or platform.machine()},"
                        f" median of {args.repeats})")
    for column in ("cache", "view MB", "verify s", "MB/s", "epoch s (stated)", "share"):
        table.add_column(column, justify="left" if column == "cache" else "right")
    rows = {}
    for name, (samples, k, classes, epoch, source) in CACHES.items():
        seconds, size = seconds_per_view(samples, k, classes, args.repeats)
        rows[name] = {"samples": samples, "top_k": k, "view_bytes": size,
                      "verify_seconds": seconds, "epoch_seconds": epoch, "epoch_source": source,
                      "share_of_epoch": seconds / epoch}
        table.add_row(name, f"{size / 1e6:.1f}", f"{seconds:.3f}",
                      f"{size / 1e6 / seconds:,.0f}", f"{epoch:.1f}", f"{seconds / epoch:.2%}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"benchmark": "cache_verify", "cores": os.cpu_count(),
                          "cpu": platform.processor() or platform.machine(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
