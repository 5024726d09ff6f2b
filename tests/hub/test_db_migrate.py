"""``sendense-nbd db migrate`` moves a hub from its SQLite file to PostgreSQL: every table copied with its
count checked, a second copy into the now non-empty target refused, and the hub started on the target
(``--db``) sees its old jobs, points, policies and nodes and goes on from them."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import PostgresCluster, run
from tests.hub.conftest import Api, HubProcess

MIB = 1 << 20
DISKS = [{"key": 2000, "capacity": 4 * MIB}, {"key": 2001, "capacity": 2 * MIB}]


def _backup(api: Api, vm_path: str, change: str) -> dict[str, Any]:
    """A backup of DISKS through the API alone (the completion as a node would post it)."""
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": "auto", "disks": DISKS})
    assert status == 201, job
    report = {"job_id": job["job_id"], "stage": "transferring", "status": "running", "bytes_transferred": MIB}
    assert api.post(f"/backups/{job['job_id']}/progress", report)[0] == 200
    done = {
        "status": "completed",
        "vm_path": vm_path,
        "disks": [{"disk_key": d["key"], "change_id": f"{change}-{d['key']}", "disk_uuid": None} for d in DISKS],
    }
    status, job = api.post(f"/backups/{job['job_id']}/complete", done)
    assert status == 200 and job["state"] == "completed", job
    return api.wait_job(job["job_id"])  # and its retention (a stage recorded after the answer)


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found = {t: connection.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    connection.close()
    return {t: n for t, n in found.items() if t != "schema_version"}


def _migrate(source: Path, target: str, check: bool = True) -> Any:
    command = ["db", "migrate", "--from", f"sqlite:{source}", "--to", target, "--output", "json"]
    return run(sys.executable, "-m", "sendense_nbd", *command, check=check)


def _old_hub(hub_factory: Callable[..., HubProcess], repo: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A hub on SQLite with a node, a policy and three backups (two of one VM), stopped: its jobs and policy."""
    hub = hub_factory(None, "--db", f"sqlite:{repo / 'hub.db'}", repo=repo)
    api = Api(hub.url)
    assert api.post("/nodes", {"name": "site-b", "url": "http://127.0.0.1:9", "token": "t"})[0] == 201
    policy = {"name": "nightly", "node": "site-b", "vms": {"include": ["/DC/vm/a*"]}, "schedule": {"every": 3600}}
    assert api.post("/policies", policy)[0] == 201
    for vm_path, change in (("/DC/vm/a1", "52 aa/1"), ("/DC/vm/a1", "52 aa/2"), ("/DC/vm/a2", "52 aa/3")):
        _backup(api, vm_path, change)
    jobs = api.get("/backups")[1]["backups"]
    stored = api.get("/policies/nightly")[1]
    assert hub.stop() == 0
    return jobs, stored


def test_a_hub_moves_from_sqlite_to_postgresql(
    hub_factory: Callable[..., HubProcess], postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    jobs, policy = _old_hub(hub_factory, repo)
    target = postgres_cluster.new_database()
    counts = _counts(repo / "hub.db")
    summary = json.loads(_migrate(repo / "hub.db", target).stdout)
    assert summary["tables"] == counts and summary["rows"] == sum(counts.values())
    assert counts["jobs"] == 3 and counts["points"] == 6 and counts["policies"] == 1 and counts["job_samples"] > 0
    refused = _migrate(repo / "hub.db", target, check=False)
    assert refused.returncode == 1
    assert "is not empty" in refused.stderr and "db migrate copies into an empty store" in refused.stderr
    hub = hub_factory(None, "--db", target, repo=repo)
    api = Api(hub.url)
    assert api.get("/backups")[1]["backups"] == jobs
    assert api.get("/policies/nightly")[1] == policy
    assert [n["name"] for n in api.get("/nodes")[1]["nodes"]] == ["site-b"]
    status, change = api.get("/backups/changeid?vm_path=/DC/vm/a1&disk_key=2000")
    assert status == 200 and change["change_id"] == "52 aa/2-2000"
    job = _backup(api, "/DC/vm/a1", "52 aa/4")  # the chain goes on from the copied points
    assert [d["sync_type"] for d in job["detail"]["disks"]] == ["incremental", "incremental"]
    assert len(api.get("/backups")[1]["backups"]) == 4


def test_sqlites_own_tables_are_not_copied(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    from sendense_nbd.hub.db import Database
    from sendense_nbd.hub.db.transfer import copy_store

    source = tmp_path / "hub.db"
    Database(f"sqlite:{source}").close()
    with sqlite3.connect(source) as connection:  # sqlite_sequence (kept after its table goes) and sqlite_stat1
        connection.execute("CREATE TABLE counted (id INTEGER PRIMARY KEY AUTOINCREMENT)")
        connection.execute("INSERT INTO counted DEFAULT VALUES")
        connection.execute("DROP TABLE counted")
        connection.execute("INSERT INTO policies (name, spec, created, updated) VALUES ('p', '{}', 0, 0)")
        connection.execute("ANALYZE")
        internal = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE name LIKE 'sqlite_%'")}
    connection.close()
    assert {"sqlite_sequence", "sqlite_stat1"} <= internal
    source_db, target_db = Database(f"sqlite:{source}"), Database(postgres_cluster.new_database())
    try:
        counts = copy_store(source_db, target_db)
    finally:
        source_db.close()
        target_db.close()
    assert counts["policies"] == 1 and not any(name.startswith("sqlite_") for name in counts)


def test_a_target_that_is_not_a_postgresql_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    source = tmp_path / "hub.db"
    source.touch()
    refused = _migrate(source, "host=db user=hub password=s3cret-pw", check=False)
    assert refused.returncode == 2 and "give postgresql://USER@HOST/DB" in refused.stderr
    assert "s3cret-pw" not in refused.stderr + refused.stdout
    upgrade = ["db", "upgrade", "--db", "host=db user=hub password=s3cret-pw"]
    refused = run(sys.executable, "-m", "sendense_nbd", *upgrade, check=False)
    assert refused.returncode == 2 and "not libpq's key=value form" in refused.stderr
    assert "s3cret-pw" not in refused.stderr + refused.stdout
    assert list(tmp_path.iterdir()) == [source]
