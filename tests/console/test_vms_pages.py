"""The VM pages over HTTP (aiohttp's client, no browser): the VM list, a VM's chains with each point's size,
age and verify state, and the point actions (export over NBD, convert to file, verify) against a real
in-process hub with real points; errors are sentences, changes need the CSRF token, names are escaped."""

from __future__ import annotations

import asyncio
import html
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, unquote

import aiohttp
import pytest

from sendense_nbd import connect
from sendense_nbd.errors import OptionError
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.jobs import ExportDetail, JobState
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import ServerCredentials, init_pki
from tests.conftest import require
from tests.console.backups import SIZE, backed_up, ended, with_digests
from tests.console.inprocess import Console, ConsoleClient, logged_in

pytestmark = pytest.mark.peer

VM = "/DC0/vm/web01"
EVIL = "/DC0/vm/<script>alert(1)</script>"


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    """A logged-in client of a hub whose clock the test moves."""
    async with logged_in(tmp_path / "repo", clock=ManualClock(time.time())) as console:
        yield console


def view(vm_path: str) -> str:
    return "/vms/view?path=" + quote(vm_path, safe="")


async def followed(client: ConsoleClient, response: object) -> tuple[str, str]:
    """Where a 303 went, and that page."""
    assert isinstance(response, aiohttp.ClientResponse) and response.status == 303, response
    location = response.headers["Location"]
    status, page = await client.get(location)
    assert status == 200, page
    return location, page


def flashes(page: str) -> str:
    """The text of the page's messages."""
    found = re.search(r'<div id="flash" class="flashes">(.*?)</div>', page, re.S)
    assert found is not None, page
    return html.unescape(found.group(1))


async def test_the_vm_list_and_a_vms_chain_with_each_points_facts(console: Console) -> None:
    full = await backed_up(console.hub, console.clock, VM)
    incremental = await backed_up(console.hub, console.clock, VM, (MIB_2,))
    await backed_up(console.hub, console.clock, EVIL)
    status, page = await console.client.get("/vms")
    assert status == 200 and "<h1>VMs</h1>" in page
    assert f'href="{view(VM)}"' in page and ">2</td>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page

    status, page = await console.client.get(view(VM))
    assert status == 200
    first, second = (job.disks[0].point_id for job in (full, incremental))
    chain = re.search(r'<ol class="chain">(.*?)</ol>', page, re.S)
    assert chain is not None, page
    items = re.findall(r'<li id="point-([^"]+)" class="([^"]+)">', chain.group(1))
    assert items == [(first, "full"), (second, "incremental")]
    assert "4.0 MiB virtual" in page and "2.0 MiB sent" in page and "unverified" in page
    for label in ("File name", "Format"):
        assert f'<label for="{"name" if label == "File name" else "format"}-{first}">{label}</label>' in page
    for button in ("Export over NBD", "Convert to file", "Verify now", "Verify all points"):
        assert f">{button}</button>" in page
    assert f'id="job-{full.id}"' in page and f'id="job-{incremental.id}"' in page  # the VM's recent jobs

    status, page = await console.client.get(view(EVIL))
    assert status == 200 and "<h1>/DC0/vm/&lt;script&gt;alert(1)&lt;/script&gt;</h1>" in page
    assert "<script>alert" not in page


MIB_2 = 2 << 20


async def test_export_shows_the_uri_nbdinfo_reads_and_stop_ends_it(console: Console) -> None:
    job = await backed_up(console.hub, console.clock, VM)
    point_id = job.disks[0].point_id
    await console.client.get(view(VM))
    refused = await console.client.post(f"/points/{point_id}/export", {"path": VM}, csrf=False)
    assert refused.status == 403
    location, page = await followed(
        console.client, await console.client.post(f"/points/{point_id}/export", {"path": VM})
    )
    restore = await console.hub.job(location.rsplit("/", 1)[1])
    assert isinstance(restore.detail, ExportDetail) and restore.state is JobState.RUNNING
    uri = restore.detail.uri
    assert f'<code id="nbd-uri">{uri}</code>' in page
    assert f'<code class="block" id="nbdinfo-command">nbdinfo {uri}</code>' in page
    assert f'id="qemu-img-command">qemu-img convert -p -O qcow2 {uri} restored.qcow2</code>' in page
    assert "is served over NBD" in flashes(page)
    info = await asyncio.to_thread(
        subprocess.run, [require("nbdinfo"), "--size", uri], capture_output=True, text=True, timeout=30
    )
    assert info.returncode == 0 and int(info.stdout) == SIZE, info.stderr

    location, page = await followed(console.client, await console.client.post(f"/restores/{restore.id}/stop"))
    assert location == f"/restores/{restore.id}" and "is stopped" in flashes(page)
    assert (await console.hub.job(restore.id)).state is JobState.COMPLETED
    assert ">Stop export</button>" not in page and "no longer served" in page


async def test_convert_writes_the_file_and_a_bad_name_is_a_sentence(console: Console) -> None:
    job = await backed_up(console.hub, console.clock, VM)
    point_id = job.disks[0].point_id
    await console.client.get(view(VM))
    form = {"path": VM, "name": "web01.raw", "format": "raw"}
    location, page = await followed(console.client, await console.client.post(f"/points/{point_id}/convert", form))
    path = os.path.join(console.hub.restore_dir, "web01.raw")
    assert location.startswith("/restores/") and await asyncio.to_thread(os.path.getsize, path) == SIZE
    assert f'<code id="restore-file">{path}</code>' in page and "was written to" in flashes(page)

    for name, why in (("../evil", "path must be a plain file name"), ("web01.raw", "exists in the restore directory")):
        answer = await console.client.post(f"/points/{point_id}/convert", {**form, "name": name})
        location, page = await followed(console.client, answer)
        assert unquote(location) == f"/vms/view?path={VM}" and 'role="alert"' in page
        assert why in flashes(page).lower() and "{" not in flashes(page)


async def test_verify_now_and_verify_all_start_jobs_and_a_damaged_point_shows(console: Console) -> None:
    await backed_up(console.hub, console.clock, VM)
    [point] = await with_digests(console.hub, VM)
    await console.client.get(view(VM))
    location, page = await followed(
        console.client, await console.client.post(f"/points/{point.id}/verify", {"path": VM})
    )
    job_id = location.removeprefix("/jobs/")
    assert location == f"/jobs/{job_id}" and f"Verify job {job_id} started" in flashes(page)
    assert (await ended(console.hub, job_id)).state is JobState.COMPLETED
    status, page = await console.client.get(f"/jobs/{job_id}")
    assert status == 200 and f'<tr id="verdict-{point.id}">' in page and 'class="verify-verified">verified' in page

    damage = [require("qemu-io"), "-f", "qcow2", "-c", "write -P 0x55 0 65536", point.path]
    await asyncio.to_thread(subprocess.run, damage, check=True, capture_output=True)
    location, _ = await followed(console.client, await console.client.post("/vms/verify", {"path": VM}))
    await ended(console.hub, location.removeprefix("/jobs/"))
    status, page = await console.client.get(view(VM))
    assert f'<li id="point-{point.id}" class="full damaged">' in page
    assert "first bad byte at offset 0" in page and 'class="verify-damaged">damaged' in page
    status, page = await console.client.get("/vms")
    assert 'class="verify-damaged">damaged' in page


async def test_unknown_vms_points_and_jobs_are_sentences_not_json(console: Console) -> None:
    status, page = await console.client.get(view("/DC0/vm/nothing"))
    assert status == 404 and "has no restore point and no job of /DC0/vm/nothing" in page and "<h1>Not found" in page
    status, page = await console.client.get("/vms/view?path=web01")
    assert status == 400 and "the vm path is an inventory path" in page.lower() and '"error"' not in page
    status, page = await console.client.get("/vms/view")
    assert status == 400 and "give the vm&#39;s inventory path" in page.lower()
    status, page = await console.client.get("/restores/no-such-job")
    assert status == 404 and "no job no-such-job" in page.lower()
    location, page = await followed(console.client, await console.client.post("/points/no-such-point/export"))
    assert location == "/vms"
    assert "no-such-point" in flashes(page) and 'role="alert"' in page


async def test_the_vm_list_is_paged(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    from sendense_nbd.hub.console import vms

    monkeypatch.setattr(vms, "VMS_PER_PAGE", 2)
    names = [f"/DC0/vm/page{i}" for i in range(5)]
    for name in names:
        await backed_up(console.hub, console.clock, name, (MIB_2,))
    shown = []
    path: str | None = "/vms"
    while path is not None:
        status, page = await console.client.get(path)
        assert status == 200 and "5 VMs" in page
        shown += re.findall(r">(/DC0/vm/page\d)</a>", page)
        found = re.search(r'href="(/vms\?start=\d+)">Next<', page)
        path = found.group(1) if found else None
    assert shown == names  # every VM once, in order, two per page
    status, page = await console.client.get("/vms?start=junk")
    assert status == 200 and re.findall(r">(/DC0/vm/page\d)</a>", page) == names[:2]


async def test_export_under_client_certificates_names_its_reader(tmp_path: Path) -> None:
    """With --nbd-tls-verify-client the export form asks for the reader (the hub refuses an export that would
    admit every node's certificate): without one the export is refused with the hub's sentence; with one the
    restore page shows it, and only that certificate reads the export (our client over nbds://)."""
    layout = init_pki(tmp_path / "pki", nodes=["site1", "site2"])
    tls = {"nbd_tls": TLSMode.REQUIRE, "nbd_tls_creds": ServerCredentials(str(layout.hub), verify_client=True)}
    async with logged_in(tmp_path / "repo", clock=ManualClock(time.time()), **tls) as console:
        point_id = (await backed_up(console.hub, console.clock, VM)).disks[0].point_id
        page = await console.page(view(VM))
        assert f'<input type="text" id="reader-{point_id}" name="reader" required' in page
        location, page = await followed(
            console.client, await console.client.post(f"/points/{point_id}/export", {"path": VM})
        )
        assert unquote(location) == f"/vms/view?path={VM}" and "name it with reader" in flashes(page)
        location, page = await followed(
            console.client, await console.client.post(f"/points/{point_id}/export", {"path": VM, "reader": "site1"})
        )
        restore = await console.hub.job(location.rsplit("/", 1)[1])
        assert isinstance(restore.detail, ExportDetail) and restore.detail.reader == "site1"
        assert '<code id="reader">site1</code>' in page
        uri = restore.detail.uri
        assert uri.startswith("nbds://127.0.0.1:")
        with pytest.raises(OptionError, match="is served to 'site1' alone, and this client's certificate is for"):
            async with connect(f"{uri}?tls-certificates={layout.nodes['site2']}"):
                pass
        async with connect(f"{uri}?tls-certificates={layout.nodes['site1']}") as nbd:
            assert nbd.size == SIZE
    async with logged_in(tmp_path / "plain", clock=ManualClock(time.time())) as console:  # no field without them
        point_id = (await backed_up(console.hub, console.clock, VM)).disks[0].point_id
        assert 'name="reader"' not in await console.page(view(VM))
