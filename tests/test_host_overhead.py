"""benchmarks/host_overhead.py in CI-sized settings: every row and suspect, the tables, the JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

from conftest import ROOT


def _load_benchmark():
    # As `python benchmarks/host_overhead.py` runs it: the script's folder on the path.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
# what issue #26 asked to see, each in a suspect's name
ASKED = ("set_lr", "progress", "record_function", "_step_sums", "autocast", "backward",
         "AcceleratedOptimizer")


def test_rows_suspects_and_json(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per table row
    out = tmp_path / "host_overhead.json"
    bench.main(["--betons", str(digits), "--steps", "3", "--rounds", "2", "--out", str(out)])
    result, printed = json.loads(out.read_text()), capsys.readouterr().out

    ratio = result["trainer_vs_bare"]
    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
    assert set(result["seconds_per_step"]) == set(bench.ROWS) == set(result["vs_bare"])
    for name, seconds in result["seconds_per_step"].items():
        assert len(seconds) == 2 and all(s > 0 for s in seconds), name
    assert result["vs_bare"]["bare"] == 1.0
    assert result["config"]["steps"] == 3 and result["clock"] == "process CPU"

    suspects = result["suspects"]
    for word in ASKED:
        assert any(word in name for name in suspects), word
    for name, row in suspects.items():
        assert math.isfinite(row["alone_us_per_step"]), name
    for name in bench.EXTRAS:  # each measured in the loop too, by its "bare + ..." row
        assert math.isfinite(suspects[name]["in_loop_us_per_step"]), name
    assert math.isfinite(result["gap_us_per_step"])

    assert "trainer vs bare loop: test_vit, batch 8, 3 steps, median of 2 rounds" in printed
    assert "the suspects: microseconds per step" in printed
    for name in ("trainer_vs_bare (goal <= 1.05)", "bare + all five",
                 "measured gap, trainer - bare", "record_function ranges (x6)"):
        assert name in printed, name
    assert f"wrote {out}" in printed
