"""The README as a newcomer reads it: its map of the code names what is there."""

from __future__ import annotations

import re

from conftest import ROOT


def test_the_layout_table_lists_every_module_of_fasttt():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    listed = set()
    for row in layout.splitlines():
        if row.startswith("| `fasttt/"):
            first = row.split("|")[1]
            listed |= {name.removeprefix("fasttt/") for name in re.findall(r"`([\w/]+\.py)`",
                                                                             first)}
    modules = {p.name for p in (ROOT / "fasttt").glob("*.py") if p.name != "__init__.py"}
    assert listed == modules


def test_the_first_screens_map_points_at_code_that_is_there():
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[:readme.index("## Setting up")]
    pointers = re.findall(r"`(fasttt/\w+\.py)`(?: \(`(\w+)`\))?", first_screen)
    assert len(pointers) >= 5
    for path, name in pointers:
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^(def|class) {name}\b", source, re.M), (path, name)
