"""A sweep of students from one teacher against the same grid as independent runs.

    python benchmarks/sweep_vs_independent.py [--recipe recipes/digits_d06.toml]
        [--grid generations.lam=0.3,0.7] [--grid generations.temperature=1,4]
        [--epochs 12] [--parallel 1] [--set SECTION.KEY=VALUE ...]
        [--out bench_out/sweep_vs_independent.json]

Side by side in one run on this machine, with the same recipe, epochs and number of
points trained at a time, each arm in fresh processes as a user starts them:
- sweep: one patriarch (`fasttt/train.py ... generations.students=0`), then
  `python -m fasttt.sweep` over the grid: the first point builds the teacher's cache,
  every other point reads it;
- independent: one run per grid point as before sweeps existed, each training its own
  patriarch and then its student with an online teacher (cache.mode = "online").
Prints a table (wall seconds, and the sweep's time as a fraction of the independent
runs') and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "fasttt" / "train.py"


def grid_points(grid: list[str]) -> list[list[str]]:
    """Every combination of the grid's `key=v1,v2` values, as --set overrides."""
    points = [[]]
    for item in grid:
        key, _, values = item.partition("=")
        points = [[*p, f"{key}={v}"] for p in points for v in values.split(",")]
    return points


def timed(command: list[str], log: Path, threads: int | None = None) -> float:
    """Run `command` with its output to `log`; its wall seconds, or exit on a failure.

    `threads`: its share of the cores, as the sweep gives each of its points.
    """
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env).returncode
    if status:
        sys.exit(f"error: {' '.join(command)} failed (exit {status}); see {log}")
    return time.perf_counter() - start


def flags(overrides: list[str]) -> list[str]:
    """--set flags for each override."""
    return [arg for o in overrides for arg in ("--set", o)]


def main() -> None:
    """Time both arms one after the other and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits_d06.toml")
    parser.add_argument("--grid", action="append", default=None)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench_out/sweep_vs_independent.json"))
    args = parser.parse_args()
    grid = args.grid or ["generations.lam=0.3,0.7", "generations.temperature=1,4"]
    temperatures = next((g.partition("=")[2] for g in grid
                         if g.startswith("generations.temperature=")), "1")
    work = Path(tempfile.mkdtemp(prefix="sweep_bench_"))
    common = [*args.set, f"schedule.epochs={args.epochs}", "run.log_with=[]",
              f"cache.temperatures=[{temperatures}]", f'data.beton_dir="{work / "data"}"']
    python = [sys.executable]
    console = Console()
    points = grid_points(grid)

    console.print(f"sweep arm: one patriarch, then {len(points)} students from its cache")
    teacher = timed([*python, str(TRAIN), str(args.recipe), *flags(common),
                     "--set", "generations.students=0", "--set", 'run.name="teacher"',
                     "--runs-dir", str(work / "runs")], work / "teacher.log")
    sweep = timed([*python, "-m", "fasttt.sweep", str(args.recipe),
                   *flags([*common, "generations.students=1",
                           f'generations.teacher="{work / "runs" / "teacher" / "gen0"}"']),
                   *(a for g in grid for a in ("--grid", g)), "--parallel", str(args.parallel),
                   "--runs-dir", str(work / "runs"), "--name", "sweep"], work / "sweep.log")

    console.print(f"independent arm: {len(points)} runs, each a patriarch and an online "
                  "student")

    def independent(i: int) -> float:
        overrides = [*common, *points[i], "generations.students=1", 'cache.mode="online"',
                     f'run.name="independent{i}"']
        return timed([*python, str(TRAIN), str(args.recipe), *flags(overrides),
                      "--runs-dir", str(work / "runs")], work / f"independent{i}.log",
                     threads=max(1, (os.cpu_count() or 1) // args.parallel))

    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(independent, range(len(points))))
    independent_s = time.perf_counter() - start

    sweep_s = teacher + sweep
    table = Table(title=f"{len(points)} students, {args.epochs} epochs each, "
                        f"{args.parallel} at a time")
    for column in ("arm", "wall s", "vs independent"):
        table.add_column(column, justify="right")
    table.add_row("sweep: patriarch", f"{teacher:.1f}", "")
    table.add_row("sweep: students from one cache", f"{sweep:.1f}", "")
    table.add_row("sweep, total", f"{sweep_s:.1f}", f"{sweep_s / independent_s:.3f}")
    table.add_row("independent runs, online teachers", f"{independent_s:.1f}", "1.000")
    console.print(table)
    result = {"recipe": str(args.recipe), "grid": grid, "epochs": args.epochs,
              "parallel": args.parallel, "points": len(points),
              "sweep_teacher_s": teacher, "sweep_students_s": sweep, "sweep_total_s": sweep_s,
              "independent_runs_s": runs, "independent_total_s": independent_s,
              "ratio_sweep_to_independent": sweep_s / independent_s,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
