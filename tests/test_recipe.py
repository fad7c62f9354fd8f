"""Recipes: typed sections, one-line errors naming file and key, exact round trip."""

from __future__ import annotations

import dataclasses

import pytest

from fasttt.errors import UserError
from fasttt.recipe import Recipe, load_recipe

GOOD = """
[run]
name = "cifar100_r56_d06"
seed = 3
[optim]
lr = 1            # an integer where a float is expected is fine
[schedule]
epochs = 164
milestones = [82, 123]
[generations]
patriarch_loss = "tsd"
u = 0.6
lam = 0.6
"""


def write(tmp_path, text: str, name: str = "r.toml"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_a_recipe_reads_into_typed_frozen_sections(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.run.name == "cifar100_r56_d06" and recipe.run.seed == 3
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.schedule.milestones == (82, 123)
    assert recipe.cache == Recipe().cache  # absent sections take their defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.run.seed = 4


@pytest.mark.parametrize("text,key", [
    ("[run]\nnmae = 'x'", "unknown key run.nmae"),
    ("[runn]\nname = 'x'", "unknown section [runn]"),
    ("[optim]\nlr = 'fast'", "optim.lr must be number"),
    ("[run]\nseed = 1.5", "run.seed must be integer"),
    ("[run]\ncompile = 1", "run.compile must be true or false"),
    ("[run]\ncompile_mode = 'fast'", 'run.compile_mode must be "default" or "reduce-overhead" or'),
    ("[run]\nmixed_precision = 'fp8'", 'run.mixed_precision must be "no" or "bf16" or "fp16"'),
    ("[schedule]\nmilestones = [82, 'x']", "schedule.milestones must be a list of integers"),
    ("[generations]\nu = 0.0", "generations.u must be in (0, 1]"),
    ("[generations]\nu = 1.2", "generations.u must be in (0, 1]"),
    ("[generations]\nlam = -0.1", "generations.lam must be in [0, 1]"),
    ("[generations]\nk = 1", "generations.k must be >= 2"),
    ("[schedule]\nepochs = 0", "schedule.epochs must be >= 1"),
    ("[cache]\nviews = -1", "cache.views must be >= 0"),
    ("[schedule]\nepochs = 10\nmilestones = [20]", "schedule.milestones must lie in 1..epochs"),
    ("[run]\nname = 'x'\n[run]\nseed = 1", "invalid TOML"),
    ("run = 3", "[run] must be a table"),
])
def test_each_bad_recipe_is_one_line_naming_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(str(path)) and key in message and "\n" not in message


def test_unreadable_recipes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="not UTF-8"):
        load_recipe(write(tmp_path, b"[run]\nname = '\xff\xfe'"))


def test_round_trip_is_exact(tmp_path):
    # run.name must be a plain file name: model.name carries the odd characters here
    recipe = load_recipe(write(tmp_path, GOOD), ["model.name=odd \"name\" \\ \u00e9\x7f"])
    out = tmp_path / "resolved.toml"
    recipe.write(out)
    assert load_recipe(out) == recipe
    assert load_recipe(out).to_toml() == out.read_text()


def test_an_override_changes_exactly_one_field(tmp_path):
    path = write(tmp_path, GOOD)
    base, changed = load_recipe(path), load_recipe(path, ["generations.lam=0.5"])
    assert changed.generations.lam == 0.5
    assert dataclasses.replace(changed, generations=base.generations) == base
    assert dataclasses.replace(changed.generations, lam=0.6) == base.generations
    assert load_recipe(path, ["run.name=quick"]).run.name == "quick"  # bare words are strings
    with pytest.raises(UserError, match=r"with --set\): generations.lam must be in \[0, 1\]"):
        load_recipe(path, ["generations.lam=2"])
    with pytest.raises(UserError, match="expected section.key=value"):
        load_recipe(path, ["lam=2"])


def test_a_recipe_may_extend_a_base(tmp_path):
    write(tmp_path, GOOD, "base.toml")
    child = write(tmp_path, 'base = "base.toml"\n[generations]\nu = 0.7\n', "child.toml")
    recipe = load_recipe(child)
    assert recipe.generations.u == 0.7 and recipe.generations.lam == 0.6
    assert recipe.run.name == "cifar100_r56_d06"
    write(tmp_path, 'base = "loop.toml"', "loop.toml")
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "loop.toml")
