"""An offsite copy's export under ``--nbd-tls-verify-client`` (docs/TLS.md, "Hub and node"): served from the real
RGW bucket over ``nbds://`` through the hub's own route (restore_route), it admits only the client certificate its
``reader`` names. Without a reader it is refused (it would admit every node's certificate); another node's
certificate gets NBD_REP_ERR_POLICY at NBD_OPT_GO (our client, nbdinfo), the reader's reads it byte for byte
(nbdcopy, qemu-img compare with the repository's point)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd import connect
from sendense_nbd.errors import OptionError
from sendense_nbd.hub.certnames import CertificateNames
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import ServerCredentials, init_pki
from sendense_nbd.tls.pki import Layout
from tests.conftest import require, run
from tests.hub.operating import LocalHub, local_hub
from tests.offsite.conftest import new_bucket, secret_file

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM = "/DC0/vm/web01"


async def _copied_point(hub: LocalHub, ceph_cluster: Any, secret: str, site: Path | None) -> dict[str, Any]:
    """A policy with a copy target, node ``site``, and one full backup written with site's certificate (over
    TLS, where its export is site's alone; plain without ``site``); the completed copy."""
    await hub.ok("POST", "/nodes", {"name": "site", "url": "http://127.0.0.1:9"})
    copy = {"endpoint": ceph_cluster.rgw_endpoint, "bucket": new_bucket(ceph_cluster), "retain": 60, "margin": 5,
            "access_key": ceph_cluster.s3_access_key, "secret_file": secret, "seal_every": 2}  # fmt: skip
    policy = {"name": "offsite", "node": "site", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 366 * 86400}}
    await hub.ok("POST", "/policies", {**policy, "copy": copy})
    body = {"vm_path": VM, "mode": "full", "disks": [{"key": 2000, "capacity": 8 * MIB}]}
    job = await hub.ok("POST", "/backups", body)
    uri = job["detail"]["disks"][0]["uri"]
    assert uri.startswith("nbds://127.0.0.1:" if site else "nbd://127.0.0.1:"), uri
    uri += f"?tls-certificates={site}" if site else ""
    async with connect(uri) as nbd:  # our client: libnbd's Python binding refuses tls-certificates by default
        await nbd.pwrite(b"\x5a" * 3 * MIB, offset=0)
        await nbd.flush()
    done = {"status": "completed", "vm_path": VM, "disks": [{"disk_key": 2000, "change_id": "52 aa/1"}]}
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", done)
    await hub.hub.settled()
    await hub.hub.copies.settled()
    [made] = (await hub.ok("GET", f"/copies?vm_path={VM}"))["copies"]
    assert made["state"] == "completed", made
    return dict(made)


def _tls(layout: Layout) -> dict[str, Any]:
    return {
        "nbd_tls": TLSMode.REQUIRE,
        "nbd_tls_creds": ServerCredentials(str(layout.hub), verify_client=True),
        "nbd_tls_names": CertificateNames.from_pem(layout.hub / "server-cert.pem"),
    }


async def test_a_copys_export_admits_only_its_reader(ceph_cluster: Any, tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", nodes=["site", "other"])
    site, other = layout.nodes["site"], layout.nodes["other"]
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time()), **_tls(layout)) as hub:
        copy = await _copied_point(hub, ceph_cluster, secret, site)
        path = f"/copies/{copy['id']}/export"
        status, answer = await hub.call("POST", path)
        assert status == 400, answer
        assert "checks client certificates (--nbd-tls-verify-client)" in answer["error"]["message"]
        assert "name it with reader" in answer["error"]["message"]
        assert (await hub.ok("GET", "/ports"))["exports"] == []

        served = await hub.ok("POST", path, {"reader": "site"})
        assert served["reader"] == "site" and served["uri"] == f"nbds://127.0.0.1:{served['port']}/copy-{copy['id']}"
        uri = served["uri"]
        with pytest.raises(
            OptionError, match="is served to 'site' alone, and this client's certificate is for 'other'"
        ):
            async with connect(f"{uri}?tls-certificates={other}"):
                pass
        info = await asyncio.to_thread(
            run, require("nbdinfo"), "--size", f"{uri}?tls-certificates={other}", check=False
        )
        assert info.returncode != 0 and "server policy prevents NBD_OPT_GO" in info.stderr, info.stderr
        local = tmp_path / "read.raw"
        await asyncio.to_thread(run, require("nbdcopy"), f"{uri}?tls-certificates={site}", str(local))
        [point] = [p["path"] for p in (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]]
        await asyncio.to_thread(run, require("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(local), point)

        status, answer = await hub.call("POST", path, {"reader": "other"})
        assert status == 409 and answer["error"]["code"] == "served", answer
        assert (await hub.ok("POST", path, {"reader": "site"}))["uri"] == uri  # the same reader: as it is
        status, answer = await hub.call("POST", path, {"reader": "a b"})
        assert status == 400 and "reader must be the name in a client certificate" in answer["error"]["message"]
        await hub.ok("DELETE", path)


async def test_a_plain_copy_export_refuses_a_reader_it_cannot_enforce(ceph_cluster: Any, tmp_path: Path) -> None:
    """Without TLS on restores (the tunnel's default hub) a reader would bind nothing: refused, not ignored."""
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        copy = await _copied_point(hub, ceph_cluster, secret, None)
        status, answer = await hub.call("POST", f"/copies/{copy['id']}/export", {"reader": "site"})
        assert status == 400 and "the export is plain NBD" in answer["error"]["message"], answer
        served = await hub.ok("POST", f"/copies/{copy['id']}/export")
        assert served["uri"].startswith("nbd://127.0.0.1:") and served["reader"] is None
        info = await asyncio.to_thread(run, require("nbdinfo"), "--size", served["uri"])
        assert int(info.stdout) == 8 * MIB
