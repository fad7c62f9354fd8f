"""Names, paths, the end of a run and launches: run.name is a plain file name, an empty
path is one line with nothing written, a signal after the report line ends quietly, and a
CPU launch on two machines is told the command that starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import RECIPE, ROOT, one_line_refusal, snapshot, tiny_run_args
from rich.console import Console

import fasttt.errors as errors
import fasttt.processes as processes
import fasttt.train as train_module
from fasttt.processes import launch_request
from fasttt.recipe import load_recipe, toml_value
from fasttt.train import main as train

NAME = "digits_d06"


@pytest.mark.parametrize("name,cleaned", [
    ("two\nlines", "two_lines"), ("bell\x1b[31mred", "bell_31mred"), ("it's", "it_s"),
    ('say "hi"', "say_hi_"), ("-flag", "flag"), (".hidden", "hidden"), ("a/b", "a_b"),
    ("..", "run"), ("x" * 201, "x" * 200)])
def test_a_run_name_that_is_not_a_plain_file_name_is_refused_with_one_that_is(
        digits, tmp_path, name, cleaned):
    runs = tmp_path / "runs"
    args = tiny_run_args(digits, runs, **{"run.name": toml_value(name)})
    one_line_refusal(lambda: train(args), "run.name must be a plain file name on one line",
                     "letters, digits and . _ - + = , @", f'e.g. "{cleaned}"')
    assert not runs.exists()
    assert load_recipe(RECIPE, [f"run.name={cleaned}"]).run.name == cleaned


def test_plain_run_names_in_any_script_are_kept():
    for name in ("lam0.3-lr0.1-seed1", "a+b=c,d@e", "résumé_2", "_x"):
        assert load_recipe(RECIPE, [f'run.name="{name}"']).run.name == name


@pytest.mark.parametrize("beton_dir,needle", [
    ('""', "must name the betons' directory on one line"),
    ('"."', "must name a directory of its own to build the digits betons in"),
    ('".."', "must name a directory of its own"), ('"/"', "must name a directory of its own"),
    ('"a\\nb"', "on one line")])
def test_a_beton_dir_that_names_no_directory_is_one_line_and_nothing_is_written(
        tmp_path, monkeypatch, beton_dir, needle):
    here = tmp_path / "empty" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    one_line_refusal(lambda: train([str(RECIPE), "--set", f"data.beton_dir={beton_dir}"]),
                     "data.beton_dir ", needle)
    assert snapshot(tmp_path) == before  # no ..lock, no runs/


def test_a_signal_just_after_the_report_line_lets_the_run_finish_quietly(
        digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(errors, "_signals_received", [])
    monkeypatch.setattr(errors, "_complete", [])
    finish, torn_down = train_module.finish, []

    def signalled_finish(accelerator):
        os.kill(os.getpid(), signal.SIGTERM)  # as the report line is printed
        finish(accelerator)
        torn_down.append(True)

    monkeypatch.setattr(train_module, "finish", signalled_finish)
    # what comes before the report line is other tests': seconds saved
    monkeypatch.setattr(train_module, "train_generations", lambda *args: None)
    monkeypatch.setattr(train_module, "analyze_run", lambda *args: None)
    monkeypatch.setattr(train_module, "write_report", lambda run_dir, console: run_dir / "R.md")
    args = tiny_run_args(digits, tmp_path / "runs")
    assert errors.exit_on_user_error(lambda: train(args)) is None  # exit status 0
    assert torn_down
    out, err = capsys.readouterr()
    assert f"report:{tmp_path / 'runs' / NAME / 'R.md'}" in "".join(out.split())  # folded
    assert err == ""


# train.py's end, the signals sent from its teardown and from the interpreter's exit
LATE = """
import atexit, os, signal, sys, time
from fasttt.errors import (exit_at_once_on_interrupt, exit_on_user_error,
                           ignore_signals_once_complete, results_complete)

def main():
    results_complete()
    print("report: here", flush=True)
    for signum in map(int, sys.argv[2:]):  # while tearing down
        os.kill(os.getpid(), signum)

late = int(sys.argv[1])
if late:  # atexit's callbacks run in the interpreter's exit, after train.py's last line
    atexit.register(lambda: (os.kill(os.getpid(), late), time.sleep(0.5)))
exit_at_once_on_interrupt()
try:
    exit_on_user_error(main)
finally:
    ignore_signals_once_complete()
"""


@pytest.mark.parametrize("late,during,status", [
    (0, [signal.SIGTERM], 0),  # in the teardown: it finishes
    (0, [signal.SIGTERM, signal.SIGINT], 130),  # a second one: a hung teardown stops
    (signal.SIGINT, [], 0),  # as the interpreter exits: the exit goes on
    pytest.param(signal.SIGHUP, [signal.SIGHUP], 0, marks=pytest.mark.skipif(
        signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, reason="under nohup: ignored"))])
def test_signals_once_the_results_are_complete_end_quietly(late, during, status):
    done = subprocess.run([sys.executable, "-c", LATE, str(int(late)),
                           *map(str, map(int, during))], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == status, done
    assert done.stdout == "report: here\n", done
    assert done.stderr == ("" if status == 0 else errors.COMPLETE_HINT + "\n"), done


def test_a_cpu_launch_on_two_machines_is_told_the_command_that_starts_both(monkeypatch):
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.7",
            "--main_process_port", "29512", "fasttt/train.py", "R.toml"]
    asked = launch_request(argv)  # as read from the parent process
    monkeypatch.setattr(processes, "launch_request", lambda: asked)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what --cpu sets
    message = one_line_refusal(lambda: processes.make_accelerator("no", Console(quiet=True)),
                               "asked for 2 machines, but with --cpu it starts one process on "
                               "each, which trains alone")
    assert ("run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_machines 2 "
            "--num_processes 2 --machine_rank 1 --main_process_ip 10.0.0.7 --main_process_port "
            "29512 --mixed_precision no --dynamo_backend no fasttt/train.py RECIPE.toml` on each "
            "of the 2 machines, with its own --machine_rank from 0 to 1 (0 on 10.0.0.7)"
            ) in message
    assert "--num_machines 1" not in message
    request = launch_request(["/usr/bin/accelerate", "launch", "--num_machines=3",
                              "--num_processes=4", "x.py"])
    assert "--num_machines 3 --num_processes 6 --machine_rank R --main_process_ip H " in \
        processes.one_process_advice(request, cpu_asked=False)
