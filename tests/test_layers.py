"""The data path's layers: fasttt.betons under the builders, the builders under the entry points.

Read from the source with `ast` (imports inside functions count too), so a circle or an
import back up is caught without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fasttt", "beton_builders")


def module_files() -> dict[str, Path]:
    """Every module of fasttt and beton_builders, by dotted name."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = module_files()


def imports(module: str) -> set[str]:
    """The modules of fasttt and beton_builders that `module` imports, anywhere in it."""
    named = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # `from p import m` too
            named |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(
                ("import_module", "__import__")) and node.args:  # importlib's way
            named.add(ast.unparse(node.args[0]).strip("'\""))
    return (named & MODULES.keys()) - {module}


def reachable(module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for found in imports(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return seen


def test_the_layers_are_read_from_the_source():
    assert {"fasttt.betons", "fasttt.data", "beton_builders.__main__"} <= MODULES.keys()
    assert "fasttt.betons" in imports("beton_builders.writing")
    assert "fasttt.betons" in imports("fasttt.data")


def test_no_fasttt_module_imports_the_builders_command_line():
    assert not [m for m in MODULES if m.startswith("fasttt") and
                "beton_builders.__main__" in imports(m)]


def test_the_betons_module_stands_on_nothing_of_fasttt_but_its_errors():
    assert imports("fasttt.betons") == {"fasttt.errors"}


def test_the_builders_write_betons_without_the_loaders():
    assert not [m for m in MODULES if m.startswith("beton_builders") and
                "fasttt.data" in reachable(m)]


@pytest.mark.parametrize("module", ["fasttt.betons", "fasttt.data", "fasttt.train",
                                    *(m for m in MODULES if m.startswith("beton_builders"))])
def test_the_data_path_has_no_import_circle(module):
    assert module not in reachable(module)
