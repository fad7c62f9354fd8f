"""Untrusted files stay data: nothing fasttt reads can make it run code.

Each place fasttt reads a pickle-capable file gets payloads that DO run code under a
plain loader (each is run once that way and its marker file appears), and must refuse
them with one line, the marker never created and nothing written: a checkpoint's
state.pt (torch.load weights_only=True), weights (safetensors), teacher cache arrays
(np.load without pickles) and CIFAR release files (a restricted unpickler).
"""

from __future__ import annotations

import builtins
import importlib
import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_refusal, snapshot, write_cifar_release
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from beton_builders.__main__ import main as build_betons
from fasttt.betons import read_manifest
from fasttt.cache import CacheSpec, array_specs, open_arrays, seal_manifest
from fasttt.checkpoint import load_checkpoint, load_weights, save_checkpoint
from fasttt.errors import UserError
from fasttt.files import sha256_file, write_json


class Call:
    """Pickles as `function(*args)`: what a malicious file makes a plain unpickler run."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __call__(self, *args):  # pickle wants a callable; the unpickled result is called
        raise AssertionError("never called while pickling")

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict:
    """name -> object whose unpickling writes `marker`, by several routes."""
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Call(os.system, f"touch {marker}"),
        "subprocess.call": Call(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": Call(builtins.eval, touch),
        "builtins.exec": Call(builtins.exec, touch),
        "importlib+getattr": Call(Call(getattr, Call(importlib.import_module, "os"), "system"),
                                  f"touch {marker}"),
        "numpy.savetxt": Call(np.savetxt, str(marker), [1.0]),
        "object array": np.array([Call(os.system, f"touch {marker}")], dtype=object),
    }


def raw_pickles(marker: Path) -> dict:
    """Hand-made pickles: GLOBAL/INST opcodes with odd names, extensions, persistent ids."""
    def short(text: str) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(text)]) + text.encode()

    touch = f"touch {marker}".encode()
    command = b"(S'" + touch + b"'\ntR."
    return {
        "GLOBAL posix.system": b"cposix\nsystem\n" + command,
        "INST os.system": b"(S'" + touch + b"'\nios\nsystem\n.",
        "dotted name": b"cnumpy._core.multiarray\n_reconstruct.__globals__\n.",
        "trailing space": b"cnumpy \nndarray\n.",
        "relative module": b"c.numpy\nndarray\n.",
        "empty names": b"c\n\n.",
        "terminal escapes": b"c\x1b]0;owned\x07os\nsystem\n.",
        "numpy.load": b"cnumpy\nload\n(S'x.npy'\ntR.",
        "numpy.testing": b"cnumpy.testing\nassert_\n.",
        "STACK_GLOBAL dotted": b"\x80\x04" + short("numpy._core.multiarray")
        + short("_reconstruct.__globals__") + b"\x93.",
        "STACK_GLOBAL non-str": b"\x80\x04K\x01K\x02\x93.",
        "extension code": b"\x80\x02\x82\x01.",
        "persistent id": b"\x80\x02P1\n.",
        "truncated": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)[:-40],
        "huge length": b"\x80\x02B\xff\xff\xff\x7fabc",
    }


def runs_under_a_plain_loader(obj, marker: Path) -> None:
    """Prove a payload real: a plain unpickler runs it and the marker appears."""
    pickle.loads(pickle.dumps(obj, protocol=2))
    assert marker.exists()
    marker.unlink()


# ------------------------------------------------------------------------ CIFAR files

@pytest.mark.parametrize("victim", ["data_batch_2", "batches.meta"])
def test_cifar_pickles_that_run_code_are_refused(tmp_path, victim):
    marker = tmp_path / "pwned"
    release = write_cifar_release(tmp_path / "src", "cifar10", per_file=4)
    attempts = {name: pickle.dumps(obj, protocol=2) for name, obj in payloads(marker).items()}
    for obj in payloads(marker).values():
        runs_under_a_plain_loader(obj, marker)
    attempts |= raw_pickles(marker)
    for name in ("GLOBAL posix.system", "INST os.system"):
        pickle.loads(attempts[name])
        assert marker.exists()
        marker.unlink()
    for name, payload in attempts.items():
        (release / victim).write_bytes(payload)
        before = snapshot(tmp_path)
        message = one_line_refusal(
            lambda: build_betons(["cifar10", str(release), str(tmp_path / "out")]),
            f"refusing {release / victim}")
        assert not marker.exists(), name
        assert not (tmp_path / "out").exists(), name
        after = {k: v for k, v in snapshot(tmp_path).items() if k != ".out.lock"}
        assert after == {k: v for k, v in before.items() if k != ".out.lock"}, name
        assert "not a plain CIFAR pickle" in message or "expected a dict" in message, message


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A tiny cifar-10-batches-py directory, two images a file."""
    return write_cifar_release(tmp_path_factory.mktemp("release"), "cifar10", per_file=2)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(damage=st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                  st.integers(0, 7)), min_size=1, max_size=3)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8))))
def test_damaged_cifar_pickles_build_or_are_one_line(release, damage):
    work = release.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(release, work / "src")
    victim = work / "src" / "data_batch_1"
    data = bytearray(victim.read_bytes())
    # Protocol 2 stores the pixels as a latin-1 string in UTF-8; offsets outside it change
    # the pickle's structure rather than an image.
    text = pickle.loads(bytes(data), encoding="bytes")[b"data"].tobytes().decode("latin-1")
    pixels, size = data.find(text.encode()), len(text.encode())
    assert pixels > 0
    structure = [*range(pixels), *range(pixels + size, len(data))]
    if damage[0] == "truncate":
        data = data[:int(len(data) * damage[1])]
    elif damage[0] == "flip":
        for where, bit in damage[1]:
            data[structure[int(len(structure) * where)]] ^= 1 << bit
    else:
        at = structure[min(int(len(structure) * damage[1]), len(structure) - 1)]
        data[at:at] = damage[2]
    victim.write_bytes(data)
    try:
        build_betons(["cifar10", str(work / "src"), str(work / "out")])
    except UserError as err:
        assert str(err).isprintable() and str(victim) in str(err), str(err)
        assert sorted(p.name for p in work.iterdir()) == [".out.lock", "src"]
    else:
        assert damage[0] != "truncate"
        assert read_manifest(work / "out")["splits"]["train"]["count"] == 10


def test_cifar_files_of_plain_data_but_wrong_shape_are_one_line(tmp_path):
    release = write_cifar_release(tmp_path / "src", "cifar100", per_file=4)
    cases = {
        ("train", b"fine_labels"): ([b"x"] * 4, "not a list of 4 integers"),
        ("train", b"coarse_labels"): ([25] * 4, "coarse_labels values lie outside 0..19"),
        ("test", b"data"): ([[1, 2], [3]], "expected uint8 (N, 3072)"),
        ("meta", b"fine_label_names"): ([b"\xff"] * 100, "not a list of UTF-8 names"),
        ("meta", b"coarse_label_names"): ("abc", "not a list of UTF-8 names"),
    }
    for (name, key), (value, needle) in cases.items():
        original = (release / name).read_bytes()
        batch = pickle.loads(original, encoding="bytes")
        (release / name).write_bytes(pickle.dumps({**batch, key: value}, protocol=2))
        one_line_refusal(lambda: build_betons(["cifar100", str(release), str(tmp_path / "out")]),
                         needle)
        assert not (tmp_path / "out").exists()
        (release / name).write_bytes(original)


# ------------------------------------------------------------------------ checkpoints

@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint of a small model after one SGD step: (gen dir, model, optimizer)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    gen = tmp_path / "gen0"
    gen.mkdir()
    save_checkpoint(gen, 3, model, optimizer, None, {"epoch": 3, "step": 9})
    assert load_checkpoint(gen, model, optimizer, None) == {"epoch": 3, "step": 9}
    return gen, model, optimizer


def torch_file(obj) -> bytes:
    """`obj` as torch.save writes it (a zip holding data.pkl)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def reseal(ckpt: Path) -> None:
    """Record the checkpoint's files' current checksums, as an attacker who edits it could."""
    state = json.loads((ckpt / "train_state.json").read_text())
    state["sha256"] = {name: sha256_file(ckpt / name) for name in state["sha256"]}
    (ckpt / "train_state.json").write_text(json.dumps(state))


def test_checkpoint_state_that_runs_code_is_refused(checkpoint, tmp_path):
    gen, model, optimizer = checkpoint
    marker = tmp_path / "pwned"
    state = gen / "ckpt-0003" / "state.pt"
    legit = torch.load(state, weights_only=True)
    for name, obj in payloads(marker).items():
        for layout, data in (("zip", torch_file({**legit, "optimizer": obj})),
                             ("legacy pickle", pickle.dumps({**legit, "cpu_rng": obj}, 2))):
            state.write_bytes(data)
            one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None),
                             f"{state} is damaged (its sha256 differs")
            reseal(state.parent)  # past the checksum, the weights-only loader still refuses
            if layout == "zip":  # a plain torch.load runs it
                torch.load(state, weights_only=False)
                assert marker.exists()
                marker.unlink()
            before = snapshot(gen)
            one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None),
                             f"refusing {state}: not plain tensor data (unsupported global ",
                             "delete")
            assert not marker.exists(), (name, layout)
            assert snapshot(gen) == before


def test_damaged_checkpoints_and_pointers_are_one_line(checkpoint, tmp_path):
    gen, model, optimizer = checkpoint
    ckpt = gen / "ckpt-0003"
    original = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(original[: len(original) // 2])
    one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None), "is damaged")
    reseal(ckpt)
    one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None), "refusing")
    (ckpt / "state.pt").write_bytes(torch_file({"optimizer": {"state": 3}}))
    reseal(ckpt)
    one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None),
                     "does not match this run's optimizer")
    (ckpt / "state.pt").write_bytes(original)
    reseal(ckpt)
    outside = tmp_path / "ckpt-0001"
    outside.mkdir()
    for pointer in (b'{"dir": "../ckpt-0001"}', b'{"dir": 7}', b'{"dir": "/etc"}', b"[1",
                    b'{"epoch": 3}', b"\xff", b"[" * 100000):
        (gen / "latest.json").write_bytes(pointer)
        one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None),
                         "latest.json or the checkpoint it names is damaged")
    write_json(gen / "latest.json", {"epoch": 3, "dir": "ckpt-0003"})
    (ckpt / "train_state.json").write_text("{")
    one_line_refusal(lambda: load_checkpoint(gen, model, optimizer, None), "is damaged")


def test_weights_that_are_pickles_or_another_model_are_refused(checkpoint, tmp_path):
    gen, model, _ = checkpoint
    marker = tmp_path / "pwned"
    weights = gen / "ckpt-0003" / "model.safetensors"
    for name, obj in payloads(marker).items():
        weights.write_bytes(torch_file({"weight": obj}))
        one_line_refusal(lambda: load_weights(model, weights), "not a readable safetensors")
        assert not marker.exists(), name
    header = json.dumps({"weight": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}})
    weights.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 4)
    one_line_refusal(lambda: load_weights(model, weights), "not a readable safetensors")
    weights.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    one_line_refusal(lambda: load_weights(model, weights), "not a readable safetensors")
    save_file({"weight": torch.zeros(2, 2)}, str(weights))
    one_line_refusal(lambda: load_weights(model, weights), "holds weights of another model")


# ------------------------------------------------------------------------ teacher cache

WANTED = CacheSpec(teacher_sha256="1" * 64, beton_sha256="2" * 64, augment_sha256="3" * 64,
                   samples=8, classes=10, views=2, stored_views=2, teacher_view="student",
                   top_k=3, dtype="float16", temperatures=(1.0,), holdout=0.0, temperature=1.0)


def test_cache_arrays_holding_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, (shape, dtype) in array_specs(WANTED.manifest()).items():
        np.lib.format.open_memmap(cache / f"{name}.npy", "w+", dtype, shape).flush()
    write_json(cache / "manifest.json", seal_manifest({**WANTED.manifest(), "complete": True}))
    assert open_arrays(cache, WANTED)["values"].shape == (2, 8, 3)
    evil = np.array([Call(os.system, f"touch {marker}")] * 48, dtype=object).reshape(2, 8, 3)
    for name in array_specs(WANTED.manifest()):
        original = (cache / f"{name}.npy").read_bytes()
        np.save(cache / f"{name}.npy", evil, allow_pickle=True)
        np.load(cache / f"{name}.npy", allow_pickle=True)  # a plain load runs it
        assert marker.exists()
        marker.unlink()
        before = snapshot(cache)
        one_line_refusal(lambda: open_arrays(cache, WANTED), f"{name}.npy is damaged",
                         "and rerun the same command to rebuild it")
        assert not marker.exists() and snapshot(cache) == before
        (cache / f"{name}.npy").write_bytes(original)
