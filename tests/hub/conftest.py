"""A running hub (``sendense-nbd hub`` subprocess), a stand-in node, vcsim, and a tiny HTTP client."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from sendense_nbd.hub.db import Database
from sendense_nbd.hub.repository import Repository
from sendense_nbd.hub.service import Hub, HubConfig
from tests.conftest import PostgresCluster, stop_process
from tests.hub.node_standin import NodeStandin
from tests.vmware.vsphere import running_vcsim

#: ``SENDENSE_TEST_DB=postgresql``: every hub these tests start (in process, or ``sendense-nbd hub`` through
#: :class:`HubProcess`) keeps its store in a fresh database of the session's PostgreSQL, one per repository
#: directory (a restarted hub finds its store again), unless the test names the hub's store itself.
TEST_DB = os.environ.get("SENDENSE_TEST_DB", "sqlite")
#: The PostgreSQL database of each repository directory, and the session's cluster (while the switch is on).
_pg_stores: dict[str, str] = {}
_pg_cluster: list[PostgresCluster] = []


def hub_store(repo: str | Path) -> str | None:
    """The ``--db`` URL of a hub on ``repo`` under ``SENDENSE_TEST_DB=postgresql`` (None: its SQLite file)."""
    if not _pg_cluster:
        return None
    key = str(Path(repo).resolve())
    if key not in _pg_stores:
        _pg_stores[key] = _pg_cluster[0].new_database()
    return _pg_stores[key]


def open_hub_store(repo: str | Path) -> Database:
    """A second connection to the store of the hub on ``repo`` (its PostgreSQL database under the switch)."""
    return Database(hub_store(repo) or str(Path(repo) / "hub.db"))


def hub_db_args(repo: str | Path) -> list[str]:
    """``["--db", URL]`` for a hub process on ``repo`` under the switch, else nothing."""
    url = hub_store(repo)
    return [] if url is None else ["--db", url]


@pytest.fixture(autouse=True)
def _hub_store_switch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Under ``SENDENSE_TEST_DB=postgresql``, in-process hubs without a ``db`` get their repository's database."""
    if TEST_DB == "sqlite":
        yield
        return
    if TEST_DB != "postgresql":
        pytest.fail(f"SENDENSE_TEST_DB={TEST_DB!r}: sqlite (the default) or postgresql", pytrace=False)
    _pg_cluster[:] = [request.getfixturevalue("postgres_cluster")]
    original = Hub.__init__

    def init(self: Hub, config: HubConfig) -> None:
        original(self, config if config.db is not None else attrs.evolve(config, db=hub_store(config.repo)))

    monkeypatch.setattr(Hub, "__init__", init)
    yield
    _pg_cluster.clear()


def free_port_range(count: int) -> range:
    """``count`` consecutive ports that are free now (best effort on a busy machine); the search starts at a
    place of this process's own, so that test sessions running side by side rarely pick the same ports."""
    starts = range(21000, 60000, 97)
    first = os.getpid() % len(starts)
    for start in [*starts[first:], *starts[:first]]:
        ports = range(start, start + count)
        held = []
        try:
            for port in ports:
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return ports
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise AssertionError("no free port range")


class Api:
    """JSON over HTTP: ``api.get(path)``, ``api.post(path, body)``; returns (status, body)."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/") + "/api/v1"
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        raw: bytes | None = None,
        *,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, Any]:
        return self.call("POST", path, body, raw)

    def delete(self, path: str) -> tuple[int, Any]:
        return self.call("DELETE", path)

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.get(f"/backups/{job_id}")
            assert status == 200, job
            if job["state"] in ("failed", "cancelled") or (job["state"] == "completed" and retained(job)):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish: {job}")


def retained(job: dict[str, Any]) -> bool:
    """A completed job's retention (run after its completion's answer) has run: its last stage."""
    return job.get("kind") != "backup" or any(stage["name"] == "retention" for stage in job.get("stages") or ())


class HubProcess:
    def __init__(self, repo: Path, ports: range, node_url: str | None, *extra: str) -> None:
        self.repo, self.ports, self.node_url, self.extra = repo, ports, node_url, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.startup: dict[str, Any] = {}

    def start(self) -> HubProcess:
        store = [] if "--db" in self.extra else hub_db_args(self.repo)
        command = [
            sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(self.repo), *store,
            "--listen", "127.0.0.1:0", "--nbd-ports", f"{self.ports.start}-{self.ports.stop - 1}",
            *(["--node-url", self.node_url] if self.node_url else []), *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            raise AssertionError(f"the hub did not start: {self.proc.communicate()[1].decode()}")
        self.startup = json.loads(line)
        self.port = int(self.startup["listening"].rsplit(":", 1)[1])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig)


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("hub-vcsim")
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "8") as info:
        yield info


@pytest.fixture
def node(vcsim: dict[str, Any], tmp_path: Path) -> Iterator[NodeStandin]:
    standin = NodeStandin(vcsim, tmp_path).start()
    yield standin
    standin.stop()


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    started: list[HubProcess] = []

    def start(node_url: str | None, *extra: str, ports: range | None = None, repo: Path | None = None) -> HubProcess:
        hub = HubProcess(repo or tmp_path / "repo", ports or free_port_range(6), node_url, *extra).start()
        started.append(hub)
        return hub

    yield start
    for hub in started:
        if hub.proc is not None and hub.proc.poll() is None:
            hub.stop(signal.SIGKILL)


def nbd_write(uri: str, writes: list[tuple[int, bytes]]) -> None:
    """Write ``(offset, data)`` pieces to an export with libnbd, then FLUSH."""
    from tests.peers import nbd

    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        for offset, data in writes:
            handle.pwrite(data, offset)
        handle.flush()
    finally:
        handle.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new store for :class:`Database`: an SQLite file, or a fresh database of the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "hub.db")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()


@pytest.fixture
async def repository(tmp_path: Path, store_target: str) -> AsyncIterator[Repository]:
    """A repository with its own store (each engine), no hub."""
    db = Database(store_target)
    try:
        yield Repository(str(tmp_path / "repo"), db)
    finally:
        db.close()
