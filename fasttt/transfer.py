"""Transfer (the paper's Table 6): each generation as a feature extractor for another dataset.

    python -m fasttt.transfer runs/NAME data/caltech256 --train-per-class 60
    python -m fasttt.transfer runs/NAME data/indoor67 --train-per-class 80 --canvas-size 512

Every finished generation's LAST-epoch weights embed every image of the target betons
(all splits pooled, shown with the run's un-augmented evaluation view) as penultimate
features: the pooled vector that feeds the classifier (512-d for ResNet-18, as the
paper uses). A linear SVM (scikit-learn's LinearSVC, one-vs-rest, C = 1.0: the paper
names no C) is trained on N images per class and scored on the rest. The paper says
nothing on normalisation, so each feature vector is L2-normalised. The split is drawn
once per (target, N, seed) with numpy's default_rng and is the same for every
generation, so the accuracies compare features only. Results go to
RUN_DIR/transfer/<target name>.json.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ffcv.reader import Reader
from rich.console import Console
from rich.table import Table
from sklearn.svm import LinearSVC

from fasttt.augment import eval_images
from fasttt.betons import MANIFEST, is_photo, read_manifest
from fasttt.data import BetonLoader, sequential_loader
from fasttt.errors import OneLineParser, UserError, exit_on_user_error
from fasttt.files import write_json
from fasttt.models import last_epoch_model, penultimate_features
from fasttt.progress import progress_bar
from fasttt.recipe import AugmentConfig, DataConfig, Recipe, load_recipe
from fasttt.rundir import RECIPE, TRANSFER, finished_generations, generation_weights

SVM_SEED = 0  # LinearSVC's random_state: liblinear's coordinate-descent order
USAGE = ("python -m fasttt.transfer RUN_DIR TARGET_BETON_DIR --train-per-class N [--seed S] "
         "[--canvas-size PX] [--batch-size B] [--svm-c C]")


@dataclass(frozen=True)
class TransferOptions:
    """How the target is split, shown to the models and classified."""

    train_per_class: int  # SVM training images per class; the rest are the test set
    seed: int = 0  # draws the split
    canvas_size: int = 0  # photo targets: canvas side in pixels; 0 = the recipe's
    batch_size: int = 256  # feature-extraction batch
    svm_c: float = 1.0  # LinearSVC's C

    def check(self) -> None:
        """One-line refusal of values that cannot work."""
        if self.train_per_class < 1 or self.seed < 0:
            raise UserError("--train-per-class must be at least 1 and --seed at least 0")
        if self.batch_size < 1 or self.canvas_size < 0 or not self.svm_c > 0:
            raise UserError("--batch-size must be >= 1, --canvas-size >= 0, --svm-c > 0")


@dataclass(frozen=True)
class Target:
    """The target beton directory and how its images are decoded."""

    beton_dir: Path
    manifest: dict
    canvas_size: int | None  # photos only


def parse_args(argv: list[str]) -> tuple[Path, Path, TransferOptions]:
    """RUN_DIR, TARGET_BETON_DIR and the checked options."""
    parser = OneLineParser(prog="python -m fasttt.transfer", description=__doc__.splitlines()[0],
                           usage_line=USAGE)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--train-per-class", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canvas-size", type=int, default=0,
                        help="photo targets; default the recipe's data.canvas_size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--svm-c", type=float, default=1.0)
    args = parser.parse_args(argv)
    options = TransferOptions(args.train_per_class, args.seed, args.canvas_size,
                              args.batch_size, args.svm_c)
    options.check()
    return args.run_dir, args.target, options


def trained_generations(run_dir: Path) -> list[int]:
    """The run's finished generations, each with its weights, or a one-line refusal."""
    generations = finished_generations(run_dir)
    for m in generations:
        generation_weights(run_dir, m)  # there and whole, or a one-line refusal
    if not generations:
        raise UserError(f"{run_dir} has no finished generation (no gen0/eval.json): "
                        "train one with fasttt/train.py first")
    return generations


def read_run(run_dir: Path) -> tuple[Recipe, int]:
    """The run's resolved recipe and its number of classes (its training betons')."""
    if not (run_dir / RECIPE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {RECIPE}): pass "
                        "runs/<name> as written by fasttt/train.py")
    recipe = load_recipe(run_dir / RECIPE)
    beton_dir = Path(recipe.data.beton_dir)
    if not (beton_dir / MANIFEST).is_file():
        raise UserError(f"{run_dir} was trained on {beton_dir}, which has no {MANIFEST} here: "
                        "run from the directory it was trained in, or rebuild those betons")
    return recipe, len(read_manifest(beton_dir)["class_names"])


def open_target(beton_dir: Path, canvas_size: int) -> Target:
    """The target betons; photos need a canvas size (from --canvas-size or the recipe)."""
    manifest = read_manifest(beton_dir)
    if not is_photo(manifest):
        return Target(beton_dir, manifest, None)
    if not canvas_size:
        resolution = manifest["image_policy"].get("max_resolution", "its max resolution")
        raise UserError(f"{beton_dir} holds photos: pass --canvas-size PX (at least "
                        f"{resolution}), or set data.canvas_size in the run's recipe")
    return Target(beton_dir, manifest, canvas_size)


def pooled_labels(target: Target) -> np.ndarray:
    """The label of every target image, splits pooled in name order, read without decoding."""
    labels = []
    for split in sorted(target.manifest["splits"]):
        reader = Reader(str(target.beton_dir / target.manifest["splits"][split]["file"]))
        labels.append(reader.metadata[f"f{reader.field_names.index('label')}"])
    return np.concatenate(labels).astype(np.int64)


def split_indices(labels: np.ndarray, class_names: list[str], train_per_class: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) sample indices: `train_per_class` random picks per class for train.

    A pure function of its arguments, so every generation and every invocation with the
    same seed gets the same split.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    smallest = int(counts.argmin())
    if counts[smallest] <= train_per_class:
        most = int(counts[smallest]) - 1
        hint = (f"use --train-per-class {most} or less" if most >= 1 else
                "no N leaves it a test image: remove that class from the target")
        raise UserError(f"class {class_names[smallest]!r} has only {counts[smallest]} images, "
                        f"so --train-per-class {train_per_class} leaves none to test: {hint}")
    rng = np.random.default_rng(seed)
    train = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), train_per_class, replace=False)
        for c in range(len(class_names))]))
    return train, np.setdiff1d(np.arange(len(labels)), train)


def target_loaders(target: Target, data: DataConfig, batch_size: int,
                   device: torch.device) -> list[tuple[int, BetonLoader]]:
    """One in-order loader per split, in name order, each with the pooled row of its first image.

    Built once and reused for every generation: each new FFCV loader pays a numba compile.
    """
    splits = sorted(target.manifest["splits"])
    offsets = np.cumsum([0] + [target.manifest["splits"][split]["count"] for split in splits])
    return [(int(offset), sequential_loader(
                target.beton_dir, split=split, batch_size=batch_size,
                num_workers=data.num_workers, os_cache=data.os_cache,
                canvas_size=target.canvas_size, device=device))
            for offset, split in zip(offsets[:-1], splits, strict=True)]


def extract_features(model: torch.nn.Module, loaders: list[tuple[int, BetonLoader]],
                     num_samples: int, augment: AugmentConfig, device: torch.device, progress,
                     description: str) -> np.ndarray:
    """Penultimate features (N, D) float32 of every target image, rows as `pooled_labels`."""
    task = progress.add_task(description, total=sum(len(loader) for _, loader in loaders),
                             info="")
    features = torch.zeros(num_samples, model.num_features)
    model.eval()
    with torch.inference_mode():
        for offset, loader in loaders:
            for batch in loader:
                images = eval_images(batch, augment, device)
                features[offset + batch.index] = penultimate_features(model, images).cpu()
                progress.advance(task)
    progress.remove_task(task)
    return features.numpy()


def svm_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                 test: np.ndarray, svm_c: float) -> float:
    """Test accuracy (%) of a linear SVM trained on the L2-normalised train features."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, np.finfo(np.float32).tiny)
    svm = LinearSVC(C=svm_c, random_state=SVM_SEED)
    svm.fit(unit[train], labels[train])
    correct = int((svm.predict(unit[test]) == labels[test]).sum())
    return 100 * correct / len(test)


def transfer(run_dir: Path, target_dir: Path, options: TransferOptions,
             console: Console) -> dict:
    """Every finished generation's SVM accuracy on the target; the result as JSON-ready data."""
    recipe, num_classes = read_run(run_dir)
    generations = trained_generations(run_dir)
    target = open_target(target_dir, options.canvas_size or recipe.data.canvas_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaders = target_loaders(target, recipe.data, options.batch_size, device)  # checks them
    labels = pooled_labels(target)
    train, test = split_indices(labels, target.manifest["class_names"],
                                options.train_per_class, options.seed)
    name, rows = target_dir.resolve().name, []
    with progress_bar(True) as progress:
        for m in generations:
            model = last_epoch_model(generation_weights(run_dir, m), recipe.model,
                                     recipe.run, num_classes, device)
            features = extract_features(model, loaders, len(labels), recipe.augment, device,
                                        progress, f"gen{m} features")
            accuracy = svm_accuracy(features, labels, train, test, options.svm_c)
            rows.append({"generation": m, "accuracy": accuracy})
            console.print(f"gen{m}: {accuracy:.2f}% on {name}")
    return {"target": str(target_dir.resolve()), "train_per_class": options.train_per_class,
            "seed": options.seed, "svm_c": options.svm_c, "train_samples": len(train),
            "test_samples": len(test), "generations": rows}


def print_result(result: dict, console: Console) -> None:
    """One row per generation: train and test images, SVM accuracy."""
    table = Table(title=f"transfer to {Path(result['target']).name} "
                        f"({result['train_per_class']} per class, seed {result['seed']})")
    for column in ("gen", "train images", "test images", "accuracy %"):
        table.add_column(column, justify="right")
    for row in result["generations"]:
        table.add_row(str(row["generation"]), str(result["train_samples"]),
                      str(result["test_samples"]), f"{row['accuracy']:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Score every finished generation of a run on a target; write RUN_DIR/transfer/<name>.json."""
    run_dir, target_dir, options = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    result = transfer(run_dir, target_dir, options, console)
    out = run_dir / TRANSFER / f"{target_dir.resolve().name}.json"
    out.parent.mkdir(exist_ok=True)
    write_json(out, result)
    print_result(result, console)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    exit_on_user_error(main)
