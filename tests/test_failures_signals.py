"""Signals: SIGINT, SIGTERM and SIGHUP at any moment, the imports and FFCV's callbacks
included, never hang and print `interrupted: rerun the same command to resume`."""

from __future__ import annotations

import ctypes
import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, one_error_line, tiny_run_args
from ffcv.loader import epoch_iterator

import beton_builders.imagefolder as imagefolder
import fasttt.errors as errors
from fasttt.data import sequential_loader
from fasttt.errors import exit_on_user_error


def run_train(args: list[str], **kwargs) -> subprocess.Popen:
    """`python fasttt/train.py ...` as a user starts it, output piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "fasttt" / "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, **kwargs)


def test_a_signal_during_the_imports_stops_at_once_with_the_resume_line(digits, tmp_path):
    process = run_train(tiny_run_args(digits, tmp_path / "runs"))
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("SIGINT during the imports: still running after 30 s")
    assert process.returncode == 130, stderr
    assert one_error_line(stderr) == "interrupted: rerun the same command to resume"


def test_a_chain_of_signals_at_keyed_moments_never_hangs_and_each_rerun_goes_on(
        digits, tmp_path):
    # Each process is a rerun of the one signalled before it, running still at its moment.
    # That a resumed run ends with an uninterrupted run's results is tests/test_faults.py's
    # to check, end to end (SIGKILLs at seeded moments, every result compared): a signal
    # only unwinds the stack, and what is written is written whole.
    args = tiny_run_args(digits, tmp_path / "runs", **{"generations.students": 1})
    moments = random.Random(15)
    for sent, signum in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGINT), start=1):
        log = tmp_path / f"stdout{sent}"
        with open(log, "w") as stdout:
            # A crash as the process ends (one CI run: SIGSEGV after the resume line, not
            # reproduced in 200 runs since) then shows every thread's Python stack.
            process = subprocess.Popen([sys.executable, str(ROOT / "fasttt" / "train.py"), *args],
                                       stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                       env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        while process.poll() is None and not log.stat().st_size:  # its imports are done
            time.sleep(0.05)
        time.sleep(moments.uniform(0, 4))
        assert process.poll() is None, (sent, process.communicate()[1])  # inside the run
        process.send_signal(signum)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"signal {sent} ({signum.name}): still running after 30 s")
        assert process.returncode in (0, 128 + signum), (sent, stderr)
        if process.returncode:
            assert one_error_line(stderr) == "interrupted: rerun the same command to resume"


def test_a_signal_swallowed_by_a_callback_is_raised_at_the_next_batch(digits, monkeypatch,
                                                                      capsys):
    # numba prints an exception raised inside its callbacks as "ignored" and goes on: the
    # signal handler's record is what raises it again.
    monkeypatch.setattr(errors, "_signals_received", [])
    loader = sequential_loader(digits, split="val", batch_size=64, num_workers=1)
    batches = iter(loader)
    next(batches)
    errors._signals_received.append(signal.SIGTERM)  # as the handler records one
    with pytest.raises(errors.Interrupted):
        next(batches)
    with pytest.raises(SystemExit) as stop:  # a main that ends normally still stops with it
        exit_on_user_error(lambda: None)
    assert stop.value.code == 143
    assert capsys.readouterr().err.strip() == "interrupted: rerun the same command to resume"


def test_a_signal_inside_ffcvs_epoch_constructor_leaves_nothing_half_built(digits, monkeypatch,
                                                                           capsys):
    # Raised half way through FFCV's EpochIterator.__init__, the interrupt left an object
    # whose __del__ failed ("AttributeError: ... terminate_event") after the resume line.
    monkeypatch.setattr(errors, "_signals_received", [])
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    chunks = epoch_iterator.chunks

    def signal_mid_constructor(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return chunks(*args)

    monkeypatch.setattr(epoch_iterator, "chunks", signal_mid_constructor)
    loader = sequential_loader(digits, split="val", batch_size=64, num_workers=1)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(lambda: next(iter(loader)))
    code = stop.value.code
    del stop  # its exception's frames hold what the interrupt left behind
    gc.collect()
    assert code == 130 and not unraisable, [u.exc_value for u in unraisable]
    assert capsys.readouterr().err.strip() == "interrupted: rerun the same command to resume"


def test_a_signal_inside_a_c_callback_prints_only_the_resume_line(monkeypatch, capsys):
    # numba compiles through llvmlite's ctypes callbacks: a signal landing in one is printed
    # by Python as "Exception ignored ... Traceback", then raised again by fasttt.
    monkeypatch.setattr(errors, "_signals_received", [])
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, not pytest's
    callback = ctypes.CFUNCTYPE(None)(lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(callback)
    assert stop.value.code == 143
    assert capsys.readouterr().err.strip() == "interrupted: rerun the same command to resume"


@pytest.mark.skipif(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,
                    reason="started under nohup: a hangup is ignored, as it should be")
def test_a_hangup_stops_cleanly_with_the_resume_line(monkeypatch, capsys):
    # A closed terminal: a sweep must stop its points, a run must stop at an epoch's end.
    monkeypatch.setattr(errors, "_signals_received", [])

    def hang_up():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(10)

    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(hang_up)
    assert stop.value.code == 128 + signal.SIGHUP
    assert capsys.readouterr().err.strip() == "interrupted: rerun the same command to resume"


def _worker_sigterm_handler(path):
    """Stands in for probe_image: what a pool worker does on SIGTERM."""
    return signal.getsignal(signal.SIGTERM)


def test_pool_workers_leave_signals_to_their_parent(monkeypatch):
    # Inherited, fasttt's handler raised inside multiprocessing's queue lock when the pool
    # terminated its workers, and the parent waited forever (seen in a synthetic build).
    monkeypatch.setattr(imagefolder, "probe_image", _worker_sigterm_handler)
    found = []
    exit_on_user_error(lambda: found.extend(imagefolder.probe_all([(Path("x"), 0)], 1, "probe")))
    assert found == [signal.SIG_DFL]
