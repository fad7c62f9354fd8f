"""A run whose generation 0 is another run's finished generation: students only.

`[generations] teacher = "runs/NAME/genM"` makes this run's gen0 a copy of that
generation (its weights, eval.json, metrics, and analysis when it has one) with
`teacher.json` saying where it came from, so the report, the ensembles and the status
read it like any patriarch. The first student sees exactly the views that run would
have shown its own generation M+1, so it reads the cache beside the original weights,
in place and read-only; a missing one is built there once, under that run's lock, and
shared by every run that adopts the same teacher (a sweep's points, two sweeps at
once). This run's seed still keys the student's initial weights and batch order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fasttt.errors import UserError
from fasttt.files import copy_file, sha256_file, write_json
from fasttt.recipe import DataConfig, Recipe, load_recipe
from fasttt.rundir import (
    ADOPTED,
    ANALYSIS,
    EVAL,
    INPUTS,
    METRICS,
    RECIPE,
    SECOND_CLASS,
    WEIGHTS,
    beton_fingerprint,
    generation_dir,
    generation_weights,
    has_trained,
)


@dataclass(frozen=True)
class Adopted:
    """Where an adopted gen0 came from: the teacher's run, generation and seed."""

    run_dir: Path
    generation: int
    seed: int

    def weights(self) -> Path:
        """The original, verified weights (the shared cache lives beside them)."""
        return generation_weights(self.run_dir, self.generation)

    def describe(self) -> str:
        """The teacher in words, as logs and reports name it."""
        return f"{generation_dir(self.run_dir, self.generation)}"


def parse_teacher(text: str) -> tuple[Path, int]:
    """generations.teacher's run directory and generation number (recipe.py checked the form)."""
    path = Path(text)
    return path.parent, int(path.name[len("gen"):])


def _teacher_recipe(run_dir: Path, where: str) -> Recipe:
    try:
        return load_recipe(run_dir / RECIPE)
    except UserError as err:
        raise UserError(f"generations.teacher = {where}: its run's recipe cannot be read "
                        f"({err})") from None


def _betons_of(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / INPUTS).read_bytes())["betons"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def adopt_teacher(run_dir: Path, where: str, model: str, data: DataConfig,
                  manifest: dict) -> Adopted:
    """Make run_dir/gen0 the generation `where` (generations.teacher), after checking it fits.

    It must be finished and whole, another run's, of the same `model`, trained on these
    betons (`data.beton_dir`, described by `manifest`) with the same holdout. A gen0
    adopted earlier from the same weights is kept.
    """
    beton_dir = Path(data.beton_dir)
    source_run, m = parse_teacher(where)
    if source_run.resolve() == Path(run_dir).resolve():
        raise UserError(f"generations.teacher = {where} is a generation of this run itself: "
                        "name another run's generation, or leave generations.teacher empty")
    source = generation_dir(source_run, m)
    if not (source / EVAL).is_file():
        raise UserError(f"generations.teacher = {where}: {source} is not a finished "
                        f"generation; train it first, or name one that has finished")
    weights = generation_weights(source_run, m)  # whole, or a one-line refusal
    theirs = _teacher_recipe(source_run, where)
    if theirs.model.name != model:
        raise UserError(f"generations.teacher = {where} is a {theirs.model.name}, this "
                        f"recipe trains a {model}: set model.name = "
                        f"\"{theirs.model.name}\" (students share their teacher's architecture)")
    if _betons_of(source_run) != beton_fingerprint(beton_dir, manifest):
        raise UserError(f"generations.teacher = {where} was trained on other betons than "
                        f"{beton_dir}: set data.beton_dir to its run's betons "
                        f"({theirs.data.beton_dir})")
    for key in ("holdout", "train_limit"):  # the teacher trained on exactly our rows
        if getattr(theirs.data, key) != getattr(data, key):
            value = getattr(theirs.data, key)
            raise UserError(f"generations.teacher = {where} was trained with data.{key} = "
                            f"{value:g}, this recipe has {getattr(data, key):g}: set "
                            f"data.{key} = {value:g}")
    adopted = Adopted(source_run, m, theirs.run.seed)
    record = {"run": str(source_run), "generation": m, "seed": theirs.run.seed,
              "weights_sha256": sha256_file(weights)}
    gen0 = generation_dir(run_dir, 0)
    if _read_record(gen0 / ADOPTED) == record and (gen0 / EVAL).is_file():
        return adopted
    if has_trained(run_dir):  # its students learned from the weights adopted before
        raise UserError(f"generations.teacher = {where} is not the teacher {run_dir} adopted "
                        f"and trained students from (its weights or record differ from "
                        f"{gen0 / ADOPTED}): restore that teacher, or start a new run with "
                        "another run.name")
    gen0.mkdir(parents=True, exist_ok=True)
    (gen0 / EVAL).unlink(missing_ok=True)  # unfinished until everything is copied
    for name in (WEIGHTS, METRICS, ANALYSIS, SECOND_CLASS):
        (gen0 / name).unlink(missing_ok=True)  # nothing of an earlier teacher stays
        if (source / name).is_file():
            copy_file(source / name, gen0 / name)
    write_json(gen0 / ADOPTED, record)
    copy_file(source / EVAL, gen0 / EVAL)  # last: gen0 is finished from here on
    return adopted


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def adopted_teacher(run_dir: Path) -> Adopted | None:
    """Where run_dir's gen0 came from, or None when the run trained its own patriarch."""
    path = generation_dir(run_dir, 0) / ADOPTED
    if not path.is_file():
        return None
    found = _read_record(path)
    try:
        return Adopted(Path(found["run"]), int(found["generation"]), int(found["seed"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is damaged: delete {generation_dir(run_dir, 0)} and rerun "
                        "the same command to adopt the teacher again") from None
