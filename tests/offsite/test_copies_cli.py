"""``sendense-nbd copies ...`` against a hub whose point was copied to the real RGW: list, show, export (the URI
read by qemu-img) and stop, download, verify, and a delete Object Lock refuses, in the hub's words."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from tests.conftest import require, run
from tests.hub.operating import LocalHub, local_hub
from tests.offsite.conftest import new_bucket, secret_file
from tests.offsite.test_hub_copy_lifecycle import VM, _backup, _start

pytestmark = pytest.mark.peer


async def _cli(hub: LocalHub, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sendense_nbd", "copies", *args, "--hub", hub.url]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
    assert done.returncode == status, (args, done.stdout, done.stderr)
    return done


async def test_the_copies_commands(ceph_cluster: Any, tmp_path: Path) -> None:
    secret = secret_file(tmp_path, ceph_cluster.s3_secret_key)
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time())) as hub:
        await _start(hub, ceph_cluster, new_bucket(ceph_cluster), secret)
        point = await _backup(hub, [(0, b"a" * (1 << 20))], full=True)
        (line,) = (await _cli(hub, "list", "--vm", VM)).stdout.splitlines()
        copy_id, state, kind, where, point_id, *_ = line.split("\t")
        assert (state, kind, where, point_id) == ("completed", "full", f"{VM}:2000", point)
        assert "locked until 20" in line
        assert json.loads((await _cli(hub, "show", copy_id)).stdout)["manifest"]["point_id"] == point
        uri = (await _cli(hub, "export", copy_id)).stdout.strip()
        path = {p["id"]: p for p in (await hub.ok("GET", f"/points?vm_path={VM}"))["points"]}[point]["path"]
        await asyncio.to_thread(run, require("qemu-img"), "compare", "-F", "qcow2", uri, path)
        assert (await _cli(hub, "export", copy_id, "--stop")).stdout.strip() == f"stopped serving {copy_id}"
        assert (await _cli(hub, "verify", copy_id)).stdout.strip() == f"{copy_id} verified"
        top = (await _cli(hub, "download", copy_id, "dr")).stdout.strip()
        await asyncio.to_thread(run, require("qemu-img"), "compare", top, path)
        refused = await _cli(hub, "delete", copy_id, status=1)
        assert refused.stderr.startswith("Error: HTTP 409 locked: ") and "is locked until" in refused.stderr
        gone = await _cli(hub, "show", "nope", status=1)
        assert gone.stderr.strip() == "Error: HTTP 404 not_found: no offsite copy nope"
