"""Real NBD servers for the client tests: qemu-nbd, nbdkit, nbd-server and our
own, each on a unix socket in a short temporary directory, plus nbdinfo and
nbdcopy as independent judges. A missing tool fails (``tests.conftest.require``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require, run

START_TIMEOUT = 10.0


def _listening(path: str) -> bool:
    """The unix socket ``path`` is bound and listening (flag __SO_ACCEPTCON)."""
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


class Spawner:
    """Starts servers and kills them all at teardown."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def socket_path(self) -> str:
        self._count += 1
        return f"{self.directory}/s{self._count}"

    def start(self, cmd: list[str], sock: str) -> subprocess.Popen[bytes]:
        """Run ``cmd`` (which listens on ``sock``) and wait until it listens."""
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(sock):
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd[0]} did not listen on {sock}")
            time.sleep(0.005)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    directory = tempfile.mkdtemp(prefix="nbdc", dir="/tmp")  # unix socket paths must be short
    spawner = Spawner(directory)
    yield spawner
    spawner.close()
    shutil.rmtree(directory, ignore_errors=True)


def unix_uri(sock: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@pytest.fixture
def nbdkit(spawner: Spawner) -> Callable[..., str]:
    """``nbdkit(*args, export="")``: start nbdkit with ``args``; return its URI."""

    def start(*args: str, export: str = "") -> str:
        sock = spawner.socket_path()
        spawner.start([require("nbdkit"), "-f", "-U", sock, "--exit-with-parent", *args], sock)
        return unix_uri(sock, export)

    return start


@pytest.fixture
def qemu_nbd(spawner: Spawner) -> Callable[..., str]:
    """``qemu_nbd(image, *args, fmt="raw", export="")``: a persistent qemu-nbd."""

    def start(image: Path, *args: str, fmt: str = "raw", export: str = "") -> str:
        sock = spawner.socket_path()
        cmd = [require("qemu-nbd"), "-f", fmt, "-k", sock, "-t", "-e", "16", "-x", export, *args, str(image)]
        spawner.start(cmd, sock)
        return unix_uri(sock, export)

    return start


@pytest.fixture
def nbd_server(spawner: Spawner) -> Callable[..., Callable[[], str]]:
    """``nbd_server(image, **config)`` returns a function that starts a fresh
    ``nbd-server -d`` (it serves exactly one client) and returns its URI."""

    def prepare(image: Path, export: str = "disk", **config: str) -> Callable[[], str]:
        def start() -> str:
            sock = spawner.socket_path()
            conf = Path(sock + ".conf")
            lines = ["[generic]", f"unixsock = {sock}", "allowlist = true", f"[{export}]", f"exportname = {image}"]
            lines += [f"{key} = {value}" for key, value in config.items()]
            conf.write_text("\n".join(lines) + "\n")
            spawner.start([require("nbd-server"), "-C", str(conf), "-d"], sock)
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
