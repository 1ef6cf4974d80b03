"""README's "Development" module table is checked against the tree, so the map cannot drift.

Every module of the package (``wsm_optim/**/*.py`` but ``__init__``/``__main__``,
and ``kernels/*.py``) must be named in the table's first column, itself or
through a folder (``wsm_optim/backends/``); everything the column names must
exist. In a cell, a bare ``name.py`` after a path lives in that path's folder
(``wsm_optim/io.py``, ``checkpoint_readers.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = re.compile(r"^## Development\n(.*?)(?=^## |\Z)", re.S | re.M)


def _named_paths(readme: str) -> list[str]:
    section = SECTION.search(readme)
    assert section, "README.md has no '## Development' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("| `")]
    named = []
    for row in rows:
        cell = row.split("|")[1]
        folder = ""
        for token in re.findall(r"`([^`]+)`", cell):
            if "/" in token:
                folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
                named.append(token)
            else:
                named.append(folder + token)
    return named


def _modules() -> set[str]:
    found = {p.relative_to(ROOT).as_posix() for p in (ROOT / "wsm_optim").rglob("*.py")
             if "__pycache__" not in p.parts and p.name not in ("__init__.py", "__main__.py")
             and not p.resolve().is_relative_to((ROOT / "kernels").resolve())}
    return found | {p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.py")}


def test_every_module_is_in_the_development_table():
    named = _named_paths((ROOT / "README.md").read_text())
    covered = {m for m in _modules() if any(m == n or (n.endswith("/") and m.startswith(n)) for n in named)}
    assert _modules() - covered == set(), "modules missing from README's Development table"


def test_everything_the_development_table_names_exists():
    missing = [n for n in _named_paths((ROOT / "README.md").read_text()) if not (ROOT / n).exists()]
    assert missing == []


def test_the_parser_reads_folders_and_bare_names():
    table = ("## Development\n| module | what |\n|---|---|\n"
             "| `wsm_optim/io.py`, `checkpoint_readers.py` | files |\n| `kernels/` | kernels |\n## Next\n")
    assert _named_paths(table) == ["wsm_optim/io.py", "wsm_optim/checkpoint_readers.py", "kernels/"]
