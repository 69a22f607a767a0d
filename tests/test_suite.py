"""The test suite's own rule: every test function has a name of its own across tests/, so a name says what it pins
and `pytest -k name` or a report line finds one test, not two."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).parent


def collected_names(source: str) -> list[str]:
    """Names of the test functions pytest collects from a module: top-level ``test_*`` and ``Test*`` methods."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            methods = [f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            names += [f"{node.name}.{f.name}" for f in methods if f.name.startswith("test")]
    return names


def test_no_two_test_functions_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(TESTS.rglob("test_*.py")):
        for name in collected_names(path.read_text(encoding="utf-8")):
            where[name].append(str(path.relative_to(TESTS)))
    shared = {name: files for name, files in where.items() if len(files) > 1}
    assert not shared, f"Test names used more than once (rename each to say what it pins): {shared}"
