"""Bad input never gives a traceback: recipes, betons, manifests and teacher caches, fuzzed.

Every damaged or mistyped input either loads correctly or is refused with ONE line, a
fasttt UserError saying what to do, and a refusal creates or changes no file. Hypothesis
runs derandomized (the same cases on every machine, no example database): 1,480 recipe
cases, 105 beton and beton-manifest cases, 130 teacher-cache cases, plus explicit cases
and three `python fasttt/train.py` subprocesses. Loaders are opened in a thread with a
timeout, so a damaged beton that hangs FFCV fails the test instead of blocking CI.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import RECIPE, ROOT, one_line_refusal, snapshot, tiny_recipe, write_image_folder
from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beton_builders.__main__ import main as build_betons
from fasttt.betons import read_manifest
from fasttt.cache import CACHE_ARRAYS, CacheSpec, array_specs, build_cache, cache_spec, open_arrays
from fasttt.checkpoint import save_weights
from fasttt.data import sequential_loader, split_loader, train_loader
from fasttt.errors import UserError, exit_on_user_error
from fasttt.recipe import SECTIONS, load_recipe
from fasttt.teachers import OnlineTeacher, view_schedule
from fasttt.train import main as train

VALID = tomllib.loads(RECIPE.read_text())
KEYS = sorted({f.name for make in SECTIONS.values() for f in dataclasses.fields(make())})


def fuzz(examples: int):
    """Hypothesis settings for CI: a fixed number of reproducible cases, no deadline."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def within(seconds: float, call):
    """`call()` in a thread: its result, or its exception re-raised; a hang fails the test."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as err:  # re-raised in the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"hung for {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def fresh(path: Path) -> Path:
    """An empty directory at `path`, whatever was there."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------- recipes

def toml_string(text: str) -> str:
    """A TOML basic string: JSON escapes are TOML's, but for a raw DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value) -> str:
    """Any value the strategies make, as TOML (ints of any size, nan and inf included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    return repr(value)


def toml_text(tables: dict) -> str:
    """Top-level keys first, then one [section] per table."""
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in tables.items()
             if not isinstance(v, dict)]
    for name, table in tables.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(name)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


HUGE = [2**63, 2**63 - 1, -2**63 - 1, 2**64, 10**30, -10**30, 2**31, 1e308, -1e308, 5e-324,
        float("nan"), float("inf"), float("-inf"), 0, -1, 0.0, -0.0]
WEIRD = ["", " ", ".", "..", "a/b", "x\x00y", "line\nbreak", "\u2028", "\x7f", "ünï", "🙂",
         "../../etc", "fp8", "step"]
VALUES = st.one_of(
    st.sampled_from(HUGE), st.sampled_from(WEIRD), st.booleans(),
    st.integers(-2**70, 2**70), st.integers(-3, 300), st.floats(), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-2, 2**64), st.floats(), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
KNOWN = [(s, f.name) for s, make in SECTIONS.items() for f in dataclasses.fields(make())]
# Mostly real keys, so values reach the type and range checks; sometimes a key of another
# section or a typo; rarely an unknown section.
PLACES = st.sampled_from(["known"] * 8 + ["typo", "section"]).flatmap(lambda kind: {
    "known": st.sampled_from(KNOWN),
    "typo": st.tuples(st.sampled_from(list(SECTIONS)),
                      st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8))),
    "section": st.tuples(st.sampled_from(["runn", "Data", "", "a\nb", "base"]),
                         st.sampled_from(KEYS)),
}[kind])


def sane(recipe) -> None:
    """A recipe that loaded holds only values every later stage can take."""
    for section in dataclasses.fields(recipe):
        for key, value in dataclasses.asdict(getattr(recipe, section.name)).items():
            for item in value if isinstance(value, tuple) else (value,):
                assert not isinstance(item, float) or math.isfinite(item), (key, item)
                assert not isinstance(item, int) or -2**63 <= item < 2**63, (key, item)
                assert not isinstance(item, str) or "\x00" not in item, (key, item)


def loads_sanely_or_refuses(path: Path, overrides: list[str] = ()):
    """load_recipe's outcome: (a sane recipe that round-trips, None) or (None, the one line)."""
    before = snapshot(path.parent)
    try:
        recipe = load_recipe(path, overrides)
    except UserError as err:
        message = str(err)
        assert message.isprintable(), message
        assert snapshot(path.parent) == before
        return None, message
    sane(recipe)
    out = path.parent / "resolved" / "recipe.toml"
    out.parent.mkdir(exist_ok=True)
    recipe.write(out)
    assert load_recipe(out) == recipe
    return recipe, None


@fuzz(700)
@given(changes=st.lists(st.tuples(PLACES, VALUES).map(lambda p: (*p[0], p[1])), min_size=1,
                       max_size=2))
def test_mistyped_recipe_keys_load_sanely_or_name_file_and_key(tmp_path_factory, changes):
    path = fresh(tmp_path_factory.getbasetemp() / "keys") / "r.toml"
    tables = copy.deepcopy(VALID)
    for section, key, value in changes:
        if not isinstance(tables.get(section), dict):
            tables[section] = {}
        tables[section][key] = value
    path.write_text(toml_text(tables))
    recipe, message = loads_sanely_or_refuses(path)
    if recipe is not None:  # every value given is the value read
        for section, key, value in changes:
            wanted = tables[section][key]
            assert getattr(getattr(recipe, section), key) == (
                tuple(wanted) if isinstance(wanted, list) else wanted), (section, key, value)
        return
    assert message.startswith(f"{path}: "), message
    named = [r"unknown section \[" for s, _, _ in changes if s not in SECTIONS]
    named += [rf"(unknown key )?{re.escape(s)}\.\S+ " for s, _, _ in changes if s in SECTIONS]
    named += ["base must be a string"]
    assert any(re.match(re.escape(f"{path}: ") + pattern, message) for pattern in named), message


VALID_BYTES = RECIPE.read_bytes()
INSERTS = st.one_of(st.binary(max_size=6), st.text(max_size=6).map(str.encode),
                    st.sampled_from([b"[", b"]", b"=", b'"', b"\n", b"[run]", b"9" * 30, b"nan"]))
EDITS = st.lists(st.tuples(st.integers(0, len(VALID_BYTES)), st.integers(0, 8), INSERTS),
                 min_size=1, max_size=4)


@fuzz(300)
@given(raw=st.one_of(st.binary(max_size=200), EDITS, st.sampled_from([
    b"", b"\xff\xfe\x00", b"[run]\nname = '\xc3\x28'", b"a = " + b"[" * 5000 + b"]" * 5000,
    b"x = {" * 3000, b"[run]\nseed = 1\n[run]\nseed = 2", b"[schedule]\nepochs = 1_000_000_0"])))
def test_raw_recipe_bytes_load_sanely_or_are_one_line(tmp_path_factory, raw):
    path = fresh(tmp_path_factory.getbasetemp() / "raw") / "r.toml"
    if isinstance(raw, list):  # edits of the real recipe: delete some bytes, insert others
        data = bytearray(VALID_BYTES)
        for at, delete, insert in raw:
            data[at:at + delete] = insert
        raw = bytes(data)
    path.write_bytes(raw)
    _, message = loads_sanely_or_refuses(path)
    assert message is None or message.startswith(f"{path}: ")


LINKS = st.lists(st.one_of(st.none(), st.integers(0, 4),
                           st.sampled_from(["missing", "dir", "number", "nul", "empty"])),
                 min_size=1, max_size=5)


@fuzz(180)
@given(links=LINKS)
def test_base_chains_cycles_and_missing_bases_are_one_line(tmp_path_factory, links):
    folder = fresh(tmp_path_factory.getbasetemp() / "bases")
    (folder / "adir").mkdir()
    texts = {"missing": '"gone.toml"', "dir": '"adir"', "number": "3",
             "nul": '"a\\u0000b.toml"', "empty": '""'}
    for i, link in enumerate(links):
        target = (f'"f{link}.toml"' if link < len(links) else '"gone.toml"') \
            if isinstance(link, int) else texts.get(link)
        base = f"base = {target}\n" if target else ""
        (folder / f"f{i}.toml").write_text(f"{base}[run]\nseed = {i}\n")
    _, message = loads_sanely_or_refuses(folder / "f0.toml")
    seen, at = [], 0
    while isinstance(at, int) and at < len(links) and at not in seen:
        seen.append(at)
        at = links[at]
    if at is None:
        assert message is None and load_recipe(folder / "f0.toml").run.seed == 0
        return
    expected = {"dir": "cannot read", "number": "base must be", "nul": "base must be",
                "empty": "base must be"}.get(at, "no such recipe file")
    if isinstance(at, int) and at < len(links):
        expected = "form a cycle"
    assert message is not None and expected in message and str(folder) in message, message


def test_a_base_chain_deeper_than_the_limit_is_one_line(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}.toml").write_text(f'base = "f{i + 1}.toml"\n' if i < 39 else "")
    one_line_refusal(lambda: load_recipe(tmp_path / "f0.toml"), "more than 32 base recipes")
    assert load_recipe(tmp_path / "f30.toml").run.seed == 0


OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0", "1e308", "nan", "-inf", "9" * 40, "[1, 2", "'x'",
                     '"\\u0000"', "\udcff", "[" * 3000, "true", "{a = 1}", "", "1979-05-27",
                     "x\ny", "0x7fffffffffffffff1", '"../.."']),
    st.text(max_size=10), st.integers().map(str), st.floats().map(repr))
OVERRIDES = st.lists(st.sampled_from(["structured"] * 6 + ["text"]).flatmap(
    lambda kind: st.text(max_size=20) if kind == "text" else
    st.builds(lambda place, value: f"{place[0]}.{place[1]}={value}", PLACES, OVERRIDE_VALUES)),
    min_size=1, max_size=2)


@fuzz(300)
@given(overrides=OVERRIDES)
def test_set_overrides_load_sanely_or_are_one_line(tmp_path_factory, overrides):
    path = fresh(tmp_path_factory.getbasetemp() / "set") / "r.toml"
    path.write_bytes(VALID_BYTES)
    _, message = loads_sanely_or_refuses(path, overrides)
    assert message is None or message.startswith((f"{path} (with --set): ", "--set ")), message


def test_huge_values_that_would_fail_later_are_refused_up_front(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(VALID_BYTES)
    for override, key in [("schedule.epochs=1000000000000000000000000000000", "schedule.epochs"),
                          ("schedule.epochs=1000000", "schedule.epochs"),
                          ("optim.lr=1e308", "optim.lr"), ("run.seed=9223372036854775808",
                                                           "run.seed"),
                          ("run.seed=-1", "run.seed"), ("cache.views=10000000", "cache.views"),
                          ("data.canvas_size=1000000", "data.canvas_size"),
                          ("augment.mean=[nan, 0, 0]", "augment.mean"),
                          ("generations.temperature=1e-300", "generations.temperature"),
                          ("run.name=..", "run.name"), ('run.name="a\\u0000"', "run.name"),
                          ("run.name=\udcff", "run.name")]:
        one_line_refusal(lambda o=override: load_recipe(path, [o]), f"{path} (with --set): {key} ")


def test_train_cli_prints_one_line_and_exits_2_on_bad_recipes_and_arguments(tmp_path, capsys):
    # One case as a user's process, so that nothing else (an import's warning, a traceback)
    # reaches stderr; the others through exit_on_user_error in this process, as
    # `python fasttt/train.py` calls main (seconds of torch and FFCV imports saved each).
    (tmp_path / "binary.toml").write_bytes(b"[run]\nname = '\xff\xfe'\n")
    runs = tmp_path / "runs"
    cases = {"not UTF-8": [str(tmp_path / "binary.toml")],
             "unknown key run.'na\\nme'": [str(RECIPE), "--set", "run.na\nme=1"],
             "unrecognized arguments: --bogus (usage: fasttt/train.py RECIPE.toml":
                 [str(RECIPE), "--bogus"]}
    for n, (expected, args) in enumerate(cases.items()):
        args = [*args, "--runs-dir", str(runs)]
        if n == 0:
            child = subprocess.run([sys.executable, str(ROOT / "fasttt" / "train.py"), *args],
                                   capture_output=True, text=True, cwd=tmp_path, timeout=300,
                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            status, err = child.returncode, child.stderr
        else:
            with pytest.raises(SystemExit) as stop:
                exit_on_user_error(lambda args=args: train(args))
            status, err = stop.value.code, capsys.readouterr().err
        assert status == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert expected in err and "Traceback" not in err, err
    assert not runs.exists()


# ---------------------------------------------------------------------------- betons

@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Where the fuzzed tests damage their copies of the shared digits betons."""
    return tmp_path_factory.mktemp("damaged_betons")


def val_copy(digits: Path, work: Path) -> Path:
    """A beton directory holding the digits manifest and val split only."""
    fresh(work)
    for name in ("manifest.json", "val.beton"):
        shutil.copy2(digits / name, work / name)
    return work


def read_val(beton_dir: Path) -> np.ndarray:
    """Every val sample's index, in order, through a real FFCV loader."""
    loader = sequential_loader(beton_dir, split="val", batch_size=360, num_workers=1)
    batches = [(b.index.numpy().copy(), b.label.numpy().copy(), tuple(b.image.shape))
               for b in loader]
    assert all(shape[1:] == (3, 32, 32) for _, _, shape in batches)
    assert all(((labels >= 0) & (labels < 10)).all() for _, labels, _ in batches)
    return np.concatenate([index for index, _, _ in batches])


def refused_without_writes(beton_dir: Path, *needles: str) -> None:
    """Opening the val loader is refused in one line, and nothing under beton_dir changes."""
    before = snapshot(beton_dir)
    within(60, lambda: one_line_refusal(lambda: read_val(beton_dir), *needles))
    assert snapshot(beton_dir) == before


def beton_offset(beton: Path, region: int, where: float) -> int:
    """A byte offset in one region FFCV follows (header, field types and names, metadata,
    allocation table) or, region 4, anywhere; `where` in [0, 1) picks it in the region."""
    header = np.fromfile(beton, HeaderType, count=1)[0]
    fields, samples = int(header["num_fields"]), int(header["num_samples"])
    metadata = HeaderType.itemsize + fields * FieldDescType.itemsize
    table = int(header["alloc_table_ptr"])
    starts = [0, 0, metadata, table, 0]
    sizes = [HeaderType.itemsize, fields * 17, samples * 32, samples * ALLOC_TABLE_TYPE.itemsize,
             beton.stat().st_size]
    at = starts[region] + int(sizes[region] * where)
    if region == 1:  # the type id and name at the start of each field descriptor
        at = HeaderType.itemsize + (at // 17) * FieldDescType.itemsize + at % 17
    return at


@fuzz(25)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_betons_are_always_refused(digits, scratch, fraction):
    work = val_copy(digits, scratch / "truncated")
    data = (work / "val.beton").read_bytes()
    (work / "val.beton").write_bytes(data[:int(len(data) * fraction)])
    refused_without_writes(work, str(work / "val.beton"), "rebuild it with `python -m "
                           f"beton_builders digits {work} --force`")


@fuzz(30)
@given(flips=st.lists(st.tuples(st.integers(0, 4), st.floats(0, 1, exclude_max=True),
                                st.integers(0, 7)), min_size=1, max_size=3))
def test_bit_flipped_betons_read_every_sample_or_are_refused(digits, scratch, flips):
    work = val_copy(digits, scratch / "flipped")
    beton = work / "val.beton"
    data = bytearray(beton.read_bytes())
    for region, where, bit in flips:
        data[beton_offset(beton, region, where)] ^= 1 << bit
    beton.write_bytes(data)
    before = snapshot(work)
    try:
        index = within(60, lambda: read_val(work))
    except UserError as err:
        assert str(err).isprintable() and "rebuild it with" in str(err)
    else:  # the flips hit pixels or bytes FFCV never reads: every sample, once, in order
        assert np.array_equal(index, np.arange(360))
    assert snapshot(work) == before


def test_empty_missing_directory_and_swapped_betons_are_refused(digits, tmp_path):
    work = val_copy(digits, tmp_path / "w")
    (work / "val.beton").write_bytes(b"")
    refused_without_writes(work, "shorter than its header")
    (work / "val.beton").unlink()
    refused_without_writes(work, "val.beton is missing or not a file")
    (work / "val.beton").mkdir()
    refused_without_writes(work, "val.beton is missing or not a file")
    (work / "val.beton").rmdir()
    shutil.copy2(digits / "train.beton", work / "val.beton")
    refused_without_writes(work, "it holds 1437 samples, manifest.json says 360")
    train = val_copy(digits, tmp_path / "t")
    shutil.copy2(digits / "val.beton", train / "train.beton")
    manifest = json.loads((digits / "manifest.json").read_text())
    manifest["splits"]["train"]["count"] = 1437
    (train / "manifest.json").write_text(json.dumps(manifest))
    one_line_refusal(lambda: train_loader(train, batch_size=8, seed=0, num_workers=1),
            "holds 360 samples, manifest.json says 1437")


MANIFEST_PATHS = [(), ("splits",), ("splits", "val"), ("splits", "val", "count"),
                  ("splits", "val", "file"), ("class_names",), ("class_names", 3),
                  ("image_policy",), ("image_policy", "kind"), ("image_policy", "height"),
                  ("image_policy", "width"), ("source",), ("source", "name"), ("format",)]
JSON_VALUES = st.one_of(
    st.sampled_from([None, True, False, -1, 0, 359, 361, 2**64, 1.5, float("nan"), "x", "",
                     "../val.beton", "/etc/passwd", "val.beton\x00", "train.beton", [], {},
                     ["a"], "photo", 31, 10**30]),
    st.integers(), st.text(max_size=6))


def mutated(manifest: dict, path: tuple, value, delete: bool):
    """`manifest` with the entry at `path` replaced by `value` or deleted."""
    if not path:
        return value
    out = copy.deepcopy(manifest)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


@fuzz(50)
@given(change=st.one_of(
    st.tuples(st.just("set"), st.sampled_from(MANIFEST_PATHS), JSON_VALUES, st.booleans()),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("bytes"), st.sampled_from([b"\xff\xfe{", b"[" * 100000, b"null", b""]))))
def test_damaged_manifests_are_refused_or_still_read_exactly(digits, scratch, change):
    work = val_copy(digits, scratch / "manifests")
    original = json.loads((work / "manifest.json").read_text())
    if change[0] == "set":
        _, path, value, delete = change
        text = json.dumps(mutated(original, path, value, delete and bool(path)))
    elif change[0] == "truncate":
        text = (work / "manifest.json").read_text()
        text = text[:int(len(text) * change[1])]
    (work / "manifest.json").write_bytes(change[1] if change[0] == "bytes" else text.encode())
    before = snapshot(work)
    try:
        manifest = read_manifest(work)
        loader = within(60, lambda: sequential_loader(work, split="val", batch_size=360,
                                                      num_workers=1))
    except UserError as err:
        message = str(err)
        assert message.isprintable() and str(work) in message, message
        assert "rebuild" in message or "no 'val' split" in message, message
    else:  # the beton passed the same checks as the intact one: it reads like it
        assert manifest["splits"]["val"]["count"] == 360 and len(loader) == 1
    assert snapshot(work) == before


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A raw-pixel photo beton of mixed sizes (40x60 ... 64x32)."""
    root = tmp_path_factory.mktemp("photos")
    write_image_folder(root / "tree", corrupt=False)
    build_betons(["imagefolder", str(root / "tree"), str(root / "raw"), "--write-mode", "raw",
                  "--num-workers", "1"])
    return root / "raw"


def test_photo_betons_with_lying_sizes_are_refused(photos, tmp_path):
    def refused_unchanged(work, needle):
        before = snapshot(work)
        one_line_refusal(lambda: sequential_loader(work, split="train", batch_size=4, num_workers=1,
                                          canvas_size=64), needle)
        assert snapshot(work) == before

    work = tmp_path / "raw"
    shutil.copytree(photos, work)
    beton = work / "train.beton"
    header = np.fromfile(beton, HeaderType, count=1)[0]
    width_at = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize + 1
    data = bytearray(beton.read_bytes())
    data[width_at] ^= 1  # sample 0 claims 61 columns: FFCV would read past its pixels
    beton.write_bytes(data)
    refused_unchanged(work, "raw image's size does not match its width and height")
    shutil.copy2(photos / "train.beton", beton)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["image_policy"]["max_resolution"] = 48
    (work / "manifest.json").write_text(json.dumps(manifest))
    refused_unchanged(work, "larger than the manifest's max_resolution")


def rebuild_advised(message: str) -> None:
    """Run the beton build a refusal advises (`python -m beton_builders ...`), in-process."""
    command = shlex.split(message.split("`")[1])
    assert command[:3] == ["python", "-m", "beton_builders"], message
    build_betons(command[3:])


def test_the_advice_for_a_damaged_digits_beton_rebuilds_it(digits, tmp_path):
    work = val_copy(digits, tmp_path / "work")
    (work / "val.beton").write_bytes((work / "val.beton").read_bytes()[:5000])
    rebuild_advised(one_line_refusal(lambda: read_val(work), "val.beton is damaged"))
    assert np.array_equal(read_val(work), np.arange(360))
    (work / "val.beton").unlink()
    rebuild_advised(one_line_refusal(lambda: read_val(work), "val.beton is missing"))
    assert (work / "val.beton").read_bytes() == (digits / "val.beton").read_bytes()


def test_the_advice_for_a_damaged_photo_beton_rebuilds_it_as_it_was(photos, tmp_path):
    work = tmp_path / "raw"
    shutil.copytree(photos, work)
    (work / "train.beton").write_bytes((work / "train.beton").read_bytes()[:3000])
    message = one_line_refusal(
        lambda: sequential_loader(work, split="train", batch_size=4, num_workers=1,
                                  canvas_size=64), "train.beton is damaged", "--write-mode raw")
    rebuild_advised(message)
    assert read_manifest(work)["image_policy"] == read_manifest(photos)["image_policy"]
    assert len(sequential_loader(work, split="train", batch_size=4, num_workers=1,
                                 canvas_size=64)) > 0


# ---------------------------------------------------------------------- teacher cache

@pytest.fixture(scope="module")
def cache(digits, tmp_path_factory):
    """A real 2-view, top-4, float16 cache of a linear teacher: (cache dir, its CacheSpec)."""
    root = tmp_path_factory.mktemp("cache")
    recipe = tiny_recipe(digits, **{"data.train_limit": 64, "schedule.epochs": 2,
                                    "cache.views": 2, "cache.top_k": 4, "cache.batch_size": 32})
    views = view_schedule(recipe.run.seed, 1, 2, recipe.augment, recipe.cache)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    save_weights(model, root / "teacher.safetensors")
    wanted = cache_spec(root / "teacher.safetensors", read_manifest(digits), 64, views,
                        recipe.cache, 10, recipe.generations.temperature)
    accelerator = Accelerator(cpu=True)
    teacher = OnlineTeacher(model, views, wanted.top_k, wanted.temperature)
    loader = split_loader(recipe.data, accelerator, "train", recipe.cache.batch_size, limit=64)
    build_cache(root / "cache", teacher, wanted, loader, accelerator)
    assert set(CACHE_KEYS) == {*wanted.manifest(), "complete"}  # the fuzzing covers every key
    assert {n: a.shape for n, a in open_arrays(root / "cache", wanted).items()} == {
        "values": (2, 64, 4), "ids": (2, 64, 4), "log_partition": (2, 64, 1)}
    return root / "cache", wanted


def opens_exactly_or_refuses(cache_dir: Path, wanted: CacheSpec) -> str | None:
    """open_arrays' outcome: None when every array has its exact spec, else the one line."""
    before = snapshot(cache_dir)
    try:
        arrays = open_arrays(cache_dir, wanted)
    except UserError as err:
        message = str(err)
        assert message.isprintable() and str(cache_dir) in message, message
        assert "delete" in message and "rebuild" in message, message
        assert snapshot(cache_dir) == before
        return message
    specs = array_specs(wanted.manifest())
    assert {n: (a.shape, a.dtype) for n, a in arrays.items()} == specs
    return None


ARRAY_DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.integers(0, 127), st.integers(0, 7)),
    st.tuples(st.just("retype"), st.sampled_from(["float64", "int16", ">f2", "uint8", "<f4"])),
    st.tuples(st.just("reshape"), st.integers(-1, 1)),
    st.tuples(st.sampled_from(["missing", "directory"])))


@fuzz(70)
@given(name=st.sampled_from(CACHE_ARRAYS), damage=ARRAY_DAMAGE)
def test_damaged_cache_arrays_are_refused(cache, name, damage):
    source, wanted = cache
    work = source.parent / "damaged"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    path = work / f"{name}.npy"
    original = np.load(path)
    if damage[0] == "truncate":
        path.write_bytes(path.read_bytes()[:int(path.stat().st_size * damage[1])])
    elif damage[0] == "flip":
        data = bytearray(path.read_bytes())
        data[damage[1]] ^= 1 << damage[2]
        path.write_bytes(data)
    elif damage[0] == "retype":
        np.save(path, original.astype(damage[1]))
    elif damage[0] == "reshape":
        np.save(path, np.zeros((original.shape[0] + damage[1], *original.shape[1:]),
                               original.dtype) if damage[1] else original.reshape(-1))
    else:
        path.unlink()
        if damage[0] == "directory":
            path.mkdir()
    message = opens_exactly_or_refuses(work, wanted)
    intact = damage[0] == "flip" or damage[0] == "retype" and np.dtype(damage[1]) == original.dtype
    if not intact:  # a flip may hit the header's padding, a retype may keep the dtype
        assert message is not None and f"{name}.npy" in message, message


CACHE_KEYS = ["complete", "teacher_sha256", "beton_sha256", "augment_sha256", "samples",
              "classes", "views", "stored_views", "teacher_view", "top_k", "dtype",
              "temperatures", "holdout", "format_version"]


@fuzz(60)
@given(change=st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CACHE_KEYS), JSON_VALUES, st.booleans()),
    st.tuples(st.just("set"), st.just("teacher_sha256"), st.just("0" * 64), st.just(False)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("bytes"), st.sampled_from([b"\xff{", b"[" * 100000, b"[]", b"7"]))))
def test_damaged_or_foreign_cache_manifests_are_refused(cache, change):
    source, wanted = cache
    work = source.parent / "foreign"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    path = work / "manifest.json"
    if change[0] == "set":
        _, key, value, delete = change
        path.write_text(json.dumps(mutated(json.loads(path.read_text()), (key,), value, delete)))
    elif change[0] == "truncate":
        path.write_bytes(path.read_bytes()[:int(path.stat().st_size * change[1])])
    else:
        path.write_bytes(change[1])
    message = opens_exactly_or_refuses(work, wanted)
    try:
        found = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        found = None
    if not isinstance(found, dict) or found.get("complete") is not True or any(
            found.get(k) != v for k, v in wanted.manifest().items()):
        assert message is not None
