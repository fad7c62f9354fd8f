"""The run directory: its layout, which generations are finished, and its guards.

    runs/<name>/
      recipe.toml  inputs.json  history.jsonl  .lock
      gen<m>/  last.safetensors  eval.json  metrics.jsonl  ckpt-*/  latest.json
               analysis.json  second_class.npy  cache/  (generation m's outputs)
               holdout.json  (data.holdout)  teacher.json  (gen0 adopted from another run)
      ensemble.json  stopping.json  summary.json  summary.md  figures/  transfer/

Every other module asks this one where a file lives. A generation is finished once its
eval.json exists (written after last.safetensors). A second process on a run would
interleave checkpoints, so the main process holds an exclusive `flock` on
`runs/<name>/.lock` while it runs; the kernel drops it when the process dies, so a
SIGKILLed or preempted run never leaves a stale lock.

A run directory is claimed by the first run that trains in it (a generation finished or
an epoch checkpointed); until then any recipe may take it over. A claimed run must see
the recipe (`recipe.toml`) and the betons (`inputs.json`) that it started with, but for
bookkeeping keys (recipe.BOOKKEEPING), more students and another stopping rule; anything
else would silently mix two experiments in one run. Each accepted change is one line of
`history.jsonl`.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from fasttt.checkpoint import LATEST
from fasttt.errors import UserError
from fasttt.files import remove_dir, sha256_file, write_json, write_text
from fasttt.recipe import (
    BOOKKEEPING,
    MAX_STUDENTS,
    Recipe,
    load_recipe,
    toml_value,
)

LOCK, RECIPE, INPUTS, HISTORY = ".lock", "recipe.toml", "inputs.json", "history.jsonl"
ENSEMBLE, SUMMARY_JSON, SUMMARY_MD = "ensemble.json", "summary.json", "summary.md"
FIGURES, TRANSFER = "figures", "transfer"
STOPPING = "stopping.json"  # the holdout curve and the stopping rule's decision
# May grow on a run that trained: the new generations train, the finished ones stay.
STUDENTS = "generations.students"
# Decide only how many generations train (fasttt/stopping.py), never what one computes.
STOP_RULE = frozenset({"generations.stop", "generations.patience", "generations.min_delta"})
# inside gen<m>/
WEIGHTS, EVAL, METRICS = "last.safetensors", "eval.json", "metrics.jsonl"
ANALYSIS, SECOND_CLASS, CACHE = "analysis.json", "second_class.npy", "cache"
HOLDOUT = "holdout.json"  # generation m judged on data.holdout (fasttt/stopping.py)
ADOPTED = "teacher.json"  # gen0 is another run's generation (fasttt/adopt.py)


def generation_dir(run_dir: Path, m: int) -> Path:
    """Where generation m of a run lives."""
    return Path(run_dir) / f"gen{m}"


def generation_dirs(run_dir: Path) -> list[Path]:
    """The generation directories a run holds, finished or not."""
    return [d for d in map(generation_dir, itertools.repeat(run_dir), range(MAX_STUDENTS + 1))
            if d.is_dir()]


def has_trained(run_dir: Path) -> bool:
    """True once a generation of the run finished or checkpointed an epoch: the run's claim.

    An adopted teacher (gen0/teacher.json) was trained elsewhere and claims nothing.
    """
    return any((is_finished(d) and not (d / ADOPTED).is_file()) or (d / LATEST).is_file()
               for d in generation_dirs(run_dir))


def is_finished(gen_dir: Path) -> bool:
    """A generation is finished once its eval.json exists (written last)."""
    return (Path(gen_dir) / EVAL).is_file()


def finished_generations(run_dir: Path, planned: int | None = None) -> list[int]:
    """Generations 0, 1, ... that have finished, in order (at most `planned` of them)."""
    count = itertools.count() if planned is None else range(planned)
    return list(itertools.takewhile(lambda m: is_finished(generation_dir(run_dir, m)), count))


def retrain_hint(run_dir: Path, m: int) -> str:
    """Advice that works for a damaged generation m: remove it and what it taught, rerun."""
    doomed = list(itertools.takewhile(Path.exists, (generation_dir(run_dir, k)
                                                    for k in itertools.count(m))))
    paths = " ".join(str(p) for p in doomed) or str(generation_dir(run_dir, m))
    return f"delete {paths} and rerun the same command to train generation {m} on again"


def best_and_last(history: list[dict]) -> dict:
    """eval.json's accuracies from metrics rows: the best epoch by val top-1, and the last."""
    best = max(history, key=lambda row: row["val_top1"])
    pick = ("epoch", "val_top1", "val_top5")
    return {"best": {k: best[k] for k in pick}, "last": {k: history[-1][k] for k in pick}}


def read_eval(run_dir: Path, m: int) -> dict:
    """Generation m's eval.json (best and last epoch, the weights' checksum), checked."""
    path = generation_dir(run_dir, m) / EVAL
    try:
        found = json.loads(path.read_bytes())
        valid = (isinstance(found["weights_sha256"], str)
                 and all(isinstance(found[k]["val_top1"], float) for k in ("best", "last")))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        valid = False
    if not valid:
        raise UserError(f"{path} is damaged or from another version: "
                        f"{retrain_hint(run_dir, m)}")
    return found


def read_stopping(run_dir: Path) -> dict | None:
    """The run's stopping.json (fasttt/stopping.py), or None: no holdout, or unreadable."""
    try:
        found = json.loads((Path(run_dir) / STOPPING).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def generation_weights(run_dir: Path, m: int) -> Path:
    """Finished generation m's last.safetensors, once its checksum matches eval.json's."""
    path = generation_dir(run_dir, m) / WEIGHTS
    recorded = read_eval(run_dir, m)["weights_sha256"]
    if not path.is_file():
        raise UserError(f"{path} is missing: {retrain_hint(run_dir, m)}")
    if sha256_file(path) != recorded:
        raise UserError(f"{path} is damaged (its sha256 differs from the one in {EVAL}): "
                        f"{retrain_hint(run_dir, m)}")
    return path


def try_lock_run_dir(run_dir: Path) -> IO | None:
    """`run_dir`'s writer lock if no other process holds it (keep the file open), else None."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def lock_run_dir(run_dir: Path) -> IO:
    """Hold `run_dir`'s writer lock (keep the returned file open), or refuse in one line."""
    handle = try_lock_run_dir(run_dir)
    if handle is None:
        raise UserError(f"{run_dir} is in use by another fasttt process: wait for it to end, "
                        "or give this run another run.name")
    return handle


def is_held(run_dir: Path) -> bool:
    """True while a process (a trainer, a cache builder) holds the run's writer lock."""
    try:  # read-only: a missing lock file is not created, so nothing holds it
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:  # shared and released at once: probes never refuse each other
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def used_caches(run_dir: Path) -> list[Path]:
    """The caches no one will read again: generation m's, once its student m+1 finished.

    A student deleted to train again gets its teacher's cache rebuilt from the verified
    weights.
    """
    used = itertools.takewhile(lambda m: is_finished(generation_dir(run_dir, m + 1)),
                               itertools.count())
    caches = (generation_cache(run_dir, m) for m in used)
    return [cache for cache in caches if cache.is_dir()]


def generation_cache(run_dir: Path, m: int) -> Path:
    """Where generation m's answers for its student are cached."""
    return generation_dir(run_dir, m) / CACHE


def teacher_cache(weights: Path) -> Path:
    """The cache beside a generation's weights (in this run or the one it adopted from)."""
    return weights.parent / CACHE


def recipe_changes(run_dir: Path, recipe: Recipe, trained: bool) -> dict[str, tuple]:
    """`section.key` -> (saved, new) of each key `recipe` changes in `run_dir`'s recipe.toml.

    Once the run has trained, a change to a key that defines the result is refused, and so
    is a generations.students below the generations already finished.
    """
    path = run_dir / RECIPE
    if not path.is_file():
        return {}
    try:
        changes = load_recipe(path).differences(recipe)
    except UserError as err:
        if not trained:  # nothing to keep: the new recipe takes the directory over
            return {}
        raise UserError(f"{err}; restore it, or pick another run.name or delete {run_dir}") \
            from None
    if not trained:
        return changes
    refused = [key for key in changes if key not in BOOKKEEPING | STOP_RULE | {STUDENTS}]
    if refused:
        saved, now = map(toml_value, changes[refused[0]])
        more = len(refused) - 1
        others = f" (and {more} more key{'s differ' if more > 1 else ' differs'})" if more else ""
        raise UserError(f"{run_dir} was made by a different recipe: {refused[0]} is {saved} in "
                        f"{path}, {now} now{others}; pick another run.name or delete {run_dir}")
    finished = len(finished_generations(run_dir))
    if recipe.generations.students < finished - 1:
        raise UserError(f"{run_dir} has finished generations 0..{finished - 1}, more than "
                        f"{STUDENTS} = {recipe.generations.students} plans: set {STUDENTS} to "
                        f"at least {finished - 1}, or pick another run.name")
    return changes


def append_history(run_dir: Path, changes: dict[str, tuple]) -> None:
    """Add one line to the run's history.jsonl: when, and each changed key's old and new value."""
    path = run_dir / HISTORY
    before = path.read_text() if path.is_file() else ""
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"),
             "changed": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}}
    write_text(path, before + json.dumps(entry) + "\n")


def beton_fingerprint(beton_dir: Path, manifest: dict) -> dict:
    """What identifies the betons a run reads: each split's count, checksum and size."""
    def size(name: str) -> int | None:
        path = Path(beton_dir) / name
        return path.stat().st_size if path.is_file() else None

    return {split: {"count": s["count"], "sha256": s.get("sha256"), "bytes": size(s["file"])}
            for split, s in sorted(manifest["splits"].items())}


def check_inputs(run_dir: Path, beton_dir: Path, manifest: dict) -> None:
    """Refuse betons that differ from those recorded in the run's inputs.json, if any."""
    path = run_dir / INPUTS
    if not path.is_file():
        return
    try:
        started = json.loads(path.read_bytes())["betons"]
        valid = isinstance(started, dict) and all(isinstance(s, dict) for s in started.values())
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        valid = False
    if not valid:
        raise UserError(f"{path} is damaged: delete it and rerun the same command (the betons "
                        f"in {beton_dir} are then recorded as the run's)")
    found = beton_fingerprint(beton_dir, manifest)
    for split in sorted(set(started) | set(found)):
        then, now = started.get(split), found.get(split)
        if then != now:
            what = next((k for k in ("count", "sha256", "bytes")
                         if (then or {}).get(k) != (now or {}).get(k)), "presence")
            raise UserError(f"the {split} beton in {beton_dir} changed since {run_dir} started "
                            f"(its {what} differs): restore the betons the run used, or "
                            "start a new run with another run.name")


def claim_run_dir(run_dir: Path, recipe: Recipe, beton_dir: Path, manifest: dict) -> None:
    """Record the recipe and betons of a run that may start or continue in `run_dir`.

    Everything is checked before anything is written. A directory no run has trained in
    holds nothing worth keeping: a failed start's generation directories (its tracker
    logs) are removed, and the new recipe and betons are recorded.
    """
    trained = has_trained(run_dir)
    changes = recipe_changes(run_dir, recipe, trained)
    if trained:
        check_inputs(run_dir, beton_dir, manifest)
    else:
        for leftover in generation_dirs(run_dir):
            remove_dir(leftover)
    if changes:
        append_history(run_dir, changes)
    if changes or not trained or not (run_dir / RECIPE).is_file():
        recipe.write(run_dir / RECIPE)
    if not trained or not (run_dir / INPUTS).is_file():
        write_json(run_dir / INPUTS, {"betons": beton_fingerprint(beton_dir, manifest)})
