"""Lint and types: ruff over everything, mypy (strict on protocol/ and storage/)."""

from __future__ import annotations

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
