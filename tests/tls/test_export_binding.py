"""With ``--nbd-tls-verify-client`` each export of a backup admits only the certificate of the node whose
job it is (docs/TLS.md, "Hub and node"): another node's valid certificate, from the same ``tls init``, is
refused at NBD_OPT_GO with a sentence that names both nodes, and the hub logs why.

A real in-process hub (its exports are real NBD servers on real ports), a node API that accepts jobs, and
real clients: ours (``connect``) and libnbd's ``nbdinfo``/``nbdcopy`` over ``nbds://`` with
``tls-certificates``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd import connect
from sendense_nbd.errors import OptionError
from sendense_nbd.hub.certnames import CertificateNames
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import ServerCredentials, init_pki, issue_certificate, make_ca
from sendense_nbd.tls.pki import write_client_credentials, write_server_credentials
from tests.conftest import require, run
from tests.hub.accepting_node import accepting_node
from tests.hub.operating import START, LocalHub, local_hub

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM_PATH = "/DC0/vm/DC0_H0_VM0"


async def _backup(hub: LocalHub, node: str, vm_path: str = VM_PATH) -> str:
    """A backup job of one 1 MiB disk of ``vm_path`` on ``node``; its export's URI."""
    body = {"vm_path": vm_path, "node": node, "disks": [{"key": 2000, "capacity": MIB}]}
    job = await hub.ok("POST", "/backups", body)
    assert job["state"] == "running", job
    [disk] = job["detail"]["disks"]
    assert disk["uri"].startswith("nbds://127.0.0.1:"), disk
    return str(disk["uri"])


async def _peer(*args: str) -> Any:
    """A libnbd tool, off the event loop (the hub serves in it)."""
    return await asyncio.to_thread(run, *args, check=False)


async def test_an_export_admits_only_its_own_nodes_certificate(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each export, in its export worker process, admits only the certificate of its job's node: refused at GO
    with the reason (which the worker logs), for our client and libnbd's."""
    layout = init_pki(tmp_path / "pki", nodes=["site1", "site2"])
    site1, site2 = (f"tls-certificates={layout.nodes[name]}" for name in ("site1", "site2"))
    tls = {
        "nbd_tls_creds": ServerCredentials(str(layout.hub), verify_client=True),
        "nbd_tls_names": CertificateNames.from_pem(layout.hub / "server-cert.pem"),
    }
    data = os.urandom(MIB)
    source = tmp_path / "source.raw"
    source.write_bytes(data)
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **tls) as hub:
        assert hub.hub.config.workers > 0
        for name in ("site1", "site2"):
            await hub.ok("POST", "/nodes", {"name": name, "url": node.url, "transport": "tls"})
        uri = await _backup(hub, "site1")
        assert [body["targets"] for body in node.received] == [{"2000": uri}]

        # Our client: site2's certificate is refused at GO with the reason, site1's is served.
        with pytest.raises(OptionError) as refused:
            async with connect(f"{uri}?{site2}"):
                pass
        export = uri.rsplit("/", 1)[1]
        reason = f"export {export!r} serves a job of node 'site1', and this client's certificate is for 'site2'"
        assert reason in str(refused.value), refused.value
        async with connect(f"{uri}?{site1}") as nbd:
            assert nbd.size == MIB

        # libnbd: nbdinfo and nbdcopy with site2's certificate are refused (libnbd names the refusal, the hub's
        # log the reason); with site1's they read and write.
        info = await _peer(require("nbdinfo"), "--size", f"{uri}?{site2}")
        assert info.returncode != 0 and "server policy prevents NBD_OPT_GO" in info.stderr, info.stderr
        copied = await _peer(require("nbdcopy"), str(source), f"{uri}?{site2}")
        assert copied.returncode != 0 and "server policy prevents NBD_OPT_GO" in copied.stderr, copied.stderr
        info = await _peer(require("nbdinfo"), "--size", f"{uri}?{site1}")
        assert info.returncode == 0 and int(info.stdout) == MIB, info.stderr
        copied = await _peer(require("nbdcopy"), "--flush", str(source), f"{uri}?{site1}")
        assert copied.returncode == 0, copied.stderr
        async with connect(f"{uri}?{site1}") as nbd:
            assert await nbd.pread(offset=0, length=MIB) == data

        # Another VM's job on site2: its export is site2's alone.
        second = await _backup(hub, "site2", "/DC0/vm/other")
        with pytest.raises(OptionError, match="serves a job of node 'site2'.*certificate is for 'site1'"):
            async with connect(f"{second}?{site1}"):
                pass
        async with connect(f"{second}?{site2}") as nbd:
            assert nbd.size == MIB
    logged = [line for line in capfd.readouterr().err.splitlines() if "WARNING refusing client" in line]
    first = f"export {export!r} serves a job of node 'site1', and this client's certificate is for 'site2'"
    assert len([m for m in logged if first in m]) >= 3, logged  # ours, nbdinfo, nbdcopy (each connection)
    assert len([m for m in logged if "node 'site2', and this client's certificate is for 'site1'" in m]) == 1
    assert all(first in m or "node 'site2'" in m for m in logged), logged


async def test_without_client_certificates_an_export_binds_no_node(tmp_path: Path) -> None:
    """Binding needs the certificates verified (--nbd-tls-verify-client): without it any TLS client is served,
    which is why a hub refuses such exports on a network address unless --allow-any-tls-client."""
    layout = init_pki(tmp_path / "pki", nodes=["site1", "site2"])
    tls = {"nbd_tls_creds": ServerCredentials(str(layout.hub))}
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **tls) as hub:
        await hub.ok("POST", "/nodes", {"name": "site1", "url": node.url, "transport": "tls"})
        uri = await _backup(hub, "site1")
        async with connect(f"{uri}?tls-certificates={layout.nodes['site2']}") as nbd:
            assert nbd.size == MIB


async def _point(hub: LocalHub, node_url: str, transport: str, query: str = "") -> str:
    """A completed point of node site1 (registered with ``transport``), its 1 MiB of b"r" written by our client
    (with ``query``, its TLS settings); the point's ID."""
    await hub.ok("POST", "/nodes", {"name": "site1", "url": node_url, "transport": transport})
    body = {"vm_path": VM_PATH, "node": "site1", "disks": [{"key": 2000, "capacity": MIB}]}
    job = await hub.ok("POST", "/backups", body)
    async with connect(job["detail"]["disks"][0]["uri"] + query) as nbd:
        await nbd.pwrite(b"r" * MIB, offset=0)
        await nbd.flush()
    done = {"status": "completed", "disks": [{"disk_key": 2000, "change_id": "52 aa/1"}]}
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", done)
    [point] = (await hub.ok("GET", f"/points?vm_path={VM_PATH}"))["points"]
    return str(point["id"])


async def test_a_restores_export_admits_only_its_reader(tmp_path: Path) -> None:
    """A restore serves no node's job: under --nbd-tls-verify-client it names its reader (refused without one,
    as it would admit every node's certificate), and only that certificate reads it (ours, nbdinfo, nbdcopy)."""
    layout = init_pki(tmp_path / "pki", nodes=["site1", "site2"])
    site1, site2 = (f"tls-certificates={layout.nodes[name]}" for name in ("site1", "site2"))
    tls = {"nbd_tls": TLSMode.REQUIRE, "nbd_tls_creds": ServerCredentials(str(layout.hub), verify_client=True)}
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **tls) as hub:
        point_id = await _point(hub, node.url, "tls", f"?{site1}")
        status, answer = await hub.call("POST", "/restores", {"point_id": point_id})
        assert status == 400 and "so a restore's export admits exactly one" in answer["error"]["message"], answer
        convert = {"point_id": point_id, "action": "convert", "path": "x.raw", "reader": "site1"}
        status, answer = await hub.call("POST", "/restores", convert)
        assert status == 400 and "reader belongs to action export" in answer["error"]["message"], answer
        assert (await hub.ok("GET", "/ports"))["exports"] == []
        detail = (await hub.ok("POST", "/restores", {"point_id": point_id, "reader": "site1"}))["detail"]
        assert detail["reader"] == "site1" and detail["uri"].startswith("nbds://127.0.0.1:"), detail
        with pytest.raises(OptionError, match="is served to 'site1' alone, and this client's certificate is for"):
            async with connect(f"{detail['uri']}?{site2}"):
                pass
        info = await _peer(require("nbdinfo"), "--size", f"{detail['uri']}?{site2}")
        assert info.returncode != 0 and "server policy prevents NBD_OPT_GO" in info.stderr, info.stderr
        copied = await _peer(require("nbdcopy"), f"{detail['uri']}?{site1}", str(tmp_path / "restored.raw"))
        assert copied.returncode == 0, copied.stderr
        assert (tmp_path / "restored.raw").read_bytes() == b"r" * MIB


@pytest.mark.parametrize("verify", ["tls-without-client-certificates", "plain"])
async def test_a_reader_the_hub_cannot_enforce_is_refused(tmp_path: Path, verify: str) -> None:
    """Without client certificates, or on a plain restore export, a reader would bind nothing: refused (400,
    no export), not ignored; the export without it works as before."""
    layout = init_pki(tmp_path / "pki", nodes=["site1"])
    tls = {"nbd_tls": TLSMode.REQUIRE, "nbd_tls_creds": ServerCredentials(str(layout.hub))} if verify != "plain" else {}
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **tls) as hub:
        query = f"?tls-certificates={layout.nodes['site1']}" if tls else ""
        point_id = await _point(hub, node.url, "tls" if tls else "tunnel", query)
        status, answer = await hub.call("POST", "/restores", {"point_id": point_id, "reader": "site1"})
        why = "no --nbd-tls-verify-client" if tls else "the export is plain NBD"
        assert status == 400 and f"which this hub does not check ({why})" in answer["error"]["message"], answer
        assert (await hub.ok("GET", "/ports"))["exports"] == []
        status, answer = await hub.call("POST", "/restores", {"point_id": point_id, "reader": "bad name"})
        assert status == 400 and "reader must be the name in a client certificate" in answer["error"]["message"]
        detail = (await hub.ok("POST", "/restores", {"point_id": point_id}))["detail"]
        assert detail["reader"] is None
        async with connect(detail["uri"] + query) as nbd:
            assert await nbd.pread(offset=0, length=MIB) == b"r" * MIB


async def test_a_client_certificate_is_its_dns_names_when_it_has_any(tmp_path: Path) -> None:
    """RFC 6125 6.4.4, the rule the server side reads names by: a certificate with DNS name site1 and common
    name site2 is site1's alone, so site2's export refuses it (the common name counts only without DNS names)."""
    ca = make_ca()
    server = issue_certificate(ca, "localhost", usage="server", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    hub_dir = write_server_credentials(tmp_path / "hub", ca, server)
    mixed = issue_certificate(ca, "site2", usage="client", dns_names=["site1"])
    query = f"tls-certificates={write_client_credentials(tmp_path / 'mixed', ca, mixed)}"
    tls = {"nbd_tls_creds": ServerCredentials(str(hub_dir), verify_client=True)}
    async with accepting_node() as node, local_hub(tmp_path / "repo", clock=ManualClock(START), **tls) as hub:
        for name in ("site1", "site2"):
            await hub.ok("POST", "/nodes", {"name": name, "url": node.url, "transport": "tls"})
        first, second = await _backup(hub, "site1"), await _backup(hub, "site2", "/DC0/vm/other")
        with pytest.raises(
            OptionError, match="serves a job of node 'site2', and this client's certificate is for 'site1'"
        ):
            async with connect(f"{second}?{query}"):
                pass
        async with connect(f"{first}?{query}") as nbd:
            assert nbd.size == MIB
