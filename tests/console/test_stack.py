"""The console tests' own tools work: chromium under Playwright reads the hub, and the module's real stack backs up
the VM named ``<script>...``, fails a job on demand with a readable error, and slows a job so its progress shows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from playwright.sync_api import Page

from tests.console.conftest import DISK_SIZE, SCRIPT_NAME, SCRIPT_VM, TOKEN, Stack
from tests.pipeline.stack import VM_PATH

pytestmark = pytest.mark.peer


def test_chromium_reads_the_hub_status_with_the_token(stack: Stack, open_page: Callable[..., Page]) -> None:
    page = open_page()
    refused = page.goto(f"{stack.url}/api/v1/status")
    assert refused is not None and refused.status == 401
    page.context.set_extra_http_headers({"Authorization": f"Bearer {TOKEN}"})
    answer = page.goto(f"{stack.url}/api/v1/status")
    assert answer is not None and answer.status == 200
    status = json.loads(page.locator("body").inner_text())
    assert status == answer.json() and "ports" in json.dumps(status), status


def test_the_script_vm_backs_up_and_a_job_fails_on_demand(stack: Stack) -> None:
    assert SCRIPT_VM in stack.api.get(f"/nodes/{_default_node(stack)}/vms")[1]["vms"]
    stack.change_disks(SCRIPT_VM)
    done = stack.backup(SCRIPT_VM)
    assert done["state"] == "completed", done
    stack.pipeline.verify(done, stack.pipeline.disk_copies("script", SCRIPT_VM), SCRIPT_VM)
    assert SCRIPT_NAME in done["vm_path"]

    stack.fail_next_backup()
    failed = stack.backup(VM_PATH)
    assert failed["state"] == "failed", failed
    message = failed["error"]["message"]
    assert "CreateSnapshot" in message and "{" not in message, failed["error"]


def test_a_slow_source_reports_progress_below_100(stack: Stack) -> None:
    stack.change_disks(VM_PATH, 0, DISK_SIZE)
    stack.pipeline.read_delay = "1"
    try:
        status, job = stack.api.post("/backups", {"vm_path": VM_PATH, "mode": "full"})
        assert status == 201, job
        seen = set()
        while (current := stack.api.get(f"/backups/{job['job_id']}")[1])["state"] == "running":
            progress = stack.api.get(f"/backups/{job['job_id']}/progress")[1]["progress"]
            if progress:
                seen.add(progress["percent"])
            time.sleep(0.1)
        assert any(0 < p < 100 for p in seen), seen
        assert stack.api.wait_job(job["job_id"])["state"] == "completed", current
    finally:
        stack.pipeline.read_delay = None


def _default_node(stack: Stack) -> str:
    nodes = stack.api.get("/nodes")[1]["nodes"]
    return str(nodes[0]["name"])
