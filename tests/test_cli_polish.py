"""The command lines' polish: help for every option, named arguments, did-you-mean keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import RECIPE, one_line_refusal

from fasttt.predict import main as predict_cli
from fasttt.predict import read_image
from fasttt.recipe import load_recipe
from fasttt.rundir import EVAL
from fasttt.sweep import main as sweep_cli
from fasttt.train import parse_args


def help_text(call, capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        call(["--help"])
    assert caught.value.code == 0
    return capsys.readouterr().out


def option_helps(text: str) -> dict[str, str]:
    """Each argument in argparse's help (its first word) -> the help text that follows it."""
    entries, current = {}, None
    for line in text.split("positional arguments:", 1)[1].splitlines():
        found = re.match(r"^  (\S+)(?: [A-Z]\S*)?(?:\s{2,}(.*))?$", line)
        if found:
            current = found.group(1)
            entries[current] = (found.group(2) or "").strip()
        elif current and line.startswith("   "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


@pytest.mark.parametrize(("call", "options"), [
    (parse_args, ["RECIPE.toml", "--set", "--runs-dir"]),
    (sweep_cli, ["RECIPE.toml", "--grid", "--seeds", "--parallel", "--set", "--runs-dir",
                 "--name"]),
    (predict_cli, ["EXPORT_DIR", "IMAGE", "--max-pixels"]),
])
def test_every_option_says_what_it_does(call, options, capsys):
    helps = option_helps(help_text(call, capsys))
    for option in options:
        assert helps.get(option), (option, helps)
    for option in ("--runs-dir", "--seeds", "--parallel"):
        if option in options:
            assert "default:" in helps[option], helps[option]


def test_predict_names_its_arguments_and_a_missing_image(tmp_path, capsys):
    usage = help_text(predict_cli, capsys).split("\n\n")[0]
    assert "EXPORT_DIR IMAGE [IMAGE ...]" in usage, usage
    image = tmp_path / "missing.png"
    one_line_refusal(lambda: predict_cli([str(tmp_path), str(image)]),
                     f"{image}: no such file")
    one_line_refusal(lambda: read_image(image), f"{image}: no such file")
    one_line_refusal(lambda: predict_cli([str(tmp_path / "nothing"), str(image)]),
                     "nothing: no such directory")


def test_an_unknown_key_suggests_the_closest(tmp_path):
    one_line_refusal(lambda: load_recipe(RECIPE, ["generations.lamm=0.3"]), "(with --set)",
                     "unknown key generations.lamm (did you mean generations.lam?")
    one_line_refusal(lambda: load_recipe(RECIPE, ["optim.epochs=3"]),
                     "did you mean schedule.epochs?")
    one_line_refusal(lambda: load_recipe(RECIPE, ["generation.lam=0.3"]),
                     "unknown section [generation] (did you mean [generations]?")
    recipe = tmp_path / "typo.toml"
    recipe.write_text(f'base = "{RECIPE}"\n[run]\nnaem = "x"\n')
    message = one_line_refusal(lambda: load_recipe(recipe), f"{recipe}: unknown key run.naem "
                               "(did you mean run.name?")
    assert "--set" not in message
    refusal = one_line_refusal(lambda: load_recipe(RECIPE, ["run.zzzz=1"]), "unknown key")
    assert "did you mean" not in refusal


def test_a_grid_typo_is_named_as_the_grids(tmp_path: Path):
    teacher = tmp_path / "runs" / "teacher" / "gen0"
    teacher.mkdir(parents=True)
    (teacher / EVAL).write_text("{}")  # a finished generation, as far as the sweep checks
    recipe = tmp_path / "students.toml"
    recipe.write_text(f'base = "{RECIPE}"\n[generations]\nteacher = "{teacher}"\n')
    message = one_line_refusal(
        lambda: sweep_cli([str(recipe), "--grid", "generations.lamm=0.3,0.5",
                           "--runs-dir", str(tmp_path / "runs")]),
        "(with --grid)", "unknown key generations.lamm (did you mean generations.lam?")
    assert "--set" not in message
    assert not (tmp_path / "runs" / "run-sweep").exists()  # refused before anything was made
