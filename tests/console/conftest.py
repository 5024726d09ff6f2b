"""The console's browser tests: Debian's chromium driven by Playwright (sync API), against a real stack per module.

- ``browser``: one headless chromium per module (see ``playwright``), launched from /usr/bin/chromium
  (``playwright install`` cannot download a browser here); a missing chromium fails the test, never skips it.
- ``open_page(timezone_id=..., viewport=...)``: a page in a new context (1280x900 by default); ``page`` is one such
  page. When the test fails, every page it opened is saved as a screenshot under its ``tmp_path``.
- ``stack``: vcsim, the hub (with ``--token-file`` and its SSH endpoint), the real node and its SSH tunnel
  (tests/pipeline/stack.py), one per module. One vcsim VM is renamed, before the node reads the inventory, to
  :data:`SCRIPT_NAME`; ``stack.fail_next_backup()`` makes the next backup fail with a readable error, and
  ``stack.pipeline.read_delay`` slows the disk reads of the jobs started after it. The services' output goes to
  ``hub.log``, ``node.log`` and ``tunnel.log`` in the module's temp directory (``console0/``).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask

from tests.hub.conftest import HubProcess, free_port_range
from tests.pipeline.stack import MIB, Pipeline
from tests.vmware.vsphere import running_vcsim, vmdisk

CHROMIUM = "/usr/bin/chromium"
TOKEN = "console-test-token-0123456789"
#: A VM name as vCenter keeps ``<script>window.pwned=1</script>``: vSphere escapes a ``/`` in a name as ``%2f``
#: (vcsim keeps a ``/`` as it is, and the inventory path then no longer finds the VM).
SCRIPT_NAME = "<script>window.pwned=1<%2fscript>"
SCRIPT_VM = "/DC0/vm/" + SCRIPT_NAME
RENAMED = "/DC0/vm/DC0_H0_VM1"
DISK_SIZE = 4 * MIB  # each VM's one disk


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item (``item.report_call``) for the fixtures' teardown."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Playwright's sync driver, per module: while it lives it holds this thread's running event loop, so it must
    be gone before a pytest-asyncio test (another module's) runs. A browser test module has no async test."""
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Headless Debian chromium; missing, the test fails (run ./setup.sh)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is not installed; run ./setup.sh", pytrace=False)
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
    yield chromium
    chromium.close()


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Page]]:
    """Factory: ``open_page(timezone_id=None, viewport=(1280, 900))`` -> a page in a context of its own.
    A failed test leaves ``failure-N.png`` of each page under its ``tmp_path``."""
    contexts: list[BrowserContext] = []

    def open_one(*, timezone_id: str | None = None, viewport: tuple[int, int] = (1280, 900)) -> Page:
        width, height = viewport
        context = browser.new_context(viewport={"width": width, "height": height}, timezone_id=timezone_id)
        context.set_default_timeout(15_000)
        contexts.append(context)
        return context.new_page()

    yield open_one
    report = getattr(request.node, "report_call", None)
    failed = report is None or report.failed
    for n, page in enumerate(page for context in contexts for page in context.pages):
        if failed:
            shot = tmp_path / f"failure-{n}.png"
            try:
                page.screenshot(path=str(shot), full_page=True, timeout=5_000)
                print(f"screenshot of {page.url}: {shot}")
            except PlaywrightError as exc:
                print(f"no screenshot of {page.url}: {exc.message}")
    for context in contexts:
        context.close()


@pytest.fixture
def page(open_page: Callable[..., Page]) -> Page:
    """A page at 1280x900 in a fresh context (no cookies)."""
    return open_page()


class Stack:
    """The real stack behind the console: ``url`` (the console, at the hub API's root), ``api`` (with the token)."""

    def __init__(self, pipeline: Pipeline, vcsim: dict[str, Any]) -> None:
        self.pipeline, self.vcsim = pipeline, vcsim
        self.url, self.api, self.token = pipeline.hub.url, pipeline.api, TOKEN

    def fail_next_backup(self) -> None:
        """The next snapshot fails in vcsim (fault injection), so the next backup job fails, saying why."""
        (Path(self.vcsim["state"]) / "faults" / "CreateSnapshot_Task").write_text("1 FileFault\n")

    def change_disks(self, vm_path: str, offset: int = 0, length: int = MIB) -> None:
        """New random data in each of the VM's disks (so the next backup has something to send)."""
        vm = next(v for v in self.vcsim["vms"] if v["path"] == vm_path)
        for disk in vm["disks"]:
            vmdisk.write(self.vcsim["state"], vm["moref"], disk["key"], offset, os.urandom(length))

    def backup(self, vm_path: str, timeout: float = 120) -> dict[str, Any]:
        """An ad hoc backup through the hub API, to its end (completed or failed)."""
        status, job = self.api.post("/backups", {"vm_path": vm_path, "mode": "auto"})
        assert status == 201, job
        return self.api.wait_job(job["job_id"], timeout=timeout)

    def view_url(self, vm_path: str) -> str:
        """The console's page of a VM (its path in the query)."""
        return f"{self.url}/vms/view?path={quote(vm_path, safe='')}"


def drain(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Copy a service's stdout and stderr to ``log`` as they come: a pipe nobody reads fills up and then blocks the
    service on its next log line (a stack that lives for a module logs a lot)."""

    def copy(stream: IO[bytes]) -> None:
        with contextlib.suppress(ValueError, OSError), open(log, "ab") as out:
            for line in stream:
                out.write(line)
                out.flush()

    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            threading.Thread(target=copy, args=(stream,), daemon=True).start()


def rename_vm(vcsim: dict[str, Any], path: str, name: str) -> str:
    """Rename the VM at ``path`` in vcsim (Rename_Task) and in ``vcsim["vms"]``; its new inventory path."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    si = SmartConnect(host=vcsim["host"], port=vcsim["port"], user="user", pwd="pass", sslContext=context)
    try:
        vm = si.RetrieveContent().searchIndex.FindByInventoryPath(path.lstrip("/"))
        assert vm is not None, path
        WaitForTask(vm.Rename_Task(name))
    finally:
        Disconnect(si)
    new_path = path.rsplit("/", 1)[0] + "/" + name
    entry = next(v for v in vcsim["vms"] if v["path"] == path)
    entry.update(path=new_path, name=name)
    return new_path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real stack for the module: vcsim (2 VMs x 1 disk of 4 MiB used), hub with a token, node, tunnel."""
    root = tmp_path_factory.mktemp("console")
    hubs: list[HubProcess] = []

    def start_hub(
        node_url: str | None, *extra: str, ports: range | None = None, repo: Path | None = None
    ) -> HubProcess:
        hubs.append(HubProcess(repo or root / "repo", ports or free_port_range(6), node_url, *extra).start())
        return hubs[-1]

    state = root / "vcsim"
    state.mkdir()
    with running_vcsim(state, "-vm-disks", "1", "-disk-size-mb", str(DISK_SIZE // MIB)) as vcsim:
        assert rename_vm(vcsim, RENAMED, SCRIPT_NAME) == SCRIPT_VM
        # One read in flight per connection, so a slowed job's progress moves read by read.
        pipeline = Pipeline(root, vcsim, start_hub, slow_source=False, token=TOKEN, node_extra="requests = 1")
        for name, proc in (("hub", pipeline.hub.proc), ("node", pipeline.node.proc), ("tunnel", pipeline.tunnel.proc)):
            assert proc is not None
            drain(proc, root / f"{name}.log")
        try:
            yield Stack(pipeline, vcsim)
        finally:
            pipeline.close()
            for hub in hubs:
                hub.stop()


def wait_until(predicate: Callable[[], object], timeout: float = 30, what: str = "the condition") -> None:
    """Poll ``predicate`` every 0.1 s until it is true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
