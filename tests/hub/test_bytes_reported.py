"""The bytes a job sent and the bytes that changed, as a node reports them: kept in the job's progress,
in its detail at completion and in each restore point (docs/HUB_API.md); an older store gains the columns."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd.hub.db import Database
from sendense_nbd.hub.repository import Repository
from tests.hub.conftest import Api, HubProcess

pytestmark = pytest.mark.peer

MIB = 1 << 20
DISKS = [{"key": 2000, "capacity": 4 * MIB}, {"key": 2001, "capacity": 2 * MIB}]
FIGURES = {2000: (9 * MIB, 6 * MIB), 2001: (4096, 4096)}  # disk key: (bytes_transferred, bytes_changed)


def test_sent_and_changed_bytes_reach_the_job_and_its_points(hub_factory: Callable[..., HubProcess]) -> None:
    api = Api(hub_factory(None).url)
    status, job = api.post("/backups", {"vm_path": "/DC/vm/a", "mode": "full", "disks": DISKS})
    assert status == 201, job
    report = {
        "status": "running",
        "bytes_transferred": 100,
        "bytes_changed": 80,
        "disks": [{"disk_key": 2000, "bytes_transferred": 100, "bytes_changed": 80}],
    }
    assert api.post(f"/backups/{job['job_id']}/progress", report)[0] == 200
    shown = api.get(f"/backups/{job['job_id']}/progress")[1]["progress"]
    assert shown["bytes_changed"] == 80 and shown["disks"][0]["bytes_changed"] == 80, shown
    completion = {
        "status": "completed",
        "vm_path": "/DC/vm/a",
        "disks": [
            {"disk_key": key, "change_id": f"52 aa/{key}", "bytes_transferred": sent, "bytes_changed": changed}
            for key, (sent, changed) in FIGURES.items()
        ],
    }
    status, done = api.post(f"/backups/{job['job_id']}/complete", completion)
    assert status == 200 and done["state"] == "completed", done
    detail = {d["disk_key"]: (d["bytes_transferred"], d["bytes_changed"]) for d in done["detail"]["disks"]}
    assert detail == FIGURES
    assert {d["disk_key"]: (d["bytes_transferred"], d["bytes_changed"]) for d in api.get(
        f"/backups/{job['job_id']}")[1]["detail"]["disks"]} == FIGURES  # fmt: skip
    points = api.get("/points?vm_path=/DC/vm/a")[1]["points"]
    assert {p["disk_key"]: (p["bytes_transferred"], p["bytes_changed"]) for p in points} == FIGURES


def test_figures_are_checked_and_optional(hub_factory: Callable[..., HubProcess]) -> None:
    api = Api(hub_factory(None).url)
    status, job = api.post("/backups", {"vm_path": "/DC/vm/b", "mode": "full", "disks": DISKS[:1]})
    assert status == 201, job
    for bad in (-1, "9", 1.5, True):
        body = {"status": "completed", "disks": [{"disk_key": 2000, "change_id": "c", "bytes_changed": bad}]}
        status, refused = api.post(f"/backups/{job['job_id']}/complete", body)
        assert status == 400 and "bytes_changed" in refused["error"]["message"], (bad, refused)
    # An older node reports neither: the figures are null, not made up.
    status, done = api.post(f"/backups/{job['job_id']}/complete", {"status": "completed", "disks": [
        {"disk_key": 2000, "change_id": "c"}]})  # fmt: skip
    assert status == 200 and done["detail"]["disks"][0]["bytes_changed"] is None, done
    [point] = api.get("/points?vm_path=/DC/vm/b")[1]["points"]
    assert point["bytes_changed"] is None and point["bytes_transferred"] is None


async def test_an_older_store_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with sqlite3.connect(path) as connection:  # the points table as the first release made it, with one row
        connection.execute(
            "CREATE TABLE points (id TEXT PRIMARY KEY, vm_path TEXT NOT NULL, disk_key INTEGER NOT NULL, "
            "job_id TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, backing TEXT, size INTEGER NOT NULL, "
            "change_id TEXT, disk_uuid TEXT, status TEXT NOT NULL, created REAL NOT NULL, completed REAL)"
        )
        connection.execute(
            "INSERT INTO points VALUES ('p1', '/DC/vm/c', 2000, 'j1', 'full', '/x.qcow2', NULL, 1048576, 'c1', "
            "NULL, 'completed', 1.0, 2.0)"
        )
    connection.close()
    db = Database(str(path))
    try:
        [point] = await Repository(str(tmp_path), db).points("/DC/vm/c")
        assert (point.id, point.change_id, point.bytes_changed, point.bytes_transferred) == ("p1", "c1", None, None)
        new = await Repository(str(tmp_path), db).new_point("/DC/vm/c", 2001, "j2", incremental=False, capacity=MIB)
        assert new.bytes_changed is None
    finally:
        db.close()
