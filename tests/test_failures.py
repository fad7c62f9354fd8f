"""Failures a cluster, a full disk and bit rot cause: never a hang, never damaged data used,
always one line whose advice works (each test follows the advice and reruns).

Disk-full cases run on a small tmpfs the test mounts (CI runs as root); where mounting is
not allowed they are skipped with the reason.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    RECIPE,
    ROOT,
    interrupt_at_evaluation,
    one_line_refusal,
    small_disk,
    snapshot,
    tiny_run_args,
    write_cifar_release,
    write_image_folder,
)
from ffcv.loader import epoch_iterator
from rich.console import Console

import beton_builders.imagefolder as imagefolder
import fasttt.errors as errors
from beton_builders.__main__ import main as build_betons
from fasttt.cache import main as cache_cli
from fasttt.data import sequential_loader
from fasttt.errors import exit_on_user_error
from fasttt.report import main as report_cli
from fasttt.report import write_report
from fasttt.rundir import lock_run_dir
from fasttt.train import main as train

NAME = "digits_d06"


def advised_paths(message: str) -> list[Path]:
    """The paths a refusal says to delete ("delete A B and rerun ...")."""
    words = message.split("delete ", 1)[1].split(" and rerun", 1)[0].split()
    return [Path(w) for w in words]


def follow_delete_advice(message: str) -> None:
    """Do what a refusal advises: delete what it names (then the caller reruns)."""
    for path in advised_paths(message):
        assert path.exists(), (path, message)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------- hangs


def test_leaving_an_epoch_whose_reader_has_finished_returns_at_once(digits):
    loader = sequential_loader(digits, split="val", batch_size=64, num_workers=1)
    outcome = []

    def consume():
        try:
            for _ in loader:
                time.sleep(1)  # the reader queues the rest and waits to say "done"
                raise ValueError("a failing step")
        except ValueError:
            outcome.append("raised")

    worker = threading.Thread(target=consume, daemon=True)
    start = time.perf_counter()
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the loader's reader thread was left waiting forever"
    assert outcome == ["raised"] and time.perf_counter() - start < 10


@pytest.mark.parametrize("overrides,needles", [
    ({"generations.k": 11}, ("generations.k = 11 exceeds the 10 classes",
                             "set generations.k to at most 10")),
])
def test_a_recipe_that_cannot_fit_the_data_is_refused_before_anything_is_written(
        digits, tmp_path, overrides, needles):
    one_line_refusal(lambda: train(tiny_run_args(digits, tmp_path / "runs", **overrides)), *needles)
    assert not (tmp_path / "runs").exists()
    train(tiny_run_args(digits, tmp_path / "runs", **{"generations.k": 10}))  # the advice works


def test_pad_crop_on_photos_is_refused_before_anything_is_written(tmp_path):
    write_image_folder(tmp_path / "src", corrupt=False)
    build_betons(["imagefolder", str(tmp_path / "src"), str(tmp_path / "photos"),
                  "--max-resolution", "64", "--num-workers", "1"])
    args = tiny_run_args(tmp_path / "photos", tmp_path / "runs", **{
        "data.canvas_size": 64, "data.train_limit": 0, "optim.batch_size": 2,
        "generations.k": 2})
    one_line_refusal(lambda: train(args), 'augment.kind = "pad_crop" is for fixed-size images',
                     'set augment.kind = "resized_crop"')
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- damaged data


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory) -> Path:
    """A finished two-generation run (its betons a copy), to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(digits, root / "digits")
    train(tiny_run_args(root / "digits", root / "runs", **{"generations.students": 1}))
    return root


def copy_of(finished: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """(the run's command line, its run directory) of a private copy of `finished`."""
    root = tmp_path / "copy"
    shutil.copytree(finished, root)
    recipe = root / "runs" / NAME / "recipe.toml"  # it names its betons: the copy's
    recipe.write_text(recipe.read_text().replace(str(finished / "digits"), str(root / "digits")))
    return (tiny_run_args(root / "digits", root / "runs", **{"generations.students": 1}),
            root / "runs" / NAME)


def flip_low_bits(path: Path, every: int = 101, skip: int = 0) -> None:
    """Flip the lowest bit of every `every`-th byte after the first `skip` (bit rot)."""
    data = bytearray(path.read_bytes())
    for i in range(skip, len(data), every):
        data[i] ^= 1
    path.write_bytes(bytes(data))


def test_damaged_or_missing_final_weights_are_refused_and_the_advice_retrains(
        finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    good = (run / "gen1" / "last.safetensors").read_bytes()
    flip_low_bits(run / "gen0" / "last.safetensors", skip=1024)
    message = one_line_refusal(lambda: train(args), "gen0/last.safetensors is damaged",
                               "rerun the same command")
    assert advised_paths(message) == [run / "gen0", run / "gen1"]
    follow_delete_advice(message)
    train(args)
    # Retrained bit for bit on the CPU: the later generation comes back the same.
    assert (run / "gen1" / "last.safetensors").read_bytes() == good
    (run / "gen1" / "last.safetensors").unlink()
    message = one_line_refusal(lambda: train(args), "gen1/last.safetensors is missing")
    follow_delete_advice(message)
    train(args)
    (run / "gen1" / "eval.json").write_text('{"best": {"epoch"')
    message = one_line_refusal(lambda: train(args), "gen1/eval.json is damaged")
    follow_delete_advice(message)
    train(args)
    assert (run / "gen1" / "last.safetensors").read_bytes() == good


def test_a_damaged_checkpoint_is_refused_and_the_advice_retrains(digits, tmp_path,
                                                                  monkeypatch):
    args = tiny_run_args(digits, tmp_path / "runs")
    interrupt_at_evaluation(monkeypatch, call=2)  # killed in epoch 2: ckpt-0001 remains
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.undo()
    ckpt = tmp_path / "runs" / NAME / "gen0" / "ckpt-0001"
    flip_low_bits(ckpt / "model.safetensors", skip=1024)
    message = one_line_refusal(lambda: train(args), "ckpt-0001/model.safetensors is damaged",
                               "trains again from its first epoch")
    follow_delete_advice(message)
    train(args)
    assert (tmp_path / "runs" / NAME / "gen0" / "eval.json").is_file()


def test_a_damaged_cache_is_refused_and_rebuilt_from_verified_weights(finished, tmp_path,
                                                                       monkeypatch):
    args, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "gen1")
    interrupt_at_evaluation(monkeypatch, call=2)  # gen1 killed in its second epoch
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.undo()
    values = np.load(run / "gen0" / "cache" / "values.npy", mmap_mode="r+")
    values[:] = values[..., ::-1].copy()  # the logits in reverse order: no longer the teacher's
    values.flush()
    del values
    message = one_line_refusal(lambda: train(args), "cache/values.npy is damaged (view 1 differs",
                               "from the teacher's verified weights")
    follow_delete_advice(message)
    train(args)
    assert (run / "gen1" / "eval.json").is_file()


# ---------------------------------------------------------------- divergence, report, lock


def test_divergence_stops_the_generation_before_anything_is_saved(digits, tmp_path):
    args = tiny_run_args(digits, tmp_path / "runs", **{"optim.lr": 1000})
    message = one_line_refusal(lambda: train(args), "gen0 diverged in epoch ",
                               "--set optim.lr=100", "run.name")
    epoch = int(message.split("diverged in epoch ")[1].split(":")[0])
    gen0 = tmp_path / "runs" / NAME / "gen0"
    assert not (gen0 / "eval.json").exists() and not (gen0 / f"ckpt-{epoch:04d}").exists()
    assert "non-finite" in message or "loss reached" in message


def test_the_report_refuses_betons_rebuilt_as_another_dataset(finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    betons = tmp_path / "copy" / "digits"
    release = write_cifar_release(tmp_path / "release", "cifar10", per_file=30)
    build_betons(["cifar10", str(release), str(betons), "--force"])
    one_line_refusal(lambda: write_report(run, None), "beton in", "changed since",
                     "restore the betons the run used")
    build_betons(["digits", str(betons), "--force"])  # restored: digits builds are exact
    assert write_report(run, Console(quiet=True)).is_file()


def test_the_cache_builder_takes_the_run_directory_lock(finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "gen0" / "cache")
    holder = lock_run_dir(run)
    cli = [str(RECIPE), "--generation", "0", *args[1:]]
    one_line_refusal(lambda: cache_cli(cli), "in use by another fasttt process")
    holder.close()
    cache_cli(cli)
    assert (run / "gen0" / "cache" / "manifest.json").is_file()


# ---------------------------------------------------------------- signals and full disks


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


def test_a_chain_of_signals_at_keyed_moments_never_hangs_and_ends_in_the_same_run(
        finished, tmp_path):
    args = tiny_run_args(finished / "digits", tmp_path / "runs", **{"generations.students": 1})
    moments = random.Random(15)
    sent = []
    while True:
        log = tmp_path / f"stdout{len(sent)}"
        with open(log, "w") as stdout:
            process = subprocess.Popen([sys.executable, str(ROOT / "fasttt" / "train.py"), *args],
                                       stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        while process.poll() is None and not log.stat().st_size:  # its imports are done
            time.sleep(0.05)
        time.sleep(moments.uniform(0, 4))
        if process.poll() is not None or len(sent) == 3:
            break
        signum = signal.SIGTERM if len(sent) == 1 else signal.SIGINT
        process.send_signal(signum)
        sent.append(signum)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"signal {len(sent)} ({signum.name}): still running after 30 s")
        assert process.returncode in (0, 128 + signum), (len(sent), stderr)
        if process.returncode:
            assert one_error_line(stderr) == "interrupted: rerun the same command to resume"
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert len(sent) == 3, sent  # the moments fell inside the run, not after it
    for m in (0, 1):  # interrupted anywhere, resumed: the same weights as a run left alone
        name = f"runs/{NAME}/gen{m}/last.safetensors"
        assert (tmp_path / name).read_bytes() == (finished / name).read_bytes()


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but for `leave` bytes; the filler's path (delete it to free the space)."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stats.f_bavail * stats.f_frsize - leave)
    return filler


def one_error_line(stderr: str) -> str:
    """The last line of stderr, which must be fasttt's one `error:` line."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_a_full_disk_while_checkpointing_names_the_file_and_a_rerun_finishes(digits, tmp_path,
                                                                            capsys):
    with small_disk(tmp_path / "disk", "16m") as disk:
        filler = fill(disk, leave=1_500_000)  # room for the weights, not the optimizer state
        args = tiny_run_args(digits, disk / "runs")
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(lambda: train(args))  # as the CLI runs it
        line = one_error_line(capsys.readouterr().err)
        assert stop.value.code == 2
        assert line.startswith("error: No space left on device: ") and "state.pt" in line, line
        assert "free space on that disk, then rerun the same command" in line
        filler.unlink()
        train(args)
        assert (disk / "runs" / NAME / "gen0" / "eval.json").is_file()


def test_a_full_disk_while_building_a_cache_is_one_line_not_a_bus_error(finished, tmp_path):
    with small_disk(tmp_path / "disk", "16m") as disk:
        shutil.copytree(finished / "runs" / NAME, disk / NAME)
        shutil.rmtree(disk / NAME / "gen0" / "cache")
        filler = fill(disk, leave=8192)
        command = [sys.executable, str(ROOT / "fasttt" / "cache.py"), str(RECIPE),
                   "--generation", "0", *tiny_run_args(finished / "digits", disk)[1:]]
        failed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert failed.returncode == 2, (failed.returncode, failed.stderr)  # not 135 (SIGBUS)
        line = one_error_line(failed.stderr)
        assert line.startswith("error: No space left on device: ") and ".npy" in line, line
        assert not (disk / NAME / "gen0" / "cache").exists()
        filler.unlink()
        cache_cli(command[2:])  # the same command, in this process
        assert (disk / NAME / "gen0" / "cache" / "manifest.json").is_file()


def test_a_full_disk_during_analysis_or_report_names_the_file_and_a_rerun_finishes(
        finished, tmp_path, capsys):
    def fails_on_a_full_disk_then_finishes(rerun, written: Path) -> None:
        def files() -> dict:
            return {p: v for p, v in snapshot(run).items() if not v[0]}

        written.unlink()
        kept = files()
        filler = fill(disk, leave=0)
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(rerun)  # as the CLI runs it
        line = one_error_line(capsys.readouterr().err)
        assert stop.value.code == 2
        assert line.startswith(f"error: No space left on device: {run}/"), line
        assert "free space on that disk, then rerun the same command" in line
        assert files() == kept  # nothing half written, nothing lost
        filler.unlink()
        rerun()
        assert written.is_file()

    with small_disk(tmp_path / "disk", "16m") as disk:
        run = disk / NAME
        shutil.copytree(finished / "runs" / NAME, run)
        (run / "gen1" / "second_class.npy").unlink()
        args = tiny_run_args(finished / "digits", disk, **{"generations.students": 1})
        fails_on_a_full_disk_then_finishes(lambda: train(args), run / "gen1" / "analysis.json")
        fails_on_a_full_disk_then_finishes(lambda: report_cli([str(run)]), run / "summary.md")


def test_a_damaged_cache_manifest_is_refused_and_the_advice_rebuilds_it(finished, tmp_path):
    args, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "gen1")
    manifest = run / "gen0" / "cache" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    message = one_line_refusal(lambda: train(args), "cache has no readable manifest.json",
                               "rerun the same command to rebuild it")
    follow_delete_advice(message)
    train(args)
    assert (run / "gen1" / "eval.json").is_file() and manifest.is_file()


# ---------------------------------------------------------------- several machines


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# torch's elastic launcher on machine 0 holds the store; when it leaves the launchers' exit
# barrier first, machine 1's launcher, still waiting there, has c10d print this warning
# with a DistNetworkError backtrace (from TCPStore::doWait), after every process of the
# run exited 0. It is the launchers' race, not the run's: the run's processes are gone.
STORE_GONE = "Connection was likely closed. Did the remote server shutdown or crash?"


def exited_cleanly(stderr: str, machine_rank: int) -> bool:
    """No abort, and no store error but the launchers' exit race on machine 1."""
    if "terminate called" in stderr:
        return False
    return "DistNetworkError" not in stderr or (
        machine_rank == 1 and STORE_GONE in stderr and "TCPStore::doWait" in stderr)


def test_two_machines_of_one_process_each_exit_cleanly_and_train_the_same_weights(digits, tmp_path):
    for attempt in range(2):  # the abort at exit came in 1 try of 4: repeat
        machines = []
        port = free_port()
        for rank in (0, 1):
            machines.append(subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 "--mixed_precision", "no", "--dynamo_backend", "no",
                 str(ROOT / "fasttt" / "train.py"),
                 *tiny_run_args(digits, tmp_path / f"runs{attempt}", **{"schedule.epochs": 1,
                                                                   "data.train_limit": 64})],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        results = [machine.communicate(timeout=300) for machine in machines]
        for rank, (machine, (_, stderr)) in enumerate(zip(machines, results, strict=True)):
            assert machine.returncode == 0, (attempt, rank, stderr[-2000:])
            assert exited_cleanly(stderr, rank), stderr[-3000:]
        assert (tmp_path / f"runs{attempt}" / NAME / "summary.md").is_file()
    # two processes give other numbers than one, but the same on every run
    weights = [(tmp_path / f"runs{attempt}" / NAME / "gen0" / "last.safetensors").read_bytes()
               for attempt in (0, 1)]
    assert weights[0] == weights[1]


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


def test_only_the_launchers_exit_race_passes_for_a_clean_exit():
    race = ("[W1201 04:25:01 socket.cpp:460] [c10d] wait failed\nframe #2: "
            "c10::DistNetworkError::DistNetworkError(...)\nframe #5: c10d::TCPStore::doWait("
            f"...)\n[W1201 04:25:01 TCPStore.cpp:106] recvValue failed: {STORE_GONE}\n")
    assert exited_cleanly("", 0) and exited_cleanly(race, 1)
    assert not exited_cleanly(race, 0)  # machine 0 holds the store: it never loses it
    assert not exited_cleanly("terminate called after throwing an instance of 'c10::"
                              "DistNetworkError'\n", 1)
    assert not exited_cleanly("c10::DistNetworkError: Connection reset by peer\n", 1)
