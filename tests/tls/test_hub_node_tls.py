"""The hub and a node over TLS (docs/TLS.md, "Hub and node"): real processes (the hub, the node, vcsim), no tunnel.

A hub with `tls init` credentials serves a node registered with transport ``tls`` its exports as ``nbds://``
(mutual TLS: the node presents its client certificate) and its API over HTTPS, which the node checks against
the deployment's CA; that node reaches the API by a name of its own (its ``hub_url``, not the hub's
``--public-url``) and dials the exports at another host (its ``nbd_host``, pinned by its ``[node] nbd_host``).
A node without a client certificate fails its job with a TLS sentence and records nothing.
A hub restarted with ``--nbd-tls require`` serves restores over TLS only, read by ``nbdinfo``/``nbdcopy``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from sendense_nbd.client.uri import parse_uri
from sendense_nbd.errors import BadRequest, ConfigError
from sendense_nbd.hub.certnames import CertificateNames
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.db import Database, rows
from sendense_nbd.hub.nodes import NodeRecord
from sendense_nbd.hub.service import HubConfig
from sendense_nbd.node.config import load
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.node.service import Node
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import ServerCredentials, init_pki
from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess, free_port_range
from tests.hub.operating import START, local_hub
from tests.node.test_node import NodeProcess, write_config
from tests.vmware.vsphere import running_vcsim, vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"
KEYS = (2000, 2001)


class HttpsApi(Api):
    """:class:`Api` over HTTPS, the hub's certificate checked against the deployment's CA."""

    def __init__(self, base: str, ca: Path) -> None:
        super().__init__(base)
        self.context = ssl.create_default_context(cafile=str(ca))

    def call(
        self, method: str, path: str, body: object = None, raw: bytes | None = None, *, content_type: str = ""
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require("nbdkit")
    state = tmp_path_factory.mktemp("tls-vcsim")
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "8") as info:
        yield info


@pytest.fixture
def hubs() -> Iterator[Callable[..., HubProcess]]:
    """Start a hub (``sendense-nbd hub`` process) on a repository, with these options; killed at teardown."""
    started: list[HubProcess] = []

    def start(repo: Path, *extra: str) -> HubProcess:
        started.append(HubProcess(repo, free_port_range(6), None, *extra).start())
        return started[-1]

    yield start
    for hub in started:
        if hub.proc is not None and hub.proc.poll() is None:
            hub.stop()


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


def _node(
    root: Path, vcsim: dict[str, Any], hub_url: str, tls: str, started: list[NodeProcess], extra: str = ""
) -> NodeProcess:
    """A node whose hub is ``hub_url`` (HTTPS) with the ``[tls]`` lines ``tls`` and ``extra`` ``[node]``
    lines, its API on 127.0.0.1."""
    root.mkdir()
    config = write_config(root, vcsim, extra=f'hub_url = "{hub_url}"\n{extra}')
    config.write_text(config.read_text() + f"\n[tls]\n{tls}\n")
    node = NodeProcess(config, listen="127.0.0.1:0")
    started.append(node)
    return node


def _copies(vcsim: dict[str, Any], root: Path, name: str) -> dict[int, Path]:
    vm = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)
    copies = {}
    for disk in vm["disks"]:
        copies[disk["key"]] = root / f"{name}-{disk['key']}.raw"
        shutil.copyfile(disk["path"], copies[disk["key"]])
    return copies


def _write(vcsim: dict[str, Any], offset: int, size: int) -> None:
    moref = next(v for v in vcsim["vms"] if v["path"] == VM_PATH)["moref"]
    for key in KEYS:
        vmdisk.write(vcsim["state"], moref, key, offset, os.urandom(size))


def _backup(api: Api, node: str) -> dict[str, Any]:
    status, job = api.post("/backups", {"vm_path": VM_PATH, "node": node})
    assert status == 201, job
    assert all(d["uri"].startswith("nbds://127.0.0.1:") for d in job["detail"]["disks"]), job
    return api.wait_job(job["job_id"])


def _verify(api: Api, job: dict[str, Any], expected: dict[int, Path]) -> None:
    points = api.get("/points?" + urlencode({"vm_path": VM_PATH}))[1]["points"]
    for disk in job["detail"]["disks"]:
        point = next(p for p in points if p["id"] == disk["point_id"])
        run(require("qemu-img"), "check", point["path"])
        run(require("qemu-img"), "compare", "-F", "raw", point["path"], str(expected[disk["disk_key"]]))


def _change_ids(api: Api) -> dict[int, str]:
    return {key: api.get(f"/backups/changeid?vm_path={VM_PATH}&disk_key={key}")[1]["change_id"] for key in KEYS}


def test_a_tls_node_backs_up_over_nbds_without_a_tunnel(
    tmp_path: Path, vcsim: dict[str, Any], hubs: Callable[..., HubProcess], nodes: list[NodeProcess]
) -> None:
    layout = init_pki(tmp_path / "pki", nodes=["site1"])
    hub_creds, node_creds = layout.hub, layout.nodes["site1"]
    repo = tmp_path / "repo"
    tls = ("--nbd-tls-creds", str(hub_creds), "--nbd-tls-verify-client", "--api-tls-creds", str(hub_creds))
    hub = hubs(repo, *tls)
    hub_url = hub.startup["listening"]
    assert hub_url.startswith("https://127.0.0.1:")
    api = HttpsApi(hub_url, layout.ca_cert)
    # site1 reaches the API as localhost (a name in the certificate, not --public-url's 127.0.0.1), the exports
    # at 127.0.0.1: another host than its hub_url's, which its [node] nbd_host allows.
    own_url = hub_url.replace("127.0.0.1", "localhost")
    pins = 'nbd_host = "127.0.0.1"'
    node = _node(tmp_path / "site1", vcsim, own_url, f'creds = "{node_creds}"', nodes, pins)
    site1 = {"name": "site1", "url": node.url, "transport": "tls", "hub_url": own_url, "nbd_host": "127.0.0.1"}
    status, record = api.post("/nodes", site1)
    assert status == 201 and (record["transport"], record["hub_url"]) == ("tls", own_url), record
    listed = subprocess.run(
        [sys.executable, "-m", "sendense_nbd", "node", "list", "--hub", hub_url],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SSL_CERT_FILE": str(layout.ca_cert)},
    )  # fmt: skip
    assert listed.returncode == 0 and listed.stdout.startswith(f"site1\tunknown\t{node.url}\ttls\t"), listed

    # A full backup, then an incremental, over nbds:// (mutual TLS), reported to the hub over HTTPS.
    _write(vcsim, 0, 3 * MIB)
    expected = _copies(vcsim, tmp_path, "full")
    full = _backup(api, "site1")
    assert full["state"] == "completed", full
    _verify(api, full, expected)
    _write(vcsim, 4 * MIB, 2 * MIB)
    expected = _copies(vcsim, tmp_path, "incremental")
    incremental = _backup(api, "site1")
    assert incremental["state"] == "completed", incremental
    assert [d["sync_type"] for d in incremental["detail"]["disks"]] == ["incremental", "incremental"]
    _verify(api, incremental, expected)
    change_ids = _change_ids(api)

    # A node without a client certificate (only the CA): its job fails with a TLS sentence, records nothing.
    _a_node_without_a_client_certificate_fails(api, hub_url, node_creds, vcsim, nodes, tmp_path)
    assert _change_ids(api) == change_ids

    # The hub again, now requiring TLS on every export: a restore is served as nbds:// only, to its reader.
    assert hub.stop() == 0
    hub = hubs(repo, *tls, "--nbd-tls", "require")
    api = HttpsApi(hub.startup["listening"], layout.ca_cert)
    point = incremental["detail"]["disks"][0]
    _a_restore_is_served_to_its_reader(api, point, node_creds, expected[point["disk_key"]], tmp_path)


def _a_node_without_a_client_certificate_fails(
    api: Api, hub_url: str, node_creds: Path, vcsim: dict[str, Any], nodes: list[NodeProcess], tmp_path: Path
) -> None:
    """A node whose directory has only the CA: its job fails with a TLS sentence and leaves no point or port."""
    bare = tmp_path / "bare-creds"
    bare.mkdir()
    shutil.copyfile(node_creds / "ca-cert.pem", bare / "ca-cert.pem")
    other = _node(tmp_path / "bare", vcsim, hub_url, f'creds = "{bare}"', nodes)
    assert api.post("/nodes", {"name": "bare", "url": other.url, "transport": "tls"})[0] == 201
    _write(vcsim, 0, MIB)
    failed = _backup(api, "bare")
    assert failed["state"] == "failed", failed
    assert "certificate" in failed["error"]["message"], failed["error"]
    points = api.get("/points?" + urlencode({"vm_path": VM_PATH}))[1]["points"]
    assert not [p for p in points if p["job_id"] == failed["job_id"]]
    assert api.get("/ports")[1]["used"] == []


def _a_restore_is_served_to_its_reader(
    api: Api, point: dict[str, Any], node_creds: Path, expected: Path, tmp_path: Path
) -> None:
    """Under --nbd-tls require with client certificates a restore names its reader (400 without), and is read
    over nbds:// with that node's certificate by nbdinfo and nbdcopy; plain NBD is refused."""
    status, refused = api.post("/restores", {"point_id": point["point_id"]})
    assert status == 400 and "name it with reader" in refused["error"]["message"], refused
    status, restore = api.post("/restores", {"point_id": point["point_id"], "reader": "site1"})
    assert status == 201, restore
    uri = restore["detail"]["uri"]
    assert uri.startswith("nbds://127.0.0.1:") and restore["detail"]["reader"] == "site1", restore
    with_creds = f"{uri}?tls-certificates={node_creds}"
    info = run(require("nbdinfo"), "--size", with_creds)
    assert int(info.stdout) == 8 * MIB
    out = tmp_path / "restored.raw"
    run(require("nbdcopy"), with_creds, str(out))
    assert out.read_bytes() == expected.read_bytes()
    plain = run(require("nbdinfo"), "--size", uri.replace("nbds://", "nbd://"), check=False)
    assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr


def test_hub_tls_options_are_checked_before_it_starts(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", nodes=["site1"])

    def hub(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(tmp_path / "repo"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    refused = hub("--nbd-tls", "require")
    assert refused.returncode == 2 and "--nbd-tls require needs --nbd-tls-creds" in refused.stderr
    refused = hub("--nbd-tls-verify-client")
    assert refused.returncode == 2 and "--nbd-tls-verify-client needs --nbd-tls-creds" in refused.stderr
    refused = hub("--nbd-tls-creds", str(layout.nodes["site1"]))
    assert refused.returncode == 2 and "server-cert.pem: missing" in refused.stderr, refused.stderr
    refused = hub("--api-tls-creds", str(tmp_path / "nowhere"))
    assert refused.returncode == 2 and "does not exist" in refused.stderr, refused.stderr
    assert not (tmp_path / "repo").exists()


async def test_a_node_transport_is_checked_stored_and_needs_hub_credentials(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", nodes=["site1"])
    clock = ManualClock(START)
    repo = tmp_path / "repo"
    async with local_hub(repo, clock=clock) as hub:
        status, answer = await hub.call(
            "POST", "/nodes", {"name": "n1", "url": "http://127.0.0.1:9", "transport": "tls"}
        )
        assert status == 400 and "transport tls needs the hub's NBD TLS credentials" in answer["error"]["message"]
        for body in ({"transport": "ssh"}, {"nbd_host": "hub:10809"}, {"nbd_host": "a b"}):
            status, answer = await hub.call("POST", "/nodes", {"name": "n1", "url": "http://127.0.0.1:9", **body})
            assert status == 400, (body, answer)
        node = await hub.ok("POST", "/nodes", {"name": "n1", "url": "http://127.0.0.1:9", "nbd_host": "hub.example"})
        assert (node["transport"], node["nbd_host"]) == ("tunnel", "hub.example")
    context = ServerCredentials(str(layout.hub))
    async with local_hub(repo, clock=clock, nbd_tls_creds=context) as hub:
        node = await hub.ok("PATCH", "/nodes/n1", {"transport": "tls", "nbd_host": None})
        assert (node["transport"], node["nbd_host"]) == ("tls", None)
    async with local_hub(repo, clock=clock) as hub:  # the credentials are gone: its backups are refused
        status, answer = await hub.call("POST", "/backups", {"vm_path": VM_PATH, "node": "n1", "disks": [2000]})
        assert status == 409 and answer["error"]["code"] == "tls_unavailable", answer
        assert "--nbd-tls-creds" in answer["error"]["message"]
        assert (await hub.ok("GET", "/backups"))["backups"] == []
    with pytest.raises(ConfigError, match="--nbd-tls require needs"):
        HubConfig(repo=str(repo), nbd_tls=TLSMode.REQUIRE)


def _older_store(path: Path) -> None:
    """A hub store from before the nodes' transport, nbd_host, hub_url and tls_pinned columns, with a node
    ``old`` and an API-registered node named default."""
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE nodes (name TEXT PRIMARY KEY, url TEXT NOT NULL, token TEXT, tunnel_identity TEXT, "
            "configured TEXT NOT NULL, added REAL NOT NULL, last_contact REAL, last_check REAL, up INTEGER, "
            "version TEXT, running_jobs INTEGER, queued_jobs INTEGER, max_jobs INTEGER, last_error TEXT)"
        )
        connection.execute("INSERT INTO nodes (name, url, configured, added) VALUES ('old', 'http://n:1', 'api', 1)")
        connection.execute(
            "INSERT INTO nodes (name, url, token, configured, added) VALUES ('default', 'http://n:2', 't', 'api', 1)"
        )
    connection.close()


def test_an_older_store_gets_the_node_transport_and_hub_url_columns(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    _older_store(path)
    db = Database(str(path))
    try:
        row = db.call(lambda c: rows(c.execute("SELECT * FROM nodes WHERE name = 'old'")))[0]
    finally:
        db.close()
    record = NodeRecord.from_row(row)
    assert (record.transport, record.nbd_host, record.hub_url, record.tls_pinned) == ("tunnel", None, None, False)


async def test_the_default_node_is_written_whole_into_a_migrated_older_store(tmp_path: Path) -> None:
    """--node-url and every --node-* option over an older store's API-registered node named default: the new
    columns are added, then every one of them written; the other node gets their defaults."""
    layout = init_pki(tmp_path / "pki", hub_names=["hub.example.com"])
    repo = tmp_path / "repo"
    repo.mkdir(mode=0o700)
    _older_store(repo / "hub.db")
    given = {"node_url": "http://127.0.0.1:9", "node_transport": "tls", "node_nbd_host": "127.0.0.1",
             "node_hub_url": "https://hub.example.com:8443", "node_tls_pinned": True,
             "nbd_tls_creds": ServerCredentials(str(layout.hub)), "nbd_advertise": "hub.example.com",
             "nbd_tls_names": CertificateNames.from_pem(layout.hub / "server-cert.pem")}  # fmt: skip
    async with local_hub(repo, clock=ManualClock(START), **given) as hub:
        default = await hub.ok("GET", "/nodes/default")
        expected = {
            "url": "http://127.0.0.1:9",
            "token": False,
            "transport": "tls",
            "nbd_host": "127.0.0.1",
            "hub_url": "https://hub.example.com:8443",
            "tls_pinned": True,
            "configured": "command line",
        }
        assert {key: default[key] for key in expected} == expected  # fmt: skip
        old = await hub.ok("GET", "/nodes/old")
        assert (old["transport"], old["nbd_host"], old["hub_url"], old["tls_pinned"]) == ("tunnel", None, None, False)
    with pytest.raises(ConfigError, match=r"the default node \(--node-url\): the nbd_host of node 'default' 127"):
        HubConfig(repo=str(repo), **{**given, "node_tls_pinned": False})  # not pinned: the name is checked


def test_node_tls_section_is_strict_and_fills_nbds_targets(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", nodes=["site1"])
    creds = layout.nodes["site1"]
    password = tmp_path / "vc.password"
    password.write_text("pass\n")
    password.chmod(0o600)

    def config(tls: str, hub_url: str = 'hub_url = "https://hub:8082"') -> Path:
        path = tmp_path / "node.toml"
        path.write_text(
            f'[vcenter]\nendpoint = "127.0.0.1:1"\nusername = "u"\npassword_file = "{password}"\n'
            f'thumbprint = "{"AB:" * 31}AB"\n\n[node]\n{hub_url}\n\n[tls]\n{tls}\n'
        )
        return path

    for tls, message in (
        ('cert = "x"', "unknown key 'cert' in [tls]"),
        (f'creds = "{tmp_path / "nowhere"}"', "[tls] TLS credentials directory"),
        ('fingerprint = "sha256:12"', "[tls] certificate fingerprint"),
        ("creds = 5", "[tls] creds must be a string"),
    ):
        with pytest.raises(ConfigError) as refused:
            load(str(config(tls)))
        assert message in str(refused.value), (tls, refused.value)
    pin = "AB" * 32
    loaded = load(str(config(f'creds = "{creds}"\nfingerprint = "{pin}"')))
    assert (loaded.tls_creds, loaded.tls_fingerprint) == (str(creds), "sha256:" + pin.lower())
    node = Node(loaded)
    filled = parse_uri(node.with_tls("nbds://hub:10100/e"))
    assert (filled.tls_certificates, filled.tls_fingerprint) == (str(creds), "sha256:" + pin.lower())
    assert node.with_tls("nbd://hub:10100/e") == "nbd://hub:10100/e"
    assert load(str(config(""))).tls_context() is None
    with pytest.raises(ConfigError) as refused:  # the hub token would go wherever a job says
        load(str(config(f'creds = "{creds}"', hub_url="")))
    assert "[tls] needs [node] hub_url" in str(refused.value)
    with pytest.raises(ConfigError) as refused:  # its token and change IDs would cross the network in clear
        load(str(config(f'creds = "{creds}"', hub_url='hub_url = "http://hub.example.com:8082"')))
    assert "[tls] with an http:// [node] hub_url on hub.example.com, not loopback" in str(refused.value)
    for local in ("http://127.0.0.1:8082", "http://localhost:8082", "http://[::1]:8082"):  # through the tunnel
        assert load(str(config(f'creds = "{creds}"', hub_url=f'hub_url = "{local}"'))).hub_urls == (local,)
    for setting in (f"tls-certificates={tmp_path}", "tls-verify-peer=false", "tls-hostname=evil.example",
                    "tls-fingerprint=sha256:" + "00" * 32):  # fmt: skip
        target = {"2000": f"nbds://hub:10100/e?{setting}"}
        body = {"job_id": "j1", "vm_path": "/DC0/vm/x", "api_url": "https://hub:8082", "targets": target}
        with pytest.raises(BadRequest) as refused_target:  # a caller never chooses how the node checks TLS
            BackupRequest.from_json(body, hub_urls=("https://hub:8082",))
        assert "names no TLS settings" in str(refused_target.value), setting
