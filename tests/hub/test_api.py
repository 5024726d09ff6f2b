"""The hub's REST API over real HTTP: JSON errors with codes, the job state machine, auth, a dry pool."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess, free_port_range, hub_db_args
from tests.hub.node_standin import NodeStandin

pytestmark = pytest.mark.peer

MIB = 1 << 20
DISKS = [{"key": 2000, "capacity": 4 * MIB}, {"key": 2001, "capacity": 2 * MIB}]


def _completion(job: dict, change: str = "52 aa/1") -> dict:
    return {
        "status": "completed",
        "vm_path": job["vm_path"],
        "disks": [{"disk_key": d["disk_key"], "change_id": f"{change}-{d['disk_key']}", "disk_uuid": None}
                  for d in job["detail"]["disks"]],
    }  # fmt: skip


def test_bad_requests_get_json_errors(hub_factory: Callable[..., HubProcess]) -> None:
    api = Api(hub_factory(None).url)
    status, body = api.post("/backups", raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "bad_request" and "not JSON" in body["error"]["message"]
    status, body = api.post("/backups", [1, 2])
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = api.post("/backups", {"mode": "full"})
    assert status == 400 and "vm_path" in body["error"]["message"]
    status, body = api.post("/backups", {"vm_path": "/DC/vm/a", "mode": "sometimes", "disks": DISKS})
    assert status == 400 and "mode" in body["error"]["message"]
    status, body = api.post("/backups", {"vm_path": "/DC/vm/a", "disks": [{"key": "x"}]})
    assert status == 400 and "device key" in body["error"]["message"]
    status, body = api.post("/backups", {"vm_path": "/DC/vm/a"})
    assert status == 400 and "no node is configured" in body["error"]["message"]
    for method, path in (("GET", "/backups/nope"), ("POST", "/backups/nope/complete"), ("DELETE", "/backups/nope")):
        status, body = api.call(method, path, {"status": "completed", "disks": []} if method == "POST" else None)
        assert status == 404 and body["error"]["code"] == "not_found", (method, path, body)
    status, body = api.get("/no/such/route")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = api.get("/backups/changeid?vm_path=/DC/vm/a&disk_key=2000")
    assert status == 404


def test_completion_once_then_conflict_and_the_points_are_served(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    status, job = api.post("/backups", {"vm_path": "/DC/vm/a", "mode": "full", "disks": DISKS})
    assert status == 201 and job["state"] == "running", job
    # The exports are real: write through one with a real client, then complete.
    data = tmp_path / "data.raw"
    data.write_bytes(b"\x5a" * MIB + bytes(3 * MIB))
    target = next(d for d in job["detail"]["disks"] if d["disk_key"] == 2000)
    run(require("nbdcopy"), "--flush", str(data), target["uri"])
    exports = {e["disk_key"]: e for e in api.get("/ports")[1]["exports"]}
    assert (
        exports[2000]["bytes_written"] >= MIB and exports[2000]["clients"] == 0 and exports[2001]["bytes_written"] == 0
    )
    assert exports[2000]["clients_served"] >= 1
    status, progress = api.post(f"/backups/{job['job_id']}/progress", {"stage": "transferring", "status": "running"})
    assert status == 200
    assert api.get(f"/backups/{job['job_id']}/progress")[1]["progress"]["stage"] == "transferring"
    status, wrong = api.post(f"/backups/{job['job_id']}/complete", {"status": "completed", "disks": []})
    assert status == 400 and wrong["error"]["code"] == "bad_request" and "the job has" in wrong["error"]["message"]
    status, done = api.post(f"/backups/{job['job_id']}/complete", _completion(job))
    assert status == 200 and done["state"] == "completed", done
    status, again = api.post(f"/backups/{job['job_id']}/complete", _completion(job))
    assert status == 409 and again["error"]["code"] == "conflict"
    status, late = api.post(f"/backups/{job['job_id']}/progress", {"status": "running"})
    assert status == 409
    status, change = api.get("/backups/changeid?vm_path=/DC/vm/a&disk_key=2000")
    assert status == 200 and change["change_id"] == "52 aa/1-2000" and change["capacity"] == 4 * MIB
    point = next(p for p in api.get("/points?vm_path=/DC/vm/a")[1]["points"] if p["disk_key"] == 2000)
    run(require("qemu-img"), "check", point["path"])
    run(require("qemu-img"), "compare", "-F", "raw", point["path"], str(data))
    assert api.get("/ports")[1]["used"] == []


def test_pool_run_dry_is_a_clear_error_and_leaks_nothing(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None, ports=free_port_range(2))
    api = Api(hub.url)
    three = DISKS + [{"key": 2002, "capacity": MIB}]
    status, body = api.post("/backups", {"vm_path": "/DC/vm/b", "mode": "full", "disks": three})
    assert status == 503 and body["error"]["code"] == "ports_exhausted", body
    assert "no free NBD port" in body["error"]["message"]
    assert api.get("/ports")[1]["used"] == []
    assert api.get("/points?vm_path=/DC/vm/b")[1]["points"] == []
    assert list((Path(hub.repo) / "vms").rglob("*.qcow2")) == []
    [failed] = api.get("/backups?vm_path=/DC/vm/b")[1]["backups"]
    assert failed["state"] == "failed"
    status, job = api.post("/backups", {"vm_path": "/DC/vm/b", "mode": "full", "disks": DISKS})
    assert status == 201, job


def test_cancel_tells_the_node_and_discards(hub_factory: Callable[..., HubProcess], node: NodeStandin) -> None:
    node.hold = True
    api = Api(hub_factory(node.url).url)
    status, job = api.post("/backups", {"vm_path": "/DC0/vm/DC0_H0_VM1", "mode": "full"})
    assert status == 201, job
    assert [d["disk_key"] for d in job["detail"]["disks"]] == [2000, 2001]  # listed by the node
    assert node.received[-1]["targets"] == {str(d["disk_key"]): d["uri"] for d in job["detail"]["disks"]}
    status, cancelled = api.delete(f"/backups/{job['job_id']}")
    assert status == 200 and cancelled["state"] == "cancelled"
    assert node.cancelled == [job["job_id"]]
    assert api.delete(f"/backups/{job['job_id']}")[0] == 409
    assert api.get("/ports")[1]["used"] == []


def test_auth(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    hub = hub_factory(None, "--token-file", str(token))
    status, body = Api(hub.url).get("/ports")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert Api(hub.url, "wrong").get("/ports")[0] == 401
    assert Api(hub.url, "t0ken").get("/ports")[0] == 200
    refused = subprocess.run(
        [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(tmp_path / "r"), "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "give --token-file" in refused.stderr


def test_a_job_that_never_completes_times_out(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None, "--job-timeout", "1")
    api = Api(hub.url)
    status, job = api.post("/backups", {"vm_path": "/DC/vm/c", "mode": "full", "disks": DISKS[:1]})
    assert status == 201
    done = api.wait_job(job["job_id"], timeout=30)
    assert done["state"] == "failed" and done["error"]["stage"] == "timeout", done
    assert api.get("/ports")[1]["used"] == [] and api.get("/points?vm_path=/DC/vm/c")[1]["points"] == []


def test_offline_cli_lists_ports_and_points(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    status, job = api.post("/backups", {"vm_path": "/DC/vm/d", "mode": "full", "disks": DISKS[:1]})
    assert status == 201
    pool = f"{hub.ports.start}-{hub.ports.stop - 1}"
    ports = json.loads(run(sys.executable, "-m", "sendense_nbd", "ports", "--repo", str(hub.repo),
                           "--nbd-ports", pool, *hub_db_args(hub.repo)).stdout)  # fmt: skip
    assert [u["job_id"] for u in ports["used"]] == [job["job_id"]] and ports["free"] == len(hub.ports) - 1
    assert api.post(f"/backups/{job['job_id']}/complete", _completion(job))[0] == 200
    points = json.loads(
        run(
            sys.executable, "-m", "sendense_nbd", "points", "/DC/vm/d", "--repo", str(hub.repo), *hub_db_args(hub.repo)
        ).stdout
    )
    assert [(p["disk_key"], p["status"], p["kind"]) for p in points] == [(2000, "completed", "full")]
