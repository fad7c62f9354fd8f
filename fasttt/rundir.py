"""The run directory's guards: one writer at a time, and the inputs it started with.

`runs/<name>/` holds a whole multi-generation run. A second process on it would
interleave checkpoints, so the main process holds an exclusive `flock` on
`runs/<name>/.lock` for as long as it runs; the kernel drops it when the process dies,
so a SIGKILLed or preempted run never leaves a stale lock behind. A resumed run must
see the recipe (`recipe.toml`) and the betons (`inputs.json`) that it started with;
anything else would silently mix two experiments in one run.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import IO

from fasttt.checkpoint import write_json
from fasttt.errors import UserError
from fasttt.recipe import Recipe, recipe_to_toml, write_recipe

LOCK = ".lock"
INPUTS = "inputs.json"


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
    saved = run_dir / "recipe.toml"
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
        write_recipe(recipe, run_dir / "recipe.toml")
