"""The paper's measurements of every finished generation of a run, written into the run.

Per generation m, from its last-epoch weights: `gen<m>/analysis.json` holds the mean
softmax confidence of the top-1..top-4 classes on the un-augmented training set (its
training rows: data.holdout's samples are left out; Tables
1 and 3), train and val accuracy, and DistC/DistS of Eqn 4 (Table 2) on both splits;
`gen<m>/second_class.npy` the second-class confusion matrix (Figure 1). `ensemble.json`
holds the val accuracy of the averaged softmax of generations 0..m (Figure 2, Tables
4-5). Every statistic is a per-batch sum, so batches and processes simply add up. The
files hold no timings or timestamps: an analysis that is killed and rerun writes the
same bytes, and an existing analysis.json is never recomputed.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console

from fasttt.augment import eval_images
from fasttt.betons import read_manifest
from fasttt.data import split_loader, train_samples, training_rows
from fasttt.errors import UserError
from fasttt.files import write_atomically, write_json
from fasttt.models import last_epoch_model, penultimate_features
from fasttt.progress import progress_bar
from fasttt.recipe import AugmentConfig, DataConfig, load_recipe
from fasttt.rundir import (
    ANALYSIS,
    ENSEMBLE,
    RECIPE,
    SECOND_CLASS,
    finished_generations,
    generation_dir,
    generation_weights,
    read_eval,
)

CONFIDENCE_RANKS = 4  # Tables 1 and 3: the top-1 .. top-4 classes of each sample
DIST_UNIT = "radians"  # Table 2's DistC/DistS (0.31-0.62) are arccos values in radians


# ---------------------------------------------------------------- per-batch sums


def confidence_sums(logits: torch.Tensor, ranks: int = CONFIDENCE_RANKS) -> torch.Tensor:
    """Batch sum of the sorted softmax probabilities at ranks 1..min(ranks, C), float64."""
    probabilities = logits.float().softmax(dim=1)
    return probabilities.topk(min(ranks, probabilities.shape[1]), dim=1).values.double().sum(0)


def hit_counts(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits) of a batch as float64; with C <= 5 every sample is a top-5 hit."""
    hits = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums (C, D) and sample counts (C,) of a batch, float64."""
    onehot = F.one_hot(labels, num_classes).double()
    # A matmul rather than index_add_, whose atomics make GPU sums differ run to run.
    return onehot.T @ features.double(), onehot.sum(0)


def second_class_counts(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C x C counts: row = true class, column = the class with the second highest score."""
    num_classes = scores.shape[1]
    second = scores.topk(2, dim=1).indices[:, 1]
    cells = torch.bincount(labels * num_classes + second, minlength=num_classes * num_classes)
    return cells.view(num_classes, num_classes)


def ensemble_hits(probabilities: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(M, 2) top-1/top-5 hits of the mean of probabilities[0..m], one row per m."""
    total = torch.zeros_like(probabilities[0])
    rows = []
    for m, member in enumerate(probabilities):
        total = total + member
        rows.append(hit_counts(total / (m + 1), labels))
    return torch.stack(rows)


# ---------------------------------------------------------------- from the sums


def row_frequencies(counts: torch.Tensor) -> np.ndarray:
    """Counts divided by their row sums, float64; rows of classes without samples stay 0."""
    counts = counts.double().cpu().numpy()
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _angles(vectors: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    cosines = F.cosine_similarity(vectors, references, dim=1)
    return torch.arccos(cosines.clamp(-1.0, 1.0))


def class_distances(sums: torch.Tensor, counts: torch.Tensor,
                    superclasses: list[int]) -> tuple[float | None, float | None]:
    """DistC and DistS of Eqn 4, in radians, from per-class feature sums and counts.

    v_j^S is the mean feature of all samples of superclass j (the paper's "mean vector
    for each superclass"; with CIFAR's balanced classes it is also the mean of its class
    means). Classes without samples or with a negative superclass id are left out;
    (None, None) when none is left.
    """
    sums, counts = sums.double().cpu(), counts.double().cpu()
    coarse = torch.as_tensor(superclasses, dtype=torch.int64)
    kept = (counts > 0) & (coarse >= 0)
    if not kept.any():
        return None, None
    sums, counts, coarse = sums[kept], counts[kept], coarse[kept]
    groups = int(coarse.max()) + 1
    group_sums = sums.new_zeros(groups, sums.shape[1]).index_add_(0, coarse, sums)
    group_counts = counts.new_zeros(groups).index_add_(0, coarse, counts)
    group_means = group_sums / group_counts.clamp(min=1)[:, None]
    dist_c = _angles(sums / counts[:, None], group_means[coarse]).mean()
    group_means = group_means[group_counts > 0]
    overall = group_means.mean(dim=0, keepdim=True).expand_as(group_means)
    return dist_c.item(), _angles(group_means, overall).mean().item()


def superclass_map(data: DataConfig, manifest: dict, num_classes: int) -> list[int] | None:
    """Class -> superclass ids: data.superclasses, else the beton's fine_to_coarse, else None."""
    if data.superclasses:
        mapping = list(data.superclasses)
        if len(mapping) != num_classes:
            raise UserError(f"data.superclasses has {len(mapping)} entries but the beton has "
                            f"{num_classes} classes: give one superclass id per class")
        return mapping
    mapping = manifest.get("fine_to_coarse")
    if not mapping:
        return None
    if len(mapping) != num_classes:
        raise UserError(f"{data.beton_dir}: the manifest's fine_to_coarse has "
                        f"{len(mapping)} entries for {num_classes} classes: rebuild the betons "
                        "with --force, or set data.superclasses")
    return list(mapping)


# ---------------------------------------------------------------- model passes


def _views(loader, augment: AugmentConfig, device: torch.device, progress, description: str):
    """(un-augmented views, labels) of each batch on the device, advancing a progress task."""
    task = progress.add_task(description, total=len(loader), info="")
    for batch in loader:
        yield (eval_images(batch, augment, device),
               batch.label.to(device, non_blocking=True))
        progress.advance(task)
    progress.remove_task(task)


def _zero_sums(model, eval_size: int, num_classes: int, device) -> dict[str, torch.Tensor]:
    """Empty sums, so a process whose slice is empty still joins the reduction."""
    images = torch.zeros(1, 3, eval_size, eval_size, device=device)
    width = penultimate_features(model, images).shape[1]
    zeros = dict(dtype=torch.float64, device=device)
    return {"samples": torch.zeros((), **zeros), "hits": torch.zeros(2, **zeros),
            "confidence": torch.zeros(min(CONFIDENCE_RANKS, num_classes), **zeros),
            "features": torch.zeros(num_classes, width, **zeros),
            "counts": torch.zeros(num_classes, **zeros),
            "second": torch.zeros(num_classes, num_classes, **zeros)}


def _split_sums(model, loader, augment: AugmentConfig, accelerator: Accelerator,
                progress, description: str) -> dict[str, torch.Tensor]:
    """Every statistic of one split, summed over its batches and over every process."""
    num_classes, device = model.num_classes, accelerator.device
    # no_grad, as evaluate(): inference tensors would make a compiled model compile again
    with torch.no_grad(), accelerator.autocast():
        sums = _zero_sums(model, augment.eval_size, num_classes, device)
        for images, labels in _views(loader, augment, device, progress, description):
            # penultimate_features and the logits share one backbone pass.
            feature_map = model.forward_features(images)
            features = model.forward_head(feature_map, pre_logits=True).float()
            logits = model.forward_head(feature_map).float()
            feature_sums, counts = class_feature_sums(features, labels, num_classes)
            batch = {"samples": sums["samples"].new_tensor(len(labels)),
                     "hits": hit_counts(logits, labels), "confidence": confidence_sums(logits),
                     "features": feature_sums, "counts": counts,
                     "second": second_class_counts(logits, labels).double()}
            sums = {key: sums[key] + value for key, value in batch.items()}
        return accelerator.reduce(sums, reduction="sum")


def _summary(sums: dict, split: str, superclasses: list[int] | None) -> dict:
    """One split's entry of analysis.json."""
    samples = int(sums["samples"].item())
    if samples == 0:
        raise UserError(f"the {split} split has no samples to analyse")
    top1, top5 = (100 * sums["hits"] / samples).tolist()
    entry = {"samples": samples, "top1": top1}
    if split == "train":
        entry["confidence"] = (sums["confidence"] / samples).tolist()
    else:
        entry["top5"] = top5
    dist_c, dist_s = (None, None)
    if superclasses is not None:
        dist_c, dist_s = class_distances(sums["features"], sums["counts"], superclasses)
    return entry | {"dist_c": dist_c, "dist_s": dist_s}


def analyze_generation(model, splits: dict, augment: AugmentConfig, accelerator: Accelerator,
                       superclasses: list[int] | None) -> tuple[dict, np.ndarray]:
    """One pass over each of `splits` (train and val loaders): analysis entries, confusion.

    Every process calls this; each reads its own slice and the sums are reduced.
    """
    model.eval()
    with progress_bar(accelerator.is_main_process) as progress:
        sums = {split: _split_sums(model, loader, augment, accelerator, progress,
                                   f"analysis {split}") for split, loader in splits.items()}
    groups = None if superclasses is None else len({c for c in superclasses if c >= 0})
    analysis = {split: _summary(sums[split], split, superclasses) for split in ("train", "val")}
    return analysis | {"dist_unit": DIST_UNIT, "superclasses": groups}, \
        row_frequencies(sums["train"]["second"])


def ensemble_accuracies(models: list, loader, augment: AugmentConfig,
                        accelerator: Accelerator) -> list[dict]:
    """Val top-1/top-5 (%) of the mean softmax of models[0..m], for each m, in one pass."""
    for model in models:
        model.eval()
    hits = torch.zeros(len(models), 2, dtype=torch.float64, device=accelerator.device)
    samples = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with (progress_bar(accelerator.is_main_process) as progress, torch.no_grad(),
          accelerator.autocast()):
        for images, labels in _views(loader, augment, accelerator.device, progress,
                                     "ensembles"):
            probabilities = [model(images).float().softmax(dim=1) for model in models]
            hits = hits + ensemble_hits(probabilities, labels)
            samples = samples + len(labels)
        totals = accelerator.reduce(torch.cat([hits.flatten(), samples[None]]), reduction="sum")
    hits, samples = totals[:-1].view(-1, 2), totals[-1].item()
    if samples == 0:
        raise UserError("the val split has no samples to analyse")
    return [{"members": list(range(m + 1)), "val_top1": 100 * top1 / samples,
             "val_top5": 100 * top5 / samples} for m, (top1, top5) in enumerate(hits.tolist())]


# ---------------------------------------------------------------- the run directory


def _ensemble_members(path: Path) -> list | None:
    """The weights checksums ensemble.json was computed from; None when missing or unreadable."""
    try:
        return json.loads(path.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def analyze_run(run_dir: Path, accelerator: Accelerator, console: Console) -> None:
    """Analyse each finished generation lacking analysis.json, then refresh ensemble.json.

    The data, model and augmentation are the run's own, from its recipe.toml. Every
    process calls this; only the main one writes.
    """
    run_dir = Path(run_dir)
    finished = finished_generations(run_dir)
    todo = [m for m in finished if not all((generation_dir(run_dir, m) / name).is_file()
                                           for name in (ANALYSIS, SECOND_CLASS))]
    # Redone when a generation was added or retrained: the members' weights name it.
    members = [read_eval(run_dir, m)["weights_sha256"] for m in finished]
    redo_ensemble = bool(finished) and _ensemble_members(run_dir / ENSEMBLE) != members
    accelerator.wait_for_everyone()  # every process has decided before any file appears
    if not todo and not redo_ensemble:
        return
    recipe = load_recipe(run_dir / RECIPE)
    manifest = read_manifest(recipe.data.beton_dir)
    num_classes = len(manifest["class_names"])
    superclasses = superclass_map(recipe.data, manifest, num_classes)
    main = accelerator.is_main_process
    if todo and superclasses is None and main:
        console.print("no class -> superclass map (data.superclasses, or a beton with "
                      "fine_to_coarse such as CIFAR-100): DistC/DistS skipped")
    batch = recipe.cache.batch_size
    splits = {"train": split_loader(recipe.data, accelerator, "train", batch,
                                    limit=train_samples(recipe.data, manifest),
                                    rows=training_rows(recipe.data, manifest)),
              "val": split_loader(recipe.data, accelerator, "val", batch)}

    def model_of(m: int):
        return last_epoch_model(generation_weights(run_dir, m), recipe.model, recipe.run,
                                num_classes, accelerator.device)

    for m in todo:
        analysis, second_class = analyze_generation(model_of(m), splits, recipe.augment,
                                                    accelerator, superclasses)
        if main:
            gen_dir = generation_dir(run_dir, m)
            write_atomically(gen_dir / SECOND_CLASS, partial(np.save, arr=second_class))
            write_json(gen_dir / ANALYSIS, {"generation": m, **analysis})
            train = analysis["train"]
            console.print(f"gen{m} analysis: train top-1 {train['top1']:.2f}%, confidence "
                          + " ".join(f"{c:.3f}" for c in train["confidence"]))
        accelerator.wait_for_everyone()
    if redo_ensemble:
        rows = ensemble_accuracies([model_of(m) for m in finished], splits["val"],
                                   recipe.augment, accelerator)
        if main:
            write_json(run_dir / ENSEMBLE, {"generations": rows, "weights_sha256": members})
            console.print(f"ensemble of gen0..gen{finished[-1]}: val top-1 "
                          f"{rows[-1]['val_top1']:.2f}%")
        accelerator.wait_for_everyone()
