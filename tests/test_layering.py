"""The package's seams: the core names no engine, integrations leave the optimizer's attributes alone,
imports run one way between the folders.

Checked on the source (``ast``), so a new module is covered without listing it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "wsm_optim"
ENGINES = re.compile(r"deepspeed|torchtitan|transformers|lightning|accelerate|megatron|olmo|\bzero\b|"
                     r"hugging ?face|trainer", re.I)


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (PKG / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _code_words(tree: ast.AST) -> list[tuple[int, str]]:
    """Identifiers and string constants of the code, docstrings left out (they may give examples)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words.append((node.lineno, node.name))
        elif isinstance(node, ast.alias):
            words.append((getattr(node, "lineno", 0), node.name))
    return words


@pytest.mark.parametrize("path", _modules("core"), ids=lambda p: p.relative_to(PKG).as_posix())
def test_the_core_names_no_engine(path):
    """What an engine needs from the core is registered by integrations (core/callers.py, _bind_engine)."""
    hits = [(line, w) for line, w in _code_words(ast.parse(path.read_text())) if ENGINES.search(w)]
    assert hits == [], f"{path.name} names an engine in its code: {hits[:5]}"


def test_the_engine_rule_would_catch_one():
    tree = ast.parse('"""Docstrings may say DeepSpeed."""\nimport sys\nif "deepspeed" in sys.modules:\n    pass\n')
    assert [w for _, w in _code_words(tree) if ENGINES.search(w)] == ["deepspeed"]


def _attribute_assignments(tree: ast.AST) -> list[tuple[int, str, str]]:
    out = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                out.append((t.lineno, t.value.id, t.attr))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            first = node.args[0] if node.args else None
            out.append((node.lineno, first.id if isinstance(first, ast.Name) else "?", "setattr"))
    return out


#: Allowed: torch's LR schedulers wrap ``optimizer.step`` and mark a stepped optimizer with ``_opt_called``
#: (their own protocol, which a scheduler re-pointed at the WSMOptimizer keeps).
ALLOWED = {("_schedulers.py", "opt", "_opt_called"), ("_schedulers.py", "optimizer", "step")}


@pytest.mark.parametrize("path", _modules("integrations"), ids=lambda p: p.relative_to(PKG).as_posix())
def test_integrations_assign_no_attribute_on_an_optimizer(path):
    optimizer_names = {"wsm", "opt", "optimizer", "wsm_opt", "inner_wsm", "inner"}
    found = [(line, obj, attr) for line, obj, attr in _attribute_assignments(ast.parse(path.read_text()))
             if (obj in optimizer_names or obj in {"zero", "engine"}) and (path.name, obj, attr) not in ALLOWED]
    assert found == [], f"{path.name} assigns attributes on an optimizer or engine object: {found}"


LAYERS = {"common": set(), "core": {"common", "schedules", "kernels"}, "offline": {"common", "schedules"},
          "cli": {"common", "schedules", "offline", "demo", "core"},
          "integrations": {"common", "schedules", "core", "offline"}}


def _imported_folders(path: Path) -> set[str]:
    """The top-level parts of ``wsm_optim`` a module imports (relative or absolute)."""
    here = path.relative_to(PKG).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                parts = base + (node.module.split(".") if node.module else [])
                names = parts[:1] or [a.name for a in node.names]
            elif node.module and node.module.startswith("wsm_optim."):
                names = node.module.split(".")[1:2]
            else:
                continue
            found.update(names)
    return found


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_run_one_way(folder):
    for path in _modules(folder):
        wrong = _imported_folders(path) - LAYERS[folder] - {folder}
        assert not wrong, f"{path.relative_to(PKG)} imports {sorted(wrong)}"
