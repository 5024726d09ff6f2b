"""No partial state in the RBD repository: the whole pipeline (vcsim, the node, its SSH tunnel, the hub with
``--repo rbd://...``; tests/pipeline/stack.py) is killed mid-copy, once the hub (kill -9, then restarted on the
same state directory), once the node (kill -9; its job fails by timeout, and the node comes back). Each time the
job's writes had reached the image's head; afterwards the head reads exactly as the last good snapshot, and the
next incremental's snapshot reads byte for byte as the VM's disks (qemu-img compare through qemu's rbd driver)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess
from tests.node.test_node import NodeProcess
from tests.pipeline.stack import MIB, NODE_API_HOST, VM_PATH, Pipeline
from tests.rbd_repo.conftest import snapshot_filename, snapshot_matches
from tests.vmware.vsphere import vmdisk

pytestmark = pytest.mark.peer

KEYS = (2000, 2001)


def _pipeline(root: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess], url: str) -> Pipeline:
    """The pipeline with its hub on the RBD repository (state in ``root/state``)."""

    def rbd_hub(node_url: str, *extra: str, **kwargs: Any) -> HubProcess:
        return hub_factory(node_url, *extra, "--repo", url, "--state-dir", str(root / "state"), **kwargs)

    # One read in flight per connection (2 per disk): with a delay on each read, a copy takes 16 in a row.
    pipeline = Pipeline(root, vcsim, rbd_hub, node_extra="requests = 1")
    pipeline.read_delay = None
    return pipeline


def _full(pipeline: Pipeline, vcsim: dict[str, Any], ceph_cluster: Any) -> dict[int, str]:
    """A first (full) backup of random data, checked; each disk's point path."""
    vm = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)
    for key in KEYS:
        vmdisk.write(vcsim["state"], vm["moref"], key, 0, os.urandom(8 * MIB))
    expected = pipeline.disk_copies("full")
    job = _backup(pipeline.api)
    return _checked(pipeline.api, ceph_cluster, job, expected)


def _backup(api: Api) -> dict[str, Any]:
    status, job = api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
    assert status == 201, job
    done = api.wait_job(job["job_id"])
    assert done["state"] == "completed", done
    return done


def _checked(api: Api, ceph_cluster: Any, job: dict[str, Any], expected: dict[int, Path]) -> dict[int, str]:
    """The job's points read as ``expected``; their paths by disk."""
    points = {p["id"]: p for p in api.get(f"/points?vm_path={VM_PATH}")[1]["points"]}
    paths = {}
    for disk in job["detail"]["disks"]:
        paths[disk["disk_key"]] = points[disk["point_id"]]["path"]
        snapshot_matches(ceph_cluster, paths[disk["disk_key"]], expected[disk["disk_key"]])
    return paths


def _start_slow_backup(pipeline: Pipeline, vcsim: dict[str, Any], ceph_cluster: Any, last: dict[int, str]) -> str:
    """New data on every disk, a backup whose reads take 200 ms each; returns once its writes reached every head
    (its first reads of 32)."""
    vm = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)
    for key in KEYS:
        vmdisk.write(vcsim["state"], vm["moref"], key, 0, os.urandom(8 * MIB))
    pipeline.read_delay = "200ms"
    status, job = pipeline.api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
    assert status == 201, job
    deadline = time.monotonic() + 60
    while not all(_dirty(ceph_cluster, path) for path in last.values()):
        assert time.monotonic() < deadline, "the job never wrote into the heads"
        time.sleep(0.1)
    return str(job["job_id"])


def _dirty(ceph_cluster: Any, point_path: str) -> bool:
    """Whether the head has objects written since the point's snapshot."""
    image, _, snapshot = point_path.removeprefix("rbd:").partition("@")
    diff = run(require("rbd"), *ceph_cluster.client_args(), "diff", "--from-snap", snapshot, "--whole-object",
               image, "--format", "json")  # fmt: skip
    return bool(json.loads(diff.stdout or "[]"))


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (and theirs)."""
    found = run("pgrep", "-P", str(pid), check=False).stdout.split()
    return [grandchild for child in map(int, found) for grandchild in [child, *_children(child)]]


def _head_is(ceph_cluster: Any, point_path: str) -> None:
    """The image's head reads exactly as the point's snapshot."""
    snapshot = snapshot_filename(ceph_cluster, point_path)
    head = snapshot.replace("@" + point_path.rpartition("@")[2], "", 1)
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", head, snapshot)


def _wait_node_up(api: Api, timeout: float = 60) -> None:
    """Until the hub reaches the node (through the tunnel's reverse forward)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, listed = api.get("/nodes?check=1")
        if status == 200 and all(node["up"] for node in listed["nodes"]):
            return
        time.sleep(0.5)
    raise AssertionError(f"the node is not reachable: {listed}")


def _incremental(pipeline: Pipeline, ceph_cluster: Any) -> None:
    """The next backup is an incremental whose snapshots read as the disks now."""
    pipeline.read_delay = None
    expected = pipeline.disk_copies("after")
    job = _backup(pipeline.api)
    assert [d["sync_type"] for d in job["detail"]["disks"]] == ["incremental", "incremental"], job
    _checked(pipeline.api, ceph_cluster, job, expected)


@contextlib.contextmanager
def _mid_copy(
    root: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess], ceph_cluster: Any, url: str
) -> Iterator[tuple[Pipeline, dict[int, str], str]]:
    """The pipeline after a checked full backup, with a slow backup's copy under way: ``(pipeline, the full's point
    paths, the slow job's id)``; the pipeline closed at the end."""
    pipeline = _pipeline(root, vcsim, hub_factory, url)
    try:
        last = _full(pipeline, vcsim, ceph_cluster)
        yield pipeline, last, _start_slow_backup(pipeline, vcsim, ceph_cluster, last)
    finally:
        pipeline.close()


def test_a_hub_killed_mid_copy_leaves_no_partial_point(
    tmp_path: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess], ceph_cluster: Any, url: str
) -> None:
    with _mid_copy(tmp_path, vcsim, hub_factory, ceph_cluster, url) as (pipeline, last, job_id):
        killed = pipeline.hub
        assert killed.stop(signal.SIGKILL) != 0
        restarted = HubProcess(killed.repo, killed.ports, killed.node_url, *killed.extra).start()
        pipeline.hub = restarted
        assert job_id in restarted.startup["failed_jobs"], restarted.startup
        assert len(restarted.startup["discarded_points"]) == 2, restarted.startup
        for path in last.values():
            _head_is(ceph_cluster, path)
        assert pipeline.api.get(f"/backups/{job_id}")[1]["error"]["code"] == "restarted"
        _wait_node_up(pipeline.api)  # the tunnel reconnects to the new hub
        _incremental(pipeline, ceph_cluster)
        assert restarted.stop() == 0


def test_a_node_killed_mid_copy_leaves_no_partial_point(
    tmp_path: Path, vcsim: dict[str, Any], hub_factory: Callable[..., HubProcess], ceph_cluster: Any, url: str
) -> None:
    with _mid_copy(tmp_path, vcsim, hub_factory, ceph_cluster, url) as (pipeline, last, job_id):
        listen = pipeline.node.url.removeprefix("http://")
        children = _children(pipeline.node.proc.pid)
        pipeline.node.proc.kill()
        pipeline.node.proc.wait(10)
        for pid in children:  # its disk sources, orphaned by the kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        failed = pipeline.api.wait_job(job_id, timeout=90)  # by --job-timeout (15 s): the node is gone
        assert failed["state"] == "failed", failed
        assert len(pipeline.api.get(f"/points?vm_path={VM_PATH}")[1]["points"]) == 2
        for path in last.values():
            _head_is(ceph_cluster, path)
        assert listen.startswith(NODE_API_HOST)
        config = Path(pipeline.root / "node" / "node.toml")
        pipeline.node = NodeProcess(config, listen=listen)  # where the tunnel's reverse forward points
        _wait_node_up(pipeline.api)
        _incremental(pipeline, ceph_cluster)
