"""When to stop generations: each generation judged on a holdout, and the saturation rule.

The paper's accuracy rises for a few generations, then saturates as the teacher's
training top-1 confidence nears 1; it runs a fixed number of them. Choosing that number
on the test set would be leakage, so `data.holdout` sets aside a stratified part of the
training split that no generation trains on and no cache labels (fasttt/data.py).
After each generation m, its last-epoch weights and the softmax average of generations
0..m are evaluated there (`gen<m>/holdout.json`, written once, with m's mean top-1
confidence on its own training rows, the saturation signal). With
`generations.stop = "saturation"` the run stops once the holdout top-1 has not improved
by `min_delta` points for `patience` generations. `stopping.json` records the curve and
the decision; the report shows both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console
from torch import nn

from fasttt.analysis import analyze_run, ensemble_accuracies
from fasttt.betons import read_manifest
from fasttt.data import holdout_rows, split_loader
from fasttt.files import write_json
from fasttt.models import last_epoch_model
from fasttt.processes import on_main_process
from fasttt.progress import log_line
from fasttt.recipe import AugmentConfig, DataConfig, GenerationsConfig, load_recipe
from fasttt.rundir import (
    ANALYSIS,
    HOLDOUT,
    RECIPE,
    STOPPING,
    generation_dir,
    generation_weights,
    read_eval,
)


def stop_after(curve: list[float], patience: int, min_delta: float) -> int | None:
    """The generation after which the saturation rule stops, for holdout top-1 per generation.

    A generation improves when it beats the best before it by more than `min_delta`; the
    rule stops at the `patience`-th generation in a row that does not. None: go on.
    """
    best, waited = curve[0], 0
    for m, top1 in enumerate(curve[1:], start=1):
        if top1 - min_delta > best:
            best, waited = top1, 0
        else:
            waited += 1
            if waited >= patience:
                return m
    return None


def _read_holdout(path: Path, weights_sha256: str) -> dict | None:
    """A holdout.json computed from these weights, or None (missing, damaged or stale)."""
    try:
        found = json.loads(path.read_bytes())
        valid = (found["weights_sha256"] == weights_sha256
                 and all(isinstance(found[k], float) for k in ("top1", "ensemble_top1")))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return found if valid else None


def measure_holdout(run_dir: Path, m: int, data: DataConfig, batch_size: int,
                    augment: AugmentConfig, model_of: Callable[[int], nn.Module],
                    accelerator: Accelerator) -> dict:
    """Generation m's and the ensemble 0..m's holdout top-1 and m's training confidence.

    `model_of(k)` is generation k's last-epoch network, `batch_size` the evaluation batch.
    Every process calls this; only the main one writes gen<m>/holdout.json, which is
    reused as long as m's weights are the same.
    """
    path = generation_dir(run_dir, m) / HOLDOUT
    members = [read_eval(run_dir, k)["weights_sha256"] for k in range(m + 1)]
    found = _read_holdout(path, members[-1])
    if found is not None and found.get("members") == members:
        return found
    manifest = read_manifest(data.beton_dir)
    rows = holdout_rows(data, manifest)  # never empty: data.check_fits refuses that
    loader = split_loader(data, accelerator, "train", batch_size, rows=rows)
    models = [model_of(k) for k in range(m + 1)]
    ensembles = ensemble_accuracies(models, loader, augment, accelerator)
    alone = ensemble_accuracies(models[-1:], loader, augment, accelerator)[0]
    analysis = json.loads((generation_dir(run_dir, m) / ANALYSIS).read_bytes())
    result = {"generation": m, "samples": len(rows), "top1": alone["val_top1"],
              "ensemble_top1": ensembles[-1]["val_top1"],
              "train_top1_confidence": analysis["train"]["confidence"][0],
              "weights_sha256": members[-1], "members": members}
    on_main_process(accelerator, write_json, path, result)
    return result


def stopping_record(curve: list[dict], method: GenerationsConfig, holdout: float) -> dict:
    """stopping.json: the rule, the holdout curve so far and the decision."""
    top1 = [row["top1"] for row in curve]
    stopped = (stop_after(top1, method.patience, method.min_delta)
               if method.stop == "saturation" else None)
    if stopped is not None and stopped >= method.students:
        stopped = None  # the rule fired at the last planned generation: nothing was cut
    if stopped is not None:
        reason = (f"the holdout top-1 did not improve by more than {method.min_delta:g} "
                  f"points for {method.patience} generation{'s' * (method.patience > 1)}")
    elif method.stop == "saturation" and len(curve) == method.students + 1:
        reason = "every planned generation trained before the rule stopped the run"
    elif method.stop == "saturation":
        reason = "the holdout top-1 still improves, or too few generations have finished"
    else:
        reason = "generations.stop = \"fixed\": every planned generation trains"
    return {"rule": method.stop, "patience": method.patience, "min_delta": method.min_delta,
            "holdout": holdout, "holdout_samples": curve[0]["samples"],
            "planned_students": method.students, "stopped_after": stopped, "reason": reason,
            "generations": [{key: row[key] for key in ("generation", "top1", "ensemble_top1",
                                                       "train_top1_confidence")}
                            for row in curve]}


def judge_generation(run_dir: Path, m: int, accelerator: Accelerator,
                     console: Console) -> bool:
    """Judge finished generation m on the holdout, record it; True when the run stops here.

    The holdout, model and rule are the run's own, from its recipe.toml.
    """
    recipe = load_recipe(run_dir / RECIPE)
    analyze_run(run_dir, accelerator, console)  # m's confidence, the saturation signal
    num_classes = len(read_manifest(recipe.data.beton_dir)["class_names"])

    def model_of(k: int) -> nn.Module:
        return last_epoch_model(generation_weights(run_dir, k), recipe.model, recipe.run,
                                num_classes, accelerator.device)

    curve = [measure_holdout(run_dir, k, recipe.data, recipe.cache.batch_size, recipe.augment,
                             model_of, accelerator) for k in range(m + 1)]
    record = stopping_record(curve, recipe.generations, recipe.data.holdout)
    on_main_process(accelerator, write_json, run_dir / STOPPING, record)
    row = curve[-1]
    log_line(console, f"gen{m} on the holdout ({row['samples']} samples): top-1 "
                      f"{row['top1']:.2f}%, ensemble gen0..gen{m} {row['ensemble_top1']:.2f}%, "
                      f"train top-1 confidence {row['train_top1_confidence']:.3f}")
    stopped = record["stopped_after"] is not None
    if stopped:
        log_line(console, f"stopping after gen{m} of {recipe.generations.students}: "
                          f"{record['reason']} (generations.stop = \"saturation\")")
    return stopped
