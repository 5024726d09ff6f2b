"""Hub-driven backups over real HTTP and NBD: the hub (``sendense-nbd hub``) allocates ports, creates
qcow2 points and serves them; a stand-in node runs the real backup client against vcsim. Every chain is
judged with ``qemu-img check`` and ``qemu-img compare``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess, hub_db_args
from tests.hub.node_standin import NodeStandin
from tests.vmware.vsphere import vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
KEYS = (2000, 2001)


def _vm(vcsim: dict[str, Any], path: str) -> dict[str, Any]:
    return next(v for v in vcsim["vms"] if v["path"] == path)


def _disk_now(vm: dict[str, Any], key: int, dest: Path) -> Path:
    shutil.copyfile(next(d["path"] for d in vm["disks"] if d["key"] == key), dest)
    return dest


def _compare(image: str, expected: Path) -> None:
    check = run(require("qemu-img"), "check", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    result = run(require("qemu-img"), "compare", "-F", "raw", image, str(expected), check=False)
    assert result.returncode == 0, result.stdout


def _node_result(node: NodeStandin, job_id: str) -> tuple[int, str, str]:
    """The backup client's exit: it posts the completion, then exits."""
    deadline = time.monotonic() + 30
    while job_id not in node.results and time.monotonic() < deadline:
        time.sleep(0.05)
    return node.results[job_id]


def _backup(api: Api, vm_path: str, mode: str = "auto", disks: object = None) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_path": vm_path, "mode": mode}
    if disks is not None:
        body["disks"] = disks
    status, job = api.post("/backups", body)
    assert status == 201, job
    return api.wait_job(job["job_id"])


def test_full_incremental_retention_and_restores(
    vcsim: dict[str, Any], node: NodeStandin, hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    vm_path = "/DC0/vm/DC0_H0_VM0"
    vm = _vm(vcsim, vm_path)
    hub = hub_factory(node.url, "--keep", "2")
    api = Api(hub.url)
    expected: list[dict[int, Path]] = []
    for round_number in range(3):
        for key in KEYS:
            vmdisk.write(vcsim["state"], vm["moref"], key, round_number * 2 * MIB + 4096, os.urandom(300_000))
        if round_number == 2:
            vmdisk.zero(vcsim["state"], vm["moref"], 2000, 4096, 300_000)  # data of round 0 becomes zeroes
        expected.append({key: _disk_now(vm, key, tmp_path / f"r{round_number}-{key}.raw") for key in KEYS})
        job = _backup(api, vm_path)
        assert job["state"] == "completed", (job, node.results.get(job["job_id"]))
        code, out, err = _node_result(node, job["job_id"])
        assert code == 0, out + err
        job = api.get(f"/backups/{job['job_id']}")[1]  # with the final progress, sent before the client exits
        sync = {d["disk_key"]: d["sync_type"] for d in job["detail"]["disks"]}
        assert sync == dict.fromkeys(KEYS, "full" if round_number == 0 else "incremental")
        assert job["progress"]["status"] == "completed"
        status, ports = api.get("/ports")
        assert status == 200 and ports["used"] == [] and ports["exports"] == [], ports

    # Retention kept the last 2 points per disk; the older one was merged into the full image.
    status, listed = api.get(f"/points?vm_path={vm_path}")
    assert status == 200
    points = listed["points"]
    assert len(points) == 4 and all(p["status"] == "completed" for p in points)
    for key in KEYS:
        chain = [p for p in points if p["disk_key"] == key]
        assert [p["kind"] for p in chain] == ["full", "incremental"]
        _compare(chain[0]["path"], expected[1][key])
        _compare(chain[1]["path"], expected[2][key])
        status, change = api.get(f"/backups/changeid?vm_path={vm_path}&disk_key={key}")
        assert status == 200 and change["change_id"].startswith(vmdisk.cbt_id(vcsim["state"], vm["moref"], key))
        assert change["point_id"] == chain[1]["id"]
    assert len(list((Path(hub.repo) / "vms").rglob("*.qcow2"))) == 4, "merged or failed images were left behind"

    # Restore: serve the latest point read-only over NBD, and convert one to a standalone file.
    latest = [p for p in points if p["disk_key"] == 2000][-1]
    status, restore = api.post("/restores", {"point_id": latest["id"], "action": "export"})
    assert status == 201, restore
    copy = tmp_path / "restored.raw"
    run(require("nbdcopy"), restore["detail"]["uri"], str(copy))
    run("cmp", str(copy), str(expected[2][2000]))
    status, stopped = api.delete(f"/restores/{restore['id']}")
    assert status == 200 and stopped["state"] == "completed"
    out = tmp_path / "standalone.qcow2"
    run(sys.executable, "-m", "sendense_nbd", "restore", latest["id"], "--repo", str(hub.repo), "-o", str(out),
        "-f", "qcow2", *hub_db_args(hub.repo))  # fmt: skip
    _compare(str(out), expected[2][2000])
    assert hub.stop() == 0


def test_failed_backup_discards_its_points_and_frees_its_ports(
    vcsim: dict[str, Any], node: NodeStandin, hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    vm_path = "/DC0/vm/DC0_H0_VM1"
    hub = hub_factory(node.url)
    api = Api(hub.url)
    vmdisk.inject_fault(vcsim["state"], "CreateSnapshot_Task", times=1)
    job = _backup(api, vm_path, "full")
    assert job["state"] == "failed" and job["error"]["stage"] == "enabling CBT", job  # its cycle snapshot failed
    status, listed = api.get(f"/points?vm_path={vm_path}")
    assert listed["points"] == []
    assert list((Path(hub.repo) / "vms").rglob("*.qcow2")) == []
    status, ports = api.get("/ports")
    assert ports["used"] == [] and ports["exports"] == []
    # The next job works.
    job = _backup(api, vm_path, "full")
    assert job["state"] == "completed", (job, node.results.get(job["job_id"]))


def test_hub_killed_mid_backup_recovers_on_restart(
    vcsim: dict[str, Any], node: NodeStandin, hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    vm_path = "/DC0/vm/DC0_C0_RP0_VM0"
    node.hold = True  # the node takes the job but never reports: the hub dies meanwhile
    repo = tmp_path / "crash-repo"
    hub = hub_factory(node.url, repo=repo)
    api = Api(hub.url)
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": "full"})
    assert status == 201, job
    ports = [d["port"] for d in job["detail"]["disks"]]
    assert len(ports) == 2
    assert hub.stop(signal.SIGKILL) == -signal.SIGKILL

    restarted = hub_factory(node.url, repo=repo, ports=hub.ports)
    assert restarted.startup["failed_jobs"] == [job["job_id"]]
    assert sorted(restarted.startup["released_ports"]) == sorted(ports)
    api = Api(restarted.url)
    status, after = api.get(f"/backups/{job['job_id']}")
    assert after["state"] == "failed" and after["error"]["message"] == "the hub restarted"
    assert api.get(f"/points?vm_path={vm_path}")[1]["points"] == []
    assert list((repo / "vms").rglob("*.qcow2")) == []
    assert api.get("/ports")[1]["used"] == []
    node.hold = False
    done = _backup(api, vm_path, "full")
    assert done["state"] == "completed", (done, node.results.get(done["job_id"]))
    assert sorted(d["port"] for d in done["detail"]["disks"]) == sorted(ports), "the freed ports are reused"


def test_kill_dash_nine_leaves_no_listener_behind(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    status, job = api.post(
        "/backups", {"vm_path": "/DC/vm/x", "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]}
    )
    assert status == 201, job
    port = job["detail"]["disks"][0]["port"]
    run(require("nbdinfo"), "--size", job["detail"]["disks"][0]["uri"])
    hub.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run([require("nbdinfo"), "--size", f"nbd://127.0.0.1:{port}/"], capture_output=True)
        if probe.returncode != 0:
            break
        time.sleep(0.1)
    assert probe.returncode != 0
