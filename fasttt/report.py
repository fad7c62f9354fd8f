"""The evidence of a run: does the tolerant teacher help? Tables and figures, as in the paper.

    python -m fasttt.report runs/NAME      # also run by fasttt/train.py at the end of a run

Reads only what the run wrote (recipe.toml, gen<m>/eval.json, metrics.jsonl,
analysis.json, second_class.npy, ensemble.json, transfer/*.json) and writes
summary.md, summary.json and figures/*.png. Only finished generations (eval.json
present) are reported; a missing analysis, ensemble or transfer file leaves its
section out with a note. summary.json is a pure function of those files, so a
killed-and-resumed run gets byte-identical numbers. All numbers are percentages,
but DistC/DistS, which are angles in the unit the analysis states. The paper's numbers
and their matching live in fasttt/paper.py, the figures in fasttt/figures.py.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console

from fasttt.adopt import adopted_teacher
from fasttt.betons import BUILD_HINT, MANIFEST, read_manifest
from fasttt.errors import OneLineParser, UserError, exit_on_user_error, one_line
from fasttt.figures import generation_label, write_figures
from fasttt.files import write_json, write_text
from fasttt.generation import generation_views
from fasttt.paper import SERIES_LABELS, SINGLE_LABELS, match_paper, paper_patriarch, paper_summary
from fasttt.recipe import DataConfig, GenerationsConfig, load_recipe
from fasttt.rundir import (
    ANALYSIS,
    ENSEMBLE,
    EVAL,
    FIGURES,
    INPUTS,
    METRICS,
    RECIPE,
    SECOND_CLASS,
    SUMMARY_JSON,
    SUMMARY_MD,
    TRANSFER,
    check_inputs,
    finished_generations,
    generation_dir,
    read_stopping,
    retrain_hint,
)
from fasttt.teachers import ViewSchedule


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _error(accuracy: float) -> float:
    return round(100.0 - float(accuracy), 4)


REANALYSE = ("delete it and rerun the training command: finished generations are kept and "
             "what is missing of the analysis is computed again")
RETRANSFER = "delete it and rerun python -m fasttt.transfer for that target"
ADVICE = {ANALYSIS: REANALYSE, SECOND_CLASS: REANALYSE, ENSEMBLE: REANALYSE,
          METRICS: "delete it: the report then leaves that generation's learning curves out"}


def _read(path: Path, parse, advice: str | None = None):
    """parse(JSON of path), with a damaged or unexpected file as one line naming it."""
    try:
        text = path.read_text()
        return parse([json.loads(line) for line in text.splitlines() if line.strip()]
                     if path.suffix == ".jsonl" else json.loads(text))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise UserError(f"{path}: unexpected content ({type(err).__name__}: {one_line(err)}); "
                        f"{advice or ADVICE[path.name]}") from None


def _generation(m: int, e: dict) -> dict:
    row = {"generation": m}
    for which in ("best", "last"):
        row[f"{which}_epoch"] = e[which]["epoch"]
        for k in ("top1", "top5"):
            row[f"{which}_{k}"] = _round(e[which][f"val_{k}"])
            row[f"{which}_{k}_error"] = _error(e[which][f"val_{k}"])
    return row


def _curve(m: int, rows: list[dict]) -> dict:
    keep = ("epoch", "lr", "train_loss", "train_ce", "train_tsd", "train_lsr", "train_cp",
            "train_kl", "train_top1", "teacher_agreement", "teacher_top1_prob", "val_loss",
            "val_top1", "val_top5")  # no timings: the same run gives the same summary
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


def _dataset(run_dir: Path, beton_dir: Path) -> tuple[str, list[str] | None]:
    """The dataset's name and class names, from the betons the run trained on if still there.

    Betons rebuilt since (another dataset, other images) would mislabel every number.
    """
    if not (beton_dir / MANIFEST).is_file():
        return beton_dir.name, None
    if (run_dir / INPUTS).is_file():
        check_inputs(run_dir, beton_dir, read_manifest(beton_dir))
    return _read(beton_dir / MANIFEST,
                 lambda d: (d["source"]["name"], [str(c) for c in d["class_names"]]),
                 f"rebuild the betons with --force ({BUILD_HINT})")


def _format_number(x: float) -> str:
    """A number as the paper writes it: 1.0, 0.6, 0.65."""
    return f"{x:.1f}" if round(x, 1) == x else f"{x:g}"


def _process(g: GenerationsConfig) -> str:
    u = 1.0 if paper_patriarch(g) == "ce" else g.u
    return f"D({_format_number(u)}, {_format_number(g.lam)})"


def method_title(g: GenerationsConfig, model: str, dataset: str) -> str:
    """E.g. "D(0.6, 0.6), TSD patriarch, K = 5, 2 students, cifar_resnet20 on digits"."""
    students = f"{g.students} student" + ("" if g.students == 1 else "s")
    temperature = "" if g.temperature == 1 else f", T = {_format_number(g.temperature)}"
    return (f"{_process(g)}, {paper_patriarch(g).upper()} patriarch, K = {g.k}, "
            f"{students}{temperature}, {model} on {dataset}")


def _matrix(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged header raises SyntaxError or TokenError, too
        raise UserError(f"{path}: not a readable .npy file ({one_line(err)}); "
                        f"{REANALYSE}") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UserError(f"{path}: expected a square class x class matrix, got shape "
                        f"{matrix.shape}; {REANALYSE}")
    return matrix


def _notes(summary: dict, gen: list[Path]) -> list[str]:
    notes = []
    for name, what in ((ANALYSIS, "secondary information and DistC/DistS"),
                       (SECOND_CLASS, "second-class heat maps"),
                       (METRICS, "learning curves")):
        missing = [d.name for d in gen if not (d / name).is_file()]
        if missing:
            notes.append(f"No {name} in {', '.join(missing)}: their {what} are left out.")
    if summary["ensemble"] is None:
        notes.append("No ensemble.json: the ensemble columns are left out.")
    return notes  # (no transfer results: the Transfer section says so)


def _limit_note(data: DataConfig) -> list[str]:
    """A note that data.train_limit trained the run on part of the training split."""
    limit, manifest = data.train_limit, Path(data.beton_dir) / MANIFEST
    if not limit:
        return []
    total = _read(manifest, lambda d: d["splits"]["train"]["count"],
                  f"rebuild the betons with --force ({BUILD_HINT})") if manifest.is_file() else None
    if total is not None and limit >= total:
        return []
    held = " (less data.holdout's share)" if data.holdout else ""
    return [f"data.train_limit = {limit}: trained on the first {limit} of "
            f"{'the' if total is None else total} training samples{held}."]


def _teacher_views(views: ViewSchedule | None, cache_mode: str) -> str | None:
    """What the students' teachers label, in words (None without students: no views)."""
    return None if views is None else f"{views.describe()} ({cache_mode} teacher)"


def _method(g: GenerationsConfig, model: str, dataset: str, classes: int | None,
            teacher_views: str | None) -> dict:
    return {"process": _process(g), "model": model, "dataset": dataset,
            "classes": classes, "patriarch_loss": g.patriarch_loss, "u": g.u, "k": g.k,
            "lam": g.lam, "temperature": g.temperature, "students": g.students,
            "teacher_views": teacher_views}


def _results(run_dir: Path, gen: list[Path]) -> dict:
    """The finished generations' numbers, and the ensemble, analysis, transfer and curves."""
    finished = len(gen)
    ensemble = run_dir / ENSEMBLE
    transfer = sorted((run_dir / TRANSFER).glob("*.json"))
    return {
        "generations": [_read(gen[m] / EVAL, partial(_generation, m), retrain_hint(run_dir, m))
                        for m in range(finished)],
        "ensemble": _read(ensemble, partial(_ensemble, finished))
        if ensemble.is_file() else None,
        "analysis": [_read(gen[m] / ANALYSIS, partial(_analysis, m))
                     for m in range(finished) if (gen[m] / ANALYSIS).is_file()] or None,
        "transfer": [_read(p, partial(_transfer, p.stem, finished), RETRANSFER)
                     for p in transfer] or None,
        "curves": [_read(gen[m] / METRICS, partial(_curve, m))
                   for m in range(finished) if (gen[m] / METRICS).is_file()],
    }


def load_run(run_dir: Path) -> tuple[dict, dict[int, np.ndarray], list[str] | None]:
    """The report's numbers (summary.json), the second-class matrices and the class names."""
    if not (run_dir / RECIPE).is_file():
        raise UserError(f"{run_dir} has no {RECIPE}: give a run directory, runs/<name>")
    recipe = load_recipe(run_dir / RECIPE)
    planned = recipe.generations.students + 1
    finished = len(finished_generations(run_dir, planned))
    if not finished:
        raise UserError(f"{run_dir} has no finished generation (no gen0/{EVAL}): train it "
                        "first, or wait until its patriarch finishes")
    gen = [generation_dir(run_dir, m) for m in range(finished)]
    matrices = {m: _matrix(gen[m] / SECOND_CLASS) for m in range(finished)
                if (gen[m] / SECOND_CLASS).is_file()}
    dataset, class_names = _dataset(run_dir, Path(recipe.data.beton_dir))
    classes = len(class_names) if class_names else next(
        (len(x) for x in matrices.values()), None)
    adopted = adopted_teacher(run_dir)
    g, model = recipe.generations, recipe.model.name
    views = generation_views(recipe, 1) if g.students else None
    teacher_views = _teacher_views(views, recipe.cache.mode)
    summary = {"run": recipe.run.name, "title": method_title(g, model, dataset),
               "method": _method(g, model, dataset, classes, teacher_views),
               "planned_generations": planned,
               "finished_generations": finished, **_results(run_dir, gen),
               "adopted_teacher": None if adopted is None else adopted.describe(),
               "stopping": read_stopping(run_dir)}
    summary["paper"] = paper_summary(summary, match_paper(g, model, classes))
    summary["notes"] = [*_limit_note(recipe.data), *_notes(summary, gen)]
    return summary, matrices, class_names


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, [":---", *["---:"] * (len(header) - 1)], *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _headline(summary: dict) -> str:
    gens = summary["generations"]
    teacher = summary["adopted_teacher"]
    stopping = summary["stopping"] or {}
    stopped = ("" if stopping.get("stopped_after") is None else
               f" The saturation rule stopped after gen {stopping['stopped_after']}.")
    who = f"Teacher ({teacher}, adopted as gen 0)" if teacher else "Patriarch"
    text = (f"{summary['finished_generations']} of {summary['planned_generations']} generations "
            f"finished.{stopped} {who}: last-epoch top-1 error "
            f"{gens[0]['last_top1_error']:.2f} %.")
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
        row = [generation_label(g["generation"]), str(g["best_epoch"]), _f(g["best_top1_error"]),
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
    rows = [[generation_label(a["generation"]), *[_f(c) for c in a["train"]["confidence"][:width]],
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
    rows = [[generation_label(a["generation"]), *[_f(a[s][f"dist_{d}"], 4) for s in ("train", "val")
                                      for d in "cs"]] for a in analysis]
    return (title + f"Mean angle ({unit}) between class and superclass mean features (DistC) "
            "and between superclass and overall means (DistS), last-epoch models.\n\n"
            + _table(["gen", "train DistC", "train DistS", "test DistC", "test DistS"], rows))


def _stopping_section(summary: dict) -> str:
    stopping = summary["stopping"]
    if stopping is None:
        return ""
    rows = [[generation_label(g["generation"]), _f(g["top1"]), _f(g["ensemble_top1"]),
             _f(g["train_top1_confidence"], 3)] for g in stopping["generations"]]
    decision = (f"stopped after gen {stopping['stopped_after']} of the "
                f"{stopping['planned_students']} planned students: {stopping['reason']}"
                if stopping["stopped_after"] is not None else stopping["reason"])
    return ("## When to stop (holdout)\n\n"
            f"{stopping['holdout_samples']} training samples ({stopping['holdout']:g} of the "
            "split, stratified) were held out of every generation and every cache. Rule: "
            f"generations.stop = \"{stopping['rule']}\" (patience {stopping['patience']}, "
            f"min_delta {stopping['min_delta']:g} points); decision: {decision}. Top-1 (%) on "
            "the holdout of each generation's last epoch and of the ensemble of generations "
            "0..m, and each generation's mean top-1 confidence on its training rows, the "
            "paper's saturation signal.\n\n"
            + _table(["gen", "holdout top-1", "ensemble holdout top-1",
                      "train top-1 confidence"], rows))


def _transfer_section(summary: dict) -> str:
    title = "## Transfer (Table 6)\n\n"
    if summary["transfer"] is None:
        return title + "No transfer results (transfer/*.json)."
    header = ["gen", *[f"{t['name']} ({t['train_per_class']}/class)"
                       for t in summary["transfer"]]]
    accuracy = [{g["generation"]: g["accuracy"] for g in t["generations"]}
                for t in summary["transfer"]]
    rows = [[generation_label(m), *[_f(a.get(m)) for a in accuracy]]
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
    views = summary["method"]["teacher_views"]
    parts = [f"# {summary['run']}: {summary['title']}", _headline(summary),
             f"Teacher views: {views}." if views else "",
             _error_section(summary), _stopping_section(summary), _secondary_section(summary),
             _dist_section(summary),
             _transfer_section(summary), _paper_section(summary),
             "## Notes\n\n" + "\n".join(f"- {n}" for n in summary["notes"])
             if summary["notes"] else "", "## Figures\n\n" + images]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(run_dir: Path, console: Console) -> Path:
    """Write summary.json, figures/*.png and summary.md of a run directory; return summary.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (give runs/<name>)")
    summary, matrices, names = load_run(run_dir)
    figures = write_figures(run_dir, summary, matrices, names)
    write_json(run_dir / SUMMARY_JSON,
               {**summary, "figures": [f"{FIGURES}/{f}" for f in figures]})
    path = run_dir / SUMMARY_MD
    write_text(path, render_markdown(summary, figures))
    console.print(f"wrote {path}, {run_dir / SUMMARY_JSON} and {len(figures)} figures",
                  soft_wrap=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """python -m fasttt.report RUN_DIR: write the run's summary.md, summary.json and figures."""
    parser = OneLineParser(prog="python -m fasttt.report", description=__doc__.splitlines()[0],
                           usage_line="python -m fasttt.report RUN_DIR")
    parser.add_argument("run_dir", type=Path, help="a run directory, runs/<name>")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    write_report(args.run_dir, Console())


if __name__ == "__main__":
    exit_on_user_error(main)
