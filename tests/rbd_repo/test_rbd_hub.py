"""The hub (``sendense-nbd hub --repo rbd://...``) backing vcsim VMs up into a real Ceph pool through a stand-in node
running the real backup client: fulls and incrementals become snapshots read byte for byte equal to the VM's disks
by qemu's rbd driver, retention removes snapshots, restores export a snapshot over NBD (nbdcopy), convert it to a
file and clone it to a new image (REST and CLI), verify jobs read snapshots, and a pool at its quota fails the job
that writes into it with ``insufficient_space`` and a sentence, refuses the next one (507), and leaves nothing a
later incremental could include."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess
from tests.hub.node_standin import NodeStandin
from tests.rbd_repo.conftest import ceph, rbd, snapshot_matches, wait_pool_full
from tests.vmware.vsphere import vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
KEYS = (2000, 2001)


def _vm(vcsim: dict[str, Any], path: str) -> dict[str, Any]:
    return next(v for v in vcsim["vms"] if v["path"] == path)


def _disks_now(vm: dict[str, Any], folder: Path, name: str) -> dict[int, Path]:
    """Copies of the VM's disks now, by key."""
    copies = {}
    for disk in vm["disks"]:
        copies[disk["key"]] = folder / f"{name}-{disk['key']}.raw"
        shutil.copyfile(disk["path"], copies[disk["key"]])
    return copies


def _backup(api: Api, vm_path: str) -> dict[str, Any]:
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": "auto"})
    assert status == 201, job
    return api.wait_job(job["job_id"])


def _points(api: Api, vm_path: str) -> list[dict[str, Any]]:
    status, listed = api.get(f"/points?vm_path={vm_path}")
    assert status == 200, listed
    return list(listed["points"])


def _start(hub_factory: Callable[..., HubProcess], node: NodeStandin, url: str, state: Path, *extra: str) -> Api:
    hub = hub_factory(node.url, "--repo", url, "--state-dir", str(state), *extra, repo=state)
    assert hub.startup["store"] == url, hub.startup
    return Api(hub.url)


def test_backups_retention_restores_and_verify_on_rbd(
    vcsim: dict[str, Any],
    node: NodeStandin,
    hub_factory: Callable[..., HubProcess],
    ceph_cluster: Any,
    url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    vm_path = "/DC0/vm/DC0_H0_VM0"
    vm = _vm(vcsim, vm_path)
    state = tmp_path / "state"
    api = _start(hub_factory, node, url, state, "--keep", "2")
    expected = []
    for round_number in range(3):
        for key in KEYS:
            vmdisk.write(vcsim["state"], vm["moref"], key, round_number * 2 * MIB + 4096, os.urandom(300_000))
        if round_number == 2:
            vmdisk.zero(vcsim["state"], vm["moref"], 2000, 4096, 300_000)  # round 0's data becomes zeroes
        expected.append(_disks_now(vm, tmp_path, f"r{round_number}"))
        job = _backup(api, vm_path)
        assert job["state"] == "completed", (job, node.results.get(job["job_id"]))
        sync = {d["disk_key"]: d["sync_type"] for d in job["detail"]["disks"]}
        assert sync == dict.fromkeys(KEYS, "full" if round_number == 0 else "incremental")

    points = _points(api, vm_path)
    assert len(points) == 4 and all(p["path"].startswith(f"rbd:{ceph_cluster.pool}/{prefix}.") for p in points)
    for key in KEYS:
        chain = [p for p in points if p["disk_key"] == key]
        assert [p["kind"] for p in chain] == ["full", "incremental"]  # round 0's snapshot was removed
        image = chain[0]["path"].removeprefix("rbd:").partition("@")[0]
        assert [s["name"] for s in rbd(ceph_cluster, "snap", "ls", image)] == [p["id"] for p in chain]
        snapshot_matches(ceph_cluster, chain[0]["path"], expected[1][key])
        snapshot_matches(ceph_cluster, chain[1]["path"], expected[2][key])

    latest = [p for p in points if p["disk_key"] == 2000][-1]
    _restores(api, ceph_cluster, latest, expected[2][2000], tmp_path, state)

    status, job = api.post("/verify", {"vm_path": vm_path})
    assert status == 202, job
    deadline = time.monotonic() + 120
    while (verified := api.get(f"/verify/{job['job_id']}")[1])["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert verified["state"] == "completed", verified
    assert {p["verify_state"] for p in _points(api, vm_path)} == {"verified"}
    status, usage = api.get("/repository")
    assert status == 200 and usage["path"].startswith(f"rbd://{ceph_cluster.pool}?") and usage["points"] == 4, usage
    assert 0 < usage["free"] <= usage["total"], usage
    listed = run(sys.executable, "-m", "sendense_nbd", "points", vm_path, "--repo", str(state))
    assert latest["id"] in listed.stdout


def _restores(api: Api, cluster: Any, point: dict[str, Any], expected: Path, tmp_path: Path, state: Path) -> None:
    """Export (read by nbdcopy), convert (REST and CLI) and clone (REST and CLI) of one point."""
    status, restore = api.post("/restores", {"point_id": point["id"], "action": "export"})
    assert status == 201, restore
    copy = tmp_path / "exported.raw"
    run(require("nbdcopy"), restore["detail"]["uri"], str(copy))
    run("cmp", str(copy), str(expected))
    status, stopped = api.delete(f"/restores/{restore['id']}")
    assert status == 200 and stopped["state"] == "completed", stopped

    status, converted = api.post("/restores", {"point_id": point["id"], "action": "convert", "path": "p.qcow2"})
    assert status == 201 and converted["state"] == "completed", converted
    run(require("qemu-img"), "compare", "-F", "raw", converted["detail"]["path"], str(expected))

    status, cloned = api.post("/restores", {"point_id": point["id"], "action": "clone", "image": "vm0-restored"})
    assert status == 201 and cloned["state"] == "completed", cloned
    assert cloned["mode"] == "clone" and cloned["detail"]["path"] == f"rbd:{cluster.pool}/vm0-restored", cloned
    status, again = api.post("/restores", {"point_id": point["id"], "action": "clone", "image": "vm0-restored"})
    assert status == 201 and again["state"] == "failed" and again["error"]["code"] == "exists", again
    assert "exists" in again["error"]["message"], again
    out = run(sys.executable, "-m", "sendense_nbd", "restore", point["id"], "--repo", str(state), "--clone", "vm0-b")
    assert f"rbd:{cluster.pool}/vm0-b" in out.stdout, out.stdout
    for name in ("vm0-restored", "vm0-b"):
        run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", cluster.rbd_filename(name), str(expected))
        run(require("rbd"), *cluster.client_args(), "rm", f"{cluster.pool}/{name}")


def test_a_pool_at_its_quota_fails_the_job_cleanly_and_keeps_no_partial_data(
    vcsim: dict[str, Any],
    node: NodeStandin,
    hub_factory: Callable[..., HubProcess],
    ceph_cluster: Any,
    url: str,
    tmp_path: Path,
) -> None:
    vm_path = "/DC0/vm/DC0_H0_VM1"
    vm = _vm(vcsim, vm_path)
    api = _start(hub_factory, node, url, tmp_path / "state", "--min-free", "0")
    for key in KEYS:
        vmdisk.write(vcsim["state"], vm["moref"], key, 0, os.urandom(MIB))
    before = _disks_now(vm, tmp_path, "before")
    assert _backup(api, vm_path)["state"] == "completed"

    for key in KEYS:
        vmdisk.write(vcsim["state"], vm["moref"], key, 0, os.urandom(6 * MIB))
    node.hold = True  # the node takes the job and waits: the pool fills up first
    status, job = api.post("/backups", {"vm_path": vm_path})
    assert status == 201, job
    ceph(ceph_cluster, "osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", "1")
    try:
        wait_pool_full(ceph_cluster, True)
        assert node._loop is not None
        asyncio.run_coroutine_threadsafe(node._run(node.received[-1]), node._loop).result(timeout=120)
        failed = api.wait_job(job["job_id"])
        assert failed["state"] == "failed" and failed["error"]["code"] == "insufficient_space", failed
        assert "ENOSPC" in failed["error"]["message"], failed["error"]
        assert api.get("/ports")[1]["used"] == []
        node.hold = False
        status, refused = api.post("/backups", {"vm_path": vm_path})
        assert status == 507 and "free" in refused["error"]["message"], refused
    finally:
        ceph(ceph_cluster, "osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", "0")
    wait_pool_full(ceph_cluster, False)

    points = _points(api, vm_path)
    assert len(points) == 2 and {p["kind"] for p in points} == {"full"}
    for point in points:
        snapshot_matches(ceph_cluster, point["path"], before[point["disk_key"]])
    after = _disks_now(vm, tmp_path, "after")
    done = _backup(api, vm_path)
    assert done["state"] == "completed", (done, node.results.get(done["job_id"]))
    for point in _points(api, vm_path):
        if point["job_id"] == done["job_id"]:
            assert point["kind"] == "incremental"
            snapshot_matches(ceph_cluster, point["path"], after[point["disk_key"]])
