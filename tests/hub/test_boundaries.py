"""The hub's typed boundaries, in-process: the service refuses with domain errors (never the HTTP
layer's BadRequest) and changes nothing; the node's disk list arrives as DiskSpecs, a malformed one
is a NodeError; points carry SyncType/PointStatus enums while the store keeps the plain strings, so
a hub.db written before the enums opens, and an interrupted merge written that way is finished;
a port lease's purpose is the job's kind, stored as its value; a point whose job ended meanwhile (another
hub took this one over) is never completed."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sendense_nbd.backup.records import Mode, SyncType
from sendense_nbd.errors import (
    BadRequest,
    CompletionMismatch,
    InvalidBackup,
    NodeError,
    NodeNotFound,
    RepositoryError,
)
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.jobs import JobKind, JobState
from sendense_nbd.hub.node_client import NodeClient
from sendense_nbd.hub.repository import PointStatus, Repository
from sendense_nbd.hub.requests import (
    BackupRequest,
    Completion,
    DiskSpec,
    Failure,
    ReportedDisk,
    RestoreAction,
    RestoreRequest,
)
from sendense_nbd.hub.service import Hub, HubConfig
from sendense_nbd.storage.modes import ImageFormat
from tests.conftest import require, run
from tests.hub.conftest import free_port_range, open_hub_store

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM = "/DC/vm/web01"
GIB = 1 << 30


class ScriptedNode:
    """A node API that answers ``GET /vms/disks`` with whatever a test sets (a node may send junk)."""

    def __init__(self) -> None:
        self.answer: tuple[int, Any] = (200, {"disks": []})
        self.started: list[dict[str, Any]] = []
        self.url = ""

    def app(self) -> web.Application:
        """The two routes the hub calls when it lists and backs up a VM."""

        async def disks(request: web.Request) -> web.Response:
            status, body = self.answer
            return web.json_response(body, status=status)

        async def start(request: web.Request) -> web.Response:
            self.started.append(await request.json())
            return web.json_response({}, status=202)

        app = web.Application()
        app.add_routes([web.get("/api/v1/vms/disks", disks), web.post("/api/v1/backups", start)])
        return app


@pytest.fixture
async def node() -> AsyncIterator[ScriptedNode]:
    """A scripted node listening on 127.0.0.1."""
    scripted = ScriptedNode()
    runner = web.AppRunner(scripted.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    scripted.url = f"http://127.0.0.1:{port}"
    try:
        yield scripted
    finally:
        await runner.cleanup()


@pytest.fixture
async def hub(tmp_path: Path, node: ScriptedNode) -> AsyncIterator[Hub]:
    """A started in-process hub whose node is the scripted one."""
    started = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4), node_url=node.url))
    await started.start()
    try:
        yield started
    finally:
        await started.wait_closed()


async def _nothing_left(hub: Hub) -> None:
    assert await hub.backups(VM) == []
    assert (await hub.port_status()).pool.used == ()
    assert list((Path(hub.config.repo) / "vms").rglob("*.qcow2")) == []


async def test_the_node_disk_list_arrives_typed(node: ScriptedNode) -> None:
    node.answer = (200, {"vm_path": VM, "disks": [
        {"key": 2000, "capacity": 16 * GIB, "label": "Hard disk 1", "uuid": "6000C29a"},
        {"key": 2001, "capacity": None},
    ]})  # fmt: skip
    client = NodeClient(node.url)
    try:
        assert await client.disks(VM) == (DiskSpec(2000, 16 * GIB), DiskSpec(2001, None))
        node.answer = (404, {"error": {"code": "not_found"}})
        with pytest.raises(NodeNotFound):
            await client.disks(VM)
    finally:
        await client.close()


MALFORMED: list[object] = [
    [{"key": 2000}],
    {"disks": {"2000": 1}},
    {"disks": []},
    {"disks": [{"key": True, "capacity": MIB}]},
    {"disks": [{"key": -1, "capacity": MIB}]},
    {"disks": [{"capacity": MIB}]},
    {"disks": [{"key": 2000, "capacity": 1000}]},
    {"disks": [{"key": 2000, "capacity": "1 GB"}]},
    {"disks": [{"key": 2000, "capacity": MIB}, {"key": 2000, "capacity": MIB}]},
    {"disks": [{"key": k, "capacity": MIB} for k in range(257)]},
]


@pytest.mark.parametrize("answer", MALFORMED)
async def test_a_malformed_node_disk_list_is_a_node_error_and_starts_nothing(
    hub: Hub, node: ScriptedNode, answer: object
) -> None:
    node.answer = (200, answer)
    with pytest.raises(NodeError, match=f"the node's disk list for {VM} is malformed") as refused:
        await hub.create_backup(BackupRequest(VM, Mode.FULL, None))
    assert not isinstance(refused.value, BadRequest)
    assert node.started == []
    await _nothing_left(hub)


async def test_a_listed_disk_is_backed_up(hub: Hub, node: ScriptedNode) -> None:
    node.answer = (200, {"disks": [{"key": 2000, "capacity": MIB, "label": "Hard disk 1"}]})
    job = await hub.create_backup(BackupRequest(VM, Mode.AUTO, None))
    [disk] = job.disks
    assert (disk.disk_key, disk.sync_type, job.state) == (2000, SyncType.FULL, JobState.RUNNING)
    assert [started["targets"] for started in node.started] == [{"2000": disk.uri}]


async def test_refusals_are_domain_errors_and_change_nothing(tmp_path: Path) -> None:
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4)))
    await hub.start()
    try:
        with pytest.raises(InvalidBackup, match="no node is configured"):
            await hub.create_backup(BackupRequest(VM, Mode.AUTO, None))
        with pytest.raises(InvalidBackup, match="disk 2001: give its capacity"):
            await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(2000, MIB), DiskSpec(2001, None))))
        await _nothing_left(hub)
        job = await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(2000, MIB),)))
        good = ReportedDisk(2000, "52 aa/1", None)
        with pytest.raises(CompletionMismatch, match="the completion is for /DC/vm/other"):
            await hub.complete(job.id, Completion("/DC/vm/other", (good,)))
        with pytest.raises(CompletionMismatch, match=r"names disks \[2001\], the job has \[2000\]"):
            await hub.complete(job.id, Completion(VM, (ReportedDisk(2001, "52 aa/1", None),)))
        assert (await hub.job(job.id)).state is JobState.RUNNING
        [lease] = (await hub.port_status()).pool.used
        assert (lease.job_id, lease.purpose, lease.to_json()["purpose"]) == (job.id, JobKind.BACKUP, "backup")
        done = await hub.complete(job.id, Completion(VM, (good,)))
        assert done.state is JobState.COMPLETED and done.disks[0].sync_type is SyncType.FULL
        [point] = await hub.points(VM)
        assert (point.kind, point.status, point.change_id) == (SyncType.FULL, PointStatus.COMPLETED, "52 aa/1")
        assert point.to_json()["kind"] == "full" and point.to_json()["status"] == "completed"
        restore = await hub.restore(RestoreRequest(point.id, RestoreAction.EXPORT, ImageFormat.QCOW2, None))
        [lease] = (await hub.port_status()).pool.used
        assert (lease.job_id, lease.purpose) == (restore.id, JobKind.RESTORE)
        store = open_hub_store(hub.config.repo)
        try:
            assert store.call(lambda c: [tuple(r) for r in c.execute("SELECT purpose FROM leases")]) == [("restore",)]
        finally:
            store.close()
    finally:
        await hub.wait_closed()


def _stored(db_path: Path) -> list[tuple[str, str, str, str | None]]:
    with sqlite3.connect(db_path) as connection:
        return list(connection.execute("SELECT id, kind, status, backing FROM points ORDER BY created"))


def _write(path: str, pattern: int, offset: int) -> None:
    run(require("qemu-io"), "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} 65536", path)


async def test_the_store_keeps_plain_strings_and_an_interrupted_merge_written_so_is_finished(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    db = Database(str(db_path))
    repository = Repository(str(tmp_path), db)
    try:
        base = await repository.new_point(VM, 2000, "j1", incremental=False, capacity=MIB)
        _write(base.path, 0x11, 0)
        await repository.complete([(base.id, ReportedDisk(2000, "c1", None))])
        top = await repository.new_point(VM, 2000, "j2", incremental=True, capacity=None)
        _write(top.path, 0x22, 65536)
        await repository.complete([(top.id, ReportedDisk(2000, "c2", "6000C29a"))])
        assert _stored(db_path) == [(base.id, "full", "completed", None), (top.id, "incremental", "completed", base.id)]
        chain = await repository.points(VM, 2000)
        assert [(p.kind, p.status) for p in chain] == [(SyncType.FULL, PointStatus.COMPLETED),
                                                       (SyncType.INCREMENTAL, PointStatus.COMPLETED)]  # fmt: skip
        with sqlite3.connect(db_path) as connection:  # a crash right after retention marked the base
            connection.execute("UPDATE points SET status = 'merging' WHERE id = ?", (base.id,))
        assert [p.id for p in await repository.points(VM)] == [top.id]
        assert await repository.recover() == ([], [base.id])
        assert _stored(db_path) == [(top.id, "full", "completed", None)]
        merged = await repository.point(top.id)
        assert (merged.kind, merged.status, merged.backing, merged.change_id) == (
            SyncType.FULL, PointStatus.COMPLETED, None, "c2",
        )  # fmt: skip
    finally:
        db.close()
    expected = tmp_path / "expected.raw"
    expected.write_bytes(b"\x11" * 65536 + b"\x22" * 65536 + bytes(MIB - 2 * 65536))
    run(require("qemu-img"), "check", merged.path)
    run(require("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", merged.path, str(expected))


async def test_a_point_whose_job_ended_meanwhile_is_never_completed(tmp_path: Path) -> None:
    """A hub taking this one over fails its jobs and then rolls their heads back: a completion already past
    its checks must not then seal and record the point (it would hold the base's data under the new change
    ID). The point stays pending and is discarded with its job."""
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(2)))
    await hub.start()
    try:
        job = await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(2000, MIB),)))
        [disk] = job.detail.disks
        failure = Failure("hub", "hub b took this one over", "hub_lost")
        await hub._jobs.transition(job.id, JobState.FAILED, error=failure)  # as the taking hub does
        with pytest.raises(RepositoryError, match="its job ended meanwhile"):
            await hub._repository.complete([(disk.point_id, ReportedDisk(2000, "52 aa/1", None))])
        point = await hub._repository.point(disk.point_id)
        assert (point.status, point.change_id) == (PointStatus.PENDING, None)
        await hub._repository.discard(disk.point_id)
        assert await hub._repository.points(VM) == []
    finally:
        hub.close()
        await hub.wait_closed()
