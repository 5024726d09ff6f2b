"""Digests at backup time and verify jobs, against a real hub (``sendense-nbd hub``) with real backups
written into its exports by libnbd; every expectation is computed from ``qemu-img convert -O raw``, and
damage is made by flipping bytes in stored qcow2 files (found with ``qemu-img map``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.copy.digests import CHUNK_SIZE, DigestFile
from sendense_nbd.hub.repository.local import layer_extents
from sendense_nbd.hub.verify import chunks_of
from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess, nbd_write, open_hub_store

pytestmark = pytest.mark.peer

MIB = 1 << 20
SIZE = 14 * MIB  # four chunks, the last one short
KEY = 2000
VM_A, VM_B = "/DC/vm/a", "/DC/vm/b"


def _backup(api: Api, vm_path: str, writes: list[tuple[int, bytes]], mode: str = "auto") -> dict[str, Any]:
    """One backup job: the writes go into its export, then the completion is posted."""
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": mode, "disks": [{"key": KEY, "capacity": SIZE}]})
    assert status == 201, job
    [disk] = job["detail"]["disks"]
    nbd_write(disk["uri"], writes)
    body = {"status": "completed", "disks": [{"disk_key": KEY, "change_id": f"52 {job['job_id']}/1"}]}
    status, done = api.post(f"/backups/{job['job_id']}/complete", body)
    assert status == 200 and done["state"] == "completed", done
    return api.wait_job(done["job_id"])  # and its retention, which runs after the answer


def _points(api: Api, vm_path: str, *, digests: bool = True, timeout: float = 60) -> list[dict[str, Any]]:
    """The VM's points, once every one has its digests recorded (when ``digests``)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = api.get(f"/points?vm_path={vm_path}")
        assert status == 200, body
        if not digests or all(p["digests"] for p in body["points"]) or time.monotonic() > deadline:
            return list(body["points"])
        time.sleep(0.1)


def _verify(api: Api, body: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    status, job = api.post("/verify", body)
    assert status == 202 and job["kind"] == "verify", job
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = api.get(f"/verify/{job['job_id']}")
        assert status == 200, job
        if job["state"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError(f"verify job did not end: {job}")


def _raw_digests(image: str, tmp_path: Path) -> tuple[bytes, ...]:
    raw = tmp_path / f"{os.path.basename(image)}.raw"
    run(require("qemu-img"), "convert", "-O", "raw", image, str(raw))
    data = raw.read_bytes()
    return tuple(hashlib.sha256(data[o : o + CHUNK_SIZE]).digest() for o in range(0, len(data), CHUNK_SIZE))


def _sidecar(point: dict[str, Any]) -> Path:
    return Path(point["path"]).parent / point["digests"]


def _flip_data(image: str, guest_offset: int) -> None:
    """Flip a byte of the data cluster holding ``guest_offset`` in the image file itself."""
    mapped = json.loads(run(require("qemu-img"), "map", "-f", "qcow2", "--output=json", image).stdout)
    entry = next(e for e in mapped if e["start"] <= guest_offset < e["start"] + e["length"])
    assert entry["data"] and entry["depth"] == 0 and "offset" in entry, entry
    host = entry["offset"] + guest_offset - entry["start"]
    with open(image, "r+b") as file:
        file.seek(host)
        byte = file.read(1)
        file.seek(host)
        file.write(bytes([byte[0] ^ 0xFF]))


def _flip_l1(image: str) -> None:
    """Point the image's first L1 entry past the end of the file (a corruption the check finds)."""
    with open(image, "r+b") as file:
        file.seek(40)
        l1_offset = int.from_bytes(file.read(8), "big")
        file.seek(l1_offset + 2)
        byte = file.read(1)
        file.seek(l1_offset + 2)
        file.write(bytes([byte[0] ^ 0x40]))


def _by_state(job: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    return {p["point_id"]: (p["state"], p["bad_offset"]) for p in job["detail"]["points"]}


def test_digests_at_backup_time_equal_the_raw_view(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    api = Api(hub_factory(None).url)
    _backup(api, VM_A, [(4096, os.urandom(200_000)), (9 * MIB, os.urandom(MIB)), (SIZE - 4096, os.urandom(4096))])
    _backup(api, VM_A, [(5 * MIB, os.urandom(70_000))])  # an overlay over chunk 1 only
    _backup(api, VM_A, [(13 * MIB, bytes(65536))])  # zeroes over nothing: an overlay that changes no byte
    points = _points(api, VM_A)
    assert [p["kind"] for p in points] == ["full", "incremental", "incremental"]
    for point in points:
        assert point["digests"] == f"{point['id']}.digests" and point["verify_state"] == "unverified", point
        recorded = DigestFile.read(str(_sidecar(point)), size=SIZE)
        assert recorded.digests == _raw_digests(point["path"], tmp_path), point["id"]
    assert DigestFile.read(str(_sidecar(points[1]))).digests[1] != DigestFile.read(str(_sidecar(points[0]))).digests[1]


def test_verify_finds_flipped_bytes_and_the_next_backup_is_full(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    api = Api(hub_factory(None).url)
    for vm_path in (VM_A, VM_B):
        _backup(api, vm_path, [(0, os.urandom(64 * 1024)), (9 * MIB + 4096, os.urandom(300_000))])
        _backup(api, vm_path, [(5 * MIB, os.urandom(4096))])
    full_a, incremental_a = _points(api, VM_A)
    clean = _verify(api, {"vm_path": VM_A})
    assert clean["state"] == "completed" and clean["mode"] == "vm", clean
    assert _by_state(clean) == {full_a["id"]: ("verified", None), incremental_a["id"]: ("verified", None)}

    _flip_data(full_a["path"], 9 * MIB + 5000)  # chunk 2 of the full point, seen through the overlay too
    damaged = _verify(api, {"vm_path": VM_A})
    assert _by_state(damaged) == {
        full_a["id"]: ("damaged", 2 * CHUNK_SIZE),
        incremental_a["id"]: ("damaged", 2 * CHUNK_SIZE),
    }
    assert damaged["detail"]["damaged"] == 2 and "differs from its digest" in damaged["detail"]["points"][0]["error"]
    shown = {p["id"]: p for p in _points(api, VM_A)}
    assert shown[full_a["id"]]["verify_state"] == "damaged" and shown[full_a["id"]]["bad_offset"] == 2 * CHUNK_SIZE
    assert shown[incremental_a["id"]]["verified_at"] is not None
    other = _verify(api, {"vm_path": VM_B})
    assert [state for state, _ in _by_state(other).values()] == ["verified", "verified"], other

    # The damaged newest point is no base: no change ID to start from, and the next backup is a full point.
    status, answer = api.get(f"/backups/changeid?vm_path={VM_A}&disk_key={KEY}")
    assert status == 404, answer
    job = _backup(api, VM_A, [(0, os.urandom(4 * MIB)), (9 * MIB, os.urandom(MIB))])
    [disk] = job["detail"]["disks"]
    assert disk["sync_type"] == "full" and disk["base_point"] is None, disk
    assert job["full_reason"] == "verify_failed" and disk["full_reason"] == "verify_failed", job
    newest = _points(api, VM_A)[-1]
    assert newest["kind"] == "full" and newest["backing"] is None
    again = _verify(api, {"point_id": newest["id"]})
    assert again["mode"] == "point" and _by_state(again) == {newest["id"]: ("verified", None)}, again
    assert api.get(f"/backups/changeid?vm_path={VM_A}&disk_key={KEY}")[0] == 200


def test_verify_finds_a_damaged_structure_and_a_damaged_sidecar(hub_factory: Callable[..., HubProcess]) -> None:
    api = Api(hub_factory(None).url)
    _backup(api, VM_A, [(0, os.urandom(MIB))])
    _backup(api, VM_A, [(6 * MIB, os.urandom(MIB))])
    _backup(api, VM_B, [(0, os.urandom(MIB))])
    full_a, incremental_a = _points(api, VM_A)
    _flip_l1(incremental_a["path"])
    check = run(require("qemu-img"), "check", incremental_a["path"], check=False)
    assert check.returncode != 0, check.stdout  # qemu-img agrees the file is damaged
    found = _verify(api, {"point_id": incremental_a["id"]})
    verdicts = {p["point_id"]: p for p in found["detail"]["points"]}
    assert [p["point_id"] for p in found["detail"]["points"]] == [full_a["id"], incremental_a["id"]]  # oldest first
    assert verdicts[full_a["id"]]["state"] == "verified"
    assert verdicts[incremental_a["id"]]["state"] == "damaged"
    assert "qcow2 check" in verdicts[incremental_a["id"]]["error"], verdicts

    [point_b] = _points(api, VM_B)
    sidecar = _sidecar(point_b)
    sidecar.write_bytes(sidecar.read_bytes()[:-7])  # truncated
    reported = _verify(api, {"vm_path": VM_B})
    assert reported["state"] == "completed", reported
    [verdict] = reported["detail"]["points"]
    assert verdict["state"] == "damaged" and "digests cannot be read" in verdict["error"], verdict


def test_points_without_digests_and_unknown_points(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    _backup(api, VM_A, [(0, os.urandom(MIB))])
    [point] = _points(api, VM_A)
    assert api.post("/verify", {"point_id": "no-such-point"})[0] == 404
    assert api.post("/verify", {"point_id": "../../etc"})[0] == 404
    for bad in ({}, {"vm_path": VM_A, "point_id": point["id"]}, {"vm_path": "relative"}, {"vm": VM_A}):
        status, answer = api.post("/verify", bad)
        assert status == 400, (bad, answer)
    assert api.get("/verify/no-such-job")[0] == 404

    # A stop between writing a sidecar (here: half of it) and recording it: the restarted hub keeps the
    # file and computes the digests again; the sidecar of a point that is gone is removed.
    hub.stop()
    sidecar = _sidecar(point)
    sidecar.write_bytes(sidecar.read_bytes()[:50])
    orphan = sidecar.parent / "20260101T000000Z-0123abcd.digests"
    orphan.write_bytes(b"left by a point that is gone")
    store = open_hub_store(tmp_path / "repo")
    try:
        store.call(lambda c: c.execute("UPDATE points SET digests = NULL"))
    finally:
        store.close()
    restarted = hub_factory(None)
    assert restarted.startup["removed_orphans"] == [str(orphan)] and not orphan.exists()
    [again] = _points(Api(restarted.url), VM_A)
    assert DigestFile.read(str(_sidecar(again))).digests == _raw_digests(again["path"], tmp_path)


def test_retention_keeps_the_survivors_digests(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    api = Api(hub_factory(None, "--keep", "2").url)
    _backup(api, VM_A, [(0, os.urandom(MIB)), (8 * MIB, os.urandom(MIB))])
    first = _points(api, VM_A)[0]
    for round_number in range(2):
        _backup(api, VM_A, [(round_number * 4 * MIB + 4096, os.urandom(MIB))])
        _points(api, VM_A)
    points = _points(api, VM_A)
    assert len(points) == 2 and first["id"] not in {p["id"] for p in points}
    folder = Path(points[0]["path"]).parent
    assert sorted(p.name for p in folder.glob("*.digests")) == sorted(p["digests"] for p in points)
    for point in points:
        assert DigestFile.read(str(_sidecar(point))).digests == _raw_digests(point["path"], tmp_path)
    job = _verify(api, {"vm_path": VM_A})
    assert [state for state, _ in _by_state(job).values()] == ["verified", "verified"], job


def _cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sendense_nbd", "verify", "--hub", hub.url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_verify_command_and_the_alert(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    _backup(api, VM_A, [(0, os.urandom(MIB)), (4 * MIB, os.urandom(MIB))])
    [point] = _points(api, VM_A)
    done = _cli(hub, VM_A, "--wait")
    assert done.returncode == 0, done.stderr
    assert f"{point['id']} disk {KEY}: verified" in done.stdout and "1 verified, 0 damaged" in done.stdout

    started = _cli(hub, "--point", point["id"])
    assert started.returncode == 0 and json.loads(started.stdout)["kind"] == "verify", started.stderr
    job_id = json.loads(started.stdout)["job_id"]
    deadline = time.monotonic() + 60
    while api.get(f"/verify/{job_id}")[1]["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)  # it ends before the damage is made
    assert api.get(f"/verify/{job_id}")[1]["state"] == "completed"

    _flip_data(point["path"], 4 * MIB + 10)
    found = _cli(hub, "--point", point["id"], "--wait")
    assert found.returncode == 1, found.stderr
    assert f"damaged at offset {CHUNK_SIZE}" in found.stdout, found.stdout
    alerts = api.get("/alerts?kind=verify_failed")[1]["alerts"]
    assert [a["subject"] for a in alerts] == [VM_A] and point["id"] in alerts[0]["message"], alerts

    unknown = _cli(hub, "--point", "no-such-point", "--wait")
    assert unknown.returncode == 1 and "HTTP 404" in unknown.stderr, unknown.stderr
    assert _cli(hub).returncode == 2 and _cli(hub, VM_A, "--point", point["id"]).returncode == 2


def test_an_overlay_reads_only_the_chunks_its_layer_defines(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run(require("qemu-img"), "create", "-f", "qcow2", str(base), str(SIZE))
    run(require("qemu-io"), "-f", "qcow2", "-c", f"write -P 1 0 {SIZE}", str(base))  # every chunk has data below
    run(require("qemu-img"), "create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(top))
    writes = [f"write -P 7 {CHUNK_SIZE + 4096} 4096", f"write -z {3 * CHUNK_SIZE} 65536"]
    run(require("qemu-io"), "-f", "qcow2", *(arg for w in writes for arg in ("-c", w)), str(top))
    assert chunks_of(layer_extents(str(top), SIZE)) == {1, 3}  # data in chunk 1, a zero cluster in chunk 3
    assert chunks_of(layer_extents(str(base), SIZE)) == {0, 1, 2, 3}
