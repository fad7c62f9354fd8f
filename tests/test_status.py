"""python -m fasttt.status: where a run stands, read from its files, never written; and
drop_used_caches, which frees a teacher's cache once its student has finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import interrupt_at_evaluation, one_line_refusal, snapshot, two_generation_args

from fasttt.cache import drop_used_caches
from fasttt.errors import exit_on_user_error
from fasttt.rundir import CACHE, EVAL, LOCK, METRICS, WEIGHTS, lock_run_dir
from fasttt.status import main, run_status
from fasttt.train import main as train

NAME = "digits_d06"


# a digits run of seconds: 128 samples, 2 epochs, the patriarch and one student
args_for = two_generation_args
# what a run writes once every generation has finished, besides the later generations
WHEN_FINISHED = ("gen0/analysis.json", "gen0/second_class.npy", "ensemble.json", "figures",
                 "summary.json", "summary.md")


@pytest.fixture(scope="module")
def trained(two_generation_run, tmp_path_factory) -> dict[str, Path]:
    """The shared finished run ("finished": copy it to change it), and a copy of it taken
    back to the end of gen0, then trained again to a stop in gen1's second epoch ("stopped")."""
    root = tmp_path_factory.mktemp("status")
    finished = two_generation_run / "runs" / NAME
    stopped = copy_run(finished, root / "stopped")
    for name in ("gen1", *WHEN_FINISHED):
        shutil.rmtree(stopped / name) if (stopped / name).is_dir() else (stopped / name).unlink()
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at_evaluation(patch, call=2)  # gen1's 1st epoch: its ckpt-0001 stays
        with pytest.raises(KeyboardInterrupt):
            train(args_for(two_generation_run / "digits", root / "stopped"))
    return {"stopped": stopped, "finished": finished}


def copy_run(run_dir: Path, where: Path) -> Path:
    """A private copy of a run directory (its recipe still names the shared betons)."""
    return Path(shutil.copytree(run_dir, where / NAME))


def file_bytes(path: Path) -> int:
    """The bytes of every file under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_finished_run_reports_eval_json_and_no_time_left(trained, tmp_path, capsys):
    run = copy_run(trained["finished"], tmp_path)
    main([str(run), "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert facts == run_status(run)
    assert (facts["state"], facts["current_generation"], facts["held"]) == ("finished", None,
                                                                           False)
    assert facts["eta_generation_s"] == facts["eta_run_s"] == 0
    for m, gen in enumerate(facts["generations"]):
        found = json.loads((run / f"gen{m}" / EVAL).read_text())
        assert (gen["state"], gen["epochs_done"]) == ("finished", 2)
        assert (gen["best"], gen["last"]) == (found["best"], found["last"])
    main([str(run)])
    text = capsys.readouterr().out
    assert "finished: all generations finished; no process holds it" in text
    assert "cifar_resnet8" in text and "generation 0:00:00, run 0:00:00" in text


def test_a_stopped_run_stands_in_its_second_generation_with_time_left(trained, tmp_path,
                                                                      capsys):
    run = copy_run(trained["stopped"], tmp_path)
    facts = run_status(run)
    assert (facts["state"], facts["current_generation"], facts["held"]) == ("stopped", 1, False)
    gen0, gen1 = facts["generations"]
    assert (gen0["state"], gen1["state"], gen1["epochs_done"]) == ("finished", "in progress", 1)
    assert gen1["last"]["epoch"] == 1 and (run / "gen1" / "ckpt-0001").is_dir()
    rows = [json.loads(line) for m in (0, 1)
            for line in (run / f"gen{m}" / METRICS).read_text().splitlines()]
    per_epoch = sum(row["seconds"] for row in rows) / 3
    assert facts["seconds_per_epoch"] == pytest.approx(per_epoch)
    # gen1 has one epoch left and no generation comes after it
    assert facts["eta_generation_s"] == facts["eta_run_s"] == pytest.approx(per_epoch)
    assert per_epoch > 0
    main([str(run)])
    assert "stopped: gen 1/1: 1/2 epochs done; no process holds it" in capsys.readouterr().out


def test_a_run_held_by_a_process_is_reported_and_keeps_its_lock(trained, tmp_path):
    run = copy_run(trained["stopped"], tmp_path)
    holder = lock_run_dir(run)
    try:
        facts = run_status(run)
        assert (facts["held"], facts["state"]) == (True, "running")
        one_line_refusal(lambda: lock_run_dir(run), "in use by another fasttt process")
    finally:
        holder.close()
    assert run_status(run)["held"] is False
    (run / LOCK).unlink()  # never locked: no lock file
    assert run_status(run)["held"] is False


def test_disk_figures_are_the_bytes_of_the_files(trained, tmp_path):
    run = copy_run(trained["stopped"], tmp_path)
    facts = run_status(run)
    gen0, gen1 = facts["generations"]
    assert gen0["bytes"] == {"checkpoints": 0, "weights": (run / "gen0" / WEIGHTS).stat().st_size,
                             "cache": file_bytes(run / "gen0" / CACHE)}
    assert gen1["bytes"] == {"checkpoints": file_bytes(run / "gen1" / "ckpt-0001"),
                             "weights": 0, "cache": 0}
    assert min(gen0["bytes"]["cache"], gen1["bytes"]["checkpoints"]) > 0
    assert facts["bytes_total"] == file_bytes(run)
    assert facts["bytes_freed_by_keep_last"] == 0  # gen0's student is still training
    finished = run_status(trained["finished"])
    assert finished["bytes_freed_by_keep_last"] == file_bytes(trained["finished"] / "gen0" / CACHE)


def test_drop_used_caches_frees_exactly_a_teachers_cache_once_its_student_finished(
        trained, tmp_path):
    stopped = copy_run(trained["stopped"], tmp_path / "stopped")
    before = snapshot(stopped)
    assert drop_used_caches(stopped) == 0 and snapshot(stopped) == before
    run = copy_run(trained["finished"], tmp_path / "finished")
    size, before = file_bytes(run / "gen0" / CACHE), snapshot(run)
    assert drop_used_caches(run) == size > 0
    after = snapshot(run)
    gone = {path for path in before if path not in after}
    assert gone == {path for path in before if Path(path).parts[:2] == ("gen0", CACHE)}
    # gen0's own time changes with its entries; nothing else does, and nothing is added
    assert {k: v for k, v in after.items() if k != "gen0"} == \
        {k: v for k, v in before.items() if k not in gone and k != "gen0"}
    assert drop_used_caches(run) == 0
    assert run_status(run)["bytes_freed_by_keep_last"] == 0


def test_status_touches_no_file_of_the_run(trained, tmp_path, capsys):
    for which in ("stopped", "finished"):
        run = copy_run(trained[which], tmp_path / which)
        if which == "stopped":
            (run / LOCK).unlink()  # the probe must not create it
        before = snapshot(run)
        main([str(run)])
        main([str(run), "--json"])
        assert snapshot(run) == before, which
    capsys.readouterr()


def test_a_missing_run_directory_or_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    for argv, needle in (([str(tmp_path / "nope")], "nope is not a run directory"),
                         ([str(tmp_path)], "has no recipe.toml"),
                         ([], "(usage: python -m fasttt.status RUN_DIR [--json])")):
        with pytest.raises(SystemExit) as leaving:
            exit_on_user_error(lambda argv=argv: main(argv))
        err = capsys.readouterr().err
        assert leaving.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
        assert needle in err, err


def test_a_damaged_metrics_file_is_one_line_naming_it(trained, tmp_path):
    run = copy_run(trained["stopped"], tmp_path)
    (run / "gen1" / METRICS).write_text('{"epoch": 1, "seconds": "soon"}\n')
    one_line_refusal(lambda: run_status(run), "gen1/metrics.jsonl: unexpected content",
                     "delete it")


def test_keep_last_set_on_a_finished_run_frees_the_used_cache_and_retrains_nothing(
        trained, tmp_path):
    run = copy_run(trained["finished"], tmp_path)
    weights = [(run / f"gen{m}" / WEIGHTS).read_bytes() for m in (0, 1)]
    assert (run / "gen0" / CACHE).is_dir()
    train([*args_for(Path(run_status(run)["dataset"]), tmp_path),
           "--set", 'cache.keep="last"'])  # a bookkeeping key: the run goes on
    assert not (run / "gen0" / CACHE).exists()
    assert [(run / f"gen{m}" / WEIGHTS).read_bytes() for m in (0, 1)] == weights
    history = [json.loads(line) for line in (run / "history.jsonl").open()]
    assert history[-1]["changed"] == {"cache.keep": {"old": "all", "new": "last"}}
