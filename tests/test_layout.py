"""The library's shape: one concept per module, no module over 500 lines, imports at the
top (only the CLI imports lazily, so that `--help` starts without torch)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddetr_tutorial"
MODULES = sorted(PACKAGE.rglob("*.py"))
LAZY_IMPORTS_ALLOWED = {PACKAGE / "cli.py"}


def test_the_package_has_modules():
    assert len(MODULES) > 20


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.relative_to(PACKAGE)} has {lines} lines; split it"


def _nested_imports(tree):
    """Import statements inside functions or classes: (line, text)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    found.append((inner.lineno, ast.unparse(inner)))
    return sorted(set(found))


@pytest.mark.parametrize("path", [p for p in MODULES if p not in LAZY_IMPORTS_ALLOWED],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_are_at_the_top(path):
    nested = _nested_imports(ast.parse(path.read_text()))
    assert not nested, f"{path.relative_to(PACKAGE)} imports inside functions: {nested}"


def test_the_import_check_finds_a_nested_import():
    tree = ast.parse("import os\n\ndef f():\n    from json import dumps\n    return dumps\n")
    assert _nested_imports(tree) == [(4, "from json import dumps")]
