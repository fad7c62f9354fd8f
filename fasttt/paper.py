"""The paper's numbers (Yang et al., AAAI 2019, Tables 1-6) and which of them a run reproduces.

Data, not code: each PaperSetting is a row group of the paper's tables with the model,
class count, patriarch loss, u and lambda it applies to. `match_paper` picks the settings
of a recipe; `our_series` lays a run's summary out under the same series names, so the
report can set the two side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fasttt.losses import patriarch_loss_name
from fasttt.recipe import GenerationsConfig


@dataclass(frozen=True)
class PaperSetting:
    """A row group of the paper's tables, and which runs it applies to (numbers in %)."""

    name: str
    source: str
    model: str
    classes: int
    patriarch: str  # the patriarch's loss; any loss with CE weight 1 is "ce"
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


def paper_patriarch(g: GenerationsConfig) -> str:
    """The patriarch's loss as the paper's tables name it: any loss whose CE weight is 1 is CE."""
    return patriarch_loss_name(g.patriarch_loss, g.u, g.k, g.eta)


def match_paper(g: GenerationsConfig, model: str, classes: int | None) -> list[PaperSetting]:
    """The paper's settings that a run of `model` reproduces (model, classes, loss, u, lambda)."""
    loss = paper_patriarch(g)

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, abs_tol=1e-9)

    return [s for s in PAPER_SETTINGS
            if s.model == model and s.classes == classes and s.patriarch == loss
            and (loss == "ce" or s.u is None or close(s.u, g.u))
            and (g.students == 0 or s.lams is None or any(close(lam, g.lam) for lam in s.lams))]


def _analysis_series(a: dict) -> dict[str, float]:
    to_radians = math.pi / 180 if a["dist_unit"] == "degrees" else 1.0
    row = {f"top{k + 1}_confidence": c for k, c in enumerate(a["train"]["confidence"][:4])}
    row |= {"train_top1": a["train"]["top1"], "val_top1": a["val"]["top1"]}
    return row | {f"{split}_dist_{d}": round(a[split][f"dist_{d}"] * to_radians, 4)
                  for split in ("train", "val") for d in "cs"
                  if a[split][f"dist_{d}"] is not None}


def _transfer_series(summary: dict) -> dict[str, dict[int, float]]:
    """Accuracy by generation of each transfer target the paper also reports."""
    series = {}
    for name, aliases in TRANSFER_ALIASES.items():
        for t in summary["transfer"] or []:
            if any(a in "".join(filter(str.isalnum, t["name"].lower())) for a in aliases):
                series[name] = {g["generation"]: g["accuracy"] for g in t["generations"]}
    return series


def our_series(summary: dict) -> dict[str, list[float | None]]:
    """Our numbers under the names of PaperSetting.per_generation, one entry per generation."""
    ensemble = {e["generation"]: e for e in summary["ensemble"] or [] if e["generation"] > 0}
    analysis = {a["generation"]: a for a in summary["analysis"] or []}
    transfer = _transfer_series(summary)
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


def paper_summary(summary: dict, settings: list[PaperSetting]) -> dict:
    """summary.json's "paper": the matched settings and our series that they report."""
    ours = our_series(summary)
    used = sorted({k for s in settings for k in s.per_generation}, key=list(SERIES_LABELS).index)
    return {"matched": [{"name": s.name, "source": s.source,
                         "per_generation": {k: list(v) for k, v in s.per_generation.items()},
                         "single": s.single} for s in settings],
            "ours": {k: ours[k] for k in used}}
