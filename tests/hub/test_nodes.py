"""Many nodes: the hub's registry (API and CLI), node health, jobs routed by node, and node_unavailable.

Real hubs (``sendense-nbd hub`` subprocesses, or in-process with a manual clock), real nodes
(``sendense-backup node`` against vcsim, and the stand-in node), real HTTP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import sendense_nbd
from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import BadRequest, ConfigError, Conflict, NodeError, NodeUnavailable, UnknownNode
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.db import Connection
from sendense_nbd.hub.jobs import JobState
from sendense_nbd.hub.node_client import MAX_LOGGED_SKIPS
from sendense_nbd.hub.nodes import DEFAULT, HEALTH_INTERVAL, JOB_GRACE, NODE_LOST, parse_edit, parse_node
from sendense_nbd.hub.requests import BackupRequest, DiskSpec
from sendense_nbd.hub.service import Hub, HubConfig
from tests.api_fuzz import JSON, TEXT
from tests.conftest import require
from tests.hub.conftest import Api, HubProcess, free_port_range, hub_store
from tests.hub.node_standin import NodeStandin
from tests.hub.operating import START, LocalHub, local_hub, pump
from tests.node.test_node import NodeProcess, write_config

pytestmark = pytest.mark.peer

MIB = 1 << 20
FINGERPRINT = "SHA256:" + "A1b2" * 10 + "xyz"
SECRET = "node-secret-token-0123456789"


def _dead_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``sendense-nbd ARGS --hub URL`` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("SENDENSE_HUB_URL", "SENDENSE_HUB_TOKEN_FILE")}
    command = [sys.executable, "-m", "sendense_nbd", *args, "--hub", hub.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.fixture
def node_processes() -> Iterator[Callable[[Path], NodeProcess]]:
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


def test_registry_api_refuses_bad_nodes_and_never_shows_tokens(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    assert api.get("/nodes") == (200, {"nodes": []})
    good = {"name": "site-b", "url": "http://127.0.0.1:8081/", "token": SECRET, "tunnel_identity": FINGERPRINT}
    for change, problem in (
        ({"url": "ftp://127.0.0.1:8081"}, "http:// or https://"),
        ({"url": "http://"}, "with a host"),
        ({"url": "127.0.0.1:8081"}, "http:// or https://"),
        ({"url": "http://user:pw@127.0.0.1:8081"}, "no user name"),
        ({"url": "http://127.0.0.1:8081/?x=1"}, "no user name, query"),
        ({"url": "http://127.0.0.1:99999"}, "not a URL"),
        ({"url": None}, "url must be a string"),
        ({"name": "../x"}, "name must be"),
        ({"name": ""}, "name must be"),
        ({"token": "two words"}, "token must be"),
        ({"token": ""}, "token must be"),
        ({"tunnel_identity": "MD5:aa:bb"}, "SHA256:"),
        ({"password": "x"}, "unknown field"),
    ):
        status, body = api.post("/nodes", {**good, **change})
        assert status == 400 and problem in body["error"]["message"], (change, status, body)
    assert api.get("/nodes")[1]["nodes"] == []
    status, node = api.post("/nodes", good)
    assert status == 201, node
    assert node["url"] == "http://127.0.0.1:8081" and node["token"] is True
    assert node["tunnel_identity"] == FINGERPRINT and node["configured"] == "api" and node["up"] is None
    status, body = api.post("/nodes", {**good, "url": "http://127.0.0.1:9"})
    assert status == 409 and body["error"]["code"] == "exists"
    for path in ("/nodes", "/nodes/site-b"):
        status, body = api.get(path)
        assert status == 200 and SECRET not in json.dumps(body)
    assert api.get("/nodes/site-b")[1]["token"] is True
    if hub_store(hub.repo) is None:  # an SQLite store is the hub user's alone
        assert stat.S_IMODE((hub.repo / "hub.db").stat().st_mode) == 0o600
    for method, path in (("GET", "/nodes/nope"), ("PATCH", "/nodes/nope"), ("DELETE", "/nodes/nope"),
                         ("GET", "/nodes/..%2Fx"), ("GET", "/nodes/nope/vms")):  # fmt: skip
        status, body = api.call(method, path, {"url": "http://127.0.0.1:9"} if method == "PATCH" else None)
        assert status == 404 and body["error"]["code"] == "not_found", (method, path, body)
    status, body = api.call("PATCH", "/nodes/site-b", {"url": "file:///etc"})
    assert status == 400
    assert api.call("PATCH", "/nodes/site-b", {})[0] == 400
    status, node = api.call("PATCH", "/nodes/site-b", {"token": None, "tunnel_identity": None})
    assert status == 200 and node["token"] is False and node["tunnel_identity"] is None
    assert node["url"] == "http://127.0.0.1:8081"
    assert api.delete("/nodes/site-b") == (200, {"deleted": "site-b"})
    assert api.get("/nodes/site-b")[0] == 404


def test_a_bad_node_url_stops_the_hub_before_it_opens_anything(tmp_path: Path) -> None:
    for url in ("ftp://x", "x:8081", "http://u:p@x:8081"):
        with pytest.raises(ConfigError, match="--node-url: url"):
            HubConfig(repo=str(tmp_path / "repo"), node_url=url)
    assert not (tmp_path / "repo").exists()
    assert HubConfig(repo=str(tmp_path / "repo"), node_url="https://node.example:8081/").node_url


def test_a_backup_naming_an_unknown_node_is_refused(hub_factory: Callable[..., HubProcess]) -> None:
    api = Api(hub_factory(None).url)
    status, body = api.post("/backups", {"vm_path": "/DC0/vm/a", "node": "nope", "disks": [2000]})
    assert status == 404 and "no node 'nope'" in body["error"]["message"]
    status, body = api.post("/backups", {"vm_path": "/DC0/vm/a", "node": "a b", "disks": [2000]})
    assert status == 400 and "node" in body["error"]["message"]
    assert api.get("/backups")[1]["backups"] == []


def test_node_url_is_the_default_node(
    hub_factory: Callable[..., HubProcess], node: NodeStandin, tmp_path: Path
) -> None:
    """--node-url is the node named default (changed only on the command line); a hub started without
    it and without a registered default takes jobs without a node as before (listed disks needed)."""
    hub = hub_factory(node.url)
    api = Api(hub.url)
    status, default = api.get("/nodes/default")
    assert status == 200 and default["url"] == node.url and default["configured"] == "command line"
    for method in ("PATCH", "DELETE"):
        status, body = api.call(method, "/nodes/default", {"url": "http://127.0.0.1:9"} if method == "PATCH" else None)
        assert status == 409 and body["error"]["code"] == "configured" and "--node-url" in body["error"]["message"]
    node.hold = True
    status, job = api.post("/backups", {"vm_path": "/DC0/vm/DC0_H0_VM0"})
    assert status == 201 and job["node"] == "default" and job["state"] == "running", job
    assert [received["job_id"] for received in node.received] == [job["job_id"]]
    assert api.delete(f"/backups/{job['job_id']}")[0] == 200
    assert node.cancelled == [job["job_id"]]
    hub.stop()
    again = hub_factory(None, repo=hub.repo)
    api = Api(again.url)
    assert api.get("/nodes") == (200, {"nodes": []})
    status, body = api.post("/backups", {"vm_path": "/DC0/vm/DC0_H0_VM0"})
    assert status == 400 and "no node is configured" in body["error"]["message"]
    status, job = api.post("/backups", {"vm_path": "/DC0/vm/DC0_H0_VM0", "disks": [{"key": 2000, "capacity": MIB}]})
    assert status == 201 and job["node"] is None and job["state"] == "running"


def test_jobs_go_to_their_node_and_a_dead_node_fails_them(
    hub_factory: Callable[..., HubProcess],
    vcsim: dict[str, Any],
    node_processes: Callable[[Path], NodeProcess],
    tmp_path: Path,
) -> None:
    """Two real nodes: health, a backup through each, then one is killed: down in the health, and a job
    sent to it fails with node_unavailable (a failed job, listed) while the other still works."""
    require("nbdkit")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    node_a = node_processes(write_config(tmp_path / "a", vcsim))
    node_b = node_processes(write_config(tmp_path / "b", vcsim))
    hub = hub_factory(node_a.url)
    api = Api(hub.url)
    added = cli(hub, "node", "add", "site-b", "--url", node_b.url, "--tunnel-identity", FINGERPRINT)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["name"] == "site-b"
    status, nodes = api.get("/nodes?check=1")
    assert status == 200
    health = {n["name"]: n for n in nodes["nodes"]}
    assert set(health) == {"default", "site-b"}
    for record in health.values():
        assert record["up"] is True and record["version"] == sendense_nbd.__version__, record
        assert record["max_jobs"] == 2 and record["running_jobs"] == 0 and record["last_error"] is None
        assert record["last_contact"] is not None
    assert api.get("/nodes/site-b/vms")[1]["vms"] == sorted(vm["path"] for vm in vcsim["vms"])
    jobs = {}
    for vm, via in (("/DC0/vm/DC0_H0_VM0", "site-b"), ("/DC0/vm/DC0_H0_VM1", None)):
        status, job = api.post("/backups", {"vm_path": vm, "mode": "full", **({"node": via} if via else {})})
        assert status == 201, job
        jobs[via or "default"] = api.wait_job(job["job_id"])
    assert {name: (job["state"], job["node"]) for name, job in jobs.items()} == {
        "site-b": ("completed", "site-b"),
        "default": ("completed", "default"),
    }
    contact = api.get("/nodes/site-b")[1]["last_contact"]
    assert node_b.stop() == 0
    listed = cli(hub, "node", "list", "--check")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split("\t")[0]: line for line in listed.stdout.splitlines()}
    assert "\tup\t" in lines["default"] and "\tDOWN\t" in lines["site-b"], listed.stdout
    down = api.get("/nodes/site-b")[1]
    assert down["up"] is False and "did not answer" in down["last_error"] and down["last_contact"] == contact
    status, body = api.post("/backups", {"vm_path": "/DC0/vm/DC0_H0_VM0", "node": "site-b"})
    assert status == 502 and body["error"]["code"] == "node_unavailable", body
    failed = api.get("/backups?vm_path=/DC0/vm/DC0_H0_VM0")[1]["backups"][-1]
    assert (failed["state"], failed["node"]) == ("failed", "site-b")
    assert failed["error"]["stage"] == "starting" and failed["error"]["code"] == "node_unavailable"
    status, job = api.post("/backups", {"vm_path": "/DC0/vm/DC0_H0_VM0"})
    assert status == 201 and api.wait_job(job["job_id"])["state"] == "completed"
    assert api.get("/ports")[1]["used"] == []


def test_node_cli_manages_nodes_and_fails_in_one_line(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    hub = hub_factory(None)
    token = tmp_path / "node.token"
    token.write_text(SECRET + "\n")
    done = cli(hub, "node", "add", "site-c", "--url", "http://127.0.0.1:9", "--node-token-file", str(token))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token"] is True and SECRET not in done.stdout
    again = cli(hub, "node", "add", "site-c", "--url", "http://127.0.0.1:9")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == ["Error: HTTP 409 exists: a node named 'site-c' is registered already"]
    bad = cli(hub, "node", "add", "site-d", "--url", "ftp://x")
    assert bad.returncode == 1 and "HTTP 400 bad_request: url" in bad.stderr
    shown = cli(hub, "node", "show", "site-c", "--check")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["up"] is False and "did not answer" in record["last_error"]
    edited = cli(hub, "node", "edit", "site-c", "--url", "http://127.0.0.1:10", "--no-node-token")
    assert edited.returncode == 0, edited.stderr
    assert json.loads(edited.stdout)["url"] == "http://127.0.0.1:10" and json.loads(edited.stdout)["token"] is False
    assert cli(hub, "node", "edit", "site-c").returncode == 2  # nothing to change: a usage error
    listed = cli(hub, "node", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("site-c\tunknown\thttp://127.0.0.1:10\t")
    assert cli(hub, "node", "delete", "site-c").stdout == "deleted node site-c\n"
    gone = cli(hub, "node", "show", "site-c")
    assert gone.returncode == 1 and "HTTP 404 not_found" in gone.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "sendense_nbd", "node", "list", "--hub", _dead_url()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "did not answer GET /nodes" in unreachable.stderr


async def test_health_is_checked_on_the_hub_clock(tmp_path: Path, node: NodeStandin) -> None:
    """The health loop runs every HEALTH_INTERVAL of the hub's clock: a node that comes up shows up at
    the next check; a job's start records contact."""
    clock = ManualClock(1_000_000.0)
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4), clock=clock))
    await hub.start()
    try:
        await hub.nodes.add(parse_node({"name": "late", "url": _dead_url()}))
        await hub.nodes.add(parse_node({"name": "here", "url": node.url}))
        await _until(hub, clock, lambda nodes: nodes["late"].up is False and nodes["here"].up is True)
        here = await hub.nodes.get("here")
        assert here.version == "standin" and here.running_jobs == 0 and here.max_jobs == 4
        assert here.last_contact == here.last_check and here.last_check is not None
        await hub.nodes.edit("late", {"url": node.url})
        assert (await hub.nodes.get("late")).up is None  # a new URL: its health is not known yet
        await _until(hub, clock, lambda nodes: nodes["late"].up is True and nodes["late"].last_error is None)
        node.hold = True
        await clock.advance(5)
        request = BackupRequest("/DC0/vm/DC0_H0_VM0", Mode.FULL, (DiskSpec(2000, MIB),), node="late")
        job = await hub.create_backup(request)
        assert job.node == "late" and (await hub.nodes.get("late")).last_contact == clock.now()
        assert await hub.nodes.list_vms("here") == sorted(vm["path"] for vm in node.vcsim["vms"])
    finally:
        hub.close()
        await hub.wait_closed()


async def _until(
    hub: Hub, clock: ManualClock, predicate: Callable[[dict[str, Any]], bool], seconds: float = 15.0
) -> None:
    """Move the hub's clock on a health interval at a time until ``predicate`` holds of the nodes."""
    deadline = time.monotonic() + seconds
    while not predicate({record.name: record for record in await hub.nodes.records()}):
        assert time.monotonic() < deadline, f"not within {seconds} s: {await hub.nodes.records()}"
        await clock.advance(HEALTH_INTERVAL)
        await asyncio.sleep(0.05)


VM0 = "/DC0/vm/DC0_H0_VM0"


async def _state(hub: LocalHub, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = await hub.ok("GET", f"/backups/{job_id}")
    return job


async def _next_round(hub: LocalHub) -> None:
    """Move the hub's clock a health interval on and wait until that round of checks has run (the watch of
    the nodes' jobs follows it)."""
    await hub.clock.advance(HEALTH_INTERVAL)

    async def checked() -> bool:
        return (await hub.ok("GET", "/nodes/default"))["last_check"] == hub.clock.now()

    await pump(hub, checked, step=0, limit=30)
    await asyncio.sleep(0.2)


async def _nothing_held(hub: LocalHub, repo: Path) -> None:
    """No port leased, no image left."""
    assert (await hub.ok("GET", "/ports"))["used"] == []
    assert list((repo / "vms").rglob("*.qcow2")) == []


async def test_a_node_that_dies_mid_job_fails_it_once_lost(tmp_path: Path, node: NodeStandin) -> None:
    """A node takes a job (the stand-in holds it) and dies: the job runs on until the node has been silent
    for more than NODE_LOST seconds of the hub's clock, then fails node_unavailable, its ports and points
    gone and job_failed fired. While the node lives and knows the job, the job runs on."""
    node.hold = True
    repo = tmp_path / "repo"
    async with local_hub(repo, clock=ManualClock(START), node_url=node.url) as hub:
        job_id = (await hub.ok("POST", "/backups", {"vm_path": VM0, "mode": "full"}))["job_id"]
        assert len((await hub.ok("GET", "/ports"))["used"]) == 2 and len(list(repo.rglob("*.qcow2"))) == 2

        async def asked() -> bool:  # the hub asked the living node about the job, past its grace
            return job_id in node.asked

        await pump(hub, asked, step=HEALTH_INTERVAL, limit=30)
        await asyncio.sleep(0.5)
        assert (await _state(hub, job_id))["state"] == "running"
        contact = (await hub.ok("GET", "/nodes/default"))["last_contact"]
        node.stop()
        while (job := await _state(hub, job_id))["state"] == "running":
            assert hub.clock.now() - contact <= NODE_LOST + 4 * HEALTH_INTERVAL, "the lost node's job runs on"
            await _next_round(hub)
        assert job["state"] == "failed", job
        assert (job["error"]["stage"], job["error"]["code"]) == ("node", "node_unavailable")
        assert "has not answered for" in job["error"]["message"], job["error"]
        assert job["stages"][-1]["ended"] - contact > NODE_LOST, "failed before the node was lost"
        await _nothing_held(hub, repo)
        [alert] = (await hub.ok("GET", "/alerts?kind=job_failed"))["alerts"]
        assert alert["key"] == job_id and "node_unavailable" in json.dumps(alert["detail"])
        assert (await hub.ok("GET", "/nodes/default"))["up"] is False


async def test_a_restarted_node_that_forgot_a_job_fails_it_after_the_grace(tmp_path: Path, node: NodeStandin) -> None:
    """A node restarts (a new stand-in on its port) and no longer knows a running job: within JOB_GRACE of
    the job's start that is no failure (a node registers a job when it accepts it); after it, the job fails
    node_unavailable with its ports and points gone."""
    node.hold = True
    repo = tmp_path / "repo"
    async with local_hub(repo, clock=ManualClock(START), node_url=node.url) as hub:
        job = await hub.ok("POST", "/backups", {"vm_path": VM0, "mode": "full"})
        queued = job["stages"][0]["started"]
        node.stop()
        (tmp_path / "again").mkdir()
        again = NodeStandin(node.vcsim, tmp_path / "again").start(node.port)
        try:
            await _next_round(hub)  # the job is 30 s old: its node's not knowing it is no failure yet
            await asyncio.sleep(0.3)
            assert (await _state(hub, job["job_id"]))["state"] == "running", "failed within the grace"

            async def failed() -> bool:
                return (await _state(hub, job["job_id"]))["state"] == "failed"

            await pump(hub, failed, step=HEALTH_INTERVAL, limit=30)
            ended = await _state(hub, job["job_id"])
            assert (ended["error"]["stage"], ended["error"]["code"]) == ("node", "node_unavailable")
            assert "does not know the job" in ended["error"]["message"], ended["error"]
            assert ended["stages"][-1]["ended"] - queued >= JOB_GRACE
            assert again.asked == [job["job_id"]] * len(again.asked) and again.asked
            await _nothing_held(hub, repo)
        finally:
            again.stop()


async def test_a_node_in_use_by_a_policy_cannot_be_deleted(tmp_path: Path) -> None:
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4), clock=ManualClock(0.0)))
    try:
        await hub.nodes.add(parse_node({"name": "site-b", "url": "http://127.0.0.1:9"}))
        await hub.nodes.add(parse_node({"name": DEFAULT, "url": "http://127.0.0.1:10"}))
        specs = {"uses-b": {"name": "uses-b", "node": "site-b"}, "uses-default": {"name": "uses-default"}}

        def store_policies(connection: Connection) -> None:  # as the policy store keeps a policy's JSON
            connection.executemany(
                "INSERT INTO policies (name, spec, created, updated) VALUES (?, ?, 0, 0)",
                [(name, json.dumps(spec)) for name, spec in specs.items()],
            )

        await hub._db.run(store_policies)
        for name, policy in (("site-b", "uses-b"), (DEFAULT, "uses-default")):
            with pytest.raises(Conflict, match=f"used by the policies {policy}") as refused:
                await hub.nodes.delete(name)
            assert refused.value.code == "in_use"
        await hub._db.run(lambda c: c.execute("DELETE FROM policies WHERE name = 'uses-b'"))
        await hub.nodes.delete("site-b")
        with pytest.raises(UnknownNode):
            await hub.nodes.get("site-b")
        with pytest.raises(NodeUnavailable):
            await hub.nodes.list_vms(None)
    finally:
        await hub.wait_closed()


class FailingNode:
    """A node that answers whatever status a test sets (no real node answers 5xx on demand)."""

    def __init__(self) -> None:
        self.status = 503
        self.vms: object = {"vms": []}
        self.url = ""

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            body = {"error": {"code": "busy", "message": "scripted"}}
            return web.json_response(body if self.status >= 400 else {"disks": [{"key": 2000, "capacity": MIB}]},
                                     status=self.status)  # fmt: skip

        async def vms(request: web.Request) -> web.Response:
            return web.json_response(self.vms)

        app = web.Application()
        app.add_routes([web.get("/api/v1/vms/disks", answer), web.post("/api/v1/backups", answer)])
        app.router.add_get("/api/v1/vms", vms)
        return app


async def test_a_node_answering_5xx_fails_its_jobs_with_node_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """5xx or no answer: node_unavailable; a 4xx refusal of the start: node_refused. Either way the job is
    listed as failed, and its ports and points are gone. A VM listing that is no list is refused; its
    malformed entries are skipped (logged, boundedly), the good ones kept."""
    scripted = FailingNode()
    runner = web.AppRunner(scripted.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    scripted.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4), node_url=scripted.url))
    await hub.start()
    try:
        vm = "/DC0/vm/DC0_H0_VM0"
        cases = (
            (503, (DiskSpec(2000, MIB),), NodeUnavailable, "node_unavailable"),  # the start answers 503
            (500, None, NodeUnavailable, "node_unavailable"),  # the disk listing answers 500
            (400, (DiskSpec(2000, MIB),), NodeError, "node_refused"),
        )
        for status, disks, error, code in cases:
            scripted.status = status
            with pytest.raises(error, match=f"HTTP {status}"):
                await hub.create_backup(BackupRequest(vm, Mode.FULL, disks))
            job = (await hub.backups(vm))[-1]
            assert job.state is JobState.FAILED and job.node == DEFAULT
            assert job.error is not None and (job.error.stage, job.error.code) == ("starting", code)
            record = await hub.nodes.get(None)
            assert record.up is False and f"HTTP {status}" in (record.last_error or "")
        assert len(await hub.backups(vm)) == 3
        for junk in ({"vms": {}}, [], {"vms": None}, {"vms": ["/DC0/vm/x"] * 100_001}):
            scripted.vms = junk
            with pytest.raises(NodeError, match="the node's VM list is malformed"):
                await hub.nodes.list_vms(None)
        many = [{"path": f"/DC0/vm/f{i // 100}/vm-{i:05}", "name": f"vm-{i:05}", "uuid": None} for i in range(5000)]
        scripted.vms = {"vms": many}  # about 400 KB: more than one read of the answer
        assert await hub.nodes.list_vms(None) == [vm["path"] for vm in many]
        bad = [{"path": "DC0/vm/x"}, {"name": "x"}, "/a//b", 7, None, {"path": "/DC0/vm/\x00"}] * 10
        scripted.vms = {"vms": [{"path": "/DC0/vm/x", "name": "x", "uuid": None}, *bad, "/DC0/vm/y"]}
        with caplog.at_level(logging.WARNING, logger="sendense_nbd.hub.node_client"):
            assert await hub.nodes.list_vms(None) == ["/DC0/vm/x", "/DC0/vm/y"]  # the bad entries skipped
        skips = [r.getMessage() for r in caplog.records if r.name == "sendense_nbd.hub.node_client"]
        assert len(skips) == MAX_LOGGED_SKIPS + 1 and "skipped 60 malformed entries" in skips[-1], skips
        assert (await hub.port_status()).pool.used == ()
        assert list((tmp_path / "repo" / "vms").rglob("*.qcow2")) == []
    finally:
        hub.close()
        await hub.wait_closed()
        await runner.cleanup()


async def test_a_policy_item_names_only_a_job_its_own_start_made(tmp_path: Path) -> None:
    """A node that does not answer: the run's item names the failed job its start recorded. A VM the node
    does not know (404: refused before any job exists): the item names no job, not the VM's older failed
    one, and says why."""
    scripted = FailingNode()
    vm = "/DC0/vm/gone"
    scripted.vms = {"vms": [{"path": vm, "name": "gone", "uuid": None}]}
    runner = web.AppRunner(scripted.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    scripted.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=scripted.url) as hub:
            policy = {"name": "p", "vms": {"include": [vm]}, "schedule": {"every": 86400}}
            await hub.ok("POST", "/policies", policy)
            items = []
            for status in (503, 404):
                scripted.status = status
                await hub.ok("POST", "/policies/p/run")

                async def closed() -> bool:
                    return all(run["state"] == "done" for run in (await hub.ok("GET", "/policies/p"))["runs"])

                await pump(hub, closed, limit=60)
                items.append((await hub.ok("GET", "/policies/p"))["runs"][0]["items"])
            [failed] = (await hub.ok("GET", "/backups"))["backups"]
            assert failed["error"]["code"] == "node_unavailable" and failed["policy"] == "p"
            [[unavailable], [unknown]] = items
            assert unavailable["job_id"] == failed["job_id"] and "HTTP 503" in unavailable["note"], unavailable
            assert unknown["job_id"] is None, unknown
            assert unknown["note"].startswith("failed: the node does not know it") and "HTTP" not in unknown["note"]
    finally:
        await runner.cleanup()


_URLS = st.sampled_from(["http://127.0.0.1:8081", "https://node.example/", "ftp://x", "http://", "http://[::1]:99999"])
_NODE_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["site-b", "a" * 129]), TEXT, JSON),
        "url": st.one_of(_URLS, TEXT, JSON),
        "token": st.one_of(st.sampled_from([SECRET, None, "x" * 4097]), TEXT, JSON),
        "tunnel_identity": st.one_of(st.sampled_from([FINGERPRINT, None, FINGERPRINT + "="]), TEXT, JSON),
        "transport": st.one_of(st.sampled_from(["tunnel", "tls", "ssh"]), TEXT, JSON),
        "nbd_host": st.one_of(
            st.sampled_from(["hub.example", "10.0.0.2", "::1", "h:1", "fe80::1%eth0", "fe80::1%a?b", None]), TEXT, JSON
        ),
        "hub_url": st.one_of(_URLS, st.none(), TEXT, JSON),
        "other": JSON,
    },
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(body=st.one_of(_NODE_BODIES, JSON))
def test_node_bodies_are_parsed_or_refused_with_bad_request(body: Any) -> None:
    """Any JSON: a checked node (every field within its rules) or a BadRequest, never another error."""
    for parse in (parse_node, parse_edit):
        try:
            parsed = parse(body)
        except BadRequest as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        assert set(parsed) <= {"name", "url", "token", "tunnel_identity", "transport", "nbd_host", "hub_url"} and parsed
        assert parsed.get("transport", "tunnel") in ("tunnel", "tls")
        host = parsed.get("nbd_host")
        assert host is None or ":" not in host or ipaddress.ip_address(host).version == 6
        assert host is None or "%" not in host or re.fullmatch(r"[0-9a-f:]+%[A-Za-z0-9._~-]{1,64}", host), host
        for url in (parsed.get("url"), parsed.get("hub_url")):
            assert url is None or (url.split("://")[0] in ("http", "https") and not url.endswith("/"))
        assert parsed.get("url") is None or parsed["url"].split("://")[0] in ("http", "https")
        assert parsed.get("token") is None or " " not in parsed["token"]
        assert parsed.get("tunnel_identity") in (None, FINGERPRINT)
