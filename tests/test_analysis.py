"""The paper's measurements: each statistic on hand-computed cases, then a run end to end."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import mark_finished, one_line_refusal, tiny_recipe
from rich.console import Console

from fasttt.analysis import (
    analyze_run,
    class_distances,
    class_feature_sums,
    confidence_sums,
    ensemble_accuracies,
    ensemble_hits,
    row_frequencies,
    second_class_counts,
    superclass_map,
)
from fasttt.betons import read_manifest
from fasttt.checkpoint import save_weights
from fasttt.data import sequential_loader, split_loader
from fasttt.errors import UserError
from fasttt.models import create_model
from fasttt.rundir import RECIPE, WEIGHTS, generation_dir

COARSE = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def recipe_for(digits: Path, **overrides):
    """The demo recipe on the test betons: 128 training samples, one loader thread."""
    return tiny_recipe(digits, **{"data.train_limit": 128, **overrides})


def test_confidences_are_the_mean_sorted_probabilities_and_stop_at_the_class_count():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0],
                                  [0.1, 0.2, 0.3, 0.0, 0.4]]) + 1e-12
    sums = confidence_sums(probabilities.log())
    assert sums.dtype == torch.float64
    assert torch.allclose(sums, torch.tensor([0.9, 0.6, 0.35, 0.15], dtype=torch.float64))
    three = confidence_sums(torch.tensor([[0.0, 0.0, math.log(2.0)]]))
    assert torch.allclose(three, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))


def test_orthogonal_class_means_give_the_exact_angles():
    # Superclass 0 holds classes 0 (e1) and 1 (e2): its mean lies at 45 degrees to each.
    # Class 2 (e3) is superclass 1 alone. v^A = (1/4, 1/4, 1/2), which sits at
    # arccos(1/sqrt 3) and arccos(sqrt(2/3)) = pi/2 - arccos(1/sqrt 3) from the two.
    features = torch.eye(3).repeat(2, 1) * torch.tensor([[2.0], [2.0], [2.0], [1.0], [1.0], [1.0]])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    first, second = (class_feature_sums(features[half], labels[half], 3)
                     for half in (slice(0, 3), slice(3, 6)))
    sums, counts = first[0] + second[0], first[1] + second[1]
    assert counts.tolist() == [2, 2, 2]
    dist_c, dist_s = class_distances(sums, counts, [0, 0, 1])
    assert dist_c == pytest.approx((math.pi / 4 + math.pi / 4 + 0) / 3, abs=1e-12)
    assert dist_s == pytest.approx(math.pi / 4, abs=1e-12)


def test_a_superclass_mean_weighs_samples_not_classes():
    # Class 0 has two samples on e1, classes 1 and 2 one each on e2 and e3: the superclass
    # mean is (1/2, 1/4, 1/4), not the mean of class means (1/3, 1/3, 1/3).
    sums, counts = class_feature_sums(torch.eye(3)[[0, 0, 1, 2]], torch.tensor([0, 0, 1, 2]), 4)
    dist_c, dist_s = class_distances(sums, counts, [7, 7, 7, 3])  # class 3: no samples
    expected = (math.acos(math.sqrt(2 / 3)) + 2 * math.acos(1 / math.sqrt(6))) / 3
    assert dist_c == pytest.approx(expected, abs=1e-12)
    assert dist_s == pytest.approx(0.0, abs=1e-6)  # a single superclass is its own average


def test_second_class_confusion_counts_and_row_frequencies():
    scores = torch.tensor([[5.0, 4.0, 1.0, 0.0],   # class 0, second: 1
                           [5.0, 1.0, 4.0, 0.0],   # class 0, second: 2
                           [5.0, 1.0, 4.0, 0.0],   # class 0, second: 2
                           [9.0, 8.0, 0.0, 7.0],   # class 2, wrong top-1 (0), second: 1
                           [0.0, 1.0, 2.0, 3.0]])  # class 1, second: 2
    labels = torch.tensor([0, 0, 0, 2, 1])
    counts = second_class_counts(scores, labels)
    expected = np.zeros((4, 4))
    expected[0, 1], expected[0, 2], expected[2, 1], expected[1, 2] = 1, 2, 1, 1
    assert np.array_equal(counts.numpy(), expected)
    frequencies = row_frequencies(counts)
    assert frequencies.dtype == np.float64
    expected[0] /= 3
    assert np.allclose(frequencies, expected)
    assert not frequencies[3].any()  # class 3 has no samples: its row stays 0


def test_ensemble_hits_average_the_probabilities_of_generations_0_to_m():
    first = torch.tensor([[0.50, 0.40, 0.04, 0.03, 0.02, 0.01],
                          [0.05, 0.15, 0.14, 0.13, 0.12, 0.41]])
    second = torch.tensor([[0.05, 0.60, 0.05, 0.10, 0.10, 0.10],
                           [0.80, 0.04, 0.04, 0.04, 0.04, 0.04]])
    labels = torch.tensor([1, 0])
    hits = ensemble_hits([first, second], labels)
    # Alone, the first model misses both at top-1 and has only sample 0's label in its
    # top-5; the mean ranks class 1 first for sample 0 (0.50) and class 0 for sample 1.
    assert hits.tolist() == [[0.0, 1.0], [2.0, 2.0]]


class Constant(torch.nn.Module):
    """A model whose softmax is the same `probabilities` for every image."""

    def __init__(self, probabilities: list[float]):
        super().__init__()
        self.register_buffer("logits", (torch.tensor(probabilities) + 1e-9).log())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The fixed logits, one row per image."""
        return self.logits.expand(images.shape[0], -1)


def test_ensemble_accuracies_of_fixed_models_over_the_digits(digits):
    loader = sequential_loader(digits, split="val", batch_size=512, num_workers=1)
    labels = torch.cat([batch.label for batch in loader])
    share = torch.bincount(labels, minlength=10).double() * 100 / len(labels)
    # A alone ranks 0 > 1 > 2 > 3 > 4; the mean with B ranks 5 (0.25) > 6 (0.15) > 0 (0.11)
    # > 1 (0.105) > 2 (0.10) > 3 > 4 > 7 > 8.
    a = [0.22, 0.21, 0.20, 0.19, 0.18, 0, 0, 0, 0, 0]
    b = [0, 0, 0, 0, 0, 0.50, 0.30, 0.12, 0.08, 0]
    recipe, accelerator = recipe_for(digits), Accelerator(cpu=True)
    val = split_loader(recipe.data, accelerator, "val", 512)
    rows = ensemble_accuracies([Constant(a), Constant(b)], val, recipe.augment, accelerator)
    assert [row["members"] for row in rows] == [[0], [0, 1]]
    assert rows[0]["val_top1"] == pytest.approx(share[0].item())
    assert rows[0]["val_top5"] == pytest.approx(share[:5].sum().item())
    assert rows[1]["val_top1"] == pytest.approx(share[5].item())
    assert rows[1]["val_top5"] == pytest.approx(share[[5, 6, 0, 1, 2]].sum().item())


def test_superclass_map_prefers_the_recipe_then_the_manifest(digits):
    manifest = read_manifest(digits)
    data = recipe_for(digits).data
    assert superclass_map(data, manifest, 10) is None
    assert superclass_map(data, manifest | {"fine_to_coarse": COARSE}, 10) == COARSE
    mine = recipe_for(digits, **{"data.superclasses": [9 - c for c in COARSE]}).data
    assert superclass_map(mine, manifest | {"fine_to_coarse": COARSE}, 10) == [
        9 - c for c in COARSE]
    with pytest.raises(UserError, match="data.superclasses has 3 entries"):
        superclass_map(recipe_for(digits, **{"data.superclasses": [0, 1, 1]}).data, manifest, 10)
    with pytest.raises(UserError, match="fine_to_coarse has 1 entries for 10 classes"):
        superclass_map(data, manifest | {"fine_to_coarse": [0]}, 10)


def fake_generation(run: Path, m: int, finished: bool = True) -> None:
    """gen<m>/ holding randomly initialised weights of the tiny run's ResNet-8, and eval.json
    if finished."""
    torch.manual_seed(m)
    generation_dir(run, m).mkdir(parents=True)
    save_weights(create_model("cifar_resnet8", 10), generation_dir(run, m) / WEIGHTS)
    if finished:
        mark_finished(generation_dir(run, m))


def analyse(run: Path) -> str:
    """Run analyze_run on one CPU process; return what it printed."""
    out = io.StringIO()
    analyze_run(run, Accelerator(cpu=True), Console(file=out, width=200))
    return out.getvalue()


def stamps(run: Path) -> dict:
    """The modification time of every file in the run, by name."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_analyze_run_analyses_each_finished_generation_once(digits, tmp_path):
    run = tmp_path / "run"
    fake_generation(run, 0)
    fake_generation(run, 1, finished=False)  # still training: not analysed yet
    recipe_for(digits, **{"data.superclasses": COARSE}).write(run / RECIPE)
    printed = analyse(run)
    assert "skipped" not in printed
    assert not (run / "gen1" / "analysis.json").exists()
    assert len(json.loads((run / "ensemble.json").read_text())["generations"]) == 1

    before = stamps(run)
    mark_finished(run / "gen1")
    analyse(run)
    after = stamps(run)
    assert {name for name in after if after[name] != before.get(name)} == {
        "gen1/eval.json", "gen1/analysis.json", "gen1/second_class.npy", "ensemble.json"}

    analyses = [json.loads((run / f"gen{m}" / "analysis.json").read_text()) for m in (0, 1)]
    for m, analysis in enumerate(analyses):
        assert list(analysis) == ["generation", "train", "val", "dist_unit", "superclasses"]
        assert (analysis["generation"], analysis["dist_unit"], analysis["superclasses"]) == (
            m, "radians", 5)
        train, val = analysis["train"], analysis["val"]
        assert list(train) == ["samples", "top1", "confidence", "dist_c", "dist_s"]
        assert list(val) == ["samples", "top1", "top5", "dist_c", "dist_s"]
        assert (train["samples"], val["samples"]) == (128, 360)
        confidence = train["confidence"]
        assert len(confidence) == 4 and confidence == sorted(confidence, reverse=True)
        assert 0.1 <= confidence[0] <= 1 and sum(confidence) <= 1 + 1e-9
        assert 0 <= val["top1"] <= val["top5"] <= 100
        assert all(0 <= split[key] <= math.pi for split in (train, val)
                   for key in ("dist_c", "dist_s"))
        matrix = np.load(run / f"gen{m}" / "second_class.npy")
        assert matrix.dtype == np.float64 and matrix.shape == (10, 10)
        assert np.allclose(matrix.sum(axis=1), 1.0)  # the first 128 samples hold every digit
    assert analyses[0]["val"] != analyses[1]["val"]  # two different networks

    ensembles = json.loads((run / "ensemble.json").read_text())["generations"]
    assert [row["members"] for row in ensembles] == [[0], [0, 1]]
    # One member's ensemble is that generation: the same argmax, the same top-5.
    assert ensembles[0]["val_top1"] == pytest.approx(analyses[0]["val"]["top1"])
    assert ensembles[0]["val_top5"] == pytest.approx(analyses[0]["val"]["top5"])

    assert analyse(run) == ""  # all done: nothing recomputed, nothing printed
    assert stamps(run) == after


def test_without_a_superclass_map_distances_are_null_after_one_notice(digits, tmp_path):
    run = tmp_path / "run"
    fake_generation(run, 0)
    recipe_for(digits).write(run / RECIPE)
    printed = analyse(run)
    notices = [line for line in printed.splitlines() if "DistC/DistS skipped" in line]
    assert len(notices) == 1
    analysis = json.loads((run / "gen0" / "analysis.json").read_text())
    assert analysis["superclasses"] is None
    assert [analysis[split][key] for split in ("train", "val") for key in ("dist_c", "dist_s")
            ] == [None] * 4
    assert (run / "gen0" / "second_class.npy").is_file()


def test_a_run_without_its_recipe_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    fake_generation(run, 0)
    one_line_refusal(lambda: analyse(run), str(run / RECIPE), "no such recipe file")
    (run / RECIPE).write_bytes(b"\xff")
    one_line_refusal(lambda: analyse(run), "not UTF-8")
    assert not (run / "gen0" / "analysis.json").exists()
