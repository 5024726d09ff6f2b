"""The whole pipeline on one machine (tests/pipeline/stack.py): backups through the node's SSH tunnel survive the
tunnel's failure, and cross a relay adding 50 ms of round trip byte for byte."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hub.conftest import Api, HubProcess
from tests.node.test_node import NodeProcess
from tests.pipeline.stack import MIB, NODE_SIDE, VM_PATH, Pipeline
from tests.vmware.vsphere import running_vcsim, vmdisk

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("pipeline-vcsim")
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "8") as info:
        yield info


def test_backups_through_the_tunnel_survive_a_tunnel_failure(
    tmp_path: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess]
) -> None:
    pipeline = Pipeline(tmp_path, vcsim, hub_factory)
    api = pipeline.api
    vm = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)
    moref = vm["moref"]
    try:
        # 1. A full backup through the tunnel (the hub lists the disks through the reverse forward).
        for disk in vm["disks"]:
            vmdisk.write(vcsim["state"], moref, disk["key"], 0, os.urandom(3 * MIB))
        expected = pipeline.disk_copies("full")
        status, job = api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
        assert status == 201, job
        assert all(d["uri"].startswith(f"nbd://{NODE_SIDE}:") for d in job["detail"]["disks"])
        full = api.wait_job(job["job_id"])
        assert full["state"] == "completed", full
        pipeline.verify(full, expected)
        change_ids = {
            k: api.get(f"/backups/changeid?vm_path={VM_PATH}&disk_key={k}")[1]["change_id"] for k in (2000, 2001)
        }

        # 2. The tunnel dies mid-backup and stays down: the job fails, its ports come back, nothing advances.
        for disk in vm["disks"]:
            vmdisk.write(vcsim["state"], moref, disk["key"], 4 * MIB, os.urandom(2 * MIB))
        status, job = api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
        assert status == 201, job
        _wait_for_disk_sources(pipeline.node)
        time.sleep(0.5)  # reads are in flight (each takes 3 s)
        pipeline.tunnel.kill()
        failed = api.wait_job(job["job_id"], timeout=90)
        assert failed["state"] == "failed", failed
        assert api.get("/ports")[1]["used"] == []
        for key, change_id in change_ids.items():
            assert _change_id(api, key) == change_id
        assert not [p for p in api.get(f"/points?vm_path={VM_PATH}")[1]["points"] if p["job_id"] == job["job_id"]]

        # 3. The tunnel comes back; the next job is a correct incremental.
        pipeline.tunnel = pipeline.start_tunnel()
        expected = pipeline.disk_copies("incremental")
        status, job = api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
        assert status == 201, job
        done = api.wait_job(job["job_id"])
        assert done["state"] == "completed", done
        assert [d["sync_type"] for d in done["detail"]["disks"]] == ["incremental", "incremental"]
        pipeline.verify(done, expected)
        assert _snapshots(vcsim) == []
        # The failed job of step 2 may still be winding down on the node (retries, cleanup); in time
        # every disk source is gone.
        deadline = time.monotonic() + 60
        while _disk_sources(pipeline.node) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _disk_sources(pipeline.node) == [], "the node left an nbdkit running"
    finally:
        pipeline.close()


def _change_id(api: Api, key: int) -> str:
    status, answer = api.get(f"/backups/changeid?vm_path={VM_PATH}&disk_key={key}")
    assert status == 200, answer
    return str(answer["change_id"])


def _wait_for_disk_sources(node: NodeProcess, timeout: float = 60) -> None:
    """Until the node's job runs one nbdkit per disk."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_disk_sources(node)) == 2:
            return
        time.sleep(0.05)
    raise AssertionError("the node never started its disk sources")


def _disk_sources(node: NodeProcess) -> list[str]:
    found = subprocess.run(["pgrep", "-f", "-P", str(node.proc.pid), "vddk_standin"], capture_output=True, text=True)
    return found.stdout.split()


def _snapshots(vcsim: dict[str, Any]) -> list[str]:
    """Snapshots alive in the simulator (each keeps a folder of frozen disk copies)."""
    return sorted(p.name for p in (Path(vcsim["state"]) / "snapshots").glob("*") if p.is_dir())


def test_full_and_incremental_backups_across_a_50ms_link(
    tmp_path: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess]
) -> None:
    """The tunnel crosses a relay adding 50 ms of round trip: the points are still byte-identical, and an
    incremental sends exactly the changed bytes (merge gap 0 by default)."""
    pipeline = Pipeline(tmp_path, vcsim, hub_factory, slow_source=False, rtt=0.05)
    vm = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)
    changed = 2 * 256 * 1024  # per disk: two areas of 256 KiB, 512 KiB of unchanged data apart
    try:
        for disk in vm["disks"]:
            for offset in (0, 4 * MIB):
                vmdisk.write(vcsim["state"], vm["moref"], disk["key"], offset, os.urandom(2 * MIB))
        full = _backup(pipeline, pipeline.disk_copies("full"))
        assert [d["sync_type"] for d in full["detail"]["disks"]] == ["full", "full"]
        full_bytes = _bytes(pipeline.api, full)
        # A full copy's bytes_changed is the data it read; what it sent is that data less its zeroes.
        assert all(4 * MIB <= sent <= read for sent, read in full_bytes.values()), full_bytes

        for disk in vm["disks"]:
            for offset in (5 * MIB, 5 * MIB + 768 * 1024):
                vmdisk.write(vcsim["state"], vm["moref"], disk["key"], offset, os.urandom(256 * 1024))
        incremental = _backup(pipeline, pipeline.disk_copies("incremental"))
        assert [(d["sync_type"], d["base_point"]) for d in incremental["detail"]["disks"]] == [
            ("incremental", d["point_id"]) for d in full["detail"]["disks"]
        ]
        assert _bytes(pipeline.api, incremental) == {2000: (changed, changed), 2001: (changed, changed)}
    finally:
        pipeline.close()
    # Every byte of both jobs crossed the relay (the tunnel is the node's only way to the hub's ports).
    assert pipeline.relay is not None and pipeline.relay.accepted >= 1
    assert pipeline.relay.up.bytes >= sum(sent for sent, _ in full_bytes.values()) + 2 * changed


def _backup(pipeline: Pipeline, expected: dict[int, Path]) -> dict[str, Any]:
    """Run one backup job to completion and verify its restore points against ``expected``."""
    status, job = pipeline.api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
    assert status == 201, job
    done = pipeline.api.wait_job(job["job_id"])
    assert done["state"] == "completed", done
    pipeline.verify(done, expected)
    return done


def _bytes(api: Api, job: dict[str, Any], timeout: float = 30) -> dict[int, tuple[int, int]]:
    """Per disk, (bytes_transferred, bytes_changed) of a completed job: its detail, its restore points and
    the node's final progress report (which follows the completion) must all say the same."""
    figures = {d["disk_key"]: (d["bytes_transferred"], d["bytes_changed"]) for d in job["detail"]["disks"]}
    points = {p["id"]: p for p in api.get(f"/points?vm_path={VM_PATH}")[1]["points"]}
    for disk in job["detail"]["disks"]:
        point = points[disk["point_id"]]
        assert (point["bytes_transferred"], point["bytes_changed"]) == figures[disk["disk_key"]], point
    deadline = time.monotonic() + timeout
    while (report := api.get(f"/backups/{job['job_id']}/progress")[1]["progress"] or {}).get("status") != "completed":
        if time.monotonic() > deadline:
            raise AssertionError(f"no final progress report for job {job['job_id']}: {report}")
        time.sleep(0.1)
    assert {d["disk_key"]: (d["bytes_transferred"], d["bytes_changed"]) for d in report["disks"]} == figures, report
    assert report["bytes_transferred"] == sum(sent for sent, _ in figures.values()), report
    assert report["percent"] == 100.0, report
    for disk in report["disks"]:
        assert disk["bytes_transferred"] + disk["bytes_zeroed"] + disk["bytes_skipped"] == disk["disk_size"], disk
    return figures


#: The second hub's tunnel ends on the node's side (the first one's are on NODE_SIDE).
OTHER_SIDE = "127.0.0.5"
OTHER_VM = "/DC0/vm/DC0_H0_VM1"


def test_one_node_serves_two_hubs_through_a_tunnel_each(
    tmp_path: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess]
) -> None:
    """One node, two hubs (each its own repository and SSH endpoint), an SSH tunnel from the node to each,
    its ends at its own address: each hub's job reaches the node through its own tunnel (targets and API at
    that tunnel's end), both run at once and land byte for byte in their hub's repository; with one tunnel
    down, the other hub's next backup still completes."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Pipeline(tmp_path / "a", vcsim, hub_factory, slow_source=False)
    try:
        second = Pipeline(tmp_path / "b", vcsim, hub_factory, slow_source=False, node=first.node, side=OTHER_SIDE)
        try:
            pairs = [(first, VM_PATH), (second, OTHER_VM)]
            expected = {}
            for pipeline, vm_path in pairs:
                vm = next(v for v in vcsim["vms"] if v["path"] == vm_path)
                for disk in vm["disks"]:
                    vmdisk.write(vcsim["state"], vm["moref"], disk["key"], 0, os.urandom(2 * MIB))
                expected[vm_path] = pipeline.disk_copies(f"two-hubs-{pipeline.side}", vm_path)
            jobs = []
            for pipeline, vm_path in pairs:
                status, job = pipeline.api.post("/backups", {"vm_path": vm_path, "mode": "auto"})
                assert status == 201, job
                assert all(d["uri"].startswith(f"nbd://{pipeline.side}:") for d in job["detail"]["disks"]), job
                jobs.append(job)
            for (pipeline, vm_path), job in zip(pairs, jobs, strict=True):
                done = pipeline.api.wait_job(job["job_id"])
                assert done["state"] == "completed", done
                pipeline.verify(done, expected[vm_path], vm_path)

            second.tunnel.kill()
            expected[VM_PATH] = first.disk_copies("one-tunnel", VM_PATH)
            status, job = first.api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
            assert status == 201, job
            done = first.api.wait_job(job["job_id"])
            assert done["state"] == "completed", done
            assert [d["sync_type"] for d in done["detail"]["disks"]] == ["incremental", "incremental"]
            first.verify(done, expected[VM_PATH])
        finally:
            second.close()
    finally:
        first.close()
