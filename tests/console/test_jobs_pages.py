"""The job pages over HTTP (aiohttp's client, no browser): the filterable list, newest first with an "Older"
link, a job's page (stages, bytes, why full, disks, error, the server-drawn throughput plot), its live
fragment while it runs, and Cancel; against a real in-process hub's real jobs. Errors are sentences,
changes need the CSRF token, names and messages are escaped."""

from __future__ import annotations

import html
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.jobs import JobState
from tests.console.backups import MIB, backed_up, failed, report, start
from tests.console.inprocess import Console, logged_in

pytestmark = pytest.mark.peer

VM = "/DC0/vm/web01"
EVIL = "/DC0/vm/<script>alert(1)</script>"


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    """A logged-in client of a hub whose clock the test moves."""
    async with logged_in(tmp_path / "repo", clock=ManualClock(time.time())) as console:
        yield console


def rows(page: str) -> list[str]:
    """The job IDs of the page's rows, in order."""
    return re.findall(r'<tr id="job-([^"]+)">', page)


def flashes(page: str) -> str:
    found = re.search(r'<div id="flash" class="flashes">(.*?)</div>', page, re.S)
    assert found is not None, page
    return html.unescape(found.group(1))


async def test_the_list_filters_newest_first_and_pages_back(console: Console) -> None:
    done = await backed_up(console.hub, console.clock, VM)
    broken = await failed(console.hub, EVIL, "the snapshot failed")
    later = await backed_up(console.hub, console.clock, VM)
    status, page = await console.client.get("/jobs")
    assert status == 200 and rows(page) == [later.id, broken.id, done.id]
    for label, field in (("Kind", "kind"), ("State", "state"), ("VM", "vm"), ("Policy", "policy"), ("Node", "node")):
        assert f'<label for="filter-{field}">{label}</label>' in page
    assert ">Filter</button>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert f'href="/vms/view?path={quote(VM)}"' in page and "first_backup" in page and "3.0 MiB" in page

    status, page = await console.client.get("/jobs?kind=backup&state=failed&vm_path=&policy=&node=")
    assert status == 200 and rows(page) == [broken.id]
    assert '<option value="failed" selected>' in page  # the form keeps the filter
    status, page = await console.client.get("/jobs?vm_path=" + quote(VM, safe=""))
    assert rows(page) == [later.id, done.id]

    status, page = await console.client.get("/jobs?limit=2")
    assert rows(page) == [later.id, broken.id]
    older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', page)
    assert older is not None, page
    status, page = await console.client.get(html.unescape(older.group(1)))
    assert status == 200 and rows(page) == [done.id] and 'rel="next"' not in page


async def test_a_bad_filter_is_the_page_with_a_sentence(console: Console) -> None:
    for query, why in (
        ("kind=nope", "kind must be one of backup, restore, verify"),
        ("vm_path=web01", "inventory path"),
    ):
        status, page = await console.client.get("/jobs?" + query)
        assert status == 400 and 'id="filter-error"' in page and why in html.unescape(page), page
        assert "<h1>Jobs</h1>" in page and '"error"' not in page
    status, page = await console.client.get("/jobs?vm_path=web01")
    assert 'value="web01"' in page  # what was typed stays


async def test_a_completed_backups_page(console: Console) -> None:
    job = await backed_up(console.hub, console.clock, VM, (MIB, 2 * MIB, 3 * MIB))
    status, page = await console.client.get(f"/jobs/{job.id}")
    assert status == 200 and f"Backup job {job.id}" in page
    assert "<code>first_backup</code>: It was the disk&#39;s first backup" in page
    assert "<dt>Bytes sent</dt><dd>3.0 MiB</dd>" in page and "<dt>Bytes changed</dt><dd>4.0 MiB</dd>" in page
    stages = re.findall(r"<tr>\s*<td>([a-z]+)</td>", page)
    assert stages[:2] == ["queued", "copying"] and "completing" in stages and "retention" in stages
    plot = re.search(r'<svg id="throughput-plot".*?</svg>', page, re.S)
    assert plot is not None and "<polyline" in plot.group(0) and "512.0 KiB/s" in plot.group(0)
    assert f"#point-{job.disks[0].point_id}" in page and job.disks[0].uri in page
    assert "hx-get" not in page and 'id="job-error"' not in page and ">Cancel</button>" not in page


async def test_a_failed_jobs_error_is_text(console: Console) -> None:
    job = await failed(console.hub, EVIL, '<b>no</b> snapshot: {"json": 1}', stage="<i>snap</i>")
    status, page = await console.client.get(f"/jobs/{job.id}")
    assert status == 200
    error = re.search(r'<section id="job-error".*?</section>', page, re.S)
    assert error is not None, page
    assert "&lt;i&gt;snap&lt;/i&gt;" in error.group(0) and "<dd>node</dd>" in error.group(0)
    assert "&lt;b&gt;no&lt;/b&gt; snapshot: {&#34;json&#34;: 1}" in error.group(0)
    assert "<b>no</b>" not in page and "<script>alert" not in page and "&lt;script&gt;" in page


async def test_a_running_job_polls_its_progress_until_cancelled(console: Console) -> None:
    job = await start(console.hub, VM)
    await report(console.hub, job, MIB)
    status, page = await console.client.get(f"/jobs/{job.id}")
    assert status == 200
    assert f'hx-get="/jobs/{job.id}/live" hx-trigger="every 2s" hx-swap="outerHTML"' in page
    assert f'<progress id="progress-{job.id}" max="100" value="25.0"' in page and "1.0 MiB/s" in page
    status, live = await console.client.get(f"/jobs/{job.id}/live")
    assert status == 200 and "<html" not in live and 'hx-trigger="every 2s"' in live and "copying" in live

    refused = await console.client.post(f"/jobs/{job.id}/cancel", csrf=False)
    assert refused.status == 403 and (await console.hub.job(job.id)).state is JobState.RUNNING
    answer = await console.client.post(f"/jobs/{job.id}/cancel")
    assert answer.status == 303 and answer.headers["Location"] == f"/jobs/{job.id}"
    status, page = await console.client.get(f"/jobs/{job.id}")
    assert f"Job {job.id} is cancelled." in flashes(page) and 'class="state-cancelled"' in page
    assert "cancelled by the API" in page and "hx-trigger" not in page
    status, live = await console.client.get(f"/jobs/{job.id}/live")
    assert status == 200 and "hx-trigger" not in live and "hx-get" not in live and "cancelled" in live

    answer = await console.client.post(f"/jobs/{job.id}/cancel")  # again: a sentence, not a crash
    status, page = await console.client.get(answer.headers["Location"])
    assert "already cancelled" in flashes(page) and 'role="alert"' in page


async def test_an_unknown_job_is_a_404_page(console: Console) -> None:
    for path in ("/jobs/20260101-000000-00000000", "/jobs/%3Cscript%3E", "/jobs/nope/live"):
        status, page = await console.client.get(path)
        assert status == 404 and "<h1>Not found</h1>" in page and "<script>" not in page.split("</head>")[1], path
