"""Peer servers for tests: processes that listen on short unix sockets, killed at teardown.

The one place that starts nbdkit, or wraps it for our code to start. A missing tool fails
(``tests.conftest.require``).
"""

from __future__ import annotations

import importlib
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.conftest import require

START_TIMEOUT = 15.0


class _Libnbd(ModuleType):
    """Debian's ``nbd`` module (python3-libnbd), imported when a test first uses it.

    Modules that import it at the top would stop the collection of the whole tree on a
    machine without it, although only the ``peer`` tests there need it (and fail loudly).
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("nbd"), name)


nbd = _Libnbd("nbd")


def unix_listening(path: str) -> bool:
    """The unix socket ``path`` is bound and listening (flag __SO_ACCEPTCON in /proc/net/unix)."""
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def slow_nbdkit(directory: Path, seconds: int = 3) -> Path:
    """An ``nbdkit`` wrapper script adding the delay filter: every read of its plugin takes ``seconds``."""
    wrapper = directory / "nbdkit-slow"
    wrapper.write_text(f'#!/bin/sh\nexec {require("nbdkit")} --filter=delay "$@" rdelay={seconds}\n')
    wrapper.chmod(0o755)
    return wrapper


def unix_uri(sock: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


class Processes:
    """Started server processes, with a short directory for their unix sockets."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def socket_path(self) -> str:
        self._count += 1
        return f"{self.directory}/s{self._count}"

    def start(self, cmd: list[str], ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
        """Run ``cmd`` and wait until ``ready()``; fails with its stderr if it exits or never gets ready."""
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{shlex.join(cmd)} did not start listening")
            time.sleep(0.01)
        return proc

    def start_unix(self, cmd: list[str], sock: str) -> subprocess.Popen[bytes]:
        """Run ``cmd``, which listens on the unix socket ``sock``, and wait until it does."""
        return self.start(cmd, lambda: unix_listening(sock))

    def nbdkit(self, *args: str, export: str = "") -> str:
        """Start ``nbdkit ARGS`` (plugin, filters, parameters) on a fresh socket; its URI."""
        sock = self.socket_path()
        self.start_unix([require("nbdkit"), "-f", "-U", sock, "--exit-with-parent", *args], sock)
        return unix_uri(sock, export)

    def close(self) -> None:
        """Kill what still runs, reap everything, close the pipes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


@contextmanager
def processes(prefix: str) -> Iterator[Processes]:
    """A :class:`Processes` in a fresh short directory under /tmp (unix socket paths must be short)."""
    directory = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    group = Processes(directory)
    try:
        yield group
    finally:
        group.close()
        shutil.rmtree(directory, ignore_errors=True)
