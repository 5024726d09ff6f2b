"""Why each job did what it did: its full reason, bytes and stages, recorded by the real hub while the
real backup client (through the stand-in node) backs up vcsim's VMs; error codes; one job per VM."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.errors import RepositoryError
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.jobs import MAX_STAGE_NAME, MAX_STAGES, JobStore, Stage, with_node_stages
from sendense_nbd.hub.requests import NodeStage
from sendense_nbd.hub.service import _out_of_space
from tests.hub.conftest import Api, HubProcess, open_hub_store
from tests.hub.node_standin import NodeStandin
from tests.vmware.vsphere import vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
KEYS = (2000, 2001)
#: The stages the backup client goes through for a VM whose CBT is already on, in order.
CLIENT_STAGES = ["initializing", "cleaning old snapshots", "creating snapshot", "preparing", "setting up NBD",
                 "transferring", "finalizing"]  # fmt: skip
#: The same for a VM whose CBT is off (vcsim's VMs at first).
FIRST_STAGES = CLIENT_STAGES[:2] + ["enabling CBT"] + CLIENT_STAGES[2:]


def _backup(api: Api, node: NodeStandin, vm_path: str, mode: str = "auto") -> dict[str, Any]:
    """A completed job, as the hub shows it once the client exited (its final report, with the
    client's whole stage history, arrives after the completion)."""
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": mode})
    assert status == 201, job
    done = api.wait_job(job["job_id"])
    assert done["state"] == "completed", (done, node.results.get(job["job_id"]))
    deadline = time.monotonic() + 30
    while job["job_id"] not in node.results and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.results[job["job_id"]][0] == 0, node.results[job["job_id"]]
    return api.get(f"/backups/{job['job_id']}")[1]


def _reasons(job: dict[str, Any]) -> dict[int, str | None]:
    return {d["disk_key"]: d["full_reason"] for d in job["detail"]["disks"]}


def _check_stages(job: dict[str, Any], node_stages: list[str]) -> None:
    """The hub's ``queued``, the client's stages, the hub's ``completing`` and ``retention``: each ended,
    none negative, one after the other."""
    stages = job["stages"]
    assert [stage["name"] for stage in stages] == ["queued", *node_stages, "completing", "retention"], stages
    for stage in stages:
        assert stage["ended"] is not None and stage["seconds"] >= 0, stages
        assert stage["seconds"] == pytest.approx(stage["ended"] - stage["started"]), stage
    for before, after in zip(stages, stages[1:], strict=False):
        assert after["started"] >= before["ended"] - 1e-6, stages


def _check_bytes(job: dict[str, Any]) -> None:
    disks = job["detail"]["disks"]
    assert job["bytes_sent"] == sum(d["bytes_transferred"] for d in disks), job
    assert job["bytes_changed"] == sum(d["bytes_changed"] for d in disks), job


def test_reasons_bytes_and_stages_of_real_backups(
    vcsim: dict[str, Any], node: NodeStandin, hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    vm_path = "/DC0/vm/DC0_H0_VM0"
    vm = next(v for v in vcsim["vms"] if v["path"] == vm_path)
    hub = hub_factory(node.url)
    api = Api(hub.url)
    for key in KEYS:
        vmdisk.write(vcsim["state"], vm["moref"], key, 0, os.urandom(200_000))

    first = _backup(api, node, vm_path)
    assert first["full_reason"] == "first_backup" and _reasons(first) == dict.fromkeys(KEYS, "first_backup"), first
    assert first["policy"] is None and first["error"] is None
    assert all(d["full_reason_detail"] for d in first["detail"]["disks"]), first["detail"]
    _check_stages(first, FIRST_STAGES)
    _check_bytes(first)
    assert first["bytes_sent"] >= 2 * 200_000, first

    vmdisk.write(vcsim["state"], vm["moref"], 2000, 3 * MIB, os.urandom(65536))
    incremental = _backup(api, node, vm_path)
    assert incremental["full_reason"] is None and _reasons(incremental) == dict.fromkeys(KEYS), incremental
    _check_stages(incremental, CLIENT_STAGES)
    _check_bytes(incremental)
    changed = {d["disk_key"]: d["bytes_changed"] for d in incremental["detail"]["disks"]}
    assert changed == {2000: 65536, 2001: 0}, changed
    assert incremental["bytes_changed"] == 65536

    requested = _backup(api, node, vm_path, "full")
    assert requested["full_reason"] == "requested" and _reasons(requested) == dict.fromkeys(KEYS, "requested")

    # CBT reset on the host: the node finds the change ID refused; the hub records the node's code.
    vmdisk.reset_cbt(vcsim["state"], vm["moref"], 2001)
    reset = _backup(api, node, vm_path)
    assert _reasons(reset) == {2000: None, 2001: "cbt_reset"} and reset["full_reason"] == "cbt_reset", reset
    assert {d["disk_key"]: d["sync_type"] for d in reset["detail"]["disks"]}[2000] == "incremental"

    # The points of disk 2001 vanish from the store: the hub knows the disk was backed up before.
    store = open_hub_store(hub.repo)
    try:
        store.call(lambda c: c.execute("DELETE FROM points WHERE vm_path = ? AND disk_key = 2001", (vm_path,)))
    finally:
        store.close()
    missing = _backup(api, node, vm_path)
    assert _reasons(missing) == {2000: None, 2001: "base_missing"} and missing["full_reason"] == "base_missing"
    assert {d["disk_key"]: d["sync_type"] for d in missing["detail"]["disks"]} == {2000: "incremental", 2001: "full"}

    listed = {job["job_id"]: job["full_reason"] for job in api.get(f"/backups?vm_path={vm_path}")[1]["backups"]}
    assert list(listed.values()) == ["first_backup", None, "requested", "cbt_reset", "base_missing"], listed
    assert hub.stop() == 0


def test_one_backup_per_vm_at_once(hub_factory: Callable[..., HubProcess]) -> None:
    api = Api(hub_factory(None).url)
    body = {"vm_path": "/DC/vm/busy", "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]}
    status, running = api.post("/backups", body)
    assert status == 201, running
    status, refused = api.post("/backups", body)
    assert status == 409 and refused["error"]["code"] == "vm_busy", refused
    assert running["job_id"] in refused["error"]["message"] and "/DC/vm/busy" in refused["error"]["message"]
    assert len(api.get("/backups?vm_path=/DC/vm/busy")[1]["backups"]) == 1, "the refusal made a job"
    assert api.post("/backups", {**body, "vm_path": "/DC/vm/other"})[0] == 201  # other VMs go on
    status, cancelled = api.delete(f"/backups/{running['job_id']}")
    assert status == 200 and cancelled["error"] == {"stage": "cancelled", "code": "cancelled",
                                                    "message": "cancelled by the API"}  # fmt: skip
    assert cancelled["stages"][-1]["name"] == "queued" and cancelled["stages"][-1]["ended"] is not None
    status, again = api.post("/backups", body)
    assert status == 201, again


def test_stages_from_progress_are_bounded_and_a_failure_ends_the_running_one(
    hub_factory: Callable[..., HubProcess],
) -> None:
    api = Api(hub_factory(None).url)
    body = {"vm_path": "/DC/vm/s", "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]}
    job = api.post("/backups", body)[1]
    progress = f"/backups/{job['job_id']}/progress"
    for stage in ("initializing", "initializing", "", "transferring"):
        assert api.post(progress, {"status": "running", "stage": stage})[0] == 200
    for i in range(80):  # a node naming too many stages, with long names
        assert api.post(progress, {"status": "running", "stage": f"{i:03d}" + "x" * 120})[0] == 200
    shown = api.get(f"/backups/{job['job_id']}")[1]["stages"]
    names = [stage["name"] for stage in shown]
    assert names[:3] == ["queued", "initializing", "transferring"], names
    assert len(shown) == MAX_STAGES - 2 and all(len(name) <= MAX_STAGE_NAME for name in names), names
    assert all(stage["ended"] is not None for stage in shown[:-1]) and shown[-1]["ended"] is None
    failure = {"status": "failed", "error": {"stage": "transferring", "message": "disk 2000: EIO"}}
    failed = api.post(f"/backups/{job['job_id']}/complete", failure)[1]
    assert failed["state"] == "failed" and failed["error"]["code"] == "node", failed
    assert failed["stages"][-1]["ended"] is not None and failed["bytes_sent"] is None
    late = api.post(progress, {"status": "failed", "stage": "finalizing"})
    assert late[0] == 200 and api.get(f"/backups/{job['job_id']}")[1]["stages"] == failed["stages"]


def test_completion_reasons_from_the_node_and_codes(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    api = Api(hub_factory(None).url)
    disks = [{"key": 2000, "capacity": MIB}, {"key": 2001, "capacity": MIB}]
    job = api.post("/backups", {"vm_path": "/DC/vm/r", "disks": disks})[1]
    assert job["full_reason"] == "first_backup"
    report = {"status": "completed", "disks": [
        {"disk_key": 2000, "change_id": "a/1", "full_reason": "some_new_reason", "full_reason_detail": None,
         "bytes_transferred": 10, "bytes_changed": 10},
        {"disk_key": 2001, "change_id": "b/1", "full_reason": "an older node's words",
         "bytes_transferred": 5, "bytes_changed": 4},
    ]}  # fmt: skip
    done = api.post(f"/backups/{job['job_id']}/complete", report)[1]
    assert done["state"] == "completed" and done["full_reason"] == "first_backup", done  # the hub's reason wins
    details = {d["disk_key"]: d["full_reason_detail"] for d in done["detail"]["disks"]}
    assert details == {2000: "some_new_reason", 2001: "an older node's words"}, details
    assert (done["bytes_sent"], done["bytes_changed"]) == (15, 14)

    # A node's code where the hub had none; a code this hub does not know is kept as null.
    job = api.post("/backups", {"vm_path": "/DC/vm/r", "disks": disks})[1]
    assert job["full_reason"] is None and _reasons(job) == dict.fromkeys(KEYS), job
    report["disks"][0]["full_reason"] = "cbt_reset"
    report["disks"][1]["full_reason"] = "some_new_reason"
    del report["disks"][1]["bytes_changed"]
    done = api.post(f"/backups/{job['job_id']}/complete", report)[1]
    assert _reasons(done) == {2000: "cbt_reset", 2001: None} and done["full_reason"] == "cbt_reset", done
    assert done["bytes_changed"] is None and done["bytes_sent"] == 15  # one disk did not report it

    # A job that never completes times out with its code.
    api = Api(hub_factory(None, "--job-timeout", "1", repo=tmp_path / "second").url)
    job = api.post("/backups", {"vm_path": "/DC/vm/t", "mode": "full", "disks": disks})[1]
    timed_out = api.wait_job(job["job_id"], timeout=30)
    assert timed_out["error"]["code"] == "timeout" and timed_out["stages"][-1]["ended"] is not None, timed_out


async def test_an_older_jobs_table_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with sqlite3.connect(path) as connection:  # the jobs table as the first release made it, with one row
        connection.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, vm_path TEXT NOT NULL, mode TEXT NOT NULL, "
            "state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, deadline REAL NOT NULL, "
            "detail TEXT NOT NULL, progress TEXT, error TEXT)"
        )
        connection.execute(
            "INSERT INTO jobs VALUES ('j1', 'backup', '/DC/vm/o', 'full', 'failed', 1.0, 2.0, 3.0, '{}', NULL, "
            '\'{"stage": "hub", "message": "the hub restarted"}\')'
        )
    connection.close()
    db = Database(str(path))
    try:
        old = await JobStore(db).get("j1")
        assert (old.stages, old.node, old.full_reason, old.bytes_sent) == ((), None, None, None)
        assert old.error is not None and old.error.code is None
        assert old.to_json()["error"] == {"stage": "hub", "code": None, "message": "the hub restarted"}
    finally:
        db.close()


def test_the_node_history_fits_between_the_hub_stages() -> None:
    queued = Stage("queued", 100.0, by_hub=True)
    history = (NodeStage("initializing", 0.0), NodeStage("transferring", 2.0), NodeStage("finalizing", 9.5))
    running = with_node_stages((queued,), history[:2], origin=101.0, now=104.0, terminal=False)
    assert [(s.name, s.started, s.ended) for s in running] == [
        ("queued", 100.0, 101.0), ("initializing", 101.0, 103.0), ("transferring", 103.0, None)]  # fmt: skip
    # The final report after the hub took over: the node part ends where "completing" starts; a node
    # clock running ahead is clamped, never before "queued" nor after the hub's stages.
    tail = (Stage("completing", 110.0, 111.0, by_hub=True), Stage("retention", 111.0, 112.0, by_hub=True))
    done = with_node_stages((*running, *tail), history, origin=95.0, now=120.0, terminal=True)
    assert [(s.name, s.started, s.ended) for s in done] == [
        ("queued", 100.0, 100.0), ("initializing", 100.0, 100.0), ("transferring", 100.0, 104.5),
        ("finalizing", 104.5, 110.0), ("completing", 110.0, 111.0), ("retention", 111.0, 112.0)]  # fmt: skip
    # A failed job (no hub stages after it): its node part ends when the job ended.
    failed = with_node_stages((Stage("queued", 100.0, 107.0, by_hub=True),), history, origin=101.0, now=130.0,
                              terminal=True)  # fmt: skip
    assert failed[-1].name == "finalizing" and failed[-1].ended == 107.0 and failed[-1].started == 107.0
    assert all(s.seconds is not None and s.seconds >= 0 for s in failed)
    assert with_node_stages((queued,), (), origin=0.0, now=1.0, terminal=False) == [queued]


def test_a_full_filesystem_is_found_through_the_causes() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RepositoryError("cannot create /r/x.qcow2") from exc
    except RepositoryError as wrapped:
        assert _out_of_space(wrapped)
    assert _out_of_space(sqlite3.OperationalError("database or disk is full"))
    assert not _out_of_space(RepositoryError("cannot create /r/x.qcow2: permission denied"))
    assert not _out_of_space(OSError(errno.EIO, "I/O error"))
