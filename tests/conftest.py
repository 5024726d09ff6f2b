"""Shared fixtures: real peers and our server as a subprocess.

A missing peer is a failure, never a skip: a test marked ``peer`` fails at setup, and
``require`` fails any other test that reaches for one; run ``./setup.sh`` first. Tests
without the marker (pure unit tests) run on a machine without the peers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

PEERS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy", "nbdsh", "nbdkit", "nbd-server", "sshd")


def require(tool: str) -> str:
    """Path of a peer tool; fails the test loudly when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"peer {tool!r} is not installed; run ./setup.sh", pytrace=False)
    return path


@functools.cache
def missing_peers() -> tuple[str, ...]:
    """The peer tools (and python3-libnbd) that are not installed; checked once per session."""
    missing = [tool for tool in PEERS if shutil.which(tool) is None]
    try:
        import nbd  # noqa: F401  (Debian's python3-libnbd)
    except ImportError:
        missing.append("python3-libnbd")
    return tuple(missing)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``peer`` test fails at setup when a peer is missing; unit tests never need the peers."""
    if item.get_closest_marker("peer") is not None and missing_peers():
        pytest.fail(f"peers not installed: {', '.join(missing_peers())}; run ./setup.sh", pytrace=False)


@attrs.define
class RunningServer:
    """A ``sendense-nbd serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int | None
    socket: str | None

    @property
    def uri(self) -> str:
        return self.uri_for("")

    def uri_for(self, export: str) -> str:
        if self.socket:
            return f"nbd+unix:///{export}?socket={self.socket}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    @property
    def qemu_uri(self) -> str:
        """qemu's spelling (qemu 7.2 does not take nbd+unix query URIs everywhere)."""
        if self.socket:
            return f"nbd:unix:{self.socket}"
        return f"nbd://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal a service process, wait for it, close its pipes; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return code


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sendense_nbd", *args]


def start_server(*args: str, unix: str | None = None, timeout: float = 15) -> RunningServer:
    """Start ``sendense-nbd serve ARGS`` on a free port (or ``unix``) and wait until it listens."""
    listen = ["--socket", unix] if unix else ["--port", "0"]
    proc = subprocess.Popen(server_command("serve", *listen, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    port = None
    if unix:
        deadline_ok = _wait_for(lambda: os.path.exists(unix) or proc.poll() is not None, timeout)
        if not deadline_ok or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[1].decode()}")
    else:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            proc.kill()
            raise AssertionError(f"server did not start: {line!r} {proc.communicate()[1].decode()}")
        port = int(line)
    return RunningServer(proc, port, unix)


def _wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def serve() -> Iterator:  # type: ignore[type-arg]
    """Factory: ``serve(*args, unix=None)`` starts a server, stopped at teardown."""
    started: list[RunningServer] = []

    def _start(*args: str, unix: str | None = None) -> RunningServer:
        server = start_server(*args, unix=unix)
        started.append(server)
        return server

    yield _start
    for server in started:
        if server.alive():
            server.proc.kill()
        server.proc.wait(timeout=10)
        # Only here: tests read ``proc.stderr`` after ``stop()``.
        for pipe in (server.proc.stdout, server.proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_gone(pid: int, timeout: float) -> bool:
    """The process ``pid`` (not necessarily our child) has exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def run(*cmd: str | Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a peer command, failing with its output when it fails."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """A file of reproducible pseudo-random bytes."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, 1 << 20)
            f.write(rng.randbytes(n))
            remaining -= n
    return path


def sparse_file(path: Path, size: int, data_ranges: list[tuple[int, int]], seed: int = 2) -> Path:
    """A sparse file with pseudo-random data only in ``(offset, length)`` ranges."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_ranges:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path


@pytest.fixture
def shm_image() -> Iterator[Path]:
    """A 4 MiB raw file of random bytes on tmpfs, where punching holes works and ZERO_RANGE does not."""
    path = Path("/dev/shm") / f"sendense-test-{os.getpid()}-{time.monotonic_ns()}.raw"
    random_file(path, 4 << 20)
    yield path
    path.unlink(missing_ok=True)


def _simulator_module(name: str) -> Any:
    """simulator/NAME.py, loaded by path (simulator/ is not a package); simulator/ is first on sys.path while it
    loads, as when it runs as a script, so that it imports its siblings (simulator/claims.py) by name."""
    if name not in sys.modules:
        folder = Path(__file__).resolve().parents[1] / "simulator"
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(folder))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(folder))
    return sys.modules[name]


def _ceph_cluster_module() -> Any:
    """simulator/ceph_cluster.py."""
    return _simulator_module("ceph_cluster")


#: Temporary directories of the session clusters (tempfile's directory): see ``ceph_cluster``.
CEPH_PREFIX = "sendense-ceph-"


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Any]:
    """A real single-node Ceph (simulator/ceph_cluster.py: mon, mgr, one OSD, radosgw) shared by the session.

    Started on first use (only sessions with Ceph tests pay, about 10 s) in a fresh temporary
    directory claimed by this process, stopped and removed at session end (or after a failed or
    interrupted start). The clusters of sessions that died without that (SIGKILL) are swept first.
    Missing Ceph packages fail the test, never skip.
    """
    module = _ceph_cluster_module()
    try:
        import rados  # noqa: F401  (Debian's python3-rados and python3-rbd: the system Python's)
        import rbd  # noqa: F401
    except ImportError as e:
        pytest.fail(f"python3-rbd/python3-rados not importable ({e}); run ./setup.sh", pytrace=False)
    module.sweep(tempfile.gettempdir(), CEPH_PREFIX)
    directory = tempfile.mkdtemp(prefix=CEPH_PREFIX)
    try:
        module.claim(directory)
        cluster = module.start(directory)
    except BaseException as e:  # ^C too: start stopped its daemons, the directory goes
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(e, module.ClusterError):
            pytest.fail(f"test Ceph cluster did not start: {e}", pytrace=False)
        raise
    try:
        yield cluster
    finally:
        module.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


#: Temporary directories of the session PostgreSQL clusters (tempfile's directory): see ``postgres_cluster``.
POSTGRES_PREFIX = "sendense-pg-"


class PostgresCluster:
    """The session's PostgreSQL (simulator/postgres_cluster.py): ``new_database()`` makes a fresh database."""

    def __init__(self, module: Any, cluster: Any) -> None:
        self._module = module
        self.cluster = cluster
        #: The cluster's ``postgres`` database (for a test's own administration).
        self.url: str = cluster.url()
        self._made = 0

    def new_database(self) -> str:
        """A new, empty database's ``postgresql://`` URL."""
        self._made += 1
        return self._module.create_database(self.cluster, f"test_{os.getpid()}_{self._made}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A real PostgreSQL 15 (simulator/postgres_cluster.py) shared by the session, started on first use
    (about 2 s) in a fresh temporary directory claimed by this process, stopped and removed at session end.
    The clusters of sessions that died without that (SIGKILL) are swept first. A missing PostgreSQL or
    psycopg fails the test, never skips."""
    module = _simulator_module("postgres_cluster")
    try:
        import psycopg  # noqa: F401  (Debian's python3-psycopg: the system Python's)
    except ImportError as e:
        pytest.fail(f"python3-psycopg not importable ({e}); run ./setup.sh", pytrace=False)
    module.sweep(tempfile.gettempdir(), POSTGRES_PREFIX)
    directory = tempfile.mkdtemp(prefix=POSTGRES_PREFIX)
    try:
        module.claim(directory)
        cluster = module.start(directory)
    except BaseException as e:
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(e, module.ClusterError):
            pytest.fail(f"test PostgreSQL did not start: {e}", pytrace=False)
        raise
    try:
        yield PostgresCluster(module, cluster)
    finally:
        module.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)
