"""The node (``sendense-backup node``): its configuration, its API, and hub -> node backups end to end
over real HTTP and NBD, against vcsim and real nbdkit with the vddk stand-in plugin."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from sendense_nbd.errors import ConfigError
from sendense_nbd.node.config import load
from tests.conftest import require, run, stop_process
from tests.hub.conftest import Api, HubProcess
from tests.vmware.vsphere import STANDIN_PLUGIN, running_vcsim, vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"


def write_config(
    directory: Path, vcsim: dict[str, Any], *, extra: str = "", mode: int = 0o600, nbdkit: str = "nbdkit"
) -> Path:
    password = directory / "vcenter.password"
    password.write_text(vcsim["password"] + "\n")
    password.chmod(mode)
    config = directory / "node.toml"
    config.write_text(
        f"""
[vcenter]
endpoint = "127.0.0.1:{vcsim["port"]}"
username = "{vcsim["username"]}"
password_file = "{password}"
thumbprint = "{vcsim["thumbprintSha256"]}"

[vddk]
plugin = "python {STANDIN_PLUGIN}"
nbdkit = "{nbdkit}"
transports = "nbdssl:nbd"

[node]
max_jobs = 2
connections = 2
{extra}
"""
    )
    return config


class NodeProcess:
    def __init__(self, config: Path, listen: str = "127.0.0.1:0") -> None:
        command = [str(Path(sys.executable).parent / "sendense-backup"), "node", "--config", str(config)]
        self.proc = subprocess.Popen(command + ["--listen", listen], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.proc.kill()
            raise AssertionError(f"the node did not start: {self.proc.communicate()[1].decode()}")
        self.url = json.loads(line)["listening"]

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require("nbdkit")
    state = tmp_path_factory.mktemp("node-vcsim")
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "8") as info:
        yield info


@pytest.fixture
def node_factory() -> Iterator[Callable[[Path], NodeProcess]]:
    started: list[NodeProcess] = []

    def start(config: Path) -> NodeProcess:
        node = NodeProcess(config)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)


def test_config_refuses_unsafe_or_incomplete_files(tmp_path: Path, vcsim: dict[str, Any]) -> None:
    config = load(str(write_config(tmp_path, vcsim)))
    assert config.password == vcsim["password"] and config.connections == 2
    assert vcsim["password"] not in repr(config)
    write_config(tmp_path, vcsim, mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load(str(tmp_path / "node.toml"))
    inline = tmp_path / "inline.toml"
    inline.write_text('[vcenter]\nendpoint = "vc"\nusername = "u"\npassword = "p"\n')
    inline.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load(str(inline))
    inline.chmod(0o600)
    assert load(str(inline)).password == "p"
    minimal = '[vcenter]\nendpoint = "vc"\nusername = "u"\npassword = "p"\n'
    for text, problem in (
        ('[vcenter]\nusername = "u"\npassword_file = "x"\n', "endpoint is required"),
        ('[vcenter]\nendpoint = "vc"\nusername = "u"\n', "needs password_file"),
        ("[vcenter\n", "not valid TOML"),
        ('[vcenter]\nendpoint = "vc"\nusername = "u"\npassword_file = "x"\n[extra]\n', "unknown section"),
        (f'{minimal}[node]\nmax_jobs = "2"\n', "max_jobs must be an integer"),
        (f"{minimal}[node]\nmax_queued = 0\n", "max_queued must be an integer"),
        (f'{minimal}[node]\nhub_url = "hub:8082"\n', "hub_url must be an http"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        bad.chmod(0o600)
        with pytest.raises(ConfigError, match=problem):
            load(str(bad))


def test_node_api_errors(tmp_path: Path, vcsim: dict[str, Any], node_factory: Callable[[Path], NodeProcess]) -> None:
    node = node_factory(write_config(tmp_path, vcsim))
    api = Api(node.url)
    status, body = api.post("/backups", raw=b"[")
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = api.post("/backups", {"job_id": "j", "vm_path": VM_PATH, "api_url": "http://x", "targets": {}})
    assert status == 400 and "targets" in body["error"]["message"]
    assert api.get("/backups/nope")[0] == 404
    assert api.delete("/backups/nope")[0] == 404
    status, body = api.get("/vms/disks?vm_path=/DC0/vm/none")
    assert status == 502 and "no VM at inventory path" in body["error"]["message"]
    status, body = api.get(f"/vms/disks?vm_path={VM_PATH}")
    assert status == 200 and [d["key"] for d in body["disks"]] == [2000, 2001]
    assert all(d["capacity"] == 8 * MIB and d["uuid"] for d in body["disks"])
    assert node.stop() == 0


def test_hub_drives_the_node_full_then_incremental(
    tmp_path: Path,
    vcsim: dict[str, Any],
    node_factory: Callable[[Path], NodeProcess],
    hub_factory: Callable[..., HubProcess],
) -> None:
    node = node_factory(write_config(tmp_path, vcsim))
    hub = hub_factory(node.url)
    api, node_api = Api(hub.url), Api(node.url)
    vm = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)
    for round_number in range(2):
        for disk in vm["disks"]:
            vmdisk.write(vcsim["state"], vm["moref"], disk["key"], round_number * MIB, os.urandom(200_000))
        expected = {}
        for disk in vm["disks"]:
            expected[disk["key"]] = tmp_path / f"r{round_number}-{disk['key']}.raw"
            shutil.copyfile(disk["path"], expected[disk["key"]])
        status, job = api.post("/backups", {"vm_path": VM_PATH, "mode": "auto"})
        assert status == 201, job
        done = api.wait_job(job["job_id"])
        assert done["state"] == "completed", (done, node_api.get(f"/backups/{job['job_id']}"))
        assert [d["sync_type"] for d in done["detail"]["disks"]] == (
            ["full", "full"] if round_number == 0 else ["incremental", "incremental"]
        )
        points = api.get(f"/points?vm_path={VM_PATH}")[1]["points"]
        for disk in done["detail"]["disks"]:
            point = next(p for p in points if p["id"] == disk["point_id"])
            run(require("qemu-img"), "check", point["path"])
            run(require("qemu-img"), "compare", "-F", "raw", point["path"], str(expected[disk["disk_key"]]))
        status, on_node = node_api.get(f"/backups/{job['job_id']}")
        assert status == 200 and on_node["state"] in ("running", "completed")
    assert api.get("/ports")[1]["used"] == []


def test_node_api_refuses_hostile_jobs(
    tmp_path: Path, vcsim: dict[str, Any], node_factory: Callable[[Path], NodeProcess]
) -> None:
    """Targets are NBD URIs only (never a local file), every field is checked, and with hub_url the
    node reports to and writes to that hub only."""
    hub = "http://127.0.0.1:9"
    node = node_factory(write_config(tmp_path, vcsim, extra=f'hub_url = "{hub}"'))
    api = Api(node.url)
    victim = tmp_path / "victim.raw"
    good = {"job_id": "j1", "vm_path": VM_PATH, "api_url": hub, "targets": {"2000": "nbd://127.0.0.1:9/x"}}
    for change, problem in (
        ({"targets": {"2000": str(victim)}}, "not an NBD URI"),
        ({"targets": {"2000": f"file://{victim}"}}, "not an NBD URI"),
        ({"targets": {"2000": "nbd://203.0.113.9:10100/x"}}, "not on this node's hub"),
        ({"targets": {"2000": "nbd+unix:///x?socket=/run/s"}}, "not on this node's hub"),
        ({"targets": {"x": "nbd://127.0.0.1/x"}}, "disk keys"),
        ({"targets": {"99999999999": "nbd://127.0.0.1/x"}}, "disk keys"),
        ({"targets": ["nbd://127.0.0.1/x"]}, "targets"),
        ({"api_url": "http://203.0.113.9:8082"}, "not this node's hub"),
        ({"api_url": "file:///etc/passwd"}, "http"),
        ({"job_id": "../x"}, "job_id"),
        ({"job_id": 5}, "job_id"),
        ({"vm_path": "/DC0/vm/a\x00b"}, "vm_path"),
        ({"vm_path": ["x"]}, "vm_path"),
        ({"mode": "fast"}, "mode"),
        ({"password": "x"}, "unknown field"),
    ):
        status, body = api.post("/backups", {**good, **change})
        assert status == 400 and problem in body["error"]["message"], (change, status, body)
    assert not victim.exists()
    assert api.get("/backups")[1]["backups"] == []
    status, body = api.get("/vms/disks?vm_path=/DC0/vm/a%01b")
    assert status == 400 and "vm_path" in body["error"]["message"], body
    assert node.stop() == 0


async def test_node_queue_and_history_are_bounded(tmp_path: Path, vcsim: dict[str, Any]) -> None:
    from sendense_nbd.errors import NodeBusy
    from sendense_nbd.node.jobs import JOB_HISTORY, JobState, JobTable, NodeJob
    from sendense_nbd.node.requests import BackupRequest
    from sendense_nbd.node.service import Node

    config = attrs.evolve(load(str(write_config(tmp_path, vcsim))), max_jobs=1, max_queued=2)
    node = Node(config)
    await node.start()

    def request(job_id: str) -> BackupRequest:
        body = {
            "job_id": job_id,
            "vm_path": VM_PATH,
            "api_url": "http://127.0.0.1:9",
            "targets": {"2000": "nbd://127.0.0.1:9/"},
        }
        return BackupRequest.from_json(body)

    try:
        node.start_backup(request("a"))
        node.start_backup(request("b"))
        with pytest.raises(NodeBusy, match="2 jobs are already waiting"):
            node.start_backup(request("c"))
    finally:
        node.close()
        await node.wait_closed()
    assert {job.state for job in node.jobs()} == {"cancelled"}
    jobs = JobTable()
    for i in range(JOB_HISTORY + 5):  # finished jobs are forgotten, oldest first
        job = NodeJob(request(f"old{i}"), state=JobState.COMPLETED)
        jobs.add(job)
        jobs.finished(job)
    assert len(jobs) == JOB_HISTORY and "old4" not in jobs and "old5" in jobs
