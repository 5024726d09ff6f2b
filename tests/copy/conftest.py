"""Peers for the copy tests: nbdkit, qemu-nbd and our server, on loopback only.

Each fixture starts processes that are killed at teardown; a missing tool
fails (``tests.conftest.require``).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tests.conftest import require, run
from tests.peers import Processes, processes, unix_uri


def _tcp_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def procs() -> Iterator[Processes]:
    with processes("cpy") as group:
        yield group


@pytest.fixture
def nbdkit(procs: Processes) -> Callable[..., str]:
    """``nbdkit(*args)``: nbdkit on a unix socket; returns its URI."""
    return procs.nbdkit


@pytest.fixture
def qemu_nbd(procs: Processes) -> Callable[..., str]:
    """``qemu_nbd(image, *args, fmt="raw")``: a persistent qemu-nbd (8 clients)."""

    def start(image: Path, *args: str, fmt: str = "raw") -> str:
        sock = procs.socket_path()
        cmd = [require("qemu-nbd"), "-f", fmt, "-k", sock, "-t", "-e", "8", *args, str(image)]
        procs.start_unix(cmd, sock)
        return unix_uri(sock)

    return start


def ours_command(image: Path, *args: str, fmt: str = "raw") -> list[str]:
    return [sys.executable, "-m", "sendense_nbd", "serve", "-f", fmt, "-t", "-e", "8", *args, str(image)]


@pytest.fixture
def ours(procs: Processes) -> Callable[..., str]:
    """``ours(image, *args, fmt="raw")``: our server on a unix socket (persistent, 8 clients)."""

    def start(image: Path, *args: str, fmt: str = "raw") -> str:
        sock = procs.socket_path()
        procs.start_unix(ours_command(image, "--socket", sock, *args, fmt=fmt), sock)
        return unix_uri(sock)

    return start


@attrs.define
class TCPServer:
    """Our server on a fixed TCP port, so it can be killed and started again."""

    procs: Processes
    image: Path
    fmt: str
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> None:
        cmd = ours_command(self.image, "--port", str(self.port), fmt=self.fmt)
        self.proc = self.procs.start(cmd, lambda: _tcp_listening(self.port))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` as merged ``(offset, length, type)`` runs (type bit 1: reads zero)."""
    rows = json.loads(run(require("nbdinfo"), "--map", "--json", uri, timeout=30).stdout)
    merged: list[tuple[int, int, int]] = []
    for row in rows:
        offset, length, kind = row["offset"], row["length"], row["type"]
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, kind)
        else:
            merged.append((offset, length, kind))
    return merged


def data_ranges(uri: str) -> list[tuple[int, int]]:
    """Ranges that are allocated as data (not reading as zero) per ``nbdinfo --map``."""
    return [(o, n) for o, n, kind in nbdinfo_map(uri) if not kind & 2]


def dump(uri: str, path: Path) -> Path:
    """The whole export into a local file, by nbdcopy (an independent reader)."""
    run(require("nbdcopy"), uri, str(path), timeout=60)
    return path
