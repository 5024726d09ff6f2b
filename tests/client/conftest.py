"""Real NBD servers for the client tests: qemu-nbd, nbdkit, nbd-server and our
own, each on a unix socket in a short temporary directory, plus nbdinfo and
nbdcopy as independent judges (processes from ``tests.peers``). A missing tool fails."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require, run
from tests.peers import Processes, processes, unix_uri


@pytest.fixture
def spawner() -> Iterator[Processes]:
    with processes("nbdc") as group:
        yield group


@pytest.fixture
def nbdkit(spawner: Processes) -> Callable[..., str]:
    """``nbdkit(*args, export="")``: start nbdkit with ``args``; return its URI."""
    return spawner.nbdkit


@pytest.fixture
def qemu_nbd(spawner: Processes) -> Callable[..., str]:
    """``qemu_nbd(image, *args, fmt="raw", export="")``: a persistent qemu-nbd."""

    def start(image: Path, *args: str, fmt: str = "raw", export: str = "") -> str:
        sock = spawner.socket_path()
        cmd = [require("qemu-nbd"), "-f", fmt, "-k", sock, "-t", "-e", "16", "-x", export, *args, str(image)]
        spawner.start_unix(cmd, sock)
        return unix_uri(sock, export)

    return start


@pytest.fixture
def nbd_server(spawner: Processes) -> Callable[..., Callable[[], str]]:
    """``nbd_server(image, **config)`` returns a function that starts a fresh
    ``nbd-server -d`` (it serves exactly one client) and returns its URI."""

    def prepare(image: Path, export: str = "disk", **config: str) -> Callable[[], str]:
        def start() -> str:
            sock = spawner.socket_path()
            conf = Path(sock + ".conf")
            lines = ["[generic]", f"unixsock = {sock}", "allowlist = true", f"[{export}]", f"exportname = {image}"]
            lines += [f"{key} = {value}" for key, value in config.items()]
            conf.write_text("\n".join(lines) + "\n")
            spawner.start_unix([require("nbd-server"), "-C", str(conf), "-d"], sock)
            return unix_uri(sock, export)

        return start

    return prepare


def nbdinfo_json(uri: str) -> dict:  # type: ignore[type-arg]
    """The first export of ``nbdinfo --json``."""
    data = json.loads(run(require("nbdinfo"), "--json", uri, timeout=30).stdout)
    export = data["exports"][0]
    export["structured"] = data["structured"]
    return export  # type: ignore[no-any-return]


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` as merged ``(offset, length, type)`` runs."""
    rows = json.loads(run(require("nbdinfo"), f"--map={context}", "--json", uri, timeout=30).stdout)
    return merge_runs((row["offset"], row["length"], row["type"]) for row in rows)


def merge_runs(extents: Iterator[tuple[int, int, int]] | list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join adjacent extents of the same type (servers may split runs differently)."""
    merged: list[tuple[int, int, int]] = []
    for offset, length, kind in extents:
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, kind)
        else:
            merged.append((offset, length, kind))
    return merged


def nbdcopy_bytes(uri: str) -> bytes:
    """The whole export, read by nbdcopy over one connection."""
    result = subprocess.run(
        [require("nbdcopy"), "--connections=1", uri, "-"], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout
