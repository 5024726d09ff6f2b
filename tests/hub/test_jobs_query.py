"""``GET /jobs`` and :meth:`Hub.jobs`: every kind of job, filtered in SQL on kind, state, VM, policy, node
and creation time, newest first, bounded; a bad query is a 400 naming its parameter.

Real jobs of an in-process hub (backups to an accepting node API, a verify, a restore export) for the
filters; the bound and the index use on the job store itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.db import Connection, Database
from sendense_nbd.hub.jobs import MAX_QUERY, JobKind, JobQuery, JobState, JobStore
from sendense_nbd.hub.requests import BackupRequest, DiskSpec, Failure
from tests.hub.operating import START, LocalHub, local_hub
from tests.hub.test_retention import _AcceptingNode

pytestmark = pytest.mark.peer

VM_A, VM_B = "/DC0/vm/web01", "/DC0/vm/db01"
DISK = 2000
SIZE = 4 << 20


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[LocalHub]:
    nodes = [_AcceptingNode(), _AcceptingNode()]
    for node in nodes:
        await node.start()
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=nodes[0].url) as running:
            await running.ok("POST", "/nodes", {"name": "site-b", "url": nodes[1].url})
            yield running
    finally:
        for node in nodes:
            await node.close()


async def _ids(hub: LocalHub, **query: str) -> list[str]:
    answer = await hub.ok("GET", "/jobs?" + urlencode(query))
    return [job["job_id"] for job in answer["jobs"]]


async def _made(hub: LocalHub) -> dict[str, dict[str, object]]:
    """Five jobs, created in this order: a completed backup of A (default node), a cancelled policy backup
    of B on site-b, a failed backup of A, a verify of A, a restore export of A's point (stopped)."""
    disks = [{"key": DISK, "capacity": SIZE}]
    done = await hub.ok("POST", "/backups", {"vm_path": VM_A, "disks": disks})
    await hub.ok("POST", f"/backups/{done['job_id']}/complete", {"status": "completed", "disks": [{"disk_key": DISK}]})
    request = BackupRequest(VM_B, Mode.AUTO, (DiskSpec(DISK, SIZE),), node="site-b", policy="nightly")
    cancelled = (await hub.hub.create_backup(request)).id
    await hub.ok("DELETE", f"/backups/{cancelled}")
    failed = await hub.ok("POST", "/backups", {"vm_path": VM_A, "disks": disks})
    await hub.ok("POST", f"/backups/{failed['job_id']}/complete", {"status": "failed", "error": {"message": "x"}})
    await hub.hub.settled()
    verify = await hub.ok("POST", "/verify", {"vm_path": VM_A})
    [point] = await hub.hub.points(VM_A)
    restore = await hub.ok("POST", "/restores", {"point_id": point.id, "action": "export"})
    await hub.ok("DELETE", f"/restores/{restore['id']}")
    ids = [done["job_id"], cancelled, failed["job_id"], verify["job_id"], restore["id"]]
    return {job_id: await hub.ok("GET", f"/backups/{job_id}") for job_id in ids}


async def test_filters_combine_and_the_newest_job_comes_first(hub: LocalHub) -> None:
    jobs = await _made(hub)
    done, cancelled, failed, verify, restore = jobs
    assert await _ids(hub) == [restore, verify, failed, cancelled, done]
    assert [job.id for job in await hub.hub.jobs(JobQuery())] == [restore, verify, failed, cancelled, done]
    assert await _ids(hub, kind="backup") == [failed, cancelled, done]
    assert await _ids(hub, kind="verify") == [verify]
    assert await _ids(hub, kind="restore", state="completed") == [restore]
    assert await _ids(hub, state="cancelled") == [cancelled]
    assert await _ids(hub, state="failed", vm_path=VM_A) == [failed]
    assert await _ids(hub, vm_path=VM_B) == [cancelled]
    assert await _ids(hub, kind="backup", vm_path=VM_A) == [failed, done]
    assert await _ids(hub, policy="nightly") == [cancelled]
    assert await _ids(hub, policy="other") == []
    assert await _ids(hub, node="site-b") == [cancelled]
    assert await _ids(hub, node="default") == [failed, done]  # a verify or restore has no node
    created = {job_id: float(str(job["created"])) for job_id, job in jobs.items()}
    window = {"since": repr(created[cancelled]), "before": repr(created[verify])}
    assert await _ids(hub, **window) == [failed, cancelled]  # since <= created < before
    assert await _ids(hub, since=repr(created[verify])) == [restore, verify]
    assert await _ids(hub, before=repr(created[done])) == []
    assert await _ids(hub, limit="2") == [restore, verify]
    assert await _ids(hub, limit="2", kind="backup") == [failed, cancelled]
    # a form's blank fields are no filter
    assert await _ids(hub, kind="", state="", vm_path="", limit="") == [restore, verify, failed, cancelled, done]
    shown = (await hub.ok("GET", "/jobs?kind=verify"))["jobs"][0]
    assert shown == await hub.ok("GET", f"/backups/{verify}")  # each job as GET /backups/{job} shows it


BAD = [
    ("kind=nope", "kind must be one of backup, restore, verify"),
    ("state=done", "state must be one of"),
    ("limit=0", "limit must be an integer from 1 to 1000"),
    ("limit=1001", "limit must be an integer from 1 to 1000"),
    ("limit=ten", "limit must be"),
    ("limit=%EF%BC%91", "limit must be"),  # a fullwidth digit one
    ("limit=-5", "limit must be"),
    ("since=-1", "since must be a time in epoch seconds"),
    ("since=1e9", "since must be"),
    ("before=nan", "before must be"),
    ("before=123456789012", "before must be"),
    ("vm_path=web01", "vm_path is an inventory path"),
    ("vm_path=%2FDC%2F%2Fx", "vm_path is an inventory path"),
    ("policy=a%20b", "policy must be 1-128 of"),
    ("node=a%2Fb", "node must be 1-128 of"),
    ("job=1", "unknown query parameter 'job'"),
]


@pytest.mark.parametrize(("query", "message"), BAD)
async def test_a_bad_query_is_400_naming_what_is_wrong(hub: LocalHub, query: str, message: str) -> None:
    status, answer = await hub.call("GET", "/jobs?" + query)
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_request" and message in answer["error"]["message"]


def test_a_query_never_asks_for_more_than_the_bound() -> None:
    assert JobQuery().limit == 100 and JobQuery.from_query({}).limit == 100
    assert JobQuery.from_query({"limit": "1000"}).limit == MAX_QUERY
    for limit in (0, -1, MAX_QUERY + 1):
        with pytest.raises(ValueError, match="limit"):
            JobQuery(limit=limit)
    query = JobQuery.from_query({"kind": "backup", "node": "n1", "since": "1.5", "limit": "7"})
    assert JobQuery.from_query(query.to_query()) == query


async def test_the_store_answers_from_its_indexes_within_the_bound(store_target: str) -> None:
    db = Database(store_target)
    try:
        store = JobStore(db)
        job = await store.create(JobKind.BACKUP, VM_A, Mode.AUTO, None, lifetime=60)
        await store.transition(job.id, JobState.FAILED, error=Failure("node", "x"))
        now = time.time()

        def many(connection: Connection) -> None:  # 1100 more jobs in one transaction, older than the first
            connection.executemany(
                "INSERT INTO jobs (id, kind, vm_path, mode, state, created, updated, deadline, detail, node) "
                "VALUES (?, 'backup', ?, 'auto', 'completed', ?, ?, ?, '{}', 'default')",
                [(f"old-{i:05}", VM_B, now - 10 - i, now, now) for i in range(1100)],
            )

        await db.run(many)
        assert len(await store.query(JobQuery())) == 100
        every = await store.query(JobQuery(limit=MAX_QUERY))
        assert len(every) == MAX_QUERY and every[0].id == job.id and every[1].id == "old-00000"
        assert [j.created for j in every] == sorted((j.created for j in every), reverse=True)
        assert [j.id for j in await store.query(JobQuery(state=JobState.FAILED))] == [job.id]
        for query in _queries(now):
            found = await store.query(query)
            assert [j.created for j in found] == sorted((j.created for j in found), reverse=True)
            if db.engine.dialect == "sqlite":  # its planner's own words
                await _uses_an_index(db, query)
    finally:
        db.close()


async def _uses_an_index(db: Database, query: JobQuery) -> None:
    where, args = query.where()
    sql = f"EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE {where} ORDER BY created DESC, seq DESC LIMIT ?"
    plan = await db.run(lambda c: [r[3] for r in c.execute(sql, (*args, 10))])
    assert any("USING INDEX" in step for step in plan) and not any(s == "SCAN jobs" for s in plan), plan


def _queries(now: float) -> list[JobQuery]:
    """One query per filter, and a few together."""
    return [
        JobQuery(),
        JobQuery(kind=JobKind.VERIFY),
        JobQuery(state=JobState.RUNNING),
        JobQuery(vm_path=VM_A),
        JobQuery(policy="nightly"),
        JobQuery(node="site-b"),
        JobQuery(since=now - 60, before=now),
        JobQuery(kind=JobKind.BACKUP, state=JobState.FAILED, vm_path=VM_B, since=now - 3600),
    ]
