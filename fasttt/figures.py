"""The run report's figures: PNGs under run_dir/figures, drawn from summary.json's numbers.

The paper's matched series are drawn dashed beside ours. Figures are plain matplotlib
Figures, never pyplot, so they render with Agg and need no display; PNGs carry no
software tag, so the same summary gives the same bytes, and are written through a
temporary name.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fasttt.files import write_atomically
from fasttt.paper import SINGLE_LABELS, our_series
from fasttt.rundir import FIGURES

FIGURE_DPI = 150
FIGURE_NAMES = ("error_per_generation.png", "confidence.png", "dist.png",
                "val_top1_per_epoch.png", "loss_components.png")
SOFT_TERMS = ("tsd", "lsr", "cp", "kl")  # the objective's part beside CE, by generation


def generation_label(m: int) -> str:
    """A generation as tables and legends name it: 0 is the patriarch."""
    return "0 (patriarch)" if m == 0 else str(m)


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
    write_atomically(path, partial(fig.savefig, format="png", dpi=FIGURE_DPI,
                                   metadata={"Software": None}))


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
                label=f"gen {generation_label(curve['generation'])}",
                marker="." if len(rows) < 40 else "")
    ax.legend(fontsize=8)
    return fig


def _loss_components_figure(summary: dict) -> Figure:
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    fig.suptitle(f"Loss components per epoch\n{summary['title']}", fontsize=10)
    panels = [("train_ce", "train CE"), ("soft", "train soft term (TSD/LSR/CP; KL for students)"),
              ("val_loss", "val CE")]
    for position, (key, title) in enumerate(panels, start=131):
        ax = _axes(fig, title, "epoch", "loss", position)
        for curve in summary["curves"]:
            rows = curve["epochs"]
            soft = next((t for t in SOFT_TERMS if f"train_{t}" in (rows or [{}])[0]), None)
            column = f"train_{soft}" if key == "soft" else key
            points = [(r["epoch"], r[column]) for r in rows if r.get(column) is not None]
            if points:
                label = f"gen {generation_label(curve['generation'])}" + (
                    f" ({soft})" if key == "soft" else "")
                ax.plot(*zip(*points, strict=True), label=label,
                        marker="." if len(points) < 40 else "")
        if ax.lines:
            ax.legend(fontsize=7)
            if all(min(line.get_ydata()) > 0 for line in ax.lines):
                ax.set_yscale("log")  # an early spike would flatten the rest of the curves
    return fig


def write_figures(run_dir: Path, summary: dict, matrices: dict[int, np.ndarray],
                  names: list[str] | None) -> list[str]:
    """Write figures/*.png for what the run holds; return their names in reading order."""
    ours = our_series(summary)
    figures = {"error_per_generation.png": partial(_error_figure, summary, ours)}
    if summary["analysis"]:
        figures["confidence.png"] = partial(_confidence_figure, summary, ours)
        if any(a["train"]["dist_c"] is not None for a in summary["analysis"]):
            figures["dist.png"] = partial(_dist_figure, summary)
    # one colour scale for every generation, so the heat maps compare at a glance
    vmax = max((float(np.nanmax(x, initial=0.0)) for x in matrices.values()), default=0) or 1.0
    for m, matrix in matrices.items():
        figures[f"second_class_gen{m}.png"] = partial(_second_class_figure, m, matrix, names, vmax)
    if summary["curves"]:
        figures["val_top1_per_epoch.png"] = partial(_curves_figure, summary)
    if any("train_ce" in row for curve in summary["curves"] for row in curve["epochs"]):
        figures["loss_components.png"] = partial(_loss_components_figure, summary)
    folder = run_dir / FIGURES
    folder.mkdir(exist_ok=True)
    for name, draw in figures.items():
        _save(draw(), folder / name)
    for old in folder.glob("*.png"):  # a figure whose inputs are gone would mislead
        if old.name not in figures and (old.name in FIGURE_NAMES
                                        or old.name.startswith("second_class_gen")):
            old.unlink()
    return list(figures)


def write_sweep_figures(directory: Path, sweep: dict) -> list[str]:
    """figures/sweep_<key>.png per swept key: val top-1 (mean ± std over seeds) against it.

    One line per combination of the other swept keys; the x axis is the key's values in
    grid order, evenly spaced when they are not all numbers.
    """
    keys, cells = list(sweep["grid"]), [c for c in sweep["cells"] if c["seeds_finished"]]
    folder = directory / FIGURES
    folder.mkdir(exist_ok=True)
    names = []
    for key in keys:
        values = sweep["grid"][key]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot(111)
        ax.set_title(f"{sweep['name']}: students of {sweep['teacher']}", fontsize=10)
        ax.set(xlabel=key, ylabel="val top-1 (%), last generation, last epoch")
        ax.grid(alpha=0.3)
        others = [k for k in keys if k != key]
        lines: dict[str, tuple[list, list]] = {}  # keyed by text: values may be lists
        for cell in cells:
            rest = [cell["values"][k] for k in others]
            lines.setdefault(repr(rest), (rest, []))[1].append(cell)
        for i, (_, (rest, members)) in enumerate(sorted(lines.items())):
            members.sort(key=lambda c: values.index(c["values"][key]))
            xs = [c["values"][key] if numeric else values.index(c["values"][key])
                  for c in members]
            label = ", ".join(f"{k.split('.')[-1]} = {v}" for k, v in zip(others, rest,
                                                                            strict=True))
            ax.errorbar(xs, [c["val_top1_mean"] for c in members],
                        yerr=[c["val_top1_std"] or 0.0 for c in members], marker="o",
                        capsize=3, color=f"C{i % 10}", label=label or None)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        if len(lines) > 1:
            ax.legend(fontsize=8)
        name = f"sweep_{key}.png"
        _save(fig, folder / name)
        names.append(name)
    return names
