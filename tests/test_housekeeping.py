"""House-keeping that reading the code alone would not keep: one copy of shared test fixtures, and type-checker
names for what ``refdecoder`` hands out lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import refdecoder

ROOT = Path(__file__).resolve().parents[1]


def test_thread_fixture_lives_in_conftest_only() -> None:
    defined = {
        path.name
        for path in (ROOT / "tests").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in ("_one_thread", "one_thread")
    }
    assert defined == set()
    assert "def one_thread(" in (ROOT / "tests" / "conftest.py").read_text()


def test_lazy_names_are_visible_to_type_checkers() -> None:
    tree = ast.parse((ROOT / "refdecoder" / "__init__.py").read_text())
    guarded = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for imp in node.body
        for alias in imp.names
    }
    assert guarded == refdecoder._LAZY
    assert all(callable(getattr(refdecoder, name)) for name in guarded)
