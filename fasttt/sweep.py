"""A sweep of students from one teacher: one ordinary run per grid point, one shared cache.

    python -m fasttt.sweep RECIPE.toml --grid generations.lam=0.3,0.5,0.7 \\
        --grid generations.temperature=1,4 [--seeds 3] [--parallel N] \\
        [--set SECTION.KEY=VALUE ...] [--runs-dir runs] [--name NAME]

The recipe names the teacher, `[generations] teacher = "runs/NAME/genM"` (fasttt/adopt.py),
so no point trains a patriarch: each reads that generation's cache, built once by
whichever point comes first. Every point of the grid, and every seed (run.seed = the
recipe's + 0..N-1; the seed keys the student's initial weights and batch order, the
views stay the teacher's), is an ordinary resumable run directory, runs/NAME/<point>/,
trained by fasttt/train.py in a process of its own, N at a time: on a CPU the cores are
shared out, on several GPUs the points are spread over them, and small models share one.
A rerun skips the points that finished and resumes the others. As points finish,
runs/NAME/sweep.json, sweep.md and figures/sweep_<key>.png give the val top-1 of each
point's last generation, mean ± std over seeds, against each swept key. Stopped (Ctrl-C,
SIGTERM), the sweep stops its running points (SIGINT; SIGTERM 30 s later; SIGKILL 10 s
after that), says in one line each how each stopped, and stops within 45 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from fasttt.adopt import parse_teacher
from fasttt.betons import read_manifest
from fasttt.cache import check_cache_serves
from fasttt.errors import (
    OneLineParser,
    UserError,
    exit_on_user_error,
    raise_if_interrupted,
    signals_deferred,
)
from fasttt.figures import write_sweep_figures
from fasttt.files import write_json, write_text
from fasttt.progress import duration, log_line, progress_bar
from fasttt.recipe import BOOKKEEPING, load_recipe, toml_value
from fasttt.rundir import (
    EVAL,
    SUMMARY_JSON,
    finished_generations,
    generation_dir,
    has_trained,
    lock_run_dir,
    read_eval,
    recipe_changes,
)

USAGE = ("python -m fasttt.sweep RECIPE.toml --grid SECTION.KEY=V1,V2[,...] [--grid ...] "
         "[--seeds N] [--parallel N] [--set SECTION.KEY=VALUE ...] [--runs-dir DIR] "
         "[--name NAME]")
TRAIN = Path(__file__).resolve().parent / "train.py"
SWEEP_JSON, SWEEP_MD, POINT_LOG = "sweep.json", "sweep.md", "train.log"
FIXED = ("run.name", "run.seed", "generations.teacher")  # set by the sweep itself, or --seeds
POLL_S = 0.2
# How a stopping sweep stops its points: each signal, then the seconds the points still
# running get to end before the next. train.py raises at SIGINT where it is (its writes are
# atomic; it saves nothing more) and exits in seconds: 7-8 s for the tiny runs of
# tests/test_sweep.py on a loaded 2-core CPU, so 30 s leave room for bigger loaders and a
# busier machine. SIGTERM reaches the same handler: a second chance where the first signal
# was swallowed (a C callback) or ignored; 10 s. SIGKILL, to the point's whole process
# group (its loader workers too), cannot be refused, yet a process blocked in the kernel
# (I/O to a dead network disk) ends only when that returns: after 5 s the sweep leaves it.
STOP_STEPS = ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


@dataclass(frozen=True)
class Point:
    """One run of the sweep: a value for each swept key, and a seed."""

    name: str
    texts: dict[str, str]  # swept key -> its value as given on the command line
    seed: int

    def overrides(self) -> list[str]:
        """The `section.key=value` overrides that make the sweep's recipe this point's."""
        return [*(f"{key}={text}" for key, text in self.texts.items()),
                f"run.seed={self.seed}", f"run.name={toml_value(self.name)}"]


def parse_grid(text: str) -> tuple[str, list[str]]:
    """`section.key=v1,v2,...` -> (key, values as given); commas inside [...] stay."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or not values.strip():
        raise UserError(f"--grid {text}: expected SECTION.KEY=V1,V2,... e.g. "
                        "--grid generations.lam=0.3,0.5,0.7")
    if key in FIXED:
        raise UserError(f"--grid {text}: {key} is set by the sweep itself (use --seeds for "
                        "seeds, --name for the sweep's name)")
    parts, depth, current = [], 0, ""
    for char in values:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    if "" in parts or len(set(parts)) != len(parts):
        raise UserError(f"--grid {text}: each value must be given once, none empty")
    return key, parts


def _name_part(key: str, text: str, short: bool) -> str:
    label = key.split(".")[-1] if short else key
    return re.sub(r"[^A-Za-z0-9.+_=-]", "_", f"{label}{text}")


def grid_points(grid: dict[str, list[str]], seeds: list[int]) -> list[Point]:
    """Every combination of the grid's values (first key slowest), for each seed."""
    combos: list[dict[str, str]] = [{}]
    for key, values in grid.items():
        combos = [{**combo, key: value} for combo in combos for value in values]
    short = len({key.split(".")[-1] for key in grid}) == len(grid)
    return [Point("-".join([*(_name_part(k, t, short) for k, t in combo.items()),
                            f"seed{seed}"]), combo, seed)
            for combo in combos for seed in seeds]


def point_result(point: Point, values: dict, directory: Path, status: str) -> dict:
    """A point's row of sweep.json: its values, seed, status and last generation's accuracy."""
    row = {"name": point.name, "values": values, "seed": point.seed, "status": status}
    finished = finished_generations(directory) if directory.is_dir() else []
    if status == "finished" and finished:
        m = finished[-1]
        result = read_eval(directory, m)
        row |= {"generation": m, "val_top1_last": result["last"]["val_top1"],
                "val_top1_best": result["best"]["val_top1"]}
    return row


def summarize(name: str, teacher: str, recipe_path: Path, grid: dict[str, list],
              seeds: list[int], rows: list[dict]) -> dict:
    """sweep.json: the grid, every point, and per grid cell the mean and std over seeds."""
    cells = {}
    for row in rows:
        cell = cells.setdefault(repr(sorted(row["values"].items())),
                                {"values": row["values"], "val_top1": []})
        if row["status"] == "finished":
            cell["val_top1"].append(row["val_top1_last"])
    for cell in cells.values():
        scores = cell["val_top1"]
        cell |= {"seeds_finished": len(scores),
                 "val_top1_mean": statistics.fmean(scores) if scores else None,
                 "val_top1_std": statistics.stdev(scores) if len(scores) > 1 else None}
    return {"name": name, "teacher": teacher, "recipe": str(recipe_path), "grid": grid,
            "seeds": seeds, "points": rows, "cells": list(cells.values())}


def render_sweep(sweep: dict, figures: list[str]) -> str:
    """sweep.md: the teacher, one row per grid cell (mean ± std over seeds), the figures."""
    keys = list(sweep["grid"])
    header = [*keys, "seeds", "val top-1 (%)", "per seed"]
    rows = []
    for cell in sweep["cells"]:
        mean, std = cell["val_top1_mean"], cell["val_top1_std"]
        shown = "—" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        rows.append([*(str(cell["values"][k]) for k in keys),
                     f"{cell['seeds_finished']}/{len(sweep['seeds'])}", shown,
                     ", ".join(f"{v:.2f}" for v in cell["val_top1"])])
    table = "\n".join("| " + " | ".join(line) + " |"
                      for line in [header, [":---"] * len(keys) + ["---:"] * 3, *rows])
    done = [c for c in sweep["cells"] if c["val_top1_mean"] is not None]
    best = max(done, key=lambda c: c["val_top1_mean"], default=None)
    unfinished = [p["name"] for p in sweep["points"] if p["status"] != "finished"]
    parts = [f"# Sweep {sweep['name']}: students of {sweep['teacher']}",
             f"Recipe `{sweep['recipe']}`; seeds {', '.join(map(str, sweep['seeds']))}. "
             "Val top-1 of each point's last generation at its last epoch; mean ± sample "
             "standard deviation over the seeds that finished.",
             table]
    if best is not None:
        parts.append("Best: " + ", ".join(f"{k} = {best['values'][k]}" for k in keys)
                     + f", {best['val_top1_mean']:.2f} %.")
    if unfinished:
        parts.append(f"Not finished: {', '.join(unfinished)} (rerun the same command).")
    parts.append("\n\n".join(f"![{f[:-4]}](figures/{f})" for f in figures))
    return "\n\n".join(parts) + "\n"


def write_sweep_report(directory: Path, sweep: dict) -> None:
    """sweep.json, figures/sweep_<key>.png and sweep.md of a sweep directory."""
    figures = write_sweep_figures(directory, sweep)
    write_json(directory / SWEEP_JSON, sweep)
    write_text(directory / SWEEP_MD, render_sweep(sweep, figures))


def _environment(slot: int, parallel: int) -> dict:
    """A point's environment: its share of the CPU cores, or its GPU when there are several."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    if gpus == 0 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


def _send(process: subprocess.Popen, signum: int) -> None:
    """A signal to a point; SIGKILL to its process group (the point leads its own session)."""
    try:
        if signum == signal.SIGKILL:
            os.killpg(process.pid, signum)  # not yet reaped, so the group is the point's
        else:
            process.send_signal(signum)
    except ProcessLookupError:  # it has just ended
        pass


def stop_points(running: dict[subprocess.Popen, Point], console: Console,
                steps=STOP_STEPS) -> None:
    """Stop the running points, each signal of `steps` in turn; one line per point says how.

    Every wait is bounded: a point still there after the last step is named and left.
    """
    left, started, unanswered = dict(running), time.monotonic(), []
    if not left:
        return
    log_line(console, f"stopping {len(left)} running point(s): " + ", then ".join(
        f"{signal.Signals(s).name} ({grace:g} s)" for s, grace in steps))
    for signum, grace in steps:
        if not left:
            return
        name = signal.Signals(signum).name
        for process in left:
            _send(process, signum)
        deadline = time.monotonic() + grace
        while True:
            for process in [p for p in left if p.poll() is not None]:
                why = f" (no answer to {', '.join(unanswered)})" if unanswered else ""
                log_line(console, f"{left.pop(process).name}: stopped by {name} after "
                                  f"{time.monotonic() - started:.1f} s{why}")
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))
        unanswered.append(f"{name} in {grace:g} s")
    for process, point in left.items():
        log_line(console, f"{point.name}: still running after {time.monotonic() - started:.0f}"
                          f" s (no answer to {', '.join(unanswered)}), pid {process.pid}: "
                          "left running; stop it before rerunning the sweep")


def run_points(todo: list[Point], command: list[str], directory: Path, parallel: int,
               console: Console, on_finish, stop_steps=STOP_STEPS) -> None:
    """Train the points, `parallel` at a time.

    When the sweep stops (a signal, an error), `stop_points` stops each running point (in
    its own session): SIGINT, then SIGTERM, then SIGKILL, each after `stop_steps`' grace;
    the sweep stops after them, and a rerun resumes each from its last saved epoch.
    `on_finish(point, status, seconds)` runs as each point ends.
    """
    pending, running, ended = deque(todo), {}, 0
    with progress_bar(console.is_terminal, console, transient=False) as progress:
        task = progress.add_task("sweep points", total=len(todo), info="")
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    point = pending.popleft()
                    slot = min(set(range(parallel)) - {s for _, s, _ in running.values()})
                    (directory / point.name).mkdir(parents=True, exist_ok=True)
                    with (signals_deferred(),  # a started point is always in `running`
                          open(directory / point.name / POINT_LOG, "a") as log):
                        process = subprocess.Popen(
                            [*command, *(a for o in point.overrides() for a in ("--set", o))],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=_environment(slot, parallel))
                        running[process] = (point, slot, time.monotonic())
                    raise_if_interrupted()
                    log_line(console, f"{point.name}: started ({ended + len(running)}"
                                      f"/{len(todo)})")
                for process in [p for p in running if p.poll() is not None]:
                    point, _, started = running.pop(process)
                    ended += 1
                    on_finish(point, process.returncode, time.monotonic() - started)
                    progress.advance(task)
                time.sleep(POLL_S)
        except BaseException:
            with signals_deferred():  # the points must stop before the sweep does
                stop_points({p: point for p, (point, _, _) in running.items()}, console,
                            stop_steps)
            raise


def main(argv: list[str] | None = None) -> None:
    """Check every point, train those not finished, and write the sweep's report."""
    parser = OneLineParser(prog="python -m fasttt.sweep", description=__doc__.splitlines()[0],
                           usage_line=USAGE)
    parser.add_argument("recipe", type=Path, metavar="RECIPE.toml",
                        help="the students' recipe; it names the teacher, [generations] "
                             "teacher = \"runs/NAME/genM\"")
    parser.add_argument("--grid", action="append", required=True,
                        metavar="SECTION.KEY=V1,V2",
                        help="a swept key and its values, e.g. generations.lam=0.3,0.5 "
                             "(repeatable: every combination is a point)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train each point with seeds run.seed + 0..N-1 (default: 1)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="train N points at a time (default: 1)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe key for every point (repeatable)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), metavar="DIR",
                        help="where the sweep's directory goes (default: runs)")
    parser.add_argument("--name", default=None,
                        help="the sweep's directory name, DIR/NAME (default: "
                             "<run.name>-sweep)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.seeds <= 1000 or not 1 <= args.parallel <= 256:
        raise UserError("--seeds must be in 1..1000 and --parallel in 1..256")
    grid = dict(map(parse_grid, args.grid))
    if len(grid) != len(args.grid):
        raise UserError("each --grid key may be given once: list all its values there")
    base = load_recipe(args.recipe, args.set)
    teacher = base.generations.teacher
    if not teacher:
        raise UserError(f"{args.recipe}: a sweep needs a teacher: set [generations] teacher = "
                        "\"runs/NAME/genM\" (a finished generation), e.g. --set "
                        "generations.teacher=runs/NAME/gen0")
    teacher_run, m = parse_teacher(teacher)
    if not (generation_dir(teacher_run, m) / EVAL).is_file():
        raise UserError(f"generations.teacher = {teacher} is not a finished generation: let "
                        f"the run {teacher_run} train generation {m} first")
    name = args.name or f"{base.run.name}-sweep"
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"--name {name!r}: must be a directory name without '/'")
    directory = args.runs_dir / name
    here, there = directory.resolve(), teacher_run.resolve()
    if here == there or there in here.parents or here in there.parents:
        raise UserError(f"the sweep's directory {directory} overlaps its teacher's run "
                        f"{teacher_run}: give the sweep another --name")
    seeds = [base.run.seed + s for s in range(args.seeds)]
    points = grid_points(grid, seeds)
    if len({p.name for p in points}) != len(points):
        raise UserError("two grid values give one point name (characters other than letters, "
                        "digits and . + _ = - become _): make the values differ in those")
    # `base` checked the recipe with --set: what fails now is a --grid key or value
    recipes = {p.name: load_recipe(args.recipe, [*args.set, *p.overrides()], source="--grid")
               for p in points}
    for recipe in recipes.values():  # refused now, not as each point starts
        classes = len(read_manifest(recipe.data.beton_dir)["class_names"])
        check_cache_serves(recipe.cache, recipe.generations.temperature, classes)
    typed = {p.name: {key: recipes[p.name].value(key) for key in grid} for p in points}
    typed_grid = {key: [typed[next(p.name for p in points if p.texts[key] == t)][key]
                        for t in values] for key, values in grid.items()}
    for key, values in typed_grid.items():
        if len({json.dumps(v) for v in values}) != len(values):
            raise UserError(f"--grid {key}: two values mean the same ({values}): give each once")
    console = Console()
    lock = lock_run_dir(directory)
    try:
        finished = set()
        for p in points:  # a point finished earlier; refused as train.py would refuse it
            try:
                changes = recipe_changes(directory / p.name, recipes[p.name],
                                         has_trained(directory / p.name))
            except UserError as err:
                raise UserError(f"{err} (or give the sweep another --name)") from None
            if (directory / p.name / SUMMARY_JSON).is_file() and set(changes) <= BOOKKEEPING:
                finished.add(p.name)
        todo = [p for p in points if p.name not in finished]
        log_line(console, f"sweep {name}: {len(points)} points of students of {teacher}; "
                          f"{len(finished)} finished earlier, {len(todo)} to train, "
                          f"{args.parallel} at a time")
        statuses = {p.name: 0 for p in points if p.name in finished}

        def report() -> dict:
            rows = [point_result(p, typed[p.name], directory / p.name,
                                 "finished" if statuses.get(p.name) == 0 else
                                 "pending" if p.name not in statuses else "failed")
                    for p in points]
            sweep = summarize(name, teacher, args.recipe, typed_grid, seeds, rows)
            write_sweep_report(directory, sweep)
            return sweep

        def on_finish(point: Point, status: int, seconds: float) -> None:
            statuses[point.name] = status
            log = directory / point.name / POINT_LOG
            if status == 0:
                top1 = point_result(point, typed[point.name], directory / point.name,
                                    "finished")["val_top1_last"]
                log_line(console, f"{point.name}: finished in {duration(seconds)}, val top-1 "
                                  f"{top1:.2f}%")
            else:
                log_line(console, f"{point.name}: failed (exit {status}): {_last_line(log)}; "
                                  f"its log: {log}")
            report()

        command = [sys.executable, str(TRAIN), str(args.recipe), "--runs-dir", str(directory),
                   *(a for s in args.set for a in ("--set", s))]
        run_points(todo, command, directory, args.parallel, console, on_finish)
        report()
    finally:
        lock.close()
    failed = [p for p in points if statuses.get(p.name, 0) != 0]
    console.print(f"sweep report: {directory / SWEEP_MD}")
    if failed:
        first = failed[0]
        raise UserError(f"{len(failed)} of {len(points)} points failed, first {first.name}: "
                        f"{_last_line(directory / first.name / POINT_LOG)} (its log: "
                        f"{directory / first.name / POINT_LOG}); rerun the same command to "
                        "retry them, finished points are skipped")


if __name__ == "__main__":
    exit_on_user_error(main)
