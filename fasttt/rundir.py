"""The run directory: its layout, which generations are finished, and its guards.

    runs/<name>/
      recipe.toml  inputs.json  .lock
      gen<m>/  last.safetensors  eval.json  metrics.jsonl  ckpt-*/  latest.json
               analysis.json  second_class.npy  cache/  (generation m's outputs)
      ensemble.json  summary.json  summary.md  figures/  transfer/

Every other module asks this one where a file lives. A generation is finished once its
eval.json exists (written after last.safetensors). A second process on a run would
interleave checkpoints, so the main process holds an exclusive `flock` on
`runs/<name>/.lock` while it runs; the kernel drops it when the process dies, so a
SIGKILLed or preempted run never leaves a stale lock. A resumed run must see the
recipe (`recipe.toml`) and the betons (`inputs.json`) that it started with; anything
else would silently mix two experiments in one run.
"""

from __future__ import annotations

import fcntl
import itertools
import json
from pathlib import Path
from typing import IO

from fasttt.errors import UserError
from fasttt.files import sha256_file, write_json
from fasttt.recipe import Recipe, recipe_to_toml, write_recipe

LOCK, RECIPE, INPUTS = ".lock", "recipe.toml", "inputs.json"
ENSEMBLE, SUMMARY_JSON, SUMMARY_MD = "ensemble.json", "summary.json", "summary.md"
FIGURES, TRANSFER = "figures", "transfer"
# inside gen<m>/
WEIGHTS, EVAL, METRICS = "last.safetensors", "eval.json", "metrics.jsonl"
ANALYSIS, SECOND_CLASS, CACHE = "analysis.json", "second_class.npy", "cache"


def generation_dir(run_dir: Path, m: int) -> Path:
    """Where generation m of a run lives."""
    return Path(run_dir) / f"gen{m}"


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


def lock_run_dir(run_dir: Path) -> IO:
    """Hold `run_dir`'s writer lock (keep the returned file open), or refuse in one line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{run_dir} is in use by another fasttt process: wait for it to end, "
                        "or give this run another run.name") from None
    return handle


def check_recipe(run_dir: Path, recipe: Recipe) -> bool:
    """True if `run_dir` already holds this recipe; a different recipe there is an error."""
    saved = run_dir / RECIPE
    if not saved.is_file():
        return False
    old, new = saved.read_text().splitlines(), recipe_to_toml(recipe).splitlines()
    if old != new:
        first = next((n for o, n in zip(old, new, strict=False) if o != n), "its length")
        raise UserError(f"{run_dir} was made by a different recipe (first difference: "
                        f"{first}): pick another run.name or delete {run_dir}")
    return True


def beton_fingerprint(beton_dir: Path, manifest: dict) -> dict:
    """What identifies the betons a run reads: each split's count, checksum and size."""
    def size(name: str) -> int | None:
        path = Path(beton_dir) / name
        return path.stat().st_size if path.is_file() else None

    return {split: {"count": s["count"], "sha256": s.get("sha256"), "bytes": size(s["file"])}
            for split, s in sorted(manifest["splits"].items())}


def check_inputs(run_dir: Path, beton_dir: Path, manifest: dict) -> None:
    """Refuse betons that differ from those the run started with (recorded on first use)."""
    found = beton_fingerprint(beton_dir, manifest)
    path = run_dir / INPUTS
    if not path.is_file():
        write_json(path, {"betons": found})
        return
    started = json.loads(path.read_text())["betons"]
    for split in sorted(set(started) | set(found)):
        then, now = started.get(split), found.get(split)
        if then != now:
            what = next((k for k in ("count", "sha256", "bytes")
                         if (then or {}).get(k) != (now or {}).get(k)), "presence")
            raise UserError(f"the {split} beton in {beton_dir} changed since {run_dir} started "
                            f"(its {what} differs): restore the betons the run used, or "
                            "start a new run with another run.name")


def prepare_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Write the resolved recipe on first use; a resumed run must bring the same one."""
    if not check_recipe(run_dir, recipe):
        write_recipe(recipe, run_dir / RECIPE)
