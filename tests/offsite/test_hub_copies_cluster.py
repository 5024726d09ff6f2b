"""A copy's delete answers the same through every hub of a cluster: two in-process hubs, A and B, share one RBD
repository (the session's Ceph) and one database (SQLite, or PostgreSQL under ``SENDENSE_TEST_DB=postgresql``), the
copies go to the session's RGW. While A uploads a copy (held at its first part), both hubs list A as its
``uploader``, and a delete through B is refused ``409 uploading`` naming hub A, as through A; a copy of the same
disk waiting its turn is deleted. Once A's upload is over (the bucket failed the try: the copy stays pending, to be
tried again), B deletes it. When A is dead (its heartbeat lapsed) mid-upload, its hold lapses with it (no longer
listed): B deletes the copy, and A's upload, let go, completes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.cluster import HUB_LOST
from sendense_nbd.hub.db import Database
from tests.hub.conftest import TEST_DB, nbd_write
from tests.hub.operating import LocalHub, local_hub
from tests.offsite.conftest import Parts, new_bucket, secret_file
from tests.rbd_repo.conftest import rbd_url

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM = "/DC0/vm/web01"


@pytest.fixture
def shared_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database both hubs use: an SQLite file, or under ``SENDENSE_TEST_DB=postgresql`` a fresh database of
    the session's PostgreSQL."""
    if TEST_DB == "postgresql":
        return str(request.getfixturevalue("postgres_cluster").new_database())
    if TEST_DB != "sqlite":
        pytest.fail(f"SENDENSE_TEST_DB={TEST_DB!r}: sqlite (the default) or postgresql", pytrace=False)
    return "sqlite:" + str(tmp_path / "cluster.db")


@contextlib.asynccontextmanager
async def _two_hubs(
    ceph_cluster: Any, tmp_path: Path, db: str, parts: Parts
) -> AsyncIterator[tuple[LocalHub, LocalHub, Database]]:
    """Hubs ``a`` and ``b`` on one RBD repository and database (one clock, never moved: neither beats again nor
    takes the other over), A with a node and a policy copying to a fresh bucket; a third connection to the
    database for the test's reads. The uploads ``parts`` holds are let go before the hubs stop."""
    clock = ManualClock(time.time())
    store = rbd_url(ceph_cluster, f"t{uuid.uuid4().hex[:10]}")
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    copy = {"endpoint": ceph_cluster.rgw_endpoint, "bucket": new_bucket(ceph_cluster),
            "access_key": ceph_cluster.s3_access_key, "secret_file": secret, "retain": 600, "margin": 5}  # fmt: skip
    policy = {"name": "offsite", "node": "site", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 366 * 86400},
              "copy": copy}  # fmt: skip
    async with (
        local_hub(tmp_path / "a", clock=clock, store=store, hub_id="a", db=db) as a,
        local_hub(tmp_path / "b", clock=clock, store=store, hub_id="b", db=db) as b,
    ):
        assert [(m["id"], m["live"]) for m in (await b.ok("GET", "/hubs"))["hubs"]] == [("a", True), ("b", True)]
        await a.ok("POST", "/nodes", {"name": "site", "url": "http://127.0.0.1:9"})
        await a.ok("POST", "/policies", policy)
        reader = Database(db)
        try:
            yield a, b, reader
        finally:
            parts.gate.set()
            reader.close()


async def _backup(hub: LocalHub, at: int, *, full: bool) -> str:
    """A completed backup of one 8 MiB disk (1 MiB written at ``at`` MiB) through ``hub``, its copies started,
    not waited for; its point's ID."""
    body = {"vm_path": VM, "mode": "full" if full else "incremental", "disks": [{"key": 2000, "capacity": 8 * MIB}]}
    job = await hub.ok("POST", "/backups", body)
    await asyncio.to_thread(nbd_write, job["detail"]["disks"][0]["uri"], [(at * MIB, bytes([at + 1]) * MIB)])
    done = {"status": "completed", "vm_path": VM, "disks": [{"disk_key": 2000, "change_id": f"52 aa/{time.time()}"}]}
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", done)
    await hub.hub.settled()
    return str(job["detail"]["disks"][0]["point_id"])


async def _delete(hub: LocalHub, copy_id: str) -> tuple[int, Any]:
    return await hub.call("DELETE", f"/copies/{copy_id}")


def _refused_as_uploading_on(answer: tuple[int, Any], hub: str) -> bool:
    status, body = answer
    return status == 409 and body["error"]["code"] == "uploading" and f"on hub {hub}:" in body["error"]["message"]


async def _uploader(db: Database, copy_id: str) -> str | None:
    """The hub the copy's row says uploads it now."""
    found = await db.run(lambda c: c.execute("SELECT uploader FROM offsite_copies WHERE id = ?", (copy_id,)).fetchone())
    return None if found[0] is None else str(found[0])


async def test_a_copy_uploading_on_one_hub_is_refused_through_another_until_its_upload_is_over(
    ceph_cluster: Any, tmp_path: Path, parts: Parts, shared_db: str
) -> None:
    async with _two_hubs(ceph_cluster, tmp_path, shared_db, parts) as (a, b, db):
        a.hub.copies.retry_delays = (3600.0,)  # a try the bucket fails leaves the copy pending (the next is later)
        parts.gate.clear()  # A's upload waits at its first part
        points = [await _backup(a, 0, full=True), await _backup(a, 1, full=False)]
        uploading, waiting = (await b.ok("GET", "/copies"))["copies"]
        assert [uploading["point_id"], waiting["point_id"]] == points
        assert await asyncio.to_thread(parts.arrived.wait, 60)  # the first copy's upload has begun, on A
        assert await _uploader(db, uploading["id"]) == "a"
        for hub in (b, a):  # both list who uploads what
            listed = {c["id"]: c["uploader"] for c in (await hub.ok("GET", "/copies"))["copies"]}
            assert listed == {uploading["id"]: "a", waiting["id"]: None}
            assert (await hub.ok("GET", f"/copies/{uploading['id']}"))["uploader"] == "a"
        for hub in (b, a):  # the same answer through either hub
            answer = await _delete(hub, uploading["id"])
            assert _refused_as_uploading_on(answer, "a"), answer
        # the second copy waits for the first (the disk's copies are made in turn): it uploads nowhere yet
        assert await b.ok("DELETE", f"/copies/{waiting['id']}") == {"deleted": [waiting["id"]]}
        # the bucket fails A's try: the upload is over, the copy stays pending (to be tried again)
        parts.fail_on = ".qcow2"
        parts.gate.set()
        deadline = time.monotonic() + 60
        while await _uploader(db, uploading["id"]) is not None:
            assert time.monotonic() < deadline, "A's upload did not end"
            await asyncio.sleep(0.05)
        assert (await b.ok("GET", f"/copies/{uploading['id']}"))["state"] == "pending"
        assert await b.ok("DELETE", f"/copies/{uploading['id']}") == {"deleted": [uploading["id"]]}
        assert (await a.ok("GET", "/copies"))["copies"] == []


async def test_a_dead_hubs_upload_holds_no_copy(
    ceph_cluster: Any, tmp_path: Path, parts: Parts, shared_db: str
) -> None:
    async with _two_hubs(ceph_cluster, tmp_path, shared_db, parts) as (a, b, db):
        parts.gate.clear()
        await _backup(a, 0, full=True)
        [copy] = (await b.ok("GET", "/copies"))["copies"]
        assert await asyncio.to_thread(parts.arrived.wait, 60)
        answer = await _delete(b, copy["id"])
        assert _refused_as_uploading_on(answer, "a"), answer
        # A dies mid-upload: its heartbeat loop ends (as a hung hub's), its last beat is older than the lapse (as
        # the clock would have aged it; the clock stays, so that B does not take A over meanwhile and resume the
        # copy itself)
        a.hub.close()
        lapsed = b.clock.now() - HUB_LOST - 1
        await db.run(lambda c: c.execute("UPDATE hubs SET heartbeat = ? WHERE id = ?", (lapsed, "a")))
        assert [(m["id"], m["live"]) for m in (await b.ok("GET", "/hubs"))["hubs"]] == [("a", False), ("b", True)]
        assert await _uploader(db, copy["id"]) == "a"  # marked still, by a hub that is not live
        assert (await b.ok("GET", f"/copies/{copy['id']}"))["uploader"] is None  # which counts for nothing
        assert await b.ok("DELETE", f"/copies/{copy['id']}") == {"deleted": [copy["id"]]}
        # A's upload, let go, ends to no effect: its completion needs the copy pending; the object versions it
        # made stay recorded, for offsite retention to delete once their lock is over
        parts.gate.set()
        async with asyncio.timeout(60):
            await a.hub.copies.settled()
        assert (await b.ok("GET", "/copies"))["copies"] == []
        assert (await b.ok("GET", f"/copies/{copy['id']}"))["state"] == "deleted"
        left = await db.run(
            lambda c: c.execute("SELECT COUNT(*) FROM offsite_objects WHERE copy_id = ?", (copy["id"],)).fetchone()
        )
        assert left[0] >= 2, left  # its image and its manifest, at least
        assert await _uploader(db, copy["id"]) is None


async def test_an_upload_another_hub_took_over_stops_at_its_next_part(
    ceph_cluster: Any, tmp_path: Path, parts: Parts, shared_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub lost mid-upload and back (a partition) finds its copy marked by the hub that took it over: its
    upload stops at the next part it would record, leaving the copy pending and marked by the other hub, and a
    try of its own later is refused while that hub is live. Nothing fails, nothing is sent twice."""
    async with _two_hubs(ceph_cluster, tmp_path, shared_db, parts) as (a, b, db):
        parts.gate.clear()
        await _backup(a, 0, full=True)
        [copy] = (await b.ok("GET", "/copies"))["copies"]
        assert await asyncio.to_thread(parts.arrived.wait, 60)  # A's first part waits at the gate
        # B took the copy over (as after A's heartbeat lapsed; the clock stays, so A counts as live again)
        await db.run(lambda c: c.execute("UPDATE offsite_copies SET uploader = 'b' WHERE id = ?", (copy["id"],)))
        parts.gate.set()
        async with asyncio.timeout(60):
            await a.hub.copies.settled()
        sent = list(parts.sent)
        assert len(sent) == 1 and sent[0][0].endswith(".qcow2"), sent  # the part S3 had, then no other
        assert "hub b took its upload over (this hub, a, was lost meanwhile)" in caplog.text
        shown = await a.ok("GET", f"/copies/{copy['id']}")
        assert (shown["state"], shown["uploader"], shown["error"]) == ("pending", "b", None)
        assert await _uploader(db, copy["id"]) == "b"  # A's end of upload left B's mark
        assert await a.hub.copies.resume() == [copy["id"]]  # A tries it again: B (live) uploads it
        async with asyncio.timeout(60):
            await a.hub.copies.settled()
        assert parts.sent == sent
        assert "hub b uploads it; left to it" in caplog.text
        assert (await b.ok("GET", f"/copies/{copy['id']}"))["state"] == "pending"
