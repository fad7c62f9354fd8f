"""Where a run stands, read-only: its generations, the epoch in progress, ETA, lock and disk.

    python -m fasttt.status runs/NAME          # lines and a table
    python -m fasttt.status runs/NAME --json   # the same facts as one JSON object

Reads recipe.toml, each generation's eval.json and metrics.jsonl, and the sizes of the
files; writes nothing, and takes the run's lock only for an instant, shared, to see
whether a trainer holds it. The ETA is the mean `seconds` of every epoch the run has
measured (training passes only: evaluation, checkpoints and cache builds come on top)
times the epochs left: this generation's and all of each generation not started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from fasttt.checkpoint import checkpoint_bytes
from fasttt.errors import OneLineParser, UserError, exit_on_user_error, one_line
from fasttt.files import staging_path, tree_bytes
from fasttt.progress import duration, eta_seconds, mean_epoch_seconds
from fasttt.recipe import load_recipe
from fasttt.rundir import (
    METRICS,
    RECIPE,
    WEIGHTS,
    best_and_last,
    finished_generations,
    generation_cache,
    generation_dir,
    is_held,
    read_eval,
    read_stopping,
    used_caches,
)

USAGE = "python -m fasttt.status RUN_DIR [--json]"


def metric_rows(gen_dir: Path) -> list[dict]:
    """A generation's metrics.jsonl rows (none yet: []), or a one-line refusal if damaged."""
    path = gen_dir / METRICS
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            if not (isinstance(row["epoch"], int) and all(
                    isinstance(row[k], int | float) for k in ("seconds", "val_top1", "val_top5"))):
                raise TypeError(f"epoch {row['epoch']!r}: a value is not a number")
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise UserError(f"{path}: unexpected content ({type(err).__name__}: {one_line(err)}); "
                        "delete it: training rewrites an unfinished generation's at its next "
                        "epoch, and the report leaves a finished one's learning curves out") \
            from None
    return rows


def disk_bytes(run_dir: Path, m: int) -> dict:
    """Generation m's checkpoints (staged and half-removed ones too), weights and cache."""
    cache = generation_cache(run_dir, m)
    return {"checkpoints": checkpoint_bytes(generation_dir(run_dir, m)),
            "weights": tree_bytes(generation_dir(run_dir, m) / WEIGHTS),
            "cache": tree_bytes(cache) + tree_bytes(staging_path(cache))}


def generation_status(run_dir: Path, m: int, state: str, rows: list[dict]) -> dict:
    """Generation m: if finished, eval.json's accuracies; else its epochs so far (metrics)."""
    gen = {"generation": m, "state": state, "epochs_done": len(rows), "best": None,
           "last": None, "bytes": disk_bytes(run_dir, m)}
    if state == "finished":
        found = read_eval(run_dir, m)
        gen |= {"best": found["best"], "last": found["last"], "epochs_done": found["last"]["epoch"]}
    elif rows:
        gen |= best_and_last(rows)
    return gen


def run_status(run_dir: Path) -> dict:
    """Everything `python -m fasttt.status` tells about a run, as JSON-ready facts."""
    if not (run_dir / RECIPE).is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {RECIPE}): give "
                        "runs/<name>")
    recipe = load_recipe(run_dir / RECIPE)
    planned, epochs = recipe.generations.students + 1, recipe.schedule.epochs
    stopping = read_stopping(run_dir) or {}
    stopped_after = stopping.get("stopped_after")
    if isinstance(stopped_after, int) and 0 <= stopped_after < planned - 1:
        planned = stopped_after + 1  # the saturation rule ended the run there
    else:
        stopped_after = None
    finished = len(finished_generations(run_dir, planned))
    current = finished if finished < planned else None
    rows = [metric_rows(generation_dir(run_dir, m)) for m in range(planned)]
    gens = [generation_status(run_dir, m, "finished" if m < finished else
                              ("in progress" if m == current else "not started"), rows[m])
            for m in range(planned)]
    per_epoch = mean_epoch_seconds([row for gen_rows in rows for row in gen_rows])
    eta = ((0.0, 0.0) if current is None else
           eta_seconds(per_epoch, epochs, gens[current]["epochs_done"], planned - 1 - current))
    held = is_held(run_dir)
    state = "finished" if current is None else ("running" if held else "stopped")
    return {
        "run_dir": str(run_dir), "name": recipe.run.name, "model": recipe.model.name,
        "dataset": recipe.data.beton_dir, "students": recipe.generations.students,
        "epochs": epochs, "state": state, "held": held, "current_generation": current,
        "stopped_after": stopped_after,
        "generations": gens, "seconds_per_epoch": per_epoch, "eta_generation_s": eta[0],
        "eta_run_s": eta[1], "bytes_total": tree_bytes(run_dir),
        "bytes_freed_by_keep_last": sum(map(tree_bytes, used_caches(run_dir))),
    }


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    """A narrow table (it fits a phone), numbers right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "state" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_status(facts: dict, console: Console) -> None:
    """The facts as a few lines, then each generation's accuracy and disk use."""
    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False)

    say(f"{facts['name']}: {facts['model']} on {facts['dataset']}, gen 0..{facts['students']} "
        f"of {facts['epochs']} epochs each")
    current = facts["current_generation"]
    stopped = facts["stopped_after"]
    where = (f"stopped after gen {stopped} by the saturation rule (generations.stop)"
             if current is None and stopped is not None else
             "all generations finished" if current is None else
             f"gen {current}/{facts['students']}: "
             f"{facts['generations'][current]['epochs_done']}/{facts['epochs']} epochs done")
    say(f"{facts['state']}: {where}; "
        f"{'held by a running process' if facts['held'] else 'no process holds it'}")
    if facts["eta_run_s"] is None:
        say("ETA: unknown until an epoch is measured")
    else:
        speed = ("" if facts["seconds_per_epoch"] is None else
                 f" at {facts['seconds_per_epoch']:.1f} s per epoch")
        say(f"ETA: generation {duration(facts['eta_generation_s'])}, run "
            f"{duration(facts['eta_run_s'])}{speed}")
    gens = facts["generations"]
    console.print(_table("val top-1 (%)", ("gen", "state", "epochs", "best", "at epoch", "last"), [
        (str(g["generation"]), g["state"], f"{g['epochs_done']}/{facts['epochs']}",
         *((f"{g['best']['val_top1']:.2f}", str(g["best"]["epoch"]),
            f"{g['last']['val_top1']:.2f}") if g["best"] else ("", "", "")))
        for g in gens]))
    kinds = ("checkpoints", "weights", "cache")
    console.print(_table("disk", ("gen", *kinds), [
        (str(g["generation"]), *(decimal(g["bytes"][k]) for k in kinds)) for g in gens]))
    say(f"disk: {decimal(facts['bytes_total'])} in all; cache.keep = \"last\" would free "
        f"{decimal(facts['bytes_freed_by_keep_last'])}")


def main(argv: list[str] | None = None) -> None:
    """python -m fasttt.status RUN_DIR [--json]: where the run stands, read-only."""
    parser = OneLineParser(prog="python -m fasttt.status", description=__doc__.splitlines()[0],
                           usage_line=USAGE)
    parser.add_argument("run_dir", type=Path, help="a run directory, runs/<name>")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    facts = run_status(args.run_dir)
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print_status(facts, Console())


if __name__ == "__main__":
    exit_on_user_error(main)
