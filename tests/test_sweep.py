"""One teacher, many students: runs that adopt another run's generation, and the sweep.

One tiny teacher run (a patriarch and its own student; cache.keep = "last" deletes the
patriarch's cache once the student finished) and two sweeps of its patriarch's students
run at once (2 x 2 points two at a time, and one more point beside them), which build
its cache once between them, are shared by the module.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import RECIPE, one_line_refusal, snapshot, tiny_run_args, tiny_run_flags
from rich.console import Console

import fasttt.cache as cache_module
from fasttt.cache import main as cache_main
from fasttt.sweep import (
    SWEEP_JSON,
    SWEEP_MD,
    grid_points,
    parse_grid,
    run_points,
    summarize,
    write_sweep_report,
)
from fasttt.sweep import main as sweep
from fasttt.teachers import OnlineTeacher
from fasttt.train import main as train

# the teacher's cache stores T = 1 and 4 for its top 5 of 10 logits
CACHE = {"cache.temperatures": "[1.0, 4.0]", "cache.top_k": 5, "data.train_limit": 128,
         "generations.students": 1}
GRID = ["--grid", "generations.lam=0.6,0.3", "--grid", "generations.temperature=1,4"]
POINTS = ["lam0.6-temperature1-seed0", "lam0.6-temperature4-seed0",
          "lam0.3-temperature1-seed0", "lam0.3-temperature4-seed0"]


def sweep_args(digits: Path, runs: Path, *extra: str, grid: list[str] = GRID,
               name: str = "sweep", **overrides) -> list[str]:
    """The module's sweep of the teacher's patriarch, with `overrides` on its recipe."""
    teacher = runs / "teacher" / "gen0"
    flags = tiny_run_flags(digits, **{**CACHE, "generations.teacher": f'"{teacher}"',
                                      **overrides})
    return [str(RECIPE), *flags, *grid, "--runs-dir", str(runs), "--name", name, *extra]


@pytest.fixture(scope="module")
def swept(digits, tmp_path_factory) -> Path:
    """runs/ holding the teacher run and two sweeps of its patriarch's students, run at once.

    "sweep" is 2 x 2 points, two at a time: started as a command, stopped by SIGTERM half
    way through its first point (its output in runs/../stopped.log), then rerun to the
    end. "second" is one more point, started beside it.
    """
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    train(tiny_run_args(digits, runs, **CACHE, **{"cache.keep": '"last"', "run.name": "teacher"}))
    assert not (runs / "teacher" / "gen0" / "cache").exists()  # the sweeps build it again
    second = threading.Thread(target=sweep, args=(sweep_args(
        digits, runs, grid=["--grid", "generations.lam=0.5"], name="second"),))
    second.start()
    stopped = subprocess.Popen([sys.executable, "-m", "fasttt.sweep",
                                *sweep_args(digits, runs, "--parallel", "2")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first, deadline = runs / "sweep" / POINTS[0] / "train.log", time.monotonic() + 600
        while not (first.is_file() and "gen 1/1 epoch 1/2" in first.read_text()):
            assert stopped.poll() is None, stopped.communicate()[0]
            assert time.monotonic() < deadline, "no epoch in 10 minutes"
            time.sleep(0.05)
        stopped.send_signal(signal.SIGTERM)
        output = stopped.communicate(timeout=120)[0]
    finally:
        stopped.kill()
    (runs.parent / "stopped.log").write_text(f"exit {stopped.returncode}\n{output}")
    sweep(sweep_args(digits, runs, "--parallel", "2"))
    second.join()
    return runs


def test_a_sweep_stopped_by_sigterm_stops_its_points_and_a_rerun_finishes_them(swept):
    # The rerun finished every point (the next test), and the one stopped half way as the
    # teacher's own student, bit for bit (test_the_point_with_the_teachers_own_settings_...).
    output = (swept.parent / "stopped.log").read_text()
    assert output.startswith("exit 143\n"), output
    assert output.rstrip().endswith("interrupted: rerun the same command to resume"), output
    assert "running point(s): SIGINT (30 s), then SIGTERM (10 s), then SIGKILL (5 s)" in (
        output), output
    assert re.search(rf"{POINTS[0]}: stopped by SIGINT after \d+\.\d s\n", output), output
    log = (swept / "sweep" / POINTS[0] / "train.log").read_text()
    assert "gen1: resuming after epoch 1" in log, log


def test_every_point_trains_students_only_from_one_cache_built_once(swept):
    result = json.loads((swept / "sweep" / SWEEP_JSON).read_text())
    assert [p["name"] for p in result["points"]] == POINTS
    assert all(p["status"] == "finished" and p["generation"] == 1 for p in result["points"])
    assert result["grid"] == {"generations.lam": [0.6, 0.3],
                              "generations.temperature": [1.0, 4.0]}
    assert all(c["seeds_finished"] == 1 and 0 <= c["val_top1_mean"] <= 100
               for c in result["cells"])
    teacher = swept / "teacher" / "gen0"
    assert json.loads((swept / "second" / SWEEP_JSON).read_text())["points"][0]["status"] == (
        "finished")
    logs = {name: (swept / "sweep" / name / "train.log").read_text() for name in POINTS}
    logs["second"] = (swept / "second" / "lam0.5-seed0" / "train.log").read_text()
    builders = [name for name, log in logs.items() if "teacher cache: 1/2 views" in log]
    assert len(builders) == 1, builders  # one teacher pass for both sweeps
    assert all("built earlier (no teacher pass)" in log
               for name, log in logs.items() if name not in builders)
    assert json.loads((teacher / "cache" / "manifest.json").read_text())["temperatures"] == [
        1.0, 4.0]
    for name in POINTS:  # no patriarch trained: gen0 is the teacher's, and says so
        gen0 = swept / "sweep" / name / "gen0"
        assert (gen0 / "last.safetensors").read_bytes() == (teacher /
                                                             "last.safetensors").read_bytes()
        assert json.loads((gen0 / "teacher.json").read_text())["run"] == str(teacher.parent)
        assert not (gen0 / "cache").exists()
        summary = json.loads((swept / "sweep" / name / "summary.json").read_text())
        assert summary["adopted_teacher"] == str(teacher)
    markdown = (swept / "sweep" / SWEEP_MD).read_text()
    assert f"students of {teacher}" in markdown and "| 0.3 | 4.0 | 1/1 |" in markdown
    for key in ("generations.lam", "generations.temperature"):
        assert (swept / "sweep" / "figures" / f"sweep_{key}.png").stat().st_size > 1000


def test_the_point_with_the_teachers_own_settings_reproduces_its_student(swept):
    # The same views (the teacher run's gen1 keys), seed and batch order: the same weights.
    point = swept / "sweep" / "lam0.6-temperature1-seed0" / "gen1" / "last.safetensors"
    assert point.read_bytes() == (swept / "teacher" / "gen1" / "last.safetensors").read_bytes()
    other = swept / "sweep" / "lam0.3-temperature1-seed0" / "gen1" / "last.safetensors"
    assert other.read_bytes() != point.read_bytes()


def test_a_rerun_skips_finished_points(swept, digits, capsys):
    before = snapshot(swept / "sweep")
    sweep(sweep_args(digits, swept, "--parallel", "2"))
    assert "4 finished earlier, 0 to train" in capsys.readouterr().out
    points = {k: v for k, v in snapshot(swept / "sweep").items() if k.startswith("lam")}
    assert points == {k: v for k, v in before.items() if k.startswith("lam")}  # untouched


def test_another_student_reads_the_shared_cache_with_no_teacher_pass(swept, digits, tmp_path,
                                                                     monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(OnlineTeacher, "logits", no_teacher)
    monkeypatch.setattr(cache_module, "last_epoch_model", no_teacher)
    built = snapshot(swept / "teacher" / "gen0" / "cache")
    teacher = swept / "teacher" / "gen0"
    train(tiny_run_args(digits, tmp_path, **CACHE, **{
        "generations.teacher": f'"{teacher}"', "generations.lam": 0.5,
        "generations.temperature": 4.0, "run.name": "other"}))
    assert (tmp_path / "other" / "gen1" / "eval.json").is_file()
    assert snapshot(swept / "teacher" / "gen0" / "cache") == built
    # another teacher for a run whose students learned from this one: refused
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **CACHE, **{
        "generations.teacher": f'"{swept / "teacher" / "gen1"}"', "generations.lam": 0.5,
        "generations.temperature": 4.0, "run.name": "other"})), "made by a different recipe")
    record = tmp_path / "other" / "gen0" / "teacher.json"  # as if the teacher was retrained
    record.write_text(record.read_text().replace('"weights_sha256": "', '"weights_sha256": "0'))
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **CACHE, **{
        "generations.teacher": f'"{teacher}"', "generations.lam": 0.5,
        "generations.temperature": 4.0, "run.name": "other"})),
        "is not the teacher", "adopted and trained students from")


def test_a_temperature_the_cache_cannot_serve_is_refused(swept, digits, tmp_path):
    one_line_refusal(lambda: sweep([*sweep_args(digits, swept), "--grid",
                                    "generations.temperature=1,3"]),
                     "each --grid key may be given once")
    args = sweep_args(digits, swept)
    args[args.index("generations.temperature=1,4")] = "generations.temperature=1,3"
    one_line_refusal(lambda: sweep(args), "this recipe's cache keeps the top 5 logits and "
                     "log-partitions at T = 1, 4, so it cannot serve generations.temperature "
                     "= 3", "cache.temperatures")
    teacher = swept / "teacher" / "gen0"
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **{
        **CACHE, "generations.teacher": f'"{teacher}"', "generations.temperature": 3.0,
        "cache.temperatures": "[3.0]", "run.name": "hot"})),
        "keeps the top 5 logits and log-partitions at T = 1, 4, so it cannot serve "
        "generations.temperature = 3", 'cache.mode = "online"')


@pytest.mark.parametrize("overrides, needles", [
    ({"model.name": '"cifar_resnet56"'}, ["is a cifar_resnet8", 'model.name = "cifar_resnet8"']),
    ({"data.holdout": 0.1}, ["data.holdout = 0", "set data.holdout = 0"]),
    ({"data.train_limit": 64}, ["data.train_limit = 128"]),
])
def test_a_teacher_that_does_not_fit_is_refused_before_training(swept, digits, tmp_path,
                                                                 overrides, needles):
    teacher = swept / "teacher" / "gen0"
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **{
        **CACHE, "generations.teacher": f'"{teacher}"', **overrides})), *needles)
    assert not any(tmp_path.rglob("last.safetensors"))


def test_a_teacher_that_is_not_another_runs_finished_generation_is_refused(swept, digits,
                                                                           tmp_path):
    unfinished = swept / "teacher" / "gen5"
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **CACHE, **{
        "generations.teacher": f'"{unfinished}"'})), "is not a finished generation")
    itself = tmp_path / "digits_d06" / "gen0"
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **CACHE, **{
        "generations.teacher": f'"{itself}"'})), "is a generation of this run itself")
    one_line_refusal(lambda: sweep(sweep_args(digits, tmp_path)), "is not a finished generation")


def test_grids_points_and_seed_statistics():
    assert parse_grid("cache.temperatures=[1, 2],[4]") == ("cache.temperatures", ["[1, 2]",
                                                                                  "[4]"])
    for bad in ("generations.lam", "lam=0.3", "generations.lam=0.3,0.3", "run.seed=1,2"):
        one_line_refusal(lambda bad=bad: parse_grid(bad), "--grid")
    points = grid_points({"generations.lam": ["0.3", "0.7"], "optim.lr": ["0.1"]}, [0, 1])
    assert [p.name for p in points] == ["lam0.3-lr0.1-seed0", "lam0.3-lr0.1-seed1",
                                        "lam0.7-lr0.1-seed0", "lam0.7-lr0.1-seed1"]
    assert points[1].overrides() == ["generations.lam=0.3", "optim.lr=0.1", "run.seed=1",
                                     'run.name="lam0.3-lr0.1-seed1"']
    rows = [{"values": {"lam": lam}, "status": status, "val_top1_last": top1}
            for lam, status, top1 in [(0.3, "finished", 90.0), (0.3, "finished", 94.0),
                                      (0.7, "finished", 80.0), (0.7, "failed", None)]]
    cells = summarize("s", "t", Path("r.toml"), {"lam": [0.3, 0.7]}, [0, 1], rows)["cells"]
    assert cells[0] | {"values": None} == {"values": None, "val_top1": [90.0, 94.0],
                                           "seeds_finished": 2, "val_top1_mean": 92.0,
                                           "val_top1_std": pytest.approx(2 ** 1.5)}
    assert (cells[1]["seeds_finished"], cells[1]["val_top1_std"]) == (1, None)


# Each "point" runs this script: seed 0 exits at once; seed 1 stops on SIGINT; seed 2
# ignores SIGINT and stops on SIGTERM; seed 3 ignores both, as does a helper it started.
STAND_IN = """import signal, subprocess, sys, time
seed = int(next(a for a in sys.argv if a.startswith('run.seed='))[9:])
if seed == 0: sys.exit(0)
if seed >= 2: signal.signal(signal.SIGINT, signal.SIG_IGN)
if seed == 1: signal.signal(signal.SIGINT, lambda *a: (print('saved, stopping'), sys.exit(130)))
if seed == 2: signal.signal(signal.SIGTERM, lambda *a: (print('stopping'), sys.exit(143)))
if seed == 3:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    print('helper', helper.pid)
print('training', flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie no init reaps in a container does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_signal_to_the_sweep_stops_every_running_point_in_bounded_time(tmp_path):
    # A sweep hung after SIGTERM: it waited without a timeout for a point that did not stop.
    points = grid_points({"generations.lam": ["0.3"]}, [0, 1, 2, 3, 4])
    logs = [tmp_path / point.name / "train.log" for point in points]

    def interrupt(point, status, seconds):
        while not all("training" in log.read_text() for log in logs[1:4]):  # handlers set
            time.sleep(0.05)
        raise KeyboardInterrupt  # as a signal to the sweep would, once a point has ended

    def hung(signum, frame):
        raise AssertionError("the sweep is still waiting for its points after 30 s")

    output, started = io.StringIO(), time.monotonic()
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)  # fail, not hang, without bounded waits
    try:
        with pytest.raises(KeyboardInterrupt):
            run_points(points, [sys.executable, "-c", STAND_IN], tmp_path, 4,
                       Console(file=output, width=300), interrupt,
                       stop_steps=((signal.SIGINT, 2.0), (signal.SIGTERM, 2.0),
                                   (signal.SIGKILL, 5.0)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        helper = int(logs[3].read_text().split("helper ")[1].split()[0])
        if alive(helper):
            os.kill(helper, signal.SIGKILL)
    assert time.monotonic() - started < 30  # nobody waited for a sleeping point to end
    lines = output.getvalue()
    assert "stopping 3 running point(s): SIGINT (2 s), then SIGTERM (2 s), then SIGKILL (5 s)" in (
        lines)
    stopped = dict(re.findall(r"(lam0.3-seed\d): (stopped by .*)\n", lines))
    assert set(stopped) == {"lam0.3-seed1", "lam0.3-seed2", "lam0.3-seed3"}, lines
    times = {name: float(re.search(r"after (\d+\.\d) s", how)[1])
             for name, how in stopped.items()}
    assert stopped["lam0.3-seed1"].startswith("stopped by SIGINT after")
    assert times["lam0.3-seed1"] < 2
    assert stopped["lam0.3-seed2"].endswith("s (no answer to SIGINT in 2 s)")
    assert stopped["lam0.3-seed2"].startswith("stopped by SIGTERM after")
    assert 2 <= times["lam0.3-seed2"] < 4
    assert stopped["lam0.3-seed3"].endswith("s (no answer to SIGINT in 2 s, SIGTERM in 2 s)")
    assert stopped["lam0.3-seed3"].startswith("stopped by SIGKILL after")
    assert times["lam0.3-seed3"] >= 4
    assert "saved, stopping" in logs[1].read_text() and "stopping" in logs[2].read_text()
    # Killed with its point's process group; a loaded machine may run it once more before
    # the SIGKILL lands (CI saw it alive right after the sweep returned).
    deadline = time.monotonic() + 5
    while alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(helper)
    assert not (tmp_path / points[4].name).exists()  # never started


def test_a_failed_point_is_reported_in_one_line_and_in_the_sweep_report(swept, digits):
    # the teacher trained on 128 samples, this point on 64
    args = sweep_args(digits, swept, grid=["--grid", "data.train_limit=64"], name="failing")
    message = one_line_refusal(lambda: sweep(args), "1 of 1 points failed, first "
                               "train_limit64-seed0", "was trained with data.train_limit = 128",
                               "rerun the same command to retry them")
    assert "Traceback" not in message
    result = json.loads((swept / "failing" / SWEEP_JSON).read_text())
    assert [p["status"] for p in result["points"]] == ["failed"]
    assert "Not finished: train_limit64-seed0" in (swept / "failing" / SWEEP_MD).read_text()


def test_the_cache_command_on_an_adopting_run_verifies_the_teachers_cache(swept, capsys):
    point = swept / "sweep" / POINTS[0]
    built = snapshot(swept / "teacher" / "gen0" / "cache")
    cache_main([str(point / "recipe.toml"), "--generation", "0", "--runs-dir",
                str(swept / "sweep")])
    assert "temperatures: [1.0, 4.0]" in capsys.readouterr().out
    assert snapshot(swept / "teacher" / "gen0" / "cache") == built
    assert not (point / "gen0" / "cache").exists()


def test_a_sweep_that_would_mix_runs_or_points_is_refused(swept, digits):
    one_line_refusal(lambda: sweep(sweep_args(digits, swept, name="teacher")),
                     "overlaps its teacher's run", "another --name")
    one_line_refusal(lambda: sweep(sweep_args(digits, swept, grid=[
        "--grid", "generations.lam=0.3,0.30"], name="twice")), "two values mean the same")
    one_line_refusal(lambda: sweep(sweep_args(digits, swept, grid=[
        "--grid", 'run.log_with=["a b"],["a_b"]'], name="names")), "one point name")
    assert not (swept / "twice").exists() and not (swept / "names").exists()


def test_a_student_that_does_not_fit_the_shared_cache_is_refused_without_deleting_it(
        swept, digits, tmp_path):
    teacher = swept / "teacher" / "gen0"
    built = snapshot(teacher / "cache")
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path, **{
        **CACHE, "generations.teacher": f'"{teacher}"', "cache.views": 1})),
        "serves the students of", "views", 'cache.mode = "online"')
    assert snapshot(teacher / "cache") == built
    assert not (tmp_path / "digits_d06" / "gen1").exists()


def test_sweep_figures_take_list_values(tmp_path):
    grid = {"cache.temperatures": [[1.0], [1.0, 4.0]], "generations.lam": [0.3, 0.7]}
    rows = [{"values": {"cache.temperatures": t, "generations.lam": lam}, "seed": 0,
             "status": "finished", "val_top1_last": 50.0 + lam} for t in grid["cache.temperatures"]
            for lam in grid["generations.lam"]]
    write_sweep_report(tmp_path, summarize("s", "runs/t/gen0", Path("r.toml"), grid, [0], rows))
    assert (tmp_path / "figures" / "sweep_cache.temperatures.png").stat().st_size > 1000
    assert "| [1.0, 4.0] | 0.7 | 1/1 | 50.70 |" in (tmp_path / SWEEP_MD).read_text()
