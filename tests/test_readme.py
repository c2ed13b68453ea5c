"""The README's generated parts stay true: the method table is the registry's,
and the Layout section names every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

import ccsmerge
from ccsmerge.methods import method_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def between(text: str, begin: str, end: str) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_method_table_is_the_registrys():
    table = between(README, "<!-- methods:begin -->\n", "<!-- methods:end -->")
    assert table == method_table(), "regenerate with: python -m ccsmerge.methods"


def test_layout_names_every_module():
    layout = README.split("## Layout", 1)[1]
    package = Path(ccsmerge.__file__).parent
    named = set(re.findall(r"`(ccsmerge/[^`]*)`", layout))
    for module in sorted(package.rglob("*.py")):
        relative = module.relative_to(package.parent).as_posix()
        if module.name in ("__init__.py", "__main__.py", "_version.py"):
            continue
        covered = relative in named or any(relative.startswith(n) for n in named if n.endswith("/"))
        assert covered, f"README Layout does not name {relative}"
