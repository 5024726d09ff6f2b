"""The policies pages over HTTP, as a browser without script uses them (and htmx for the preview): a real
in-process hub with its store and repository in tmp_path, a node on a real socket, a logged-in session."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import UnknownPolicy
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.jobs import Job
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec
from sendense_nbd.policy.model import Policy
from tests.console.inprocess import Console, logged_in
from tests.console.listing_node import DISK, SIZE, ListingNode

#: 2026-03-02T08:00:00Z, a Monday.
START = 1_772_438_400.0
VM = "/DC0/vm/web01"
SCRIPT_VM = "/DC0/vm/<script>alert(1)</script>"

FORM = {
    "name": "nightly",
    "node": "",
    "include": "/DC0/vm\n",
    "exclude": "/DC0/vm/test-*",
    "schedule_kind": "cron",
    "schedule_cron": "0 22 * * 1-5",
    "schedule_timezone": "Europe/Berlin",
    "schedule_every": "",
    "schedule_window": "14400",
    "verify_kind": "none",
    "verify_cron": "",
    "verify_every": "",
    "verify_timezone": "UTC",
    "verify_window": "",
    "per_policy": "2",
    "per_node": "4",
    "mode": "auto",
    "full_every": "",
    "keep_last": "3",
    "keep_daily": "7",
    "keep_weekly": "0",
    "keep_monthly": "0",
    "keep_yearly": "0",
    "enabled": "on",
}


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    node = await ListingNode([VM, SCRIPT_VM]).start()
    try:
        async with logged_in(tmp_path / "repo", clock=ManualClock(START), node=node, keep_points=10) as console:
            yield console
    finally:
        await node.close()


async def backed_up(console: Console, vm_path: str) -> Job:
    """A completed backup of the VM an hour on (the test plays the node's part); its retention ran."""
    await console.clock.advance(3600)
    job = await console.hub.create_backup(BackupRequest(vm_path, Mode.AUTO, (DiskSpec(DISK, SIZE),)))
    done = {"status": "completed", "disks": [{"disk_key": DISK, "bytes_transferred": SIZE, "bytes_changed": SIZE}]}
    await console.hub.complete(job.id, Completion.from_json(done))
    await console.hub.settled()
    return await console.hub.job(job.id)


def flashes(page: str) -> str:
    """The text of the page's messages container."""
    found = re.search(r'<div id="flash" class="flashes">(.*?)</div>', page, re.S)
    assert found is not None, page
    return html.unescape(found.group(1))


def unlabelled(page: str) -> list[str]:
    """The ids of the page's inputs, selects and textareas (not hidden) that no <label for> names."""
    controls = re.findall(r'<(?:input|select|textarea)\b(?![^>]*type="hidden")[^>]*\bid="([^"]+)"', page)
    labels = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', page))
    return [control for control in controls if control not in labels]


async def test_a_policy_is_created_shown_listed_edited_and_deleted(console: Console) -> None:
    empty = await console.page("/policies")
    assert "No policy yet" in empty and 'href="/policies/new"' in empty
    form = await console.page("/policies/new")
    assert 'action="/policies/new"' in form and 'id="retention-preview"' in form
    assert unlabelled(form) == [] and 'hx-post="/policies/preview"' in form

    location, _ = await console.post("/policies/new", FORM)
    assert location == "/policies/nightly"
    stored = (await console.hub.scheduler.store.get("nightly")).policy
    expected = {"name": "nightly", "vms": {"include": ["/DC0/vm"], "exclude": ["/DC0/vm/test-*"]},
                "schedule": {"cron": "0 22 * * 1-5", "timezone": "Europe/Berlin", "window": 14400},
                "per_policy": 2, "retention": {"keep_last": 3, "keep_daily": 7}}  # fmt: skip
    assert stored == Policy.from_json(expected)
    detail = await console.page(location)
    assert "Policy nightly created." in flashes(detail)
    assert "cron 0 22 * * 1-5 (Europe/Berlin)" in detail and "keep the last 3, 7 daily" in detail
    assert 'id="next-backup"><time datetime="2026-03-02T21:00:00Z">' in detail  # 22:00 in Berlin
    assert "It has not run yet." in detail and 'id="retention-preview"' in detail

    listing = await console.page("/policies")
    row = listing[listing.index('<tr id="policy-nightly">') :]
    assert '<a href="/policies/nightly">nightly</a>' in row and "never run" in row
    assert 'action="/policies/nightly/run"' in row and 'href="/policies/nightly/edit"' in row

    edit = await console.page("/policies/nightly/edit")
    assert 'action="/policies/nightly/edit"' in edit and unlabelled(edit) == []
    assert ">/DC0/vm</textarea>" in edit and 'value="0 22 * * 1-5"' in edit and 'value="14400"' in edit
    changed = {**FORM, "name": "ignored", "schedule_kind": "every", "schedule_every": "3600", "schedule_window": "",
               "keep_daily": "", "verify_kind": "every", "verify_every": "86400", "enabled": ""}  # fmt: skip
    location, _ = await console.post("/policies/nightly/edit", changed)
    assert location == "/policies/nightly"
    policy = (await console.hub.scheduler.store.get("nightly")).policy
    assert policy.schedule.every == 3600 and policy.schedule.cron is None and policy.schedule.window is None
    assert policy.verify is not None and policy.verify.every == 86400 and policy.schedule.timezone == "Europe/Berlin"
    assert policy.retention.keep_daily == 0 and policy.retention.keep_last == 3 and not policy.enabled
    assert "Policy nightly saved." in flashes(await console.page(location))

    _, confirm = await console.post("/policies/nightly/delete", {}, status=200)
    assert 'name="confirm" value="yes"' in confirm and "Delete policy nightly?" in confirm
    await console.hub.scheduler.store.get("nightly")  # still there
    location, _ = await console.post("/policies/nightly/delete", {"confirm": "yes"})
    assert location == "/policies"
    assert "Policy nightly deleted." in flashes(await console.page(location))
    with pytest.raises(UnknownPolicy):
        await console.hub.scheduler.store.get("nightly")


async def test_a_refused_form_shows_the_sentence_and_keeps_what_was_typed(console: Console) -> None:
    typed = {**FORM, "schedule_cron": "0 25 * * *", "include": SCRIPT_VM}
    _, page = await console.post("/policies/new", typed, status=400)
    error = re.search(r'<p class="flash error" role="alert" id="form-error">(.*?)</p>', page, re.S)
    assert (
        error is not None
        and "schedule.cron: cron hour: 25 is outside 0-23" in error.group(1).lower()
        and "{" not in error.group(1)
    )
    assert 'value="0 25 * * *"' in page and "&lt;script&gt;alert(1)&lt;/script&gt;</textarea>" in page
    assert "<script>alert" not in page

    _, page = await console.post("/policies/new", {**FORM, "per_policy": "two"}, status=400)
    assert "VMs at once must be a number" in page
    _, page = await console.post("/policies/new", {**FORM, "node": "elsewhere"}, status=404)
    assert "o node &#39;elsewhere&#39; is registered" in page and "(not registered)" in page
    _, page = await console.post("/policies/new", {**FORM, "include": " \n"}, status=400)
    assert "ms.include names at least one inventory path" in page
    assert await console.hub.scheduler.store.all() == []

    await console.post("/policies/new", FORM)
    _, page = await console.post("/policies/nightly/edit", {**FORM, "keep_last": "-1"}, status=400)
    assert "retention.keep_last" in page.lower() and 'action="/policies/nightly/edit"' in page
    assert (await console.hub.scheduler.store.get("nightly")).policy.retention.keep_last == 3
    missing = await console.page("/policies/nothing", status=404)
    assert "no policy &#39;nothing&#39;" in missing and "application/json" not in missing


async def test_run_now_opens_a_run_and_a_second_one_is_refused_with_the_sentence(console: Console) -> None:
    await console.post("/policies/new", {**FORM, "exclude": "", "per_policy": "4"})
    location, _ = await console.post("/policies/nightly/run", {})
    assert location == "/policies/nightly"
    [run] = await console.hub.scheduler.store.runs(policy="nightly")
    page = await console.page(location)
    assert f"Run {run.id} of policy nightly started for 2 VM(s)." in flashes(page)
    jobs = {item.vm_path: item.job_id for item in run.items}
    assert len(console.node.started) == 2 and all(jobs.values())
    assert f'<tr id="run-{run.id}">' in page and f'<a href="/jobs/{jobs[VM]}">{VM}</a>' in page
    assert f'<a href="/jobs/{jobs[SCRIPT_VM]}">/DC0/vm/&lt;script&gt;alert(1)&lt;/script&gt;</a>' in page
    assert "<script>alert" not in page

    _, refused = await console.post("/policies/nightly/run", {}, status=409)
    assert f"policy nightly has a backup run open ({run.id})" in refused.lower()
    assert 'role="alert" id="refused">' in refused and '"code"' not in refused
    listing = await console.page("/policies")
    assert '<span class="run-open">open</span>' in listing


async def test_the_retention_preview_marks_each_point_kept_or_dropped(console: Console) -> None:
    first = await backed_up(console, SCRIPT_VM)
    second = await backed_up(console, SCRIPT_VM)
    older, newer = (await console.hub.points(SCRIPT_VM))[:2]
    assert (older.job_id, newer.job_id) == (first.id, second.id)
    await console.page("/policies/new")
    rules = {**FORM, "name": "", "exclude": "", "keep_last": "1", "keep_daily": "0"}

    response = await console.client.session.post(
        console.client.url + "/policies/preview", data=rules,
        headers={"HX-Request": "true", "X-CSRF-Token": console.client.csrf or ""},
    )  # fmt: skip
    fragment = await response.text()
    assert response.status == 200 and "<html" not in fragment
    assert f'<tr id="preview-{newer.id}" class="keep">' in fragment and "(last)" in fragment
    assert f'<tr id="preview-{older.id}" class="drop">' in fragment
    assert "<caption>/DC0/vm/&lt;script&gt;alert(1)&lt;/script&gt;</caption>" in fragment

    _, page = await console.post("/policies/preview", rules, status=200)  # no script: the form, with the preview
    assert 'action="/policies/new"' in page and f'id="preview-{older.id}" class="drop"' in page
    _, page = await console.post("/policies/preview", {**rules, "include": ""}, status=400)
    preview = page[page.index('id="retention-preview"') :]
    assert "ms.include names at least one inventory path" in preview

    await console.post("/policies/new", {**FORM, "keep_last": "1", "keep_daily": "0"})
    detail = await console.page("/policies/nightly")
    assert f'id="preview-{older.id}" class="drop"' in detail and f'id="preview-{newer.id}" class="keep"' in detail
    assert [p.id for p in await console.hub.points(SCRIPT_VM)] == [older.id, newer.id]  # a preview drops nothing


async def test_every_change_needs_the_csrf_token(console: Console) -> None:
    await console.post("/policies/new", FORM)
    for path in ("/policies/new", "/policies/nightly/edit", "/policies/nightly/run", "/policies/nightly/delete",
                 "/policies/preview"):  # fmt: skip
        response = await console.client.post(path, {**FORM, "confirm": "yes"}, csrf=False)
        assert response.status == 403, path
        assert "CSRF token is missing" in await response.text()
    await console.hub.scheduler.store.get("nightly")
    assert await console.hub.scheduler.store.runs(policy="nightly") == []
