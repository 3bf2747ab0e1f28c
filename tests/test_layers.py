"""Imports point down the layers only (DESIGN.md, Layout): graph <- analysis <- passes <- interop <- entry points
(api, cli, cycle). Read from the source, every import statement, lazy ones inside functions included."""
from __future__ import annotations

import ast
import pathlib
import sys

ORDER = ["graph", "analysis", "passes", "interop"]  # bottom to top
ENTRY = {"api", "cli", "cycle"}
ROOT = pathlib.Path(__file__).parents[1] / "fxprune"


def _imported(tree: ast.AST) -> list[str]:
    """Every fxprune module an import statement names (``from fxprune import x`` names ``fxprune.x``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fxprune":
            out += [f"fxprune.{a.name}" for a in node.names] if node.module == "fxprune" else [node.module]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "fxprune"]
    return out


def upward() -> list[str]:
    found = []
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT).parts
        if len(parts) < 2 or parts[0] not in ORDER:
            continue
        level = ORDER.index(parts[0])
        for m in _imported(ast.parse(f.read_text())):
            top = m.split(".")[1] if "." in m else ""
            if top in ENTRY or (top in ORDER and ORDER.index(top) > level):
                found.append(f"{f.relative_to(ROOT)} imports {m}")
    return found


def test_imports_point_down_the_layers_only():
    assert upward() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "graph").mkdir()
    (tmp_path / "graph" / "bad.py").write_text("def f():\n    from fxprune.passes.minimize import minimize\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward() == ["graph/bad.py imports fxprune.passes.minimize"]
