"""Three hub processes, one cluster: on 127.0.0.2, .3 and .4, each with its own state directory and its own NBD port
pool on its own address (the same port numbers), sharing one PostgreSQL database and one RBD pool (the session's
Ceph cluster), with the real node and vcsim's 20 VMs. A policy's slots are taken by one hub each and their VMs
spread over the hubs, each VM backed up once per slot; one hub is killed (-9) mid-backup: a survivor takes it over
once, fails its jobs (``hub_lost``, naming it: no point, no change ID, the image's head rolled back to the last
snapshot), the survivors finish the slot, and the VM's next incremental, on another hub, is byte for byte its disk
(qemu-img compare through qemu's rbd driver). Any hub answers for the cluster (jobs, /hubs); a job's change sent to
another hub is redirected (307) to its own. The killed hub comes back without resurrecting its jobs."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.repository.rbd import parse_location
from tests.conftest import require, run, stop_process
from tests.hub.conftest import Api, free_port_range
from tests.node.test_node import NodeProcess
from tests.pipeline.stack import delayed_nbdkit
from tests.rbd_repo.conftest import snapshot_filename, snapshot_matches
from tests.vmware.vsphere import STANDIN_PLUGIN, running_vcsim, vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
EVERY = 20.0


class ClusterHub:
    """``sendense-nbd hub`` on its own address, state directory and log; the cluster's database and repository."""

    def __init__(self, name: str, address: str, root: Path, url: str, node_url: str, ports: range, db: str) -> None:
        self.name, self.address, self.root = name, address, root
        state = root / name
        self.log = root / f"{name}.log"
        self.command = [
            sys.executable, "-m", "sendense_nbd", "hub", "--repo", url, "--state-dir", str(state),
            "--db", db, "--hub-id", name, "--listen", f"{address}:0", "--nbd-bind", address,
            "--nbd-ports", f"{ports.start}-{ports.stop - 1}", "--node-url", node_url, "--heartbeat", "0.5",
            "--hub-lost", "4", "--min-free", "0",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup: dict[str, Any] = {}

    def start(self) -> ClusterHub:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            raise AssertionError(f"hub {self.name} did not start: {self.log.read_text()[-3000:]}")
        self.startup = json.loads(line)
        return self

    @property
    def api(self) -> Api:
        return Api(str(self.startup["listening"]))

    def stop(self) -> None:
        """SIGTERM, and SIGKILL when it does not end in time (a hub stuck in the store)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                stop_process(self.proc, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """vcsim with 20 VMs (5 datacenters of 4), one 2 MiB disk each."""
    require("nbdkit")
    state = tmp_path_factory.mktemp("multihub-vcsim")
    with running_vcsim(state, "-datacenters", "5", "-vm-disks", "1", "-disk-size-mb", "2") as info:
        assert len(info["vms"]) == 20, [vm["path"] for vm in info["vms"]]
        yield info


def _node_config(root: Path, vcsim: dict[str, Any]) -> Path:
    """The node's configuration: vcsim, the stand-in VDDK plugin behind a delay switch, 4 jobs at once."""
    password = root / "vcenter.password"
    password.write_text(vcsim["password"] + "\n")
    password.chmod(0o600)
    config = root / "node.toml"
    config.write_text(
        f'[vcenter]\nendpoint = "127.0.0.1:{vcsim["port"]}"\nusername = "{vcsim["username"]}"\n'
        f'password_file = "{password}"\nthumbprint = "{vcsim["thumbprintSha256"]}"\n\n'
        f'[vddk]\nplugin = "python {STANDIN_PLUGIN}"\nnbdkit = "{delayed_nbdkit(root)}"\ntransports = "nbdssl:nbd"\n\n'
        "[node]\nmax_jobs = 4\nmax_queued = 64\nconnections = 2\nrequests = 1\n"
    )
    return config


@pytest.fixture
def cluster(
    fleet: dict[str, Any], tmp_path: Path, url: str, postgres_cluster: Any
) -> Iterator[tuple[NodeProcess, list[ClusterHub]]]:
    """The node and three hubs on a fresh PostgreSQL database (the first starts alone: it claims the repository
    the others then join)."""
    node = NodeProcess(_node_config(tmp_path, fleet))
    ports, db = free_port_range(12), postgres_cluster.new_database()
    hubs = [ClusterHub(f"h{i}", a, tmp_path, url, node.url, ports, db) for i, a in enumerate(ADDRESSES, start=2)]
    try:
        for hub in hubs:
            hub.start()
        yield node, hubs
    finally:
        for hub in hubs:
            hub.stop()
        node.stop()


def _write_all(vcsim: dict[str, Any]) -> None:
    """New random data on every VM's disk (all of it, so each backup reads it all)."""
    for vm in vcsim["vms"]:
        for disk in vm["disks"]:
            vmdisk.write(vcsim["state"], vm["moref"], disk["key"], 0, os.urandom(2 * MIB))


def _wait(what: str, check: Callable[[], Any], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _runs(api: Api) -> list[dict[str, Any]]:
    status, view = api.get("/policies/fleet")
    assert status == 200, view
    return sorted(view["runs"], key=lambda run: run["started"])


def _done_run(api: Api, number: int) -> dict[str, Any]:
    """The policy's ``number``-th run (1 first), once it is done."""

    def done() -> dict[str, Any] | None:
        runs = _runs(api)
        return runs[number - 1] if len(runs) >= number and runs[number - 1]["state"] == "done" else None

    return _wait(f"run {number}", done)


def _check_run(api: Api, run: dict[str, Any], vcsim: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the 20 VMs once in the run, each item with its one job, started on more than one hub; the jobs."""
    assert sorted(item["vm_path"] for item in run["items"]) == sorted(vm["path"] for vm in vcsim["vms"])
    assert all(item["state"] == "done" and item["job_id"] for item in run["items"]), run
    assert len({item["hub"] for item in run["items"]}) >= 2, run
    jobs = [api.get(f"/backups/{item['job_id']}")[1] for item in run["items"]]
    assert len({job["job_id"] for job in jobs}) == 20
    for job in jobs:
        assert job["policy"] == "fleet" and job["hub"] in ("h2", "h3", "h4")
    return jobs


def _patch(api: Api, body: dict[str, Any]) -> None:
    status, answer = api.call("PATCH", "/policies/fleet", body)
    assert status == 200, answer


def _members(api: Api) -> dict[str, dict[str, Any]]:
    status, listed = api.get("/hubs")
    assert status == 200, listed
    return {member["id"]: member for member in listed["hubs"]}


def _point_paths(api: Api, vm_path: str) -> dict[str, str]:
    status, listed = api.get(f"/points?vm_path={vm_path}")
    assert status == 200, listed
    return {point["id"]: point["path"] for point in listed["points"]}


def _dirty(ceph_cluster: Any, point_path: str) -> bool:
    """Whether the image's head has objects written since the point's snapshot."""
    image, _, snapshot = point_path.removeprefix("rbd:").partition("@")
    diff = run(require("rbd"), *ceph_cluster.client_args(), "diff", "--from-snap", snapshot, "--whole-object",
               image, "--format", "json")  # fmt: skip
    return bool(json.loads(diff.stdout or "[]"))


def _writing_job(api: Api, ceph_cluster: Any) -> dict[str, Any] | None:
    """A running backup job whose writes have reached its image's head."""
    status, listed = api.get("/jobs?kind=backup&state=running")
    assert status == 200, listed
    for job in listed["jobs"]:
        paths = _point_paths(api, job["vm_path"])
        bases = [disk["base_point"] for disk in job["detail"].get("disks", ()) if disk["base_point"] in paths]
        if bases and _dirty(ceph_cluster, paths[bases[0]]):
            return dict(job)
    return None


def _disk_copies(vcsim: dict[str, Any], vm_path: str, folder: Path) -> dict[int, Path]:
    vm = next(v for v in vcsim["vms"] if v["path"] == vm_path)
    copies = {}
    for disk in vm["disks"]:
        copies[disk["key"]] = folder / f"{vm['name']}-{disk['key']}.raw"
        shutil.copyfile(disk["path"], copies[disk["key"]])
    return copies


def _head_is(ceph_cluster: Any, point_path: str) -> None:
    """The image's head reads exactly as the point's snapshot (the failed job's writes were rolled back)."""
    snapshot = snapshot_filename(ceph_cluster, point_path)
    head = snapshot.replace("@" + point_path.rpartition("@")[2], "", 1)
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", head, snapshot)


def _first_slot(hubs: list[ClusterHub], vcsim: dict[str, Any], ceph_cluster: Any) -> None:
    """Every hub sees the three live; the policy's first run backs every VM up once, spread over the hubs;
    a job's change sent to another hub is redirected to its own."""
    for hub in hubs:
        assert {name: m["live"] for name, m in _members(hub.api).items()} == {"h2": True, "h3": True, "h4": True}
    _write_all(vcsim)
    body = {"name": "fleet", "vms": {"include": [f"/DC{i}/vm/*" for i in range(5)]}, "schedule": {"every": EVERY},
            "per_policy": 3, "per_node": 6}  # fmt: skip
    status, made = hubs[0].api.post("/policies", body)
    assert status == 201, made
    jobs = _check_run(hubs[1].api, _done_run(hubs[1].api, 1), vcsim)
    assert [job["state"] for job in jobs] == ["completed"] * 20, jobs
    for job in jobs[:3]:  # a few VMs' fulls read back (the rest are alike)
        paths = _point_paths(hubs[2].api, job["vm_path"])
        copies = _disk_copies(vcsim, job["vm_path"], hubs[0].root)
        for disk in job["detail"]["disks"]:
            snapshot_matches(ceph_cluster, paths[disk["point_id"]], copies[disk["disk_key"]])
    status, listed = hubs[2].api.get("/jobs?kind=backup&limit=1000")  # any hub lists the cluster's jobs
    assert status == 200 and {job["job_id"] for job in jobs} <= {job["job_id"] for job in listed["jobs"]}, listed
    _verified_elsewhere(hubs, jobs[0])
    owner = {hub.name: hub for hub in hubs}
    job = jobs[0]
    other = next(hub for hub in hubs if hub.name != job["hub"])
    status, moved = other.api.post(f"/backups/{job['job_id']}/progress", {})
    assert status == 307, moved
    assert moved["location"] == f"{owner[job['hub']].startup['listening']}/api/v1/backups/{job['job_id']}/progress"


def _verified_elsewhere(hubs: list[ClusterHub], job: dict[str, Any]) -> None:
    """A hub verifies a point another hub made, against the digests that hub recorded (shared in the pool)."""
    other = next(hub for hub in hubs if hub.name != job["hub"]).api
    point_ids = {disk["point_id"] for disk in job["detail"]["disks"]}

    def recorded() -> bool:
        points = other.get(f"/points?vm_path={job['vm_path']}")[1]["points"]
        return all(p["digests"] for p in points if p["id"] in point_ids)

    _wait("the digests of the first points", recorded, timeout=120)
    status, started = other.post("/verify", {"vm_path": job["vm_path"]})
    assert status == 202, started
    done = other.wait_job(started["job_id"])
    verdicts = done["detail"]["points"]
    assert done["state"] == "completed" and done["hub"] != job["hub"], done
    assert verdicts and all(v["state"] == "verified" and v["digests"] for v in verdicts), verdicts


def _kill_mid_backup(hubs: list[ClusterHub], vcsim: dict[str, Any], ceph_cluster: Any) -> tuple[ClusterHub, str]:
    """New data everywhere, reads slowed down, the next slot; the hub of a job that is writing is killed (-9).
    That hub, and the VM it was backing up."""
    _patch(hubs[0].api, {"enabled": False})  # no slot while the disks change
    _write_all(vcsim)
    (hubs[0].root / "read-delay").write_text("1")
    _patch(hubs[0].api, {"enabled": True})
    job = _wait("a job writing into its image", lambda: _writing_job(hubs[0].api, ceph_cluster), timeout=120)
    victim = next(hub for hub in hubs if hub.name == job["hub"])
    victim.kill()
    return victim, str(job["job_id"])


def _taken_over(survivor: Api, victim: ClusterHub, job_id: str, ceph_cluster: Any) -> dict[str, Any]:
    """The killed hub is taken over once: its job failed hub_lost (naming it), its point gone, the image's head
    back at the VM's last snapshot. The job."""
    job = _wait("the takeover", lambda: (j := survivor.get(f"/backups/{job_id}")[1])["state"] == "failed" and j)
    assert job["error"]["code"] == "hub_lost" and f"hub {victim.name} was lost" in job["error"]["message"], job
    member = _members(survivor)[victim.name]
    assert member["state"] == "lost" and not member["live"] and member["taken_by"] in ("h2", "h3", "h4"), member
    paths = _point_paths(survivor, job["vm_path"])
    assert not {disk["point_id"] for disk in job["detail"]["disks"]} & set(paths)
    for disk in job["detail"]["disks"]:
        _head_is(ceph_cluster, paths[disk["base_point"]])
    return dict(job)


def test_three_hubs_share_the_slots_and_take_a_killed_hub_over(
    fleet: dict[str, Any], cluster: tuple[NodeProcess, list[ClusterHub]], ceph_cluster: Any
) -> None:
    _, hubs = cluster
    _first_slot(hubs, fleet, ceph_cluster)
    victim, job_id = _kill_mid_backup(hubs, fleet, ceph_cluster)
    survivors = [hub for hub in hubs if hub is not victim]
    api = survivors[0].api
    killed = _taken_over(api, victim, job_id, ceph_cluster)
    copies = _disk_copies(fleet, killed["vm_path"], victim.root)  # what the next incremental must hold
    jobs = _check_run(api, _done_run(api, 2), fleet)  # the survivors finished the slot
    for job in jobs:
        failed = job["state"] == "failed"
        assert (
            (job["hub"] == victim.name and job["error"]["code"] == "hub_lost")
            if failed
            else job["state"] == "completed"
        )
    (victim.root / "read-delay").unlink()
    _patch(api, {"enabled": False})
    status, started = survivors[1].api.post("/backups", {"vm_path": killed["vm_path"], "mode": "auto"})
    assert status == 201, started
    done = survivors[1].api.wait_job(started["job_id"])
    assert done["state"] == "completed" and done["full_reason"] is None and done["hub"] == survivors[1].name, done
    paths = _point_paths(api, killed["vm_path"])
    for disk in done["detail"]["disks"]:
        assert disk["sync_type"] == "incremental", disk
        snapshot_matches(ceph_cluster, paths[disk["point_id"]], copies[disk["disk_key"]])
    victim.start()  # back on its state directory: its jobs stay failed, it rejoins live
    assert victim.startup["failed_jobs"] == [], victim.startup
    assert _members(api)[victim.name]["live"] is True
    assert victim.api.get(f"/backups/{job_id}")[1]["state"] == "failed"


def test_two_new_hubs_started_at_once_share_one_repository(
    tmp_path: Path, url: str, postgres_cluster: Any, ceph_cluster: Any
) -> None:
    """Two hubs of a new cluster, started at the same moment with new state directories: both claim the new
    repository, one claim wins (an exclusive create) and the other hub takes the winner's repository from
    the cluster instead of failing; both are live, and the pool holds one repository."""
    ports, db = free_port_range(4), postgres_cluster.new_database()
    hubs = [ClusterHub(f"n{i}", address, tmp_path, url, "http://127.0.0.1:9", ports, db)
            for i, address in enumerate(ADDRESSES[:2])]  # fmt: skip
    starting = [threading.Thread(target=hub.start) for hub in hubs]
    try:
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(90)
        for hub in hubs:
            assert hub.startup, f"hub {hub.name} did not start: {hub.log.read_text()[-2000:]}"
            assert {name: m["live"] for name, m in _members(hub.api).items()} == {"n0": True, "n1": True}
        prefix = parse_location(url).prefix
        rados = [require("rados"), *ceph_cluster.client_args(), "-p", ceph_cluster.pool]
        identity = run(*rados, "get", f"{prefix}.repository", "-").stdout.strip()
        recorded = [json.loads((tmp_path / hub.name / "store.json").read_text()).get("repository") for hub in hubs]
        assert identity in recorded, (identity, recorded)
    finally:
        for hub in hubs:
            hub.stop()


def test_one_hub_id_runs_in_one_process_at_a_time(
    tmp_path: Path, url: str, postgres_cluster: Any, ceph_cluster: Any
) -> None:
    """A second ``sendense-nbd hub`` started with a live hub's ID (a cloned state directory) exits with an error
    that says so, and the first serves on. When the first stalls (SIGSTOP) past ``--hub-lost``, a new process
    takes the ID over; the first, let go, stops at its next heartbeat with an error saying why, and the new one
    serves."""
    db = postgres_cluster.new_database()
    (tmp_path / "other").mkdir()
    first = ClusterHub("n0", ADDRESSES[0], tmp_path, url, "http://127.0.0.1:9", free_port_range(4), db)
    second = ClusterHub("n0", ADDRESSES[1], tmp_path / "other", url, "http://127.0.0.1:9", free_port_range(4), db)
    try:
        first.start()
        shutil.copytree(first.root / "n0", second.root / "n0")  # a cloned state directory, its hub ID file too
        with open(second.log, "ab") as log:
            refused = subprocess.run(second.command, stdout=subprocess.DEVNULL, stderr=log, timeout=120)
        assert refused.returncode != 0
        assert "hub ID n0 is in use: another process runs with it" in " ".join(second.log.read_text().split())
        assert _members(first.api)["n0"]["live"]
        assert first.proc is not None
        first.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(4 + 1.5)  # --hub-lost 4: its row lapses
            second.start()
        finally:
            first.proc.send_signal(signal.SIGCONT)
        assert first.proc.wait(60) != 0
        said = " ".join(first.log.read_text().split())
        assert "hub ID n0 was taken over by another process" in said, said[-2000:]
        assert _members(second.api)["n0"]["live"]
    finally:
        for hub in (first, second):
            hub.stop()
