"""The run report on fake run directories: tables, figures, summary.json, paper matching, CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPE, ROOT
from matplotlib.image import imread
from rich.console import Console

from fasttt.errors import UserError
from fasttt.paper import PAPER_SETTINGS, match_paper, our_series, paper_patriarch
from fasttt.recipe import load_recipe
from fasttt.report import load_run, main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = Console(quiet=True)


def write_json(path: Path, obj) -> None:
    """A run's JSON input file, as another module would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_beton_manifest(folder: Path, classes: int) -> Path:
    """Just enough of a beton manifest for the report: the source name and class names."""
    write_json(folder / "manifest.json", {"source": {"name": f"fake{classes}"},
                                          "class_names": [f"c{i}" for i in range(classes)]})
    return folder


def fake_run(run_dir: Path, beton_dir: Path, *, superclasses: bool = True, classes: int = 10,
             extra: tuple[str, ...] = ()) -> Path:
    """A finished two-generation run of digits_d06 (students = 1), every input present."""
    recipe = load_recipe(RECIPE, [f'data.beton_dir="{beton_dir}"', "generations.students=1",
                                  "schedule.epochs=3", *extra])
    run_dir.mkdir(parents=True)
    recipe.write(run_dir / "recipe.toml")
    rng = np.random.default_rng(0)
    last = [(96.25, 99.75), (98.5, 100.0)]
    for m, (top1, top5) in enumerate(last):
        gen = run_dir / f"gen{m}"
        rows = [{"epoch": e + 1, "lr": 0.1 / (e + 1), "train_loss": 1.0 / (e + 1),
                 "train_top1": 80.0 + 5 * e, "images_per_s": 1234.5 + m, "seconds": 3.2 + e,
                 "val_top1": top1 - 2 + e, "val_top5": top5} for e in range(3)]
        rows[-1]["val_top1"] = top1
        gen.mkdir()
        (gen / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_json(gen / "eval.json", {"best": {"epoch": 2, "val_top1": top1 + 0.5,
                                                "val_top5": top5},
                                       "last": {"epoch": 3, "val_top1": top1, "val_top5": top5}})
        dist = (lambda v: v) if superclasses else (lambda v: None)
        write_json(gen / "analysis.json", {
            "generation": m, "dist_unit": "degrees", "superclasses": 5 if superclasses else None,
            "train": {"samples": 1437, "top1": 99.0 + m / 2,
                      "confidence": [0.66 + 0.1 * m, 0.2, 0.08, 0.03],
                      "dist_c": dist(20.0 - m), "dist_s": dist(30.0 + m)},
            "val": {"samples": 360, "top1": top1, "top5": top5,
                    "dist_c": dist(18.0 - m), "dist_s": dist(28.0 + m)}})
        matrix = rng.random((classes, classes))
        np.save(gen / "second_class.npy", matrix / matrix.sum(axis=1, keepdims=True))
    write_json(run_dir / "ensemble.json", {"generations": [
        {"members": [0], "val_top1": 96.25, "val_top5": 99.75},
        {"members": [0, 1], "val_top1": 98.75, "val_top5": 100.0}]})
    write_json(run_dir / "transfer" / "caltech256.json", {
        "target": str(beton_dir.parent / "caltech256"), "train_per_class": 60, "seed": 0,
        "train_samples": 600, "test_samples": 300,
        "generations": [{"generation": 0, "accuracy": 81.2}, {"generation": 1, "accuracy": 83.4}]})
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A fake digits run whose beton manifest is still in place, reported once."""
    root = tmp_path_factory.mktemp("report")
    run = fake_run(root / "runs" / "digits_d06", write_beton_manifest(root / "betons", 10))
    assert write_report(run, QUIET) == run / "summary.md"
    return run


def section(markdown: str, heading: str) -> str:
    """The text of one `## heading` section of summary.md."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def test_summary_md_holds_every_table_with_errors_converted(run):
    md = (run / "summary.md").read_text()
    assert md.startswith("# digits_d06: D(0.6, 0.6), TSD patriarch, K = 5, 1 student, "
                         "cifar_resnet20 on fake10\n")
    errors = section(md, "Error per generation")
    # gen1: best 99.0 -> 1.00, last 98.5 -> 1.50, top-5 100 -> 0.00; ensemble 98.75 -> 1.25
    assert "| 1 | 2 | 1.00 | 1.50 | 0.00 | 1.25 | 0.00 |" in errors
    assert "| 0 (patriarch) | 2 | 3.25 | 3.75 | 0.25 | — | — |" in errors
    assert "| 0 (patriarch) | 66.00 | 20.00 | 8.00 | 3.00 | 99.00 | 96.25 |" in section(
        md, "Secondary information")
    assert "| 1 | 19.0000 | 31.0000 | 17.0000 | 29.0000 |" in section(md, "Feature distances")
    transfer = section(md, "Transfer")
    assert "| gen | caltech256 (60/class) |" in transfer and "| 1 | 83.40 |" in transfer
    assert "No setting of the paper matches this run" in section(md, "The paper's numbers")
    assert "Best student by that measure: gen 1, 1.50 % (-2.25 points against the patriarch)" in md
    # schedule.epochs = 3 caps the recipe's 12 views: a fresh view every epoch.
    assert ("\nTeacher views: the teacher labels the student's own view, a fresh one every "
            "epoch (precomputed teacher).\n") in md
    assert "## Notes" not in md


def test_every_figure_is_a_readable_png_linked_from_summary_md(run):
    md = (run / "summary.md").read_text()
    names = ["error_per_generation", "confidence", "dist", "second_class_gen0",
             "second_class_gen1", "val_top1_per_epoch"]
    assert sorted(p.stem for p in (run / "figures").iterdir()) == sorted(names)
    for name in names:
        path = run / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, channels = imread(path).shape
        assert height > 300 and width > 400 and channels in (3, 4)
        assert f"](figures/{name}.png)" in md


def test_summary_json_holds_the_same_numbers_and_is_byte_identical_on_a_rerun(run):
    first = (run / "summary.json").read_bytes()
    figures = {p.name: p.read_bytes() for p in (run / "figures").iterdir()}
    write_report(run, QUIET)
    assert (run / "summary.json").read_bytes() == first
    assert {p.name: p.read_bytes() for p in (run / "figures").iterdir()} == figures
    summary = json.loads(first)
    gen1 = summary["generations"][1]
    assert (gen1["best_top1_error"], gen1["last_top1_error"], gen1["last_top5_error"]) == (
        1.0, 1.5, 0.0)
    assert summary["ensemble"][1]["top1_error"] == 1.25
    assert summary["analysis"][0]["train"]["confidence"] == [66.0, 20.0, 8.0, 3.0]
    assert summary["analysis"][1]["val"]["dist_s"] == 29.0
    assert summary["transfer"][0]["generations"][1]["accuracy"] == 83.4
    assert summary["paper"]["matched"] == []
    assert summary["method"]["teacher_views"] == (
        "the teacher labels the student's own view, a fresh one every epoch (precomputed "
        "teacher)")
    assert "images_per_s" not in first.decode() and "seconds" not in first.decode()
    assert summary["curves"][0]["epochs"][2]["val_top1"] == 96.25


def test_our_series_lines_up_with_the_papers_names(run):
    summary = load_run(run)[0]
    ours = our_series(summary)
    assert ours["caltech256_accuracy"] == [81.2, 83.4]  # transfer/caltech256.json
    assert ours["indoor67_accuracy"] == [None, None]
    assert ours["ensemble_top1_error"] == [None, 1.25]  # an ensemble of one is no ensemble
    assert ours["top1_confidence"] == [66.0, 76.0]
    assert ours["train_dist_c"] == [round(20.0 * math.pi / 180, 4), round(19.0 * math.pi / 180, 4)]


def test_missing_superclass_map_and_missing_files_become_notes(tmp_path):
    run = fake_run(tmp_path / "run", tmp_path / "no-betons", superclasses=False,
                   extra=("generations.students=2",))
    (run / "ensemble.json").unlink()
    (run / "gen1" / "analysis.json").unlink()
    (run / "figures").mkdir()
    for name in ("dist.png", "second_class_gen5.png", "mine.png"):  # left from earlier reports
        (run / "figures" / name).write_bytes(PNG_MAGIC)
    md = write_report(run, QUIET).read_text()
    assert "2 of 3 generations finished" in md
    assert sorted(p.name for p in (run / "figures").iterdir()) == [
        "confidence.png", "error_per_generation.png", "mine.png", "second_class_gen0.png",
        "second_class_gen1.png", "val_top1_per_epoch.png"]
    dist = section(md, "Feature distances")
    assert "No superclass map" in dist and "|" not in dist
    assert "ensemble" not in section(md, "Error per generation").split("\n\n")[-1]
    assert "- No ensemble.json" in md and "- No analysis.json in gen1: their" in md
    assert "cifar_resnet20 on no-betons" in md.splitlines()[0]  # name of the beton folder
    assert json.loads((run / "summary.json").read_text())["method"]["classes"] == 10


def test_paper_setting_matches_densenet100_on_100_classes(tmp_path):
    betons = write_beton_manifest(tmp_path / "cifar100", 100)
    run = fake_run(tmp_path / "run", betons, extra=('model.name="cifar_densenet_bc100"',))
    md = write_report(run, QUIET).read_text()
    paper = section(md, "The paper's numbers")
    assert "### CIFAR-100, DenseNet-BC-100, D(0.6, 0.6) (Table 4)" in paper
    assert "| best-epoch top-1 error, paper | 23.96 | 21.29 | 20.51 |" in paper
    assert "| best-epoch top-1 error, ours | 3.25 | 1.00 | — |" in paper
    assert "- paper, baseline best-epoch top-1 error: 22.20" in paper
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["paper"]["matched"]] == [
        "CIFAR-100, DenseNet-BC-100, D(0.6, 0.6)"]
    assert summary["method"]["classes"] == 100


@pytest.mark.parametrize("overrides, expected", [
    (["model.name=cifar_resnet110", "generations.patriarch_loss=ce", "generations.lam=0.5"],
     ["CIFAR-100, ResNet-110, born-again (CE patriarch)"]),
    (["model.name=cifar_resnet110", "generations.u=1.0", "generations.lam=0.6"],  # u = 1 is CE
     ["CIFAR-100, ResNet-110, born-again (CE patriarch)"]),
    (["model.name=cifar_resnet110"], ["CIFAR-100, ResNet-110, TSD-0.6 patriarch"]),
    # An LSR or CP patriarch with an explicit eta is softened whatever u says.
    (["model.name=cifar_resnet110", "generations.patriarch_loss=lsr", "generations.u=1.0",
      "generations.eta=0.9"], ["CIFAR-100, ResNet-110, LSR patriarch"]),
    (["model.name=cifar_resnet110", "generations.patriarch_loss=cp", "generations.u=1.0",
      "generations.eta=0.9"], ["CIFAR-100, ResNet-110, CP patriarch"]),
    (["model.name=cifar_resnet110", "generations.patriarch_loss=lsr", "generations.u=1.0"],
     ["CIFAR-100, ResNet-110, born-again (CE patriarch)"]),
    (["model.name=cifar_resnet110", "generations.lam=0.5"], []),
    (["model.name=cifar_densenet_bc190", "generations.u=0.7"],
     ["CIFAR-100, DenseNet-BC-190, D(0.7, 0.6)"]),
    (["model.name=cifar_densenet_bc190", "generations.patriarch_loss=ce", "generations.u=1.0",
      "generations.lam=0.0", "generations.students=0"],
     ["CIFAR-100, DenseNet-BC-190, baseline D(1.0, 0.0)"]),
    ([], []),
])
def test_match_paper_by_model_loss_u_and_lambda(overrides, expected):
    recipe = load_recipe(RECIPE, overrides)
    assert [s.name for s in match_paper(recipe.generations, recipe.model.name, 100)] == expected
    imagenet = load_recipe(RECIPE, ["model.name=resnet18"])
    g, model = imagenet.generations, imagenet.model.name
    assert [s.name for s in match_paper(g, model, 1000)] == ["ILSVRC2012, ResNet-18, D(0.6, 0.6)"]
    assert match_paper(g, model, 100) == []


def test_paper_settings_keep_the_papers_exact_numbers():
    by_name = {s.name: s for s in PAPER_SETTINGS}
    ban = by_name["CIFAR-100, ResNet-110, born-again (CE patriarch)"]
    assert ban.per_generation["val_top1"] == (71.55, 71.41, 72.30, 72.26, 72.52)
    tsd = by_name["CIFAR-100, ResNet-110, TSD-0.6 patriarch"]
    assert tsd.per_generation["top1_confidence"][-1] == 91.72
    assert by_name["ILSVRC2012, ResNet-18, D(0.6, 0.6)"].per_generation["top1_error"][5] == 29.6
    assert all(len(v) <= 6 for s in PAPER_SETTINGS for v in s.per_generation.values())


def test_a_run_without_finished_generations_exits_2_with_one_line(tmp_path):
    run = fake_run(tmp_path / "run", tmp_path / "betons")
    for gen in ("gen0", "gen1"):
        (run / gen / "eval.json").unlink()
    done = subprocess.run([sys.executable, "-m", "fasttt.report", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no finished generation" in done.stderr
    assert not (run / "summary.json").exists()


def test_a_directory_without_recipe_and_bad_arguments_are_refused(tmp_path):
    with pytest.raises(UserError, match="no recipe.toml"):
        main([str(tmp_path)])
    with pytest.raises(UserError, match=r"unrecognized arguments: --fast \(usage: python -m "
                                        r"fasttt.report RUN_DIR\)"):
        main([str(tmp_path), "--fast"])


@pytest.mark.parametrize("extra, views", [
    (("cache.views=2", 'cache.mode="online"'),
     "the teacher labels the student's views, 2 per sample for 3 epochs (epoch e shows view "
     "e mod 2) (online teacher)"),
    (('cache.teacher_view="unaugmented"',),
     "the teacher labels the un-augmented image; the student sees its own views (precomputed "
     "teacher)"),
    (("generations.students=0",), None),
])
def test_the_method_names_what_the_teachers_label(tmp_path, extra, views):
    run = fake_run(tmp_path / "run", write_beton_manifest(tmp_path / "betons", 10), extra=extra)
    md = write_report(run, QUIET).read_text()
    assert json.loads((run / "summary.json").read_text())["method"]["teacher_views"] == views
    assert (f"\nTeacher views: {views}.\n" in md) if views else "Teacher views" not in md


def test_the_paper_names_the_loss_the_patriarch_trains_with():
    def patriarch(*overrides):
        return paper_patriarch(load_recipe(RECIPE, list(overrides)).generations)

    assert patriarch() == "tsd"
    assert patriarch("generations.u=1.0") == "ce"
    assert patriarch("generations.patriarch_loss=lsr", "generations.u=1.0") == "ce"
    assert patriarch("generations.patriarch_loss=lsr", "generations.u=1.0",
                     "generations.eta=0.9") == "lsr"
    assert patriarch("generations.patriarch_loss=cp", "generations.eta=0.9") == "cp"


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "gen0" / "eval.json").write_text('{"best": {}'), "eval.json: unexpected"),
    (lambda run: np.save(run / "gen1" / "second_class.npy", np.ones((3, 4))),
     "expected a square class x class matrix"),
])
def test_a_damaged_input_is_one_line_naming_the_file(tmp_path, damage, message):
    run = fake_run(tmp_path / "run", tmp_path / "betons")
    damage(run)
    with pytest.raises(UserError, match=message) as err:
        write_report(run, QUIET)
    assert "\n" not in str(err.value) and "rerun" in str(err.value)


def test_a_damaged_learning_curve_is_refused_and_deleting_it_as_advised_works(tmp_path):
    run = fake_run(tmp_path / "run", tmp_path / "betons")
    metrics = run / "gen1" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])  # cut short, as a full disk would leave it
    with pytest.raises(UserError, match="metrics.jsonl: unexpected.*delete it: the report "
                                        "then leaves that generation's learning curves out"):
        write_report(run, QUIET)
    metrics.unlink()
    write_report(run, QUIET)
    assert "- No metrics.jsonl in gen1: their learning curves are left out." in (
        run / "summary.md").read_text()


def test_a_train_limit_is_a_note_and_no_transfer_is_said_once(tmp_path):
    betons = write_beton_manifest(tmp_path / "betons", 10)
    manifest = json.loads((betons / "manifest.json").read_text())
    write_json(betons / "manifest.json", {**manifest, "splits": {"train": {"count": 1437}}})
    run = fake_run(tmp_path / "run", betons, extra=("data.train_limit=256",))
    shutil.rmtree(run / "transfer")
    md = write_report(run, QUIET).read_text()
    assert ("- data.train_limit = 256: trained on the first 256 of 1437 training samples."
            in section(md, "Notes"))
    assert md.count("No transfer results") == 1 and "No transfer" not in section(md, "Notes")
    unlimited = fake_run(tmp_path / "all", betons, extra=("data.train_limit=5000",))
    assert "train_limit" not in write_report(unlimited, QUIET).read_text()
