"""The hub's offsite copies through their life against the real RGW: a failed copy (an alert, its chain sealed, the
next copy a full), an upload interrupted by a hub stop resumed after the restart from the parts recorded in hub.db,
pending copies keeping their points (and the points below) from retention and refusing a delete while they upload,
copies staying readable where they were written after their policy moves to another bucket, loses its target or
is deleted, and concurrent exports of one copy sharing one server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from tests.conftest import require, run
from tests.hub.conftest import nbd_write
from tests.hub.operating import LocalHub, local_hub
from tests.offsite.conftest import Parts, new_bucket, secret_file

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM = "/DC0/vm/web01"


def _policy(ceph_cluster: Any, bucket: str, secret: str, **extra: Any) -> dict[str, Any]:
    copy = {"endpoint": ceph_cluster.rgw_endpoint, "bucket": bucket, "access_key": ceph_cluster.s3_access_key,
            "secret_file": secret, "retain": 600, "margin": 5, "seal_every": 5}  # fmt: skip
    return {"name": "offsite", "node": "site", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 366 * 86400},
            "copy": copy, **extra}  # fmt: skip


async def _start(hub: LocalHub, ceph_cluster: Any, bucket: str, secret: str, **extra: Any) -> None:
    await hub.ok("POST", "/nodes", {"name": "site", "url": "http://127.0.0.1:9"})
    await hub.ok("POST", "/policies", _policy(ceph_cluster, bucket, secret, **extra))


async def _backup(hub: LocalHub, writes: list[tuple[int, bytes]], *, full: bool, settle: bool = True) -> str:
    """A completed backup of one 48 MiB disk with ``writes``; its point's ID. ``settle``: its copies ended."""
    body = {"vm_path": VM, "mode": "full" if full else "incremental", "disks": [{"key": 2000, "capacity": 48 * MIB}]}
    job = await hub.ok("POST", "/backups", body)
    pieces = [(at + i, data[i : i + 4 * MIB]) for at, data in writes for i in range(0, len(data), 4 * MIB)]
    await asyncio.to_thread(nbd_write, job["detail"]["disks"][0]["uri"], pieces)
    done = {"status": "completed", "vm_path": VM, "disks": [{"disk_key": 2000, "change_id": f"52 aa/{time.time()}"}]}
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", done)
    await hub.hub.settled()
    if settle:
        await hub.hub.copies.settled()
    return str(job["detail"]["disks"][0]["point_id"])


async def _copies(hub: LocalHub) -> list[dict[str, Any]]:
    return list((await hub.ok("GET", "/copies"))["copies"])


async def test_a_failed_copy_alerts_seals_its_chain_and_the_next_starts_a_full(
    ceph_cluster: Any, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, new_bucket(ceph_cluster), secret)
        hub.hub.copies.retry_delays = (0.1,)  # tried twice
        await _backup(hub, [(0, b"a" * MIB)], full=True)
        await asyncio.to_thread(Path(secret).write_text, "not-the-secret\n")  # a rotated key the hub was not given
        await _backup(hub, [(MIB, b"b" * MIB)], full=False)
        first, failed = await _copies(hub)
        assert failed["state"] == "failed" and "SignatureDoesNotMatch" in failed["error"], failed
        assert first["sealed"] and first["state"] == "completed"
        alerts = (await hub.ok("GET", "/alerts?kind=copy_failed"))["alerts"]
        assert [a["key"] for a in alerts] == [failed["id"]] and "its chain is sealed" in alerts[0]["message"]
        status, answer = await hub.call("POST", f"/copies/{first['id']}/verify")
        assert status == 502 and answer["error"]["code"] == "offsite"  # the bucket failing is no verdict
        await asyncio.to_thread(Path(secret).write_text, ceph_cluster.s3_secret_key + "\n")
        await _backup(hub, [(2 * MIB, b"c" * MIB)], full=False)
        third = (await _copies(hub))[-1]
        assert third["state"] == "completed" and third["kind"] == "full" and third["chain_id"] != first["chain_id"]
        status, answer = await hub.call("POST", f"/copies/{failed['id']}/export")
        assert status == 409 and answer["error"]["code"] == "failed"


def _recorded_parts(repo: Path) -> int:
    with sqlite3.connect(repo / "hub.db") as db:
        return sum(len(row[0]) > 2 for row in db.execute("SELECT parts FROM offsite_uploads"))


async def test_an_upload_a_stop_interrupts_resumes_after_the_restart(
    ceph_cluster: Any, tmp_path: Path, parts: Parts
) -> None:
    secret, bucket, repo = (
        secret_file(tmp_path, ceph_cluster.s3_secret_key),
        new_bucket(ceph_cluster),
        tmp_path / "repo",
    )
    data = __import__("random").Random(5).randbytes(40 * MIB)
    parts.pause = 1.0
    async with local_hub(repo, clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, bucket, secret)
        point = await _backup(hub, [(0, data)], full=True, settle=False)
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_recorded_parts, repo):  # S3 has part 1, hub.db says so
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    before = list(parts.sent)
    assert before and before[0][1] == 1
    async with local_hub(repo, clock=ManualClock(time.time())) as hub:
        assert [c["state"] for c in await _copies(hub)] == ["pending"]
        await hub.hub.copies.settled()
        (copy,) = await _copies(hub)
        assert copy["state"] == "completed", copy
        image = copy["manifest"]["image"]
        resent = [n for key, n in parts.sent[len(before) :] if key == image["key"]]
        assert resent and 1 not in resent and sorted(resent) == list(range(resent[0], resent[-1] + 1))
        got = await hub.ok("POST", f"/copies/{copy['id']}/download", {"path": "back"})
        points = {p["id"]: p for p in (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]}
        run(require("qemu-img"), "compare", got["path"], points[point]["path"])


async def test_pending_copies_keep_their_points_and_refuse_a_delete_while_uploading(
    ceph_cluster: Any, tmp_path: Path, parts: Parts
) -> None:
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, new_bucket(ceph_cluster), secret, retention={"keep_last": 1})
        parts.gate.clear()  # every upload waits at its first part
        kept = []
        for i in range(3):  # a minute apart: keep_last 1 has one last point to keep
            kept.append(await _backup(hub, [(i * MIB, bytes([i + 1]) * MIB)], full=i == 0, settle=False))
            await hub.clock.advance(60)
        points = (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]
        assert [p["id"] for p in points] == kept  # keep_last 1, yet the points waiting for their copies stay
        uploading, waiting, last = await _copies(hub)
        assert await asyncio.to_thread(parts.arrived.wait, 60)  # the first copy's upload has begun
        status, answer = await hub.call("DELETE", f"/copies/{uploading['id']}")
        assert status == 409 and answer["error"]["code"] == "uploading", answer
        assert await hub.ok("DELETE", f"/copies/{waiting['id']}") == {"deleted": [waiting["id"]]}
        parts.gate.set()
        await hub.hub.copies.settled()
        states = {c["id"]: c["state"] for c in (await hub.ok("GET", "/copies"))["copies"]}
        assert states == {uploading["id"]: "completed", last["id"]: "completed"}  # the deleted one never ran
        # the copies ended: retention ran again for the disk and keeps the last point alone, in its view
        points = (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]
        assert [p["id"] for p in points] == kept[-1:]
        await _same_as_point(hub, (await _copies(hub))[-1])


async def _same_as_point(hub: LocalHub, copy: dict[str, Any]) -> None:
    """The copy served from the bucket reads as its point (qemu-img compare)."""
    served = await hub.ok("POST", f"/copies/{copy['id']}/export")
    points = {p["id"]: p for p in (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]}
    await asyncio.to_thread(
        run, require("qemu-img"), "compare", "-F", "qcow2", served["uri"], points[copy["point_id"]]["path"]
    )
    assert (await hub.ok("DELETE", f"/copies/{copy['id']}/export"))["stopped"] is True


async def test_copies_stay_where_they_were_written_when_the_policy_moves(
    ceph_cluster: Any, tmp_path: Path, s3: Any
) -> None:
    secret, first_bucket, second_bucket = (
        secret_file(tmp_path, ceph_cluster.s3_secret_key),
        *(new_bucket(ceph_cluster) for _ in range(2)),
    )
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, first_bucket, secret)
        await _backup(hub, [(0, b"a" * MIB)], full=True)
        await hub.ok("PATCH", "/policies/offsite", {"copy": {"bucket": second_bucket}})
        await _backup(hub, [(MIB, b"b" * MIB)], full=False)
        old, new = await _copies(hub)
        # the open chain does not continue into the new bucket: a new chain starts there with a full
        assert (old["target"]["bucket"], new["target"]["bucket"]) == (first_bucket, second_bucket)
        assert new["kind"] == "full" and new["chain_id"] != old["chain_id"] and old["sealed"]
        keys = {v["Key"] for v in s3.list_object_versions(Bucket=second_bucket).get("Versions", [])}
        assert new["manifest"]["image"]["key"] in keys and old["manifest"]["image"]["key"] not in keys
        await hub.ok("PATCH", "/policies/offsite", {"copy": None})
        assert (await hub.ok("POST", f"/copies/{old['id']}/verify"))["verified"] is True  # read where written
        status, answer = await hub.call("DELETE", f"/copies/{old['id']}")
        assert status == 409 and answer["error"]["code"] == "locked" and first_bucket in answer["error"]["message"]
        await hub.ok("DELETE", "/policies/offsite")
        for copy in (old, new):
            await _same_as_point(hub, copy)


async def test_concurrent_exports_of_a_copy_share_one_server(ceph_cluster: Any, tmp_path: Path) -> None:
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, new_bucket(ceph_cluster), secret)
        await _backup(hub, [(0, b"a" * MIB)], full=True)
        (copy,) = await _copies(hub)
        answers = await asyncio.gather(*(hub.ok("POST", f"/copies/{copy['id']}/export") for _ in range(4)))
        assert len({(a["port"], a["uri"]) for a in answers}) == 1
        ports = await hub.ok("GET", "/ports")
        leases = [lease for lease in ports["used"] if lease["job_id"] == f"copy-{copy['id']}"]
        assert len(leases) == 1, ports  # one lease: the others waited and shared it
        assert [e["job_id"] for e in ports["exports"]].count(f"copy-{copy['id']}") == 1, ports  # and one export
        assert (await hub.ok("DELETE", f"/copies/{copy['id']}/export"))["stopped"] is True
        assert (await hub.ok("DELETE", f"/copies/{copy['id']}/export"))["stopped"] is False
        await hub.ok("POST", f"/copies/{copy['id']}/download", {"path": "once"})
        status, answer = await hub.call("POST", f"/copies/{copy['id']}/download", {"path": "once"})
        assert status == 409 and answer["error"]["code"] == "exists"
        await asyncio.to_thread(_damage, tmp_path / "repo", copy["id"])  # as if the object rotted since
        status, answer = await hub.call("POST", f"/copies/{copy['id']}/download", {"path": "twice"})
        assert (
            status == 502 and answer["error"]["code"] == "damaged" and "the manifest says" in answer["error"]["message"]
        )
        assert not (tmp_path / "repo" / "restores" / "twice").exists()  # a failed download leaves no folder


def _damage(repo: Path, copy_id: str) -> None:
    """Make the hub's record of a copy's image name another sha256 than the bucket's object has."""
    with sqlite3.connect(repo / "hub.db") as db:
        (text,) = db.execute("SELECT manifest FROM offsite_copies WHERE id = ?", (copy_id,)).fetchone()
        manifest = json.loads(text)
        manifest["image"]["sha256"] = "0" * 64
        db.execute("UPDATE offsite_copies SET manifest = ? WHERE id = ?", (json.dumps(manifest), copy_id))


def _left_rows(repo: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(repo / "hub.db") as db:
        return [(key, version) for key, version in db.execute("SELECT key, version FROM offsite_objects")]


async def test_what_a_failed_copy_wrote_is_known_and_deleted_when_its_lock_ends(
    ceph_cluster: Any, tmp_path: Path, s3: Any, parts: Parts
) -> None:
    secret, bucket, repo = (
        secret_file(tmp_path, ceph_cluster.s3_secret_key),
        new_bucket(ceph_cluster),
        tmp_path / "repo",
    )
    async with local_hub(repo, clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, bucket, secret, copy={**_policy(ceph_cluster, bucket, secret)["copy"],
                                                             "retain": 4, "margin": 0})  # fmt: skip
        hub.hub.copies.retry_delays = (0.1,)
        parts.fail_on = ".digests"  # the image is made, its digests' upload fails (twice)
        await _backup(hub, [(0, b"a" * MIB)], full=True)
        (failed,) = await _copies(hub)
        assert failed["state"] == "failed" and "InternalError" in failed["error"]
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # its open upload was aborted
        made = {(v["Key"], v["VersionId"]) for v in s3.list_object_versions(Bucket=bucket).get("Versions", [])}
        left = await asyncio.to_thread(_left_rows, repo)
        assert made and set(left) == made  # every version it made is recorded
        assert {key.rsplit(".", 1)[1] for key, _ in left} == {"qcow2"} and len(left) == 1  # the retry took it
        parts.fail_on = None
        await asyncio.sleep(max(0.0, max(s3.head_object(Bucket=bucket, Key=k, VersionId=v)["ObjectLockRetainUntilDate"]
                                         .timestamp() for k, v in made) + 1 - time.time()))  # fmt: skip
        await hub.clock.advance(10)
        await _backup(hub, [(MIB, b"b" * MIB)], full=False)  # its copy's retention deletes what was left
        assert (await _copies(hub))[-1]["state"] == "completed"
        kept = {(v["Key"], v["VersionId"]) for v in s3.list_object_versions(Bucket=bucket).get("Versions", [])}
        assert not kept & made and not await asyncio.to_thread(_left_rows, repo)
