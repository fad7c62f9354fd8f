"""benchmarks/epochs_per_hour.py in CI-sized settings: every row measured, the table, the JSON."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RECIPE, ROOT, set_flags
from ffcv.loader.epoch_iterator import EpochIterator
from PIL import Image
from rich.console import Console
from torch.autograd import DeviceType

from fasttt.betons import image_storage, read_manifest, split_path
from fasttt.data import train_loader
from fasttt.errors import UserError
from fasttt.models import build_model
from fasttt.recipe import ModelConfig, RunConfig

STEP_ROWS = ("loader", "patriarch_step", "student_step_cache", "student_step_online")


def _load_benchmark():
    # As `python benchmarks/epochs_per_hour.py` does, so that it finds benchmarks/synthetic.py.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "epochs_per_hour", ROOT / "benchmarks" / "epochs_per_hour.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses and the worker pool look it up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
synthetic = importlib.import_module("synthetic")
step_profile = importlib.import_module("step_profile")


def tiny(**overrides) -> list[str]:
    """--set flags for seconds-long rows: small batches, one loader thread."""
    return set_flags(**{"data.num_workers": 1, "optim.batch_size": 16, "cache.batch_size": 32,
                        **overrides})


def run(argv: list[str], out: Path, capsys, monkeypatch) -> tuple[dict, str]:
    """Run the benchmark in-process; its JSON and what it printed."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per table row
    bench.main([*argv, "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert not list(out.parent.glob(".*.work"))  # the teacher and its caches are gone
    return json.loads(out.read_text()), capsys.readouterr().out


def check_rows(result: dict, printed: str, profiled: bool = False) -> None:
    """Every row holds positive finite numbers that agree with each other; all are printed."""
    rows, settings = result["rows"], result["settings"]
    compiled = result["compile"]["mode"] is not None
    assert list(rows) == [n for n in bench.LABELS if compiled or not n.endswith("_compiled")]
    # A step row of these two-step windows may wait on the loader long enough to be named
    # again below the table: its first batch is decoded inside the window.
    table = "\n".join(line for line in printed.splitlines()
                      if "waited on the loader" not in line)
    for name, row in rows.items():
        numbers = [v for value in row.values() for v in np.ravel(value)]
        assert numbers and all(math.isfinite(v) and v > 0 for v in numbers), (name, row)
        per_epoch = settings["train_samples" if name == "cache_build" else
                            "train_images_per_epoch"]
        assert row["epochs_per_hour"] == pytest.approx(3600 * row["images_per_s"] / per_epoch)
        assert row["vs_loader"] == pytest.approx(row["images_per_s"]
                                                 / rows["loader"]["images_per_s"])
        assert len(re.findall(rf"│ {re.escape(bench.LABELS[name])} +│", table)) == 1, name
    for name in STEP_ROWS:
        assert 0 < rows[name]["loader_wait_fraction"] <= 1
        assert len(rows[name]["images_per_s_rounds"]) == settings["repeats"]
    build = rows["cache_build"]
    assert build["seconds_per_view"] == pytest.approx(settings["train_samples"]
                                                      / build["images_per_s"])
    # The cached student with its build shared over the epochs is slower than without it.
    assert rows["student_cache_with_build"]["images_per_s"] < \
        rows["student_step_cache"]["images_per_s"]
    assert "epochs per hour" in printed
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert ("profile" in result) == profiled  # only with --profile


def test_digits_recipe_measures_every_row(digits, tmp_path, capsys, monkeypatch):
    windows, compile_for_real = [], torch.compile

    class Recorded(bench.TimedLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            windows.append(self)

    def captured(function, **kwargs):  # as tests/test_compile.py: no C++ code generation
        return compile_for_real(function, backend="aot_eager")

    monkeypatch.setattr(bench, "TimedLoader", Recorded)
    monkeypatch.setattr(torch, "compile", captured)
    result, printed = run([str(RECIPE), *tiny(**{"data.beton_dir": f'"{digits}"',
                                                 "model.name": '"cifar_resnet8"'}),
                           "--repeats", "2", "--compiled", "default", "--profile",
                           str(tmp_path / "profiles"), "--profile-steps", "1"],
                          tmp_path / "out.json",
                          capsys, monkeypatch)
    check_rows(result, printed, profiled=True)
    # the profiled steps, eager and compiled (on a GPU the model's kernels before and after)
    profiled = result["profile"]
    assert list(profiled) == ["patriarch_step", "student_step_cache", "patriarch_step_compiled",
                              "student_step_cache_compiled"]
    assert all(p["steps"] == 1 and p["kernel_ms_per_1024_images"] == 0  # no GPU kernels
               and p["phases"]["fasttt.forward_loss"]["host_ms_per_step"] > 0
               for p in profiled.values())
    # compiled beside the eager steps, once: the second round's models reuse the graphs
    assert result["compile"]["mode"] == "default" and result["compile"]["graphs"] >= 1
    assert result["compile"]["seconds"] > 0
    assert "x eager; default: " in printed
    settings = result["settings"]
    assert settings["train_samples"] == read_manifest(digits)["splits"]["train"]["count"]
    assert settings["train_images_per_epoch"] == settings["train_samples"] // 16 * 16
    # warm-up, the dropped read-ahead, then the steps: (1 + 4 + 2) batches
    assert settings["measured_samples"] == (1 + bench.READ_AHEAD + 2) * 16
    # The loader alone times the steps' window, and no row's reaches a second epoch.
    windows = [timed for timed in windows if timed.profiler is None]  # the profiles' apart
    assert len(windows) == 2 * 6
    assert {(timed.warmup, timed.steps) for timed in windows} == {(1, 2)}
    assert all(len(timed.loader) == 1 + bench.READ_AHEAD + 2 for timed in windows)
    assert (settings["recipe_views"], settings["built_views"]) == (12, 2)
    assert result["recipe"]["resolved"]["model"]["name"] == "cifar_resnet8"


def test_a_window_times_no_batch_decoded_before_it(digits, monkeypatch):
    # Steps slower than the decode let FFCV decode ahead: timed, those batches would cost
    # the window nothing, and the steps would read faster than the loader alone.
    decoded, run_pipeline = {}, EpochIterator.run_pipeline

    def recorded(self, b_ix, batch_indices, *rest):
        result = run_pipeline(self, b_ix, batch_indices, *rest)
        decoded[tuple(sorted(int(i) for i in batch_indices))] = time.perf_counter()
        return result

    monkeypatch.setattr(EpochIterator, "run_pipeline", recorded)
    warmup, steps = 2, 3
    loader = train_loader(digits, batch_size=16, seed=0, num_workers=1,
                          limit=(warmup + bench.READ_AHEAD + steps) * 16)
    timed = bench.TimedLoader(loader, warmup, steps, 16, torch.device("cpu"))
    timed_batches = []
    for i, batch in enumerate(timed):
        if i == warmup - 1:  # the last warm-up step outlasts the decode: FFCV fills up
            deadline = time.perf_counter() + 30
            while len(decoded) < warmup + bench.READ_AHEAD and time.perf_counter() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            assert len(decoded) == warmup + bench.READ_AHEAD  # no more: READ_AHEAD is all
            warmed = time.perf_counter()
        elif i >= warmup:
            timed_batches.append(tuple(sorted(batch.index.tolist())))
    assert len(timed_batches) == steps
    assert all(decoded[batch] > warmed for batch in timed_batches)


def test_synthetic_cifar_size_betons_are_built_then_reused(tmp_path, capsys, monkeypatch):
    data_dir = tmp_path / "synthetic"
    result, printed = run([str(RECIPE), *tiny(), "--synthetic", "64", "--repeats", "1",
                           "--data-dir", str(data_dir)], tmp_path / "out.json", capsys,
                          monkeypatch)
    check_rows(result, printed)
    manifest = read_manifest(data_dir / "betons")
    assert manifest["image_policy"] == {"kind": "fixed", "height": 32, "width": 32,
                                        "write_mode": "raw"}
    assert manifest["splits"]["train"]["count"] == 64 and len(manifest["class_names"]) == 100
    assert result["settings"]["train_samples"] == 64
    assert result["settings"]["beton_dir"] == str(data_dir / "betons")

    spec = bench.synthetic_spec(bench.load_recipe(RECIPE), 64)
    built = (data_dir / "betons" / "train.beton").stat().st_mtime_ns
    console = Console(file=io.StringIO())
    bench.synthetic_betons(spec, data_dir, console)
    assert (data_dir / "betons" / "train.beton").stat().st_mtime_ns == built
    assert "reusing" in console.file.getvalue()
    bench.synthetic_betons(spec | {"images": 80}, data_dir, console)  # another N: rebuilt
    assert read_manifest(data_dir / "betons")["splits"]["train"]["count"] == 80


def test_synthetic_photo_recipe_goes_through_the_imagefolder_builder(
        tmp_path, capsys, monkeypatch):
    photo = tiny(**{"optim.batch_size": 8, "augment.kind": '"resized_crop"',
                    "data.canvas_size": 64, "augment.flip": "true",
                    "augment.eval_crop_ratio": 0.875})
    data_dir = tmp_path / "photos"
    result, printed = run([str(RECIPE), *photo, "--synthetic", "40", "--repeats", "1",
                           "--data-dir", str(data_dir)], tmp_path / "out.json", capsys,
                          monkeypatch)
    check_rows(result, printed)
    manifest = read_manifest(data_dir / "betons")
    assert manifest["image_policy"]["kind"] == "photo"
    assert manifest["image_policy"]["max_resolution"] == 64
    assert manifest["splits"]["train"]["count"] == 40 and len(manifest["class_names"]) == 10
    assert not (data_dir / "jpegs").exists()  # the JPEG tree is gone once the beton holds it
    assert json.loads((data_dir / "synthetic.json").read_text())["complete"] is True


def test_ffcvs_photo_policy_stores_most_photos_raw_at_its_side(tmp_path):
    # FFCV's ImageNet betons (side 400, 10 % JPEG), for a loader figure like FFCV's own.
    recipe = bench.load_recipe(RECIPE, [f"{k}={v}" for k, v in {
        "augment.kind": '"resized_crop"', "data.canvas_size": 64}.items()])
    spec = bench.synthetic_spec(recipe, 40, "ffcv")
    assert (spec["write_mode"], spec["compress_probability"]) == ("proportion", 0.10)
    assert spec["max_resolution"] == 64  # FFCV's 400, within the recipe's canvas
    assert bench.default_data_dir(spec).name == "photo64_ffcv_n40"
    assert "policy" not in bench.synthetic_spec(recipe, 40)  # fasttt's: built betons still match
    betons = bench.synthetic_betons(spec, tmp_path / "ffcv", Console(file=io.StringIO()))
    manifest = read_manifest(betons)
    assert manifest["image_policy"]["write_mode"] == "proportion"
    assert manifest["image_policy"]["compress_probability"] == 0.10
    modes, _ = image_storage(split_path(betons, manifest, "train"), manifest, 40)
    assert (modes == 1).sum() > 20  # raw pixels; 0.9 x 40 expected


def test_synthetic_photos_look_like_imagenet_files():
    sizes, shapes = [], set()
    for seed in range(8):
        image = synthetic.synthetic_photo(seed)
        shapes.add(image.shape)
        assert 300 <= image.shape[0] <= 400 and 350 <= image.shape[1] <= 450
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        sizes.append(buffer.tell())
    assert len(shapes) > 4
    assert 70 <= np.mean(sizes) / 1024 <= 140


def test_a_gpu_backward_on_the_autograd_thread_counts_for_its_range():
    # On a GPU the autograd engine runs the backward's tasks on a thread of its own, outside
    # the tree of the main thread's fasttt.backward: their kernels still count for it.
    def event(name, start, end, thread, device_us, parent=None):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               thread=thread, device_type=DeviceType.CPU,
                               cpu_time_total=end - start, device_time_total=device_us,
                               cpu_parent=parent)

    main, engine, loader = 1, 2, 3
    task = "autograd::engine::evaluate_function: ConvolutionBackward0"
    top = event(task, 1200, 1500, engine, 900)
    events = [event("fasttt.forward_loss", 0, 1000, main, 400),
              event("fasttt.backward", 1000, 2000, main, 10),
              top, event(task, 1300, 1400, engine, 500, parent=top),  # within top: once
              event(task, 2100, 2200, engine, 70),  # between steps, in no range
              event("aten::copy_", 1100, 1150, loader, 30),  # the loader's, not the backward's
              event("fasttt.forward_loss", 3000, 4000, main, 400),
              event("fasttt.backward", 4000, 5000, main, 10),
              event(task, 4500, 4600, engine, 100)]
    assert step_profile.phases(events, steps=2) == {
        "fasttt.forward_loss": {"host_ms_per_step": 1.0, "device_ms_per_step": 0.4,
                                "calls_per_step": 1.0},
        "fasttt.backward": {"host_ms_per_step": 1.0,
                            "device_ms_per_step": (10 + 900 + 10 + 100) / 1000 / 2,
                            "calls_per_step": 1.0}}


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        bench.main([str(RECIPE), "--steps", "0"])
    with pytest.raises(UserError, match="--profile-steps"):
        bench.main([str(RECIPE), "--profile-steps", "0"])
    with pytest.raises(UserError, match="fewer images than one batch"):
        bench.main([str(RECIPE), "--synthetic", "8", "--data-dir", str(tmp_path / "s")])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not the benchmark's")
    spec = bench.synthetic_spec(bench.load_recipe(RECIPE), 64)
    with pytest.raises(UserError, match="not made by --synthetic"):
        bench.synthetic_betons(spec, foreign, Console(file=io.StringIO()))
    assert (foreign / "keep.txt").is_file()


def test_all_kernels_count_once_and_the_ranges_gpu_copies_not_at_all():
    def event(device_type, device_us, annotation=False):
        return SimpleNamespace(device_type=device_type, device_time_total=device_us,
                               is_user_annotation=annotation)

    events = [event(DeviceType.CPU, 500),  # a host op: its kernels are the rows below
              event(DeviceType.CUDA, 300), event(DeviceType.CUDA, 200),
              event(DeviceType.CUDA, 900, annotation=True)]  # fasttt.backward's GPU span
    assert step_profile.kernel_ms(events, steps=2) == 0.25


def test_the_benchmarks_norm_statistics_cost_the_step_no_host_read():
    # A cumulative average reads each BatchNorm's batch count on the host: a graph break
    # under torch.compile, and a GPU sync per layer per step that the trainer never pays.
    model = build_model(ModelConfig(name="cifar_resnet20"), RunConfig(), 10, seed=0)
    bench.last_batch_norm_statistics(model)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0, explained.break_reasons
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    one, other = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 5 + 3
    with torch.no_grad():
        model(one)
        after_one = first.running_var.clone()
        model(other)
        assert not torch.allclose(first.running_var, after_one)
        model(one)
    assert torch.allclose(first.running_var, after_one)  # the last batch's statistics alone
