"""The hub's offsite copies against the real RGW: a policy's copy target checked when it is stored, each completed
point copied (chains of seal_every points, a new chain starting with a full made from an incremental point),
copies listed, served over NBD from the bucket and compared by qemu-img with the repository's points, downloaded
and verified, a locked copy's delete refused through the API (409 locked), an expired chain deleted by retention."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.cluster import HEARTBEAT, HUB_LOST, Cluster, Identity
from sendense_nbd.hub.copies import chain_lock
from sendense_nbd.hub.db import Database
from tests.conftest import require, run
from tests.hub.conftest import nbd_write
from tests.hub.operating import LocalHub, local_hub
from tests.offsite.conftest import new_bucket, secret_file
from tests.rbd_repo.conftest import rbd_url

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM = "/DC0/vm/web01"


def _policy(ceph_cluster: Any, bucket: str, secret: str, **copy: Any) -> dict[str, Any]:
    return {
        "name": "offsite", "node": "site", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 366 * 86400},
        "copy": {"endpoint": ceph_cluster.rgw_endpoint, "bucket": bucket, "access_key": ceph_cluster.s3_access_key,
                 "secret_file": secret, "retain": 60, "margin": 5, "seal_every": 2, **copy},
    }  # fmt: skip


async def _hub_with_node(hub: LocalHub) -> None:
    """A registered node for the policy to name (never called: the tests post backups with their disks)."""
    await hub.ok("POST", "/nodes", {"name": "site", "url": "http://127.0.0.1:9"})


async def _backup(hub: LocalHub, writes: list[tuple[int, bytes]], *, full: bool) -> dict[str, Any]:
    body = {"vm_path": VM, "mode": "full" if full else "incremental", "disks": [{"key": 2000, "capacity": 24 * MIB}]}
    job = await hub.ok("POST", "/backups", body)
    await asyncio.to_thread(nbd_write, job["detail"]["disks"][0]["uri"], writes)
    done = {"status": "completed", "vm_path": VM, "disks": [{"disk_key": 2000, "change_id": f"52 aa/{time.time()}"}]}
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", done)
    await hub.hub.settled()
    await hub.hub.copies.settled()
    return job


async def test_points_are_copied_served_downloaded_and_locked(ceph_cluster: Any, tmp_path: Path, s3: Any) -> None:
    bucket = new_bucket(ceph_cluster)
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _hub_with_node(hub)
        await hub.ok("POST", "/policies", _policy(ceph_cluster, bucket, secret, retain=300))
        rng = __import__("random").Random(3)
        await _backup(hub, [(0, rng.randbytes(8 * MIB)), (20 * MIB, rng.randbytes(MIB))], full=True)
        await hub.clock.advance(100)  # each copy is made 100 s after the previous one
        await _backup(hub, [(MIB, rng.randbytes(2 * MIB))], full=False)
        await hub.clock.advance(100)
        await _backup(hub, [(10 * MIB, rng.randbytes(3 * MIB)), (0, bytes(MIB))], full=False)
        copies = (await hub.ok("GET", f"/copies?vm_path={VM}"))["copies"]
        assert [c["state"] for c in copies] == ["completed"] * 3, copies
        # seal_every 2: the third point starts a new chain, a full made from the local incremental point
        assert [c["kind"] for c in copies] == ["full", "incremental", "full"]
        assert copies[0]["chain_id"] == copies[1]["chain_id"] != copies[2]["chain_id"]
        points = {p["id"]: p for p in (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]}
        for copy in copies[1:]:  # an overlay on its chain's full, and the standalone full
            served = await hub.ok("POST", f"/copies/{copy['id']}/export")
            await asyncio.to_thread(
                run, require("qemu-img"), "compare", "-F", "qcow2", served["uri"], points[copy["point_id"]]["path"]
            )
            await hub.ok("DELETE", f"/copies/{copy['id']}/export")
        assert (await hub.ok("POST", f"/copies/{copies[1]['id']}/verify"))["verified"] is True
        got = await hub.ok("POST", f"/copies/{copies[1]['id']}/download", {"path": "web01-copy"})
        assert got["verified"] and sorted(os.listdir(os.path.dirname(got["path"]))) == sorted(
            [f"{copies[0]['point_id']}.qcow2", f"{copies[1]['point_id']}.qcow2", f"{copies[1]['point_id']}.digests"]
        )
        run(require("qemu-img"), "check", got["path"])
        run(require("qemu-img"), "compare", got["path"], points[copies[1]["point_id"]]["path"])
        status, answer = await hub.call("DELETE", f"/copies/{copies[0]['id']}")
        assert status == 409 and answer["error"]["code"] == "locked", answer
        assert "is locked until" in answer["error"]["message"]
        assert [c["state"] for c in (await hub.ok("GET", "/copies"))["copies"]] == ["completed"] * 3
        # the first chain's lock covers its newest copy (the second, made 100 s later) plus retain and margin:
        # every object of the full (image, digests, manifest) was locked again when the second copy joined
        until = copies[1]["manifest"]["created"] + 305
        assert until == copies[0]["manifest"]["created"] + 405
        assert copies[0]["locked_until"] == copies[1]["locked_until"] == until
        assert copies[2]["locked_until"] == copies[2]["manifest"]["created"] + 305
        full = copies[0]["manifest"]
        manifest_key = full["image"]["key"].removesuffix(".qcow2") + ".json"
        objects = [(full[name]["key"], full[name]["version"]) for name in ("image", "digests")]
        for key, version in [*objects, (manifest_key, copies[0]["manifest_version"])]:
            retention = s3.get_object_retention(Bucket=bucket, Key=key, VersionId=version)["Retention"]
            assert abs(retention["RetainUntilDate"].timestamp() - until) < 1, key


async def test_an_expired_chain_is_deleted_by_retention(ceph_cluster: Any, tmp_path: Path, s3: Any) -> None:
    bucket = new_bucket(ceph_cluster)
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _hub_with_node(hub)
        await hub.ok("POST", "/policies", _policy(ceph_cluster, bucket, secret, retain=5, margin=0, seal_every=1))
        await _backup(hub, [(0, b"a" * MIB)], full=True)
        first = (await hub.ok("GET", "/copies"))["copies"][0]
        status, _ = await hub.call("DELETE", f"/copies/{first['id']}")
        assert status == 409
        await asyncio.sleep(max(0.0, first["manifest"]["created"] + 6 - time.time()))
        await hub.clock.advance(10)  # the hub's clock too: retention judges by it
        await _backup(hub, [(MIB, b"b" * MIB)], full=False)
        copies = (await hub.ok("GET", "/copies"))["copies"]
        assert [c["point_id"] for c in copies] != [first["point_id"]] and first["id"] not in [c["id"] for c in copies]
        kept = {v["Key"] for v in s3.list_object_versions(Bucket=bucket).get("Versions", [])}
        assert not any(first["chain_id"] in key for key in kept) and kept


async def test_a_copy_target_is_checked_when_the_policy_is_stored(ceph_cluster: Any, tmp_path: Path) -> None:
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _hub_with_node(hub)
        readable = secret_file(tmp_path, ceph_cluster.s3_secret_key, 0o644)
        status, answer = await hub.call("POST", "/policies", _policy(ceph_cluster, new_bucket(ceph_cluster), readable))
        assert status == 400 and "has mode 0644: it must be the hub user's alone" in answer["error"]["message"]
        secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
        plain = new_bucket(ceph_cluster, lock=False)
        status, answer = await hub.call("POST", "/policies", _policy(ceph_cluster, plain, secret))
        assert status == 400 and "has no Object Lock" in answer["error"]["message"]
        status, answer = await hub.call("POST", "/policies", _policy(ceph_cluster, plain, secret, lock_mode="WORM"))
        assert status == 400 and "copy.lock_mode must be one of GOVERNANCE, COMPLIANCE" in answer["error"]["message"]
        assert (await hub.ok("GET", "/policies"))["policies"] == []


async def test_hubs_sharing_a_repository_make_a_disks_copies_in_turn(ceph_cluster: Any, tmp_path: Path) -> None:
    """With an RBD repository (other hubs may share it), a disk's copies are made under the cluster's lock of
    that disk and policy: while another hub holds it, the copy waits, pending; then it is made."""
    bucket = new_bucket(ceph_cluster)
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    clock = ManualClock(time.time())
    store = rbd_url(ceph_cluster, f"t{uuid.uuid4().hex[:10]}")
    async with local_hub(tmp_path / "a", clock=clock, store=store, hub_id="a") as hub:
        await _hub_with_node(hub)
        await hub.ok("POST", "/policies", _policy(ceph_cluster, bucket, secret))
        other_db = Database("sqlite:" + str(tmp_path / "a" / "hub.db"))
        other = Cluster(other_db, clock, Identity(id="b", api_url="http://127.0.0.1:9", nbd_host="127.0.0.1",
                        ports=range(10100, 10101), store=hub.hub.cluster.me.store, local=False),
                        heartbeat=HEARTBEAT, lapse=HUB_LOST)  # fmt: skip
        await other.join(None)
        try:
            async with other.lock(chain_lock("offsite", VM, 2000)):
                body = {"vm_path": VM, "mode": "full", "disks": [{"key": 2000, "capacity": 8 * MIB}]}
                job = await hub.ok("POST", "/backups", body)
                await asyncio.to_thread(nbd_write, job["detail"]["disks"][0]["uri"], [(0, os.urandom(2 * MIB))])
                done = {"status": "completed", "vm_path": VM, "disks": [{"disk_key": 2000, "change_id": "52 aa/1"}]}
                await hub.ok("POST", f"/backups/{job['job_id']}/complete", done)
                await hub.hub.settled()
                await asyncio.sleep(1.0)  # four tries of the lock at least
                [waiting] = (await hub.ok("GET", f"/copies?vm_path={VM}"))["copies"]
                assert waiting["state"] == "pending" and waiting["manifest"] is None, waiting
            async with asyncio.timeout(60):
                await hub.hub.copies.settled()
            [made] = (await hub.ok("GET", f"/copies?vm_path={VM}"))["copies"]
            assert made["id"] == waiting["id"] and made["state"] == "completed", made
        finally:
            other_db.close()
