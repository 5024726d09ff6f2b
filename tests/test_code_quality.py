"""Lint and types: ruff over everything, mypy (strict on protocol/ and storage/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "sendense_nbd", "examples", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "sendense_nbd"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_protocol_layer_does_no_io() -> None:
    forbidden = ("import asyncio", "import socket", "import selectors", "from asyncio", "from socket")
    for path in (ROOT / "sendense_nbd" / "protocol").glob("*.py"):
        text = path.read_text()
        assert not any(f in text for f in forbidden), f"{path.name} does I/O imports"


def test_copy_cli_imports_neither_server_nor_storage_backends() -> None:
    """`sendense-nbd copy` between NBD servers starts without the server, raw or qcow2 code."""
    probe = (
        "import sys; import sendense_nbd.cli.nbd; "
        "print(sorted(m for m in sys.modules if m.startswith(('sendense_nbd.server', 'sendense_nbd.storage.'))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['sendense_nbd.storage.base',", "'sendense_nbd.storage.modes']"]


#: A function longer than this is doing several things; split it (a table may be longer: list it here).
MAX_FUNCTION_LINES = 60
LONG_TABLES: frozenset[str] = frozenset()

Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(ROOT)), ast.parse(path.read_text()))
        for path in sorted((ROOT / "sendense_nbd").rglob("*.py"))
    ]


def test_functions_are_short() -> None:
    long = []
    for where, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in LONG_TABLES:
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_public_classes_and_functions_have_docstrings() -> None:
    """Every public class, and every public module-level function, says what it is for."""
    missing = [
        f"{where}:{node.lineno} {node.name}"
        for where, tree in _sources()
        for node in tree.body
        if isinstance(node, Definition) and not node.name.startswith("_") and ast.get_docstring(node) is None
    ]
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)
