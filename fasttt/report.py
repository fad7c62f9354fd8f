"""The evidence of a run: does the tolerant teacher help? Tables and figures, as in the paper.

    python -m fasttt.report runs/NAME      # also run by fasttt/train.py at the end of a run

Reads only what the run wrote (recipe.toml, gen<m>/eval.json, metrics.jsonl,
analysis.json, second_class.npy, ensemble.json, transfer/*.json) and writes
summary.md, summary.json and figures/*.png. Only finished generations (eval.json
present) are reported; a missing analysis, ensemble or transfer file leaves its
section out with a note. summary.json is a pure function of those files, so a
killed-and-resumed run gets byte-identical numbers. All numbers are percentages,
but DistC/DistS, which are angles in the unit the analysis states.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console

from fasttt.checkpoint import write_json, write_text
from fasttt.errors import UserError, exit_on_user_error, one_line
from fasttt.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class PaperSetting:
    """A row group of the paper's tables, and which runs it applies to (numbers in %)."""

    name: str
    source: str
    model: str
    classes: int
    patriarch: str  # the patriarch's loss; any loss with u = 1 is "ce"
    u: float | None  # None: any u
    lams: tuple[float, ...] | None  # None: any lambda (checked only when the run has students)
    per_generation: dict[str, tuple[float | None, ...]]  # series -> Gen #0, Gen #1, ...
    single: dict[str, float]  # numbers that are not per generation (baselines)


_D100, _D190, _R110, _R18 = ("CIFAR-100, DenseNet-BC-100", "CIFAR-100, DenseNet-BC-190",
                             "CIFAR-100, ResNet-110", "ILSVRC2012, ResNet-18")

# The paper's numbers (Yang et al., AAAI 2019, Tables 1-6), exactly as printed: errors
# and accuracies in %, DistC/DistS (Table 2, patriarchs only) in radians. Table 5 does
# not say whether its errors come from the best or the last epoch; they are set beside
# our last epoch. Tables 2-3 train every student with lambda = 0.6.
PAPER_SETTINGS = (
    PaperSetting(f"{_R18}, baseline D(1.0, 0.0)", "Tables 5-6", "resnet18", 1000, "ce", None,
                 None, {"top1_error": (30.50,), "top5_error": (11.07,),
                        "caltech256_accuracy": (75.94,), "indoor67_accuracy": (62.92,)}, {}),
    PaperSetting(f"{_R18}, D(0.6, 0.6)", "Tables 5-6", "resnet18", 1000, "tsd", 0.6, (0.6,), {
        "top1_error": (32.52, 30.28, 30.12, 29.92, 29.77, 29.60),
        "top5_error": (11.23, 10.23, 10.15, 10.25, 10.19, 10.11),
        "ensemble_top1_error": (None, 30.01, 28.94, 28.51, 28.23, 28.08),
        "ensemble_top5_error": (None, 9.98, 9.53, 9.36, 9.28, 9.23),
        "caltech256_accuracy": (75.15, 76.83, 77.28, 77.65, 77.00, 77.83),
        "indoor67_accuracy": (62.97, 62.75, 65.72, 63.75, 63.81, 63.94)},
        {"baseline_top1_error": 30.50, "baseline_top5_error": 11.07}),
    PaperSetting(f"{_D100}, baseline D(1.0, 0.0)", "Table 4", "cifar_densenet_bc100", 100, "ce",
                 None, None, {"best_top1_error": (22.20,), "last_top1_error": (22.89,)}, {}),
    PaperSetting(f"{_D100}, D(0.6, 0.6)", "Table 4", "cifar_densenet_bc100", 100, "tsd", 0.6,
                 (0.6,), {"best_top1_error": (23.96, 21.29, 20.51, 20.83, 21.01, 21.27),
                          "last_top1_error": (25.00, 21.34, 21.59, 20.99, 21.53, 21.61),
                          "ensemble_top1_error": (None, 20.20, 18.38, 17.79, 17.37, 17.25)},
                 {"baseline_best_top1_error": 22.20, "baseline_last_top1_error": 22.89}),
    PaperSetting(f"{_D100}, D(0.7, 0.6)", "Table 4", "cifar_densenet_bc100", 100, "tsd", 0.7,
                 (0.6,), {"best_top1_error": (22.98, 21.24, 21.48, 20.94, 21.51, 21.87),
                          "last_top1_error": (23.43, 21.50, 21.80, 21.47, 21.69, 22.28),
                          "ensemble_top1_error": (None, 19.63, 18.83, 17.70, 17.56, 17.23)},
                 {"baseline_best_top1_error": 22.20, "baseline_last_top1_error": 22.89}),
    PaperSetting(f"{_D190}, baseline D(1.0, 0.0)", "Table 4", "cifar_densenet_bc190", 100, "ce",
                 None, None, {"best_top1_error": (17.22,), "last_top1_error": (17.62,)}, {}),
    PaperSetting(f"{_D190}, D(0.6, 0.6)", "Table 4", "cifar_densenet_bc190", 100, "tsd", 0.6,
                 (0.6,), {"best_top1_error": (18.87, 17.42, 17.26, 17.13, 17.24, 17.01),
                          "last_top1_error": (19.40, 17.99, 18.00, 17.52, 17.75, 17.22),
                          "ensemble_top1_error": (None, 16.83, 15.94, 15.43, 15.18, 15.21)},
                 {"baseline_best_top1_error": 17.22, "baseline_last_top1_error": 17.62}),
    PaperSetting(f"{_D190}, D(0.7, 0.6)", "Table 4", "cifar_densenet_bc190", 100, "tsd", 0.7,
                 (0.6,), {"best_top1_error": (18.63, 17.44, 16.72, 16.89, 17.39, 17.24),
                          "last_top1_error": (19.12, 17.78, 17.21, 16.98, 17.71, 17.41),
                          "ensemble_top1_error": (None, 16.37, 15.20, 15.11, 14.93, 14.47)},
                 {"baseline_best_top1_error": 17.22, "baseline_last_top1_error": 17.62}),
    # Table 1 calls its run born-again (D(1.0, 0.5) by the paper's definition) but prints
    # the numbers of Table 3's BAN row, which used lambda = 0.6: both lambdas match.
    PaperSetting(f"{_R110}, born-again (CE patriarch)", "Tables 1-3", "cifar_resnet110", 100,
                 "ce", None, (0.5, 0.6), {
                     "top1_confidence": (99.28, 98.68, 98.42, 98.33, 98.28, 97.76),
                     "top2_confidence": (0.57, 1.00, 1.13, 1.19, 1.24),
                     "top3_confidence": (0.09, 0.18, 0.23, 0.24, 0.25),
                     "top4_confidence": (0.03, 0.06, 0.09, 0.09, 0.09),
                     "train_top1": (99.74, 99.63, 99.60, 99.62, 99.59),
                     "val_top1": (71.55, 71.41, 72.30, 72.26, 72.52),
                     "train_dist_c": (0.3813,), "train_dist_s": (0.4202,),
                     "val_dist_c": (0.3234,), "val_dist_s": (0.3881,)},
                 {"best_val_top1_in_10_generations": 72.61}),
    PaperSetting(f"{_R110}, LSR patriarch", "Tables 2-3", "cifar_resnet110", 100, "lsr", None,
                 (0.6,), {"top1_confidence": (89.41, 92.09, 93.78, 94.89, 95.73, 95.91),
                          "train_dist_c": (0.6182,), "train_dist_s": (0.5475,),
                          "val_dist_c": (0.4875,), "val_dist_s": (0.4805,)},
                 {"best_val_top1_in_10_generations": 73.46}),
    PaperSetting(f"{_R110}, CP patriarch", "Tables 2-3", "cifar_resnet110", 100, "cp", None,
                 (0.6,), {"top1_confidence": (99.07, 98.25, 97.93, 97.66, 97.47, 97.01),
                          "train_dist_c": (0.3829,), "train_dist_s": (0.4114,),
                          "val_dist_c": (0.3267,), "val_dist_s": (0.3815,)},
                 {"best_val_top1_in_10_generations": 72.86}),
    PaperSetting(f"{_R110}, TSD-0.6 patriarch", "Tables 2-3", "cifar_resnet110", 100, "tsd", 0.6,
                 (0.6,), {"top1_confidence": (66.51, 76.27, 82.58, 87.08, 89.89, 91.72),
                          "train_dist_c": (0.3461,), "train_dist_s": (0.5759,),
                          "val_dist_c": (0.3153,), "val_dist_s": (0.5349,)},
                 {"best_val_top1_in_10_generations": 73.72}),
    PaperSetting(f"{_R110}, TSD-0.7 patriarch", "Table 2", "cifar_resnet110", 100, "tsd", 0.7,
                 (0.6,), {"train_dist_c": (0.3433,), "train_dist_s": (0.5274,),
                          "val_dist_c": (0.3086,), "val_dist_s": (0.4894,)},
                 {"best_val_top1_in_10_generations": 73.18}),
    PaperSetting(f"{_R110}, TSD-0.8 patriarch", "Table 2", "cifar_resnet110", 100, "tsd", 0.8,
                 (0.6,), {"train_dist_c": (0.3499,), "train_dist_s": (0.4782,),
                          "val_dist_c": (0.3097,), "val_dist_s": (0.4449,)},
                 {"best_val_top1_in_10_generations": 73.39}),
)

SERIES_LABELS = {
    "best_top1_error": "best-epoch top-1 error", "last_top1_error": "last-epoch top-1 error",
    "top1_error": "top-1 error (ours: last epoch)", "top5_error": "top-5 error (ours: last epoch)",
    "ensemble_top1_error": "ensemble top-1 error", "ensemble_top5_error": "ensemble top-5 error",
    **{f"top{k}_confidence": f"train top-{k} confidence" for k in range(1, 5)},
    "train_top1": "train top-1 accuracy", "val_top1": "test top-1 accuracy",
    "train_dist_c": "train DistC (rad)", "train_dist_s": "train DistS (rad)",
    "val_dist_c": "test DistC (rad)", "val_dist_s": "test DistS (rad)",
    "caltech256_accuracy": "Caltech-256 transfer accuracy",
    "indoor67_accuracy": "MIT Indoor-67 transfer accuracy",
}
SINGLE_LABELS = {
    "baseline_top1_error": "baseline top-1 error", "baseline_top5_error": "baseline top-5 error",
    "baseline_best_top1_error": "baseline best-epoch top-1 error",
    "baseline_last_top1_error": "baseline last-epoch top-1 error",
    "best_val_top1_in_10_generations": "best test top-1 accuracy in 10 generations",
}
# A transfer target (transfer/<name>.json) is set beside the paper's when its name,
# lower-cased with only letters and digits kept, contains one of these.
TRANSFER_ALIASES = {"caltech256": ("caltech256", "c256"), "indoor67": ("indoor67", "i67")}
FIGURE_DPI = 150
FIGURE_NAMES = ("error_per_generation.png", "confidence.png", "dist.png",
                "val_top1_per_epoch.png")


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _error(accuracy: float) -> float:
    return round(100.0 - float(accuracy), 4)


def _read(path: Path, parse):
    """parse(JSON of path), with a damaged or unexpected file as one line naming it."""
    try:
        text = path.read_text()
        return parse([json.loads(line) for line in text.splitlines() if line.strip()]
                     if path.suffix == ".jsonl" else json.loads(text))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise UserError(f"{path}: unexpected content ({type(err).__name__}: {err}); "
                        "rerun the step that writes it") from None


def _generation(m: int, e: dict) -> dict:
    row = {"generation": m}
    for which in ("best", "last"):
        row[f"{which}_epoch"] = e[which]["epoch"]
        for k in ("top1", "top5"):
            row[f"{which}_{k}"] = _round(e[which][f"val_{k}"])
            row[f"{which}_{k}_error"] = _error(e[which][f"val_{k}"])
    return row


def _curve(m: int, rows: list[dict]) -> dict:
    keep = ("epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5")
    return {"generation": m, "epochs": [{k: _round(r[k]) if k != "epoch" else r[k]
                                         for k in keep if k in r} for r in rows]}


def _ensemble(finished: int, data: dict) -> list[dict]:
    rows = []
    for entry in data["generations"]:
        m = len(entry["members"]) - 1
        if entry["members"] == list(range(m + 1)) and m < finished:
            rows.append({"generation": m, "members": entry["members"],
                         "val_top1": _round(entry["val_top1"]),
                         "val_top5": _round(entry["val_top5"]),
                         "top1_error": _error(entry["val_top1"]),
                         "top5_error": _error(entry["val_top5"])})
    return rows


def _split(part: dict) -> dict:
    out = {"samples": part["samples"], "top1": _round(part["top1"])}
    if "top5" in part:
        out["top5"] = _round(part["top5"])
    if "confidence" in part:
        out["confidence"] = [_round(100 * c) for c in part["confidence"]]
    return out | {"dist_c": _round(part["dist_c"]), "dist_s": _round(part["dist_s"])}


def _analysis(m: int, data: dict) -> dict:
    return {"generation": m, "train": _split(data["train"]), "val": _split(data["val"]),
            "dist_unit": data["dist_unit"], "superclasses": data["superclasses"]}


def _transfer(name: str, finished: int, data: dict) -> dict:
    keep = ("target", "train_per_class", "seed", "train_samples", "test_samples")
    return {"name": name, **{k: data[k] for k in keep},
            "generations": [{"generation": g["generation"], "accuracy": _round(g["accuracy"])}
                            for g in data["generations"] if g["generation"] < finished]}


def _dataset(recipe: Recipe) -> tuple[str, list[str] | None]:
    """The dataset's name and class names, from the beton manifest when it is still there."""
    manifest = Path(recipe.data.beton_dir) / "manifest.json"
    if manifest.is_file():
        return _read(manifest, lambda d: (d["source"]["name"], [str(c) for c in d["class_names"]]))
    return Path(recipe.data.beton_dir).name, None


def _label(x: float) -> str:
    return f"{x:.1f}" if round(x, 1) == x else f"{x:g}"


def _patriarch(recipe: Recipe) -> str:
    g = recipe.generations
    return "ce" if g.u >= 1 else g.patriarch_loss  # any loss at u = 1 is plain CE


def _process(recipe: Recipe) -> str:
    g = recipe.generations
    return f"D({_label(1.0 if _patriarch(recipe) == 'ce' else g.u)}, {_label(g.lam)})"


def method_title(recipe: Recipe, dataset: str) -> str:
    """E.g. "D(0.6, 0.6), TSD patriarch, K = 5, 2 students, cifar_resnet20 on digits"."""
    g = recipe.generations
    students = f"{g.students} student" + ("" if g.students == 1 else "s")
    temperature = "" if g.temperature == 1 else f", T = {_label(g.temperature)}"
    return (f"{_process(recipe)}, {_patriarch(recipe).upper()} patriarch, K = {g.k}, "
            f"{students}{temperature}, {recipe.model.name} on {dataset}")


def match_paper(recipe: Recipe, classes: int | None) -> list[PaperSetting]:
    """The paper's settings that this recipe reproduces (model, classes, loss, u, lambda)."""
    g, loss = recipe.generations, _patriarch(recipe)

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, abs_tol=1e-9)

    return [s for s in PAPER_SETTINGS
            if s.model == recipe.model.name and s.classes == classes and s.patriarch == loss
            and (loss == "ce" or s.u is None or close(s.u, g.u))
            and (g.students == 0 or s.lams is None or any(close(lam, g.lam) for lam in s.lams))]


def _analysis_series(a: dict) -> dict[str, float]:
    to_radians = math.pi / 180 if a["dist_unit"] == "degrees" else 1.0
    row = {f"top{k + 1}_confidence": c for k, c in enumerate(a["train"]["confidence"][:4])}
    row |= {"train_top1": a["train"]["top1"], "val_top1": a["val"]["top1"]}
    return row | {f"{split}_dist_{d}": _round(a[split][f"dist_{d}"] * to_radians)
                  for split in ("train", "val") for d in "cs"
                  if a[split][f"dist_{d}"] is not None}


def our_series(summary: dict) -> dict[str, list[float | None]]:
    """Our numbers under the names of PaperSetting.per_generation, one entry per generation."""
    ensemble = {e["generation"]: e for e in summary["ensemble"] or [] if e["generation"] > 0}
    analysis = {a["generation"]: a for a in summary["analysis"] or []}
    transfer = {}
    for name, aliases in TRANSFER_ALIASES.items():
        for t in summary["transfer"] or []:
            if any(a in "".join(filter(str.isalnum, t["name"].lower())) for a in aliases):
                transfer[name] = {g["generation"]: g["accuracy"] for g in t["generations"]}
    rows = []
    for g in summary["generations"]:
        m, e = g["generation"], ensemble.get(g["generation"])
        row = {"best_top1_error": g["best_top1_error"], "last_top1_error": g["last_top1_error"],
               "top1_error": g["last_top1_error"], "top5_error": g["last_top5_error"],
               "ensemble_top1_error": e and e["top1_error"],
               "ensemble_top5_error": e and e["top5_error"],
               **{f"{name}_accuracy": by_gen.get(m) for name, by_gen in transfer.items()}}
        rows.append(row | (_analysis_series(analysis[m]) if m in analysis else {}))
    return {key: [row.get(key) for row in rows] for key in SERIES_LABELS}


def _matrix(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged header raises SyntaxError or TokenError, too
        raise UserError(f"{path}: not a readable .npy file ({one_line(err)}); delete it and "
                        "rerun the analysis") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UserError(f"{path}: expected a square class x class matrix, got shape "
                        f"{matrix.shape}; rerun the analysis")
    return matrix


def _finished(run_dir: Path, planned: int) -> int:
    count = 0
    while count < planned and (run_dir / f"gen{count}" / "eval.json").is_file():
        count += 1
    return count


def _notes(summary: dict, gen: list[Path]) -> list[str]:
    notes = []
    for name, what in (("analysis.json", "secondary information and DistC/DistS"),
                       ("second_class.npy", "second-class heat maps"),
                       ("metrics.jsonl", "learning curves")):
        missing = [d.name for d in gen if not (d / name).is_file()]
        if missing:
            notes.append(f"No {name} in {', '.join(missing)}: their {what} are left out.")
    if summary["ensemble"] is None:
        notes.append("No ensemble.json: the ensemble columns are left out.")
    if summary["transfer"] is None:
        notes.append("No transfer/*.json: no transfer results.")
    return notes


def load_run(run_dir: Path) -> tuple[dict, dict[int, np.ndarray], list[str] | None]:
    """The report's numbers (summary.json), the second-class matrices and the class names."""
    if not (run_dir / "recipe.toml").is_file():
        raise UserError(f"{run_dir} has no recipe.toml: give a run directory, runs/<name>")
    recipe = load_recipe(run_dir / "recipe.toml")
    planned = recipe.generations.students + 1
    finished = _finished(run_dir, planned)
    if not finished:
        raise UserError(f"{run_dir} has no finished generation (no gen0/eval.json): train it "
                        "first, or wait until its patriarch finishes")
    gen = [run_dir / f"gen{m}" for m in range(finished)]
    analysed = [m for m in range(finished) if (gen[m] / "analysis.json").is_file()]
    matrices = {m: _matrix(gen[m] / "second_class.npy") for m in range(finished)
                if (gen[m] / "second_class.npy").is_file()}
    dataset, class_names = _dataset(recipe)
    classes = len(class_names) if class_names else next(
        (len(x) for x in matrices.values()), None)
    ensemble = run_dir / "ensemble.json"
    transfer = sorted((run_dir / "transfer").glob("*.json"))
    g = recipe.generations
    summary = {
        "run": recipe.run.name, "title": method_title(recipe, dataset),
        "method": {"process": _process(recipe), "model": recipe.model.name,
                   "dataset": dataset, "classes": classes, "patriarch_loss": g.patriarch_loss,
                   "u": g.u, "k": g.k, "lam": g.lam, "temperature": g.temperature,
                   "students": g.students},
        "planned_generations": planned, "finished_generations": finished,
        "generations": [_read(gen[m] / "eval.json", lambda e, m=m: _generation(m, e))
                        for m in range(finished)],
        "ensemble": _read(ensemble, lambda d: _ensemble(finished, d))
        if ensemble.is_file() else None,
        "analysis": [_read(gen[m] / "analysis.json", lambda d, m=m: _analysis(m, d))
                     for m in analysed] or None,
        "transfer": [_read(p, lambda d, p=p: _transfer(p.stem, finished, d))
                     for p in transfer] or None,
        "curves": [_read(gen[m] / "metrics.jsonl", lambda rows, m=m: _curve(m, rows))
                   for m in range(finished) if (gen[m] / "metrics.jsonl").is_file()],
    }
    summary["paper"] = _paper(summary, match_paper(recipe, classes))
    summary["notes"] = _notes(summary, gen)
    return summary, matrices, class_names


def _paper(summary: dict, settings: list[PaperSetting]) -> dict:
    ours = our_series(summary)
    used = sorted({k for s in settings for k in s.per_generation}, key=list(SERIES_LABELS).index)
    return {"matched": [{"name": s.name, "source": s.source,
                         "per_generation": {k: list(v) for k, v in s.per_generation.items()},
                         "single": s.single} for s in settings],
            "ours": {k: ours[k] for k in used}}


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, [":---", *["---:"] * (len(header) - 1)], *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _gen(m: int) -> str:
    return "0 (patriarch)" if m == 0 else str(m)


def _headline(summary: dict) -> str:
    gens = summary["generations"]
    text = (f"{summary['finished_generations']} of {summary['planned_generations']} generations "
            f"finished. Patriarch: last-epoch top-1 error {gens[0]['last_top1_error']:.2f} %.")
    if len(gens) > 1:
        best = min(gens[1:], key=lambda g: g["last_top1_error"])
        change = best["last_top1_error"] - gens[0]["last_top1_error"]
        text += (f" Best student by that measure: gen {best['generation']}, "
                 f"{best['last_top1_error']:.2f} % ({change:+.2f} points against the patriarch).")
    last = max(summary["ensemble"] or [], key=lambda e: e["generation"], default=None)
    if last and last["generation"] > 0:
        text += (f" Ensemble of generations 0-{last['generation']}: "
                 f"{last['top1_error']:.2f} %.")
    return text


def _error_section(summary: dict) -> str:
    ensemble = {e["generation"]: e for e in summary["ensemble"] or []}
    header = ["gen", "best epoch", "best top-1 err", "last top-1 err", "last top-5 err"]
    if summary["ensemble"] is not None:
        header += ["ensemble top-1 err", "ensemble top-5 err"]
    rows = []
    for g in summary["generations"]:
        row = [_gen(g["generation"]), str(g["best_epoch"]), _f(g["best_top1_error"]),
               _f(g["last_top1_error"]), _f(g["last_top5_error"])]
        if summary["ensemble"] is not None:
            e = ensemble.get(g["generation"]) if g["generation"] > 0 else None
            row += [_f(e and e["top1_error"]), _f(e and e["top5_error"])]
        rows.append(row)
    return ("## Error per generation (Tables 4-5, Figure 2)\n\nValidation error, %. Best: the "
            "epoch with the highest top-1; last: the final epoch, the one that teaches the next "
            "generation; ensemble: softmax average of the last epochs of generations 0..m.\n\n"
            + _table(header, rows))


def _secondary_section(summary: dict) -> str:
    title = "## Secondary information (Tables 1 and 3)\n\n"
    if summary["analysis"] is None:
        return title + "No analysis.json in any generation: nothing to show."
    width = min(len(a["train"]["confidence"]) for a in summary["analysis"])
    header = ["gen", *[f"top-{k + 1} conf" for k in range(width)], "train top-1", "test top-1"]
    rows = [[_gen(a["generation"]), *[_f(c) for c in a["train"]["confidence"][:width]],
             _f(a["train"]["top1"]), _f(a["val"]["top1"])] for a in summary["analysis"]]
    return (title + "Mean confidence (%) of each training sample's k-th highest class, and "
            "top-1 accuracy (%), of the last-epoch models.\n\n" + _table(header, rows))


def _dist_section(summary: dict) -> str:
    title = "## Feature distances DistC / DistS (Table 2)\n\n"
    analysis = [a for a in summary["analysis"] or [] if a["train"]["dist_c"] is not None]
    if not analysis:
        return title + ("No analysis.json in any generation." if summary["analysis"] is None else
                        "No superclass map for this dataset, so no DistC/DistS: set "
                        "data.superclasses or use a beton whose manifest has fine_to_coarse.")
    unit = analysis[0]["dist_unit"]
    rows = [[_gen(a["generation"]), *[_f(a[s][f"dist_{d}"], 4) for s in ("train", "val")
                                      for d in "cs"]] for a in analysis]
    return (title + f"Mean angle ({unit}) between class and superclass mean features (DistC) "
            "and between superclass and overall means (DistS), last-epoch models.\n\n"
            + _table(["gen", "train DistC", "train DistS", "test DistC", "test DistS"], rows))


def _transfer_section(summary: dict) -> str:
    title = "## Transfer (Table 6)\n\n"
    if summary["transfer"] is None:
        return title + "No transfer results (transfer/*.json)."
    header = ["gen", *[f"{t['name']} ({t['train_per_class']}/class)"
                       for t in summary["transfer"]]]
    accuracy = [{g["generation"]: g["accuracy"] for g in t["generations"]}
                for t in summary["transfer"]]
    rows = [[_gen(m), *[_f(a.get(m)) for a in accuracy]]
            for m in range(summary["finished_generations"])]
    return (title + "Accuracy (%) of a linear SVM on each generation's penultimate features.\n\n"
            + _table(header, rows))


def _paper_section(summary: dict) -> str:
    title = "## The paper's numbers beside ours\n\n"
    method = summary["method"]
    if not summary["paper"]["matched"]:
        return title + (f"No setting of the paper matches this run ({method['model']}, "
                        f"{method['classes']} classes, {method['process']}); "
                        "its tables cover resnet18 on ImageNet, cifar_densenet_bc100/bc190 and "
                        "cifar_resnet110 on CIFAR-100 (ResNet-20/56 appear only as Figure 2's "
                        "curves).")
    parts, ours = [], summary["paper"]["ours"]
    for s in summary["paper"]["matched"]:
        width = max(summary["finished_generations"], *map(len, s["per_generation"].values()))
        rows = []
        for key, values in s["per_generation"].items():
            digits = 4 if "dist" in key else 2
            for who, series in (("paper", values), ("ours", ours[key])):
                padded = [*series, *[None] * (width - len(series))]
                rows.append([f"{SERIES_LABELS[key]}, {who}", *[_f(v, digits) for v in padded]])
        singles = "".join(f"\n- paper, {SINGLE_LABELS[k]}: {v:.2f}"
                          for k, v in s["single"].items())
        parts.append(f"### {s['name']} ({s['source']})\n\n"
                     + _table(["", *[f"Gen #{m}" for m in range(width)]], rows) + "\n" + singles)
    return title + "\n\n".join(parts)


def render_markdown(summary: dict, figures: list[str]) -> str:
    """summary.md: title, headline, the paper's tables for this run, then the figures."""
    images = "\n\n".join(f"![{name[:-4].replace('_', ' ')}](figures/{name})" for name in figures)
    parts = [f"# {summary['run']}: {summary['title']}", _headline(summary),
             _error_section(summary), _secondary_section(summary), _dist_section(summary),
             _transfer_section(summary), _paper_section(summary),
             "## Notes\n\n" + "\n".join(f"- {n}" for n in summary["notes"])
             if summary["notes"] else "", "## Figures\n\n" + images]
    return "\n\n".join(p for p in parts if p) + "\n"


def _axes(fig: Figure, title: str, xlabel: str, ylabel: str, position: int = 111):
    ax = fig.add_subplot(position)
    ax.set_title(title, fontsize=10)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax


def _line(ax, values, paper: bool = False, **style) -> None:
    points = [(m, v) for m, v in enumerate(values) if v is not None]
    if points:
        ax.plot(*zip(*points, strict=True), **{"linestyle": "--" if paper else "-",
                                                "alpha": 0.55 if paper else 1.0, **style})


def _save(fig: Figure, path: Path) -> None:
    """PNG through a temporary name; no software tag, so the same inputs give the same bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    os.replace(tmp, path)


def _error_figure(summary: dict, ours: dict) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = _axes(fig, f"Top-1 validation error per generation\n{summary['title']}",
               "generation (0 = patriarch)", "top-1 error (%)")
    styles = {"best_top1_error": ("C0", "o", "best epoch"),
              "last_top1_error": ("C1", "s", "last epoch"),
              "top1_error": ("C1", "s", "top-1 (epoch not stated)"),
              "ensemble_top1_error": ("C2", "^", "ensemble of gens 0..m")}
    for key in ("best_top1_error", "last_top1_error", "ensemble_top1_error"):
        color, marker, label = styles[key]
        # hollow squares around the filled circles: best and last often coincide
        hollow = {"markerfacecolor": "none", "markersize": 10} if marker == "s" else {}
        _line(ax, ours[key], color=color, marker=marker, label=label, **hollow)
    for s in summary["paper"]["matched"]:
        for key, values in s["per_generation"].items():
            if key in styles:
                color, marker, label = styles[key]
                _line(ax, values, paper=True, color=color, marker=marker, label=f"paper: {label}")
        for key, value in s["single"].items():
            if key.startswith("baseline") and key.endswith("top1_error"):
                ax.axhline(value, color="C0" if "best" in key else "C1", linestyle=":",
                           label=f"paper: {SINGLE_LABELS[key]}")
    ax.legend(fontsize=8)
    return fig


def _confidence_figure(summary: dict, ours: dict) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(f"Mean confidence of each training sample's top classes\n{summary['title']}",
                 fontsize=10)
    top1 = _axes(fig, "top-1 class", "generation (0 = patriarch)", "confidence (%)", 121)
    rest = _axes(fig, "top-2 to top-4 classes", "generation (0 = patriarch)", "confidence (%)",
                 122)
    for k in range(1, 5):
        ax = top1 if k == 1 else rest
        _line(ax, ours[f"top{k}_confidence"], color=f"C{k - 1}", marker="o", label=f"top-{k}")
        for s in summary["paper"]["matched"]:
            values = s["per_generation"].get(f"top{k}_confidence")
            if values:
                _line(ax, values, paper=True, color=f"C{k - 1}", marker="x",
                      label=f"paper: top-{k}")
    for ax in (top1, rest):
        ax.legend(fontsize=8)
    return fig


def _dist_figure(summary: dict) -> Figure:
    analysis = {a["generation"]: a for a in summary["analysis"]}
    unit = next(a["dist_unit"] for a in analysis.values() if a["train"]["dist_c"] is not None)
    scale = 180 / math.pi if unit == "degrees" else 1.0
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = _axes(fig, f"DistC (within superclasses) and DistS (between them)\n{summary['title']}",
               "generation (0 = patriarch)", f"angle ({unit})")
    for d, color in (("c", "C0"), ("s", "C1")):
        for split, marker, name in (("train", "o", "train"), ("val", "s", "test")):
            label = f"Dist{d.upper()} {name}"
            values = [analysis[m][split][f"dist_{d}"] if m in analysis else None
                      for m in range(summary["finished_generations"])]
            _line(ax, values, color=color, marker=marker, label=label,
                  linestyle="-" if split == "train" else "--")
            for s in summary["paper"]["matched"]:
                paper = s["per_generation"].get(f"{split}_dist_{d}")
                if paper:
                    ax.plot(0, paper[0] * scale, marker="*" if split == "train" else "P",
                            markersize=10, color=color, alpha=0.55, linestyle="none",
                            label=f"paper: {label}")
    ax.legend(fontsize=8)
    return fig


def _second_class_figure(m: int, matrix: np.ndarray, names: list[str] | None,
                         vmax: float) -> Figure:
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="frequency (fraction of the row's samples)")
    ax.set_title(f"Second-highest class on the training set, gen {m}", fontsize=10)
    ax.set(xlabel="class with the second-highest score", ylabel="true class")
    if len(matrix) <= 20:
        labels = names if names and len(names) == len(matrix) else range(len(matrix))
        ticks = range(len(matrix))
        ax.set_xticks(ticks, labels, rotation=90 if max(map(len, map(str, labels))) > 2 else 0)
        ax.set_yticks(ticks, labels)
    return fig


def _curves_figure(summary: dict) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = _axes(fig, f"Validation top-1 per epoch\n{summary['title']}", "epoch",
               "val top-1 (%)")
    for curve in summary["curves"]:
        rows = [r for r in curve["epochs"] if "val_top1" in r]
        ax.plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows],
                label=f"gen {_gen(curve['generation'])}", marker="." if len(rows) < 40 else "")
    ax.legend(fontsize=8)
    return fig


def write_figures(run_dir: Path, summary: dict, matrices: dict[int, np.ndarray],
                  names: list[str] | None) -> list[str]:
    """Write figures/*.png for what the run holds; return their names in reading order."""
    ours = our_series(summary)
    figures = {"error_per_generation.png": lambda: _error_figure(summary, ours)}
    if summary["analysis"]:
        figures["confidence.png"] = lambda: _confidence_figure(summary, ours)
        if any(a["train"]["dist_c"] is not None for a in summary["analysis"]):
            figures["dist.png"] = lambda: _dist_figure(summary)
    # one colour scale for every generation, so the heat maps compare at a glance
    vmax = max((float(np.nanmax(x, initial=0.0)) for x in matrices.values()), default=0) or 1.0
    for m, matrix in matrices.items():
        figures[f"second_class_gen{m}.png"] = (
            lambda m=m, matrix=matrix: _second_class_figure(m, matrix, names, vmax))
    if summary["curves"]:
        figures["val_top1_per_epoch.png"] = lambda: _curves_figure(summary)
    folder = run_dir / "figures"
    folder.mkdir(exist_ok=True)
    for name, draw in figures.items():
        _save(draw(), folder / name)
    for old in folder.glob("*.png"):  # a figure whose inputs are gone would mislead
        if old.name not in figures and (old.name in FIGURE_NAMES
                                        or old.name.startswith("second_class_gen")):
            old.unlink()
    return list(figures)


def write_report(run_dir: Path, console: Console) -> Path:
    """Write summary.json, figures/*.png and summary.md of a run directory; return summary.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (give runs/<name>)")
    summary, matrices, names = load_run(run_dir)
    figures = write_figures(run_dir, summary, matrices, names)
    write_json(run_dir / "summary.json", {**summary, "figures": [f"figures/{f}" for f in figures]})
    path = run_dir / "summary.md"
    write_text(path, render_markdown(summary, figures))
    console.print(f"wrote {path}, {run_dir / 'summary.json'} and {len(figures)} figures",
                  soft_wrap=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """python -m fasttt.report RUN_DIR: write the run's summary.md, summary.json and figures."""
    parser = argparse.ArgumentParser(prog="python -m fasttt.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, runs/<name>")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    write_report(args.run_dir, Console())


if __name__ == "__main__":
    exit_on_user_error(main)
