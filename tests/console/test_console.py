"""The web console in a real browser (Debian chromium under Playwright) against a real hub, node, tunnel and vcsim.

The scenarios of issue 15: log in; create a policy; run it and watch its progress bar move to completion; open the
VM's chain; export a point and read it with ``nbdinfo`` at the URI the page shows; start a verify; see a failed job's
error. And: stale sessions, forged cookies and missing or wrong CSRF tokens are refused; a VM named ``<script>...``
shows as text; the dashboard fits a phone's width; the keyboard reaches the login form; times are the browser's.
The tests share one stack and run in order (each sets up what it needs through the hub API or the pages).
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Page, expect

from sendense_nbd.hub.console.auth import COOKIE
from tests.conftest import require, run
from tests.console.conftest import DISK_SIZE, SCRIPT_VM, TOKEN, Stack
from tests.pipeline.stack import VM_PATH

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parents[2]
POLICY = "nightly"
#: What has the keyboard focus: its id, else its text (the page itself: "body").
FOCUSED = "(e => e === document.body ? 'body' : e.id || e.textContent.trim())(document.activeElement)"


def log_in(page: Page, stack: Stack, token: str = TOKEN) -> None:
    """Through the login form, with the pointer."""
    page.goto(f"{stack.url}/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()


def logged_in(open_page: Callable[..., Page], stack: Stack, **options: object) -> Page:
    """A page of a fresh context, logged in, on the dashboard."""
    page = open_page(**options)
    log_in(page, stack)
    expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
    return page


def test_login_refuses_a_wrong_token_and_sets_a_strict_httponly_cookie(page: Page, stack: Stack) -> None:
    log_in(page, stack, "not-the-token")
    expect(page.get_by_role("alert")).to_have_text("That is not the hub's API token.")
    assert not [c for c in page.context.cookies() if c["name"] == COOKIE]

    page.goto(f"{stack.url}/jobs")
    expect(page).to_have_url(re.compile(r"/login\?next=(%2F|/)jobs$"))
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Jobs", level=1)).to_be_visible()  # on to where it was going
    (cookie,) = [c for c in page.context.cookies() if c["name"] == COOKIE]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict", cookie
    assert page.evaluate("document.cookie") == ""  # no script can read it


def test_keyboard_reaches_the_token_field_and_submits(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.url}/login")
    page.evaluate("document.activeElement.blur()")  # not the autofocus: Tab around the page to the field
    stops: list[str] = []
    while len(stops) < 8 and stops[-1:] != ["token"]:
        page.keyboard.press("Tab")
        stops.append(page.evaluate(FOCUSED))
    assert stops[-3:] == ["Skip to content", "sendense hub", "token"], stops
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Log in")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()

    page.keyboard.press("Tab")  # the first stop of every page: the skip link, to the content
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_focused()
    for _ in range(8):  # back up into the navigation
        page.keyboard.press("Shift+Tab")
        if page.evaluate(FOCUSED) == "Jobs":
            break
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Jobs", level=1)).to_be_visible()


def test_a_policy_made_in_the_form_runs_and_its_progress_bar_moves_to_completion(
    open_page: Callable[..., Page], stack: Stack
) -> None:
    page = logged_in(open_page, stack)
    page.get_by_role("link", name="Policies").click()
    page.get_by_role("link", name="New policy").click()
    page.get_by_label("Name", exact=True).fill(POLICY)
    page.get_by_label("Include", exact=True).fill(VM_PATH)
    page.get_by_role("button", name="Create policy").click()
    expect(page.get_by_role("heading", name=f"Policy {POLICY}")).to_be_visible()
    expect(page.locator("#flash")).to_contain_text(f"Policy {POLICY} created.")

    stack.change_disks(VM_PATH, 0, DISK_SIZE)  # a full disk of data, read slowly: several progress reports
    stack.pipeline.read_delay = "1"
    try:
        page.get_by_role("button", name="Run now").click()
        expect(page.locator("#flash")).to_contain_text(f"of policy {POLICY} started for 1 VM(s)")
        page.get_by_role("link", name="Dashboard").click()
        job_id, values = _watch_progress(page)
    finally:
        stack.pipeline.read_delay = None
    assert any(0 < value < 100 for value in values), values
    assert values == sorted(values) and values[-1] > values[0], values
    job = stack.api.wait_job(job_id)
    assert job["state"] == "completed" and job["policy"] == POLICY, job
    page.reload()
    expect(page.locator(f"#job-{job_id} .state-completed")).to_have_text("completed")


def _watch_progress(page: Page, timeout: float = 60) -> tuple[str, list[float]]:
    """The running job's ID and the values its dashboard progress bar took, sampled until the bar is gone."""
    bar = page.locator("#running progress")
    expect(bar).to_have_count(1, timeout=30_000)
    job_id = (bar.get_attribute("id") or "").removeprefix("progress-")
    values: list[float] = []
    deadline = time.monotonic() + timeout
    while (value := _value(page, f"#progress-{job_id}")) != "gone":
        assert time.monotonic() < deadline, f"job {job_id} still runs: {values}"
        if value is not None and (not values or value != values[-1]):
            values.append(value)
        page.wait_for_timeout(200)
    return job_id, values


def _value(page: Page, selector: str) -> float | str | None:
    """A progress bar's value; None while it has none, ``"gone"`` once it left the page."""
    found = page.evaluate(f"(() => {{ const bar = document.querySelector({selector!r}); "
                          f"return bar ? (bar.hasAttribute('value') ? bar.value : null) : 'gone'; }})()")  # fmt: skip
    return found if found is None or found == "gone" else float(found)


def test_the_vm_chain_shows_full_and_incremental_points_and_an_export_reads_at_the_shown_uri(
    open_page: Callable[..., Page], stack: Stack
) -> None:
    for offset in (0, DISK_SIZE // 2):  # a full (or incremental on the policy's) and an incremental
        stack.change_disks(VM_PATH, offset, DISK_SIZE // 4)
        assert stack.backup(VM_PATH)["state"] == "completed"
    page = logged_in(open_page, stack)
    page.get_by_role("link", name="VMs").click()
    page.get_by_role("link", name=VM_PATH, exact=True).click()
    expect(page.get_by_role("heading", name=VM_PATH, level=1)).to_be_visible()
    chain = page.locator("ol.chain").last
    expect(chain.locator("li.full")).to_have_count(1)
    assert chain.locator("li.incremental").count() >= 1
    expect(chain.locator("li").first).to_have_class(re.compile(r"\bfull\b"))
    expect(chain.locator("li.full")).to_contain_text("4.0 MiB virtual")

    newest = chain.locator("li").last
    point_id = (newest.get_attribute("id") or "").removeprefix("point-")
    newest.get_by_role("button", name="Export over NBD").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Restore job "))).to_be_visible()
    uri = page.locator("#nbd-uri").inner_text()
    assert uri.startswith("nbd://"), uri
    command = shlex.split(page.locator("#nbdinfo-command").inner_text())
    assert command == ["nbdinfo", uri], command
    shown = run(require("nbdinfo"), *command[1:]).stdout  # the page's own command line
    assert f"export-size: {DISK_SIZE}" in shown, shown
    assert int(run(require("nbdinfo"), "--size", uri).stdout) == DISK_SIZE
    expect(page.locator("#qemu-img-command")).to_contain_text(f"qemu-img convert -p -O qcow2 {uri} ")
    expect(page.get_by_role("link", name=point_id)).to_be_visible()

    page.get_by_role("button", name="Stop export").click()
    expect(page.locator("#flash")).to_contain_text("is stopped")
    expect(page.locator("#restore-state")).not_to_have_text("running")
    assert run(require("nbdinfo"), "--size", uri, check=False).returncode != 0


def test_the_retention_preview_is_swapped_into_the_form_by_htmx(open_page: Callable[..., Page], stack: Stack) -> None:
    page = logged_in(open_page, stack)
    page.goto(f"{stack.url}/policies/new")
    page.get_by_label("Name", exact=True).fill("preview-only")
    page.get_by_label("Include", exact=True).fill(VM_PATH)
    page.get_by_label("Keep last").fill("1")
    url = page.url
    page.get_by_role("button", name="Preview retention").click()
    preview = page.locator("#retention-preview")
    expect(preview.locator("tr.keep").first).to_be_visible()
    expect(preview.locator("tr.drop").first).to_be_visible()  # the chains above hold more than one point per disk
    expect(preview).to_contain_text(VM_PATH)
    assert page.url == url  # swapped in by htmx, not a page load
    assert page.get_by_label("Name", exact=True).input_value() == "preview-only"  # what was typed stays
    assert stack.api.get("/policies/preview-only")[0] == 404  # a preview stores nothing


def test_verify_now_runs_a_verify_job_to_verified(open_page: Callable[..., Page], stack: Stack) -> None:
    page = logged_in(open_page, stack)
    page.goto(stack.view_url(VM_PATH))
    full = page.locator("ol.chain").last.locator("li.full")
    point_id = (full.get_attribute("id") or "").removeprefix("point-")
    full.get_by_role("button", name="Verify now").click()
    expect(page.locator("#flash")).to_contain_text("Verify job")
    expect(page.get_by_role("heading", name=re.compile(r"^Verify job "))).to_be_visible()
    _reload_until(page, "#job-state", "completed")
    expect(page.locator(f"#verdict-{point_id} .verify-verified")).to_have_text("verified")
    page.goto(stack.view_url(VM_PATH))
    expect(page.locator(f"#point-{point_id} .verify-verified")).to_have_text("verified")


def _reload_until(page: Page, selector: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while page.locator(selector).inner_text() != text:
        assert time.monotonic() < deadline, f"{selector} still says {page.locator(selector).inner_text()!r}"
        page.wait_for_timeout(500)
        page.reload()


def test_a_failed_job_shows_its_error_as_a_sentence(open_page: Callable[..., Page], stack: Stack) -> None:
    stack.fail_next_backup()
    failed = stack.backup(VM_PATH)
    assert failed["state"] == "failed", failed
    message = failed["error"]["message"]
    page = logged_in(open_page, stack)
    expect(page.locator(f"#job-{failed['job_id']} .state-failed")).to_have_text("failed")
    page.get_by_role("link", name="Jobs").click()
    page.locator(f"#job-{failed['job_id']}").get_by_role("link").first.click()
    error = page.locator("#job-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(message)
    text = error.inner_text()
    assert "CreateSnapshot" in text and "{" not in text and '"code"' not in text, text


def test_a_stale_or_forged_session_is_refused(open_page: Callable[..., Page], stack: Stack) -> None:
    page = logged_in(open_page, stack)
    (cookie,) = [c for c in page.context.cookies() if c["name"] == COOKIE]
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login$"))

    for value in (cookie["value"], "forged-" + cookie["value"][7:]):
        other = open_page()
        other.context.add_cookies([{"name": COOKIE, "value": value, "url": stack.url}])
        other.goto(f"{stack.url}/policies")
        expect(other).to_have_url(re.compile(r"/login\?next=(%2F|/)policies$"))
        answer = other.request.post(f"{stack.url}/policies/preview", form={"csrf": csrf, "name": "x"})
        assert answer.status == 403 and "log in again" in answer.text(), answer.text()


def test_an_htmx_action_after_the_session_ended_goes_to_the_login_page(
    open_page: Callable[..., Page], stack: Stack
) -> None:
    page = logged_in(open_page, stack)
    page.goto(f"{stack.url}/policies/new")
    other = page.context.new_page()  # the same browser: its other tab logs out
    other.goto(f"{stack.url}/")
    other.get_by_role("button", name="Log out").click()
    expect(other).to_have_url(re.compile(r"/login$"))
    page.get_by_role("button", name="Preview retention").click()
    expect(page).to_have_url(re.compile(r"/login\?next=(%2F|/)policies(%2F|/)new$"))
    expect(page.get_by_label("API token")).to_be_visible()


def test_a_post_without_or_with_a_wrong_csrf_token_is_refused(open_page: Callable[..., Page], stack: Stack) -> None:
    page = logged_in(open_page, stack)
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    url = f"{stack.url}/policies/preview"
    form = {"include": VM_PATH, "schedule_kind": "every", "schedule_every": "3600", "verify_kind": "none"}
    for answer in (
        page.request.post(url, form=form),
        page.request.post(url, form={**form, "csrf": "not-" + csrf}),
        page.request.post(url, form=form, headers={"X-CSRF-Token": csrf[:-1]}),
    ):
        assert answer.status == 403, answer.status
        assert "CSRF token is missing or stale" in answer.text() and not answer.text().lstrip().startswith("{")
    assert page.request.post(url, form={**form, "csrf": csrf}).status == 200
    assert page.request.post(url, form=form, headers={"X-CSRF-Token": csrf, "HX-Request": "true"}).status == 200


def test_a_vm_named_script_shows_as_text(open_page: Callable[..., Page], stack: Stack) -> None:
    stack.change_disks(SCRIPT_VM)
    job = stack.backup(SCRIPT_VM)
    assert job["state"] == "completed", job
    page = logged_in(open_page, stack)
    expect(page.locator(f"#job-{job['job_id']}")).to_contain_text(SCRIPT_VM)
    page.get_by_role("link", name="VMs").click()
    page.get_by_role("link", name=SCRIPT_VM).click()
    expect(page.get_by_role("heading", name=SCRIPT_VM, level=1)).to_have_text(SCRIPT_VM)
    for where in ("/", "/vms", "/jobs", stack.view_url(SCRIPT_VM).removeprefix(stack.url)):
        answer = page.goto(stack.url + where)
        assert answer is not None and answer.status == 200
        assert SCRIPT_VM in page.locator("main").inner_text()
        assert "&lt;script&gt;window.pwned=1&lt;%2fscript&gt;" in answer.text()
        assert page.evaluate("typeof window.pwned") == "undefined"
        sources = page.locator("script").evaluate_all("scripts => scripts.map(s => s.getAttribute('src'))")
        assert all(src and src.startswith("/static/") for src in sources), sources


def test_the_dashboard_fits_a_phone_width(open_page: Callable[..., Page], stack: Stack) -> None:
    page = logged_in(open_page, stack, viewport=(390, 844))
    assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth"), page.evaluate(
        "[document.scrollingElement.scrollWidth, window.innerWidth]"
    )
    expect(page.get_by_role("navigation", name="Main")).to_be_visible()
    expect(page.get_by_role("heading", name="Running jobs")).to_be_in_viewport()


def test_times_are_shown_in_the_browser_time_zone(open_page: Callable[..., Page], stack: Stack) -> None:
    page = logged_in(open_page, stack, timezone_id="Asia/Tokyo")
    first = page.locator("#main time[datetime]").first
    expect(first).to_contain_text("GMT+9")
    utc = datetime.datetime.fromisoformat((first.get_attribute("datetime") or "").replace("Z", "+00:00"))
    tokyo = utc.astimezone(ZoneInfo("Asia/Tokyo"))
    assert tokyo.strftime("%H:%M:%S") in first.inner_text() or tokyo.strftime("%I:%M:%S") in first.inner_text()
    assert (first.get_attribute("title") or "").endswith("UTC")  # the server's text stays at hand


def test_the_dashboard_screenshot_of_a_real_run(open_page: Callable[..., Page], stack: Stack, tmp_path: Path) -> None:
    """The README's picture: the dashboard while a backup runs, after the runs above. Written under tmp_path;
    copied to docs/console-dashboard.png only with SENDENSE_SCREENSHOT=1 (never by CI)."""
    stack.change_disks(VM_PATH, 0, DISK_SIZE)
    stack.pipeline.read_delay = "1"
    try:
        status, job = stack.api.post("/backups", {"vm_path": VM_PATH, "mode": "full"})
        assert status == 201, job
        page = logged_in(open_page, stack)
        bar = page.locator(f"#progress-{job['job_id']}")
        deadline = time.monotonic() + 30
        while not 20 <= float(bar.get_attribute("value") or 0) <= 80:
            assert time.monotonic() < deadline, bar.get_attribute("value")
            page.wait_for_timeout(200)
        shot = tmp_path / "console-dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        stack.pipeline.read_delay = None
    assert shot.stat().st_size > 20_000
    if os.environ.get("SENDENSE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "console-dashboard.png")
    assert stack.api.wait_job(job["job_id"])["state"] == "completed"
