"""Room in the repository: a backup expected not to fit is refused before anything is made (507), and a
repository that fills up mid-backup fails that job cleanly, every other point intact. The repositories
live on small tmpfs mounts (the hub's store with them), so the free space is the test's to set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.capacity import INCREMENTAL_SHARE, expected_bytes, gib
from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess
from tests.hub.node_standin import NodeStandin
from tests.vmware.vsphere import vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (unmounted after, also on failure)."""
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_expected_sizes() -> None:
    assert expected_bytes(8 * MIB, full=True, recent_changed=[MIB]) == 8 * MIB
    assert expected_bytes(8 * MIB, full=False, recent_changed=[MIB, None, 3 * MIB, 2 * MIB]) == 3 * MIB
    assert expected_bytes(100 * MIB, full=False, recent_changed=[None]) == int(100 * MIB * INCREMENTAL_SHARE)
    assert expected_bytes(100 * MIB, full=False) == 10 * MIB
    assert (gib(0), gib(48 * MIB), gib(3 << 30)) == ("0.0 MiB", "48.0 MiB", "3.00 GiB")


def test_a_backup_that_would_not_fit_is_refused_before_anything_is_made(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    vm_path = "/DC/vm/roomy"
    with tmpfs(tmp_path / "fs", "64m") as fs:
        hub = hub_factory(None, "--min-free", "0", repo=fs / "repo")
        api = Api(hub.url)
        status, usage = api.get("/repository")
        assert status == 200 and usage["total"] == 64 * MIB and usage["min_free"] == 0, usage
        assert 0 < usage["free"] <= usage["total"] - usage["used"] and usage["points"] == 0, usage
        status, refused = api.post("/backups", {"vm_path": vm_path, "mode": "full", "disks": [
            {"key": 2000, "capacity": 40 * MIB}, {"key": 2001, "capacity": 40 * MIB}]})  # fmt: skip
        assert status == 507 and refused["error"]["code"] == "insufficient_space", refused
        message = refused["error"]["message"]
        assert message.startswith(f"need 80.0 MiB for {vm_path} (full of disks 2000, 2001), the repository has ")
        assert message.endswith("MiB free (keeping a reserve of 0.0 MiB)"), message
        assert api.get(f"/backups?vm_path={vm_path}")[1]["backups"] == [], "a refused backup made a job"
        assert api.get("/ports")[1]["used"] == [] and not list(fs.rglob("*.qcow2"))

        disks = [{"key": 2000, "capacity": 48 * MIB}]
        status, job = api.post("/backups", {"vm_path": vm_path, "mode": "full", "disks": disks})
        assert status == 201, job
        report = {"status": "completed", "disks": [{"disk_key": 2000, "change_id": "c/1", "bytes_changed": 2 * MIB}]}
        assert api.post(f"/backups/{job['job_id']}/complete", report)[0] == 200
        status, usage = api.get("/repository")
        assert usage["points"] == 1 and usage["points_bytes"] > 0, usage
        assert hub.stop() == 0

        # With a 20 MiB reserve a new full (48 MiB) no longer fits; an incremental (2 MiB, as the last one
        # changed) does.
        hub = hub_factory(None, "--min-free", str(20 * MIB), repo=fs / "repo")
        api = Api(hub.url)
        status, refused = api.post("/backups", {"vm_path": vm_path, "mode": "full", "disks": disks})
        assert status == 507, refused
        assert "(full of disk 2000)" in refused["error"]["message"]
        assert refused["error"]["message"].endswith("(keeping a reserve of 20.0 MiB)"), refused
        status, job = api.post("/backups", {"vm_path": vm_path, "disks": disks})
        assert status == 201 and job["detail"]["disks"][0]["sync_type"] == "incremental", job
        assert api.delete(f"/backups/{job['job_id']}")[0] == 200
        assert hub.stop() == 0


def test_backups_starting_together_hold_their_expected_space(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    """Four fulls of 28 MiB asked for at once on a 64 MiB repository: each accepted job holds its expected
    bytes from the checks after it, so two start and two are refused 507 (not four started to run out of
    space). A cancelled job's hold is let go."""
    with tmpfs(tmp_path / "fs", "64m") as fs:
        hub = hub_factory(None, "--min-free", "0", repo=fs / "repo")
        api = Api(hub.url)

        def start(index: int) -> tuple[int, Any]:
            disks = [{"key": 2000, "capacity": 28 * MIB}]
            return api.post("/backups", {"vm_path": f"/DC/vm/together-{index}", "mode": "full", "disks": disks})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(start, range(4)))
        assert sorted(status for status, _ in answers) == [201, 201, 507, 507], answers
        for status, body in answers:
            if status == 507:
                assert body["error"]["code"] == "insufficient_space"
                assert "MiB of it held for 2 backup(s) pending or running" in body["error"]["message"], body
        started = [body for status, body in answers if status == 201]
        assert [job["state"] for job in api.get("/backups")[1]["backups"]] == ["running", "running"]
        assert api.delete(f"/backups/{started[0]['job_id']}")[0] == 200
        status, job = start(9)
        assert status == 201, job
        status, refused = start(10)
        assert status == 507 and "held for 2 backup(s)" in refused["error"]["message"], refused
        assert hub.stop() == 0


def _vm(vcsim: dict[str, Any], path: str) -> dict[str, Any]:
    return next(v for v in vcsim["vms"] if v["path"] == path)


def _compare(image: str, expected: Path) -> None:
    check = run(require("qemu-img"), "check", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    result = run(require("qemu-img"), "compare", "-F", "raw", image, str(expected), check=False)
    assert result.returncode == 0, result.stdout


def _fill(path: Path, leave: int) -> None:
    """A file that takes all the filesystem's free space but ``leave`` bytes."""
    stat = os.statvfs(path.parent)
    size = stat.f_bavail * stat.f_frsize - leave
    chunk = b"\xa5" * MIB
    with open(path, "wb") as f:
        while size > 0:
            size -= f.write(chunk[: min(size, MIB)])
        f.flush()
        os.fsync(f.fileno())


def test_a_repository_that_fills_up_mid_backup_fails_that_job_only(
    vcsim: dict[str, Any], node: NodeStandin, hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    kept_vm, full_vm = "/DC0/vm/DC0_H0_VM1", "/DC0/vm/DC0_C0_RP0_VM0"
    with tmpfs(tmp_path / "fs", "48m") as fs:
        hub = hub_factory(node.url, "--min-free", "0", repo=fs / "repo")
        api = Api(hub.url)
        kept = _vm(vcsim, kept_vm)
        expected = {}
        for key in (2000, 2001):
            vmdisk.write(vcsim["state"], kept["moref"], key, 0, os.urandom(MIB))
            expected[key] = tmp_path / f"kept-{key}.raw"
            shutil.copyfile(next(d["path"] for d in kept["disks"] if d["key"] == key), expected[key])
        status, job = api.post("/backups", {"vm_path": kept_vm})
        assert status == 201 and api.wait_job(job["job_id"])["state"] == "completed"

        big = _vm(vcsim, full_vm)
        for key in (2000, 2001):
            vmdisk.write(vcsim["state"], big["moref"], key, 0, os.urandom(6 * MIB))
        node.hold = True  # the node takes the job and waits: the ballast goes in first
        status, job = api.post("/backups", {"vm_path": full_vm})
        assert status == 201, job
        ballast = fs / "ballast"
        _fill(ballast, 3 * MIB)  # less than the 12 MiB of data the node is about to write
        assert node._loop is not None
        asyncio.run_coroutine_threadsafe(node._run(node.received[-1]), node._loop).result(timeout=120)
        failed = api.wait_job(job["job_id"])
        assert failed["state"] == "failed" and failed["error"]["code"] == "insufficient_space", failed
        assert "ENOSPC" in failed["error"]["message"], failed["error"]
        assert failed["stages"][-1]["ended"] is not None, failed["stages"]

        # Its points are gone, the other VM's points are intact, and the hub serves on.
        assert api.get(f"/points?vm_path={full_vm}")[1]["points"] == []
        points = api.get(f"/points?vm_path={kept_vm}")[1]["points"]
        assert sorted(p["path"] for p in points) == sorted(str(p) for p in fs.rglob("*.qcow2")), "a file left over"
        for point in points:
            _compare(point["path"], expected[point["disk_key"]])
        assert api.get("/ports")[1]["used"] == []
        status, usage = api.get("/repository")
        assert status == 200 and usage["points"] == 2, usage

        ballast.unlink()
        node.hold = False
        wanted = {key: tmp_path / f"full-{key}.raw" for key in (2000, 2001)}
        for key, path in wanted.items():
            shutil.copyfile(next(d["path"] for d in big["disks"] if d["key"] == key), path)
        status, job = api.post("/backups", {"vm_path": full_vm})
        assert status == 201, job
        done = api.wait_job(job["job_id"])
        assert done["state"] == "completed", (done, node.results.get(job["job_id"]))
        for point in api.get(f"/points?vm_path={full_vm}")[1]["points"]:
            _compare(point["path"], wanted[point["disk_key"]])
        assert hub.stop() == 0
