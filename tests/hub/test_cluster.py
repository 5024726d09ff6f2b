"""Several hubs on one database (SQLite, and the session's PostgreSQL), in one process: each hub's store a
Database of its own over it (as separate processes have), time moved by hand. Schedulers racing for slots and
VMs, membership with heartbeats and a takeover done once, per-hub port pools, runs taken over, and a local
repository refused in a cluster. (The processes on Ceph, a hub killed mid-backup: tests/rbd_repo/test_multihub.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest

from sendense_nbd.backup.records import FullReason, Mode
from sendense_nbd.errors import ClockSkew, ClusterLockTimeout, ConfigError, HubIdInUse, StoreUnavailable
from sendense_nbd.hub import cluster as cluster_module
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.cluster import LOCK_POLL, Cluster, HubState, Identity
from sendense_nbd.hub.db import Connection, Cursor, Database
from sendense_nbd.hub.jobs import JobState
from sendense_nbd.hub.policies import ItemState, PolicyStore, Purpose, RunState
from sendense_nbd.hub.ports import PortAllocator, release_hub
from sendense_nbd.hub.scheduler import Scheduler
from sendense_nbd.hub.service import Hub, HubConfig
from sendense_nbd.policy.model import Policy
from tests.hub.conftest import free_port_range

pytestmark = pytest.mark.peer

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
HOUR = 3600.0
VMS = [f"/DC0/vm/vm{i:02d}" for i in range(20)]
HUBS = 12


class QuietAlerts:
    """Alerts that go nowhere (the at-risk check fires some)."""

    async def fire(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def clear(self, *args: Any) -> bool:
        return True

    async def list(self, query: Any) -> list[Any]:
        return []


class ClusterJobs:
    """Every hub's jobs in memory, and who started what."""

    def __init__(self) -> None:
        self.jobs: dict[str, SimpleNamespace] = {}
        self.started: list[tuple[str, str]] = []

    def running(self) -> list[SimpleNamespace]:
        return [job for job in self.jobs.values() if not job.state.terminal]

    def finish(self) -> None:
        for job in self.running():
            job.state = JobState.COMPLETED


class HubSide:
    """One hub's job side (the scheduler's Operations) over the cluster's jobs."""

    def __init__(self, jobs: ClusterJobs, name: str) -> None:
        self.cluster_jobs, self.name = jobs, name

    async def start_policy_backup(self, policy: Policy, vm_path: str, mode: Mode, reason: FullReason | None) -> Any:
        jobs = self.cluster_jobs
        assert vm_path not in {job.vm_path for job in jobs.running()}, f"{vm_path} started twice at once"
        job = SimpleNamespace(id=f"job-{len(jobs.jobs)}", vm_path=vm_path, state=JobState.RUNNING, error=None)
        jobs.jobs[job.id] = job
        jobs.started.append((vm_path, self.name))
        return job

    async def start_policy_verify(self, policy: Policy, vm_path: str) -> Any:
        raise AssertionError("no verify schedule here")

    async def job(self, job_id: str) -> Any:
        return self.cluster_jobs.jobs[job_id]

    async def policy_vms(self, policy: Policy) -> list[str]:
        return VMS

    async def stored_vms(self) -> list[str]:
        return VMS

    async def points(self, vm_path: str) -> list[Any]:
        return []

    async def incrementals(self, vm_path: str) -> int:
        return 0

    async def check_node(self, node: str | None) -> None:
        return None

    async def busy(self, vm_path: str) -> bool:
        return any(job.vm_path == vm_path for job in self.cluster_jobs.running())

    async def node_jobs(self, node: str | None) -> int:
        return len(self.cluster_jobs.running())


@pytest.fixture
async def databases(store_target: str) -> AsyncIterator[Callable[[], Database]]:
    """Handles on one store (an SQLite file, or a PostgreSQL database), each with its own connection and writer
    thread, as separate hub processes have."""
    opened: list[Database] = []

    def open_one() -> Database:
        opened.append(Database(store_target))
        return opened[-1]

    yield open_one
    for db in opened:
        db.close()


async def _until_started(schedulers: list[Scheduler], jobs: ClusterJobs, count: int) -> None:
    """Tick every scheduler at once until ``count`` jobs were started (bounded)."""
    for _ in range(20):
        if len(jobs.started) >= count:
            return
        await asyncio.gather(*(scheduler.tick() for scheduler in schedulers))
    raise AssertionError(f"{len(jobs.started)} jobs started, not {count}")


async def test_racing_schedulers_take_each_slot_and_each_vm_once(databases: Callable[[], Database]) -> None:
    clock = ManualClock(START)
    jobs = ClusterJobs()

    async def live() -> int:
        return HUBS

    schedulers = [
        Scheduler(HubSide(jobs, f"h{i}"), PolicyStore(databases()), clock, QuietAlerts(), member=f"h{i}",  # type: ignore[arg-type]
                  live=live)
        for i in range(HUBS)
    ]  # fmt: skip
    policy = {"name": "hourly", "vms": {"include": ["/DC0/vm/*"]}, "schedule": {"every": HOUR}}
    await schedulers[0].add(Policy.from_json({**policy, "per_policy": 20, "per_node": 100}))
    for slot in range(1, 4):
        await clock.advance(HOUR)
        await _until_started(schedulers, jobs, 20 * slot)
        jobs.finish()
        await asyncio.gather(*(scheduler.tick() for scheduler in schedulers))
        assert len(jobs.started) == 20 * slot, "a VM started twice in a slot"
    store = schedulers[0].store
    runs = await store.runs(policy="hourly")
    assert sorted(run.slot for run in runs if run.slot is not None) == [START + HOUR * n for n in (1, 2, 3)]
    assert all(run.state is RunState.DONE for run in runs), runs
    for run in runs:
        assert sorted(item.vm_path for item in run.items) == VMS
        assert all(item.state is ItemState.DONE and item.hub is not None for item in run.items)
        assert len({item.hub for item in run.items}) >= 4, "the run's VMs were not shared among the hubs"
    state = await store.state("hourly", Purpose.BACKUP)
    assert state.last_slot == START + 3 * HOUR


def _identity(name: str, *, local: bool = False, store: str = "rbd://pool?prefix=p") -> Identity:
    return Identity(id=name, api_url=f"http://{name}", nbd_host="127.0.0.1", ports=range(10100, 10110),
                    store=f"local:/{name}" if local else store, local=local)  # fmt: skip


async def test_a_lapsed_hub_is_taken_over_once_and_comes_back(databases: Callable[[], Database]) -> None:
    clock = ManualClock(START)
    a, b, c = (Cluster(databases(), clock, _identity(n), heartbeat=1.0, lapse=5.0) for n in "abc")
    for member in (a, b, c):
        await member.join("uuid-1")
    assert await c.repository() == "uuid-1"
    assert [m.id for m in await a.others_live()] == ["b", "c"]
    for _ in range(6):
        await clock.advance(1.0)
        await asyncio.gather(b.beat(), c.beat())
    (lost,) = await b.lost()
    assert lost.id == "a" and not lost.live
    taken = await asyncio.gather(b.take_over(lost), c.take_over(lost))
    assert sorted(taken) == [False, True]
    (row,) = [m for m in await c.members() if m.id == "a"]
    assert row.state is HubState.LOST and row.taken_by in ("b", "c")
    taker, other = (b, c) if row.taken_by == "b" else (c, b)
    assert await taker.still_taken("a") and not await other.still_taken("a")
    assert await b.lost() == []
    assert await a.beat() is False  # it had been taken over: live again, with a new heartbeat
    assert not await taker.still_taken("a")  # its takeover, if still running, leaves its new work alone
    assert [m.id for m in await b.others_live()] == ["a", "c"]
    await c.leave()
    (stopped,) = await b.lost()
    assert stopped.id == "c" and stopped.state is HubState.STOPPED


async def test_a_takeover_that_left_work_is_done_again_by_its_taker_or_a_live_hub(
    databases: Callable[[], Database],
) -> None:
    """A lost hub whose takeover left work of its behind (here a port lease: the taker failed midway) is its
    taker's to take over again; once the taker is lost too, the first live hub to look takes it (one hub); a
    hub with nothing left is nobody's."""
    clock = ManualClock(START)
    a, b, c = (Cluster(databases(), clock, _identity(n), heartbeat=1.0, lapse=5.0) for n in "abc")
    for member in (a, b, c):
        await member.join("uuid-1")
    for _ in range(6):
        await clock.advance(1.0)
        await asyncio.gather(b.beat(), c.beat())
    (lost,) = await b.lost()
    assert await b.take_over(lost)
    assert await b.unfinished() == [] and await c.unfinished() == []  # nothing of a's is left
    await b.db.run(
        lambda connection: connection.execute(
            "INSERT INTO leases (hub, port, holder, job_id, disk_key, purpose, since, expires) "
            "VALUES ('a', 10100, 'hub-a', 'job-1', 2000, 'backup', ?, ?)",
            (START, START + 3600),
        )
    )  # a lease of a's that b's takeover failed to release
    assert [m.id for m in await b.unfinished()] == ["a"]
    assert await c.unfinished() == []  # b, its taker, is live: b's to do again
    for _ in range(6):
        await clock.advance(1.0)
        await c.beat()  # b is lost too
    assert [m.id for m in await c.unfinished()] == ["a"]
    assert await b.unfinished() == []  # c took it: b, back, finds it c's
    (row,) = [m for m in await c.members() if m.id == "a"]
    assert row.taken_by == "c"
    assert await release_hub(c.db, "a") == [10100]
    assert await c.unfinished() == []


async def test_a_local_repository_or_another_store_is_refused_in_a_cluster(databases: Callable[[], Database]) -> None:
    clock = ManualClock(START)
    await Cluster(databases(), clock, _identity("a"), heartbeat=1.0, lapse=5.0).join(None)
    with pytest.raises(ConfigError, match="local directory repository runs alone"):
        await Cluster(databases(), clock, _identity("b", local=True), heartbeat=1.0, lapse=5.0).join(None)
    with pytest.raises(ConfigError, match="share one repository"):
        other = _identity("c", store="rbd://other?prefix=p")
        await Cluster(databases(), clock, other, heartbeat=1.0, lapse=5.0).join(None)


async def test_each_hub_leases_its_own_pool(databases: Callable[[], Database]) -> None:
    pool = free_port_range(4)
    two = PortAllocator(databases(), pool, bind_address="127.0.0.2", hub="h2")
    three = PortAllocator(databases(), pool, bind_address="127.0.0.3", hub="h3")
    first, second = await two.allocate("h2-1", "job-a", 0), await three.allocate("h3-1", "job-b", 0)
    try:  # each the lowest port that binds on its own address (the same one, unless another process holds it)
        assert [lease.port for lease in (await two.status()).used] == [first.lease.port]
        assert [lease.port for lease in (await three.status()).used] == [second.lease.port]
        assert await two.release_stale("h2-2") != [] and (await three.status()).used != ()
        assert await release_hub(three.db, "h3") == [second.lease.port]
        assert (await three.status()).used == ()
    finally:
        first.socket.close()
        second.socket.close()


async def test_a_lost_hubs_open_runs_are_taken_over(databases: Callable[[], Database]) -> None:
    store = PolicyStore(databases())
    policy = {"name": "p", "vms": {"include": ["/DC0/vm/*"]}, "schedule": {"every": HOUR}}
    await store.add(Policy.from_json(policy), START)
    run = await store.open_run(
        "p", Purpose.BACKUP, VMS[:3], slot=None, now=START, window_end=None, note=None, owner="a"
    )
    first, second, _ = run.items
    assert await store.claim_item(first, "a", limit=3, share=3)
    assert await store.claim_item(second, "a", limit=3, share=3)
    assert not await store.claim_item(second, "b", limit=3, share=3)  # already started
    await store.set_item(attrs.evolve(second, state=ItemState.STARTED, hub="a", job_id="job-1"))
    assert await store.take_runs("a", "b") == [run.id]
    taken = await store.run(run.id)
    assert taken.owner == "b"
    assert [(i.state, i.hub) for i in taken.items] == [
        (ItemState.QUEUED, None), (ItemState.STARTED, "a"), (ItemState.QUEUED, None),
    ]  # fmt: skip


async def test_a_hub_with_a_local_repository_runs_alone_on_its_database(tmp_path: Path, store_target: str) -> None:
    shared = store_target
    first = Hub(HubConfig(repo=str(tmp_path / "one"), db=shared, nbd_ports=free_port_range(2), hub_id="one"))
    second = Hub(HubConfig(repo=str(tmp_path / "two"), db=shared, nbd_ports=free_port_range(2), hub_id="two"))
    try:
        await first.start()
        with pytest.raises(ConfigError, match="already has hubs \\(one\\)"):
            await second.start()
    finally:
        for hub in (first, second):
            hub.close()
            await hub.wait_closed()


async def test_a_cluster_lock_is_one_hubs_at_a_time_and_lapses_with_its_hub(
    databases: Callable[[], Database],
) -> None:
    """Hubs hold a cluster lock one at a time: one waits while another live hub holds it, and gets it when the
    holder lets go, or once the holder is lost (no heartbeat) though it never let go; a restarted hub's holds
    of its last run are gone."""
    clock = ManualClock(START)
    a, b = (Cluster(databases(), clock, _identity(n), heartbeat=1.0, lapse=5.0) for n in "ab")
    for member in (a, b):
        await member.join("uuid-1")
    holders: list[str] = []

    async def hold(member: Cluster, name: str, acquired: asyncio.Event, release: asyncio.Event) -> None:
        async with member.lock(name):
            holders.append(member.id)
            acquired.set()
            await release.wait()

    taken, let_go = {n: asyncio.Event() for n in "ab"}, {n: asyncio.Event() for n in "ab"}
    first = asyncio.create_task(hold(a, "admission", taken["a"], let_go["a"]))
    async with asyncio.timeout(10):
        await taken["a"].wait()
    second = asyncio.create_task(hold(b, "admission", taken["b"], let_go["b"]))
    async with b.lock("another name"):  # locks of other names are apart
        await asyncio.sleep(4 * LOCK_POLL)
    assert holders == ["a"], "b took the lock a holds"
    let_go["a"].set()
    await first
    async with asyncio.timeout(10):
        await taken["b"].wait()
    assert holders == ["a", "b"]
    let_go["b"].set()
    await second

    stuck_taken = asyncio.Event()
    stuck = asyncio.create_task(hold(a, "disk 2000 of /DC0/vm/a", stuck_taken, asyncio.Event()))  # never let go
    async with asyncio.timeout(10):
        await stuck_taken.wait()
    for _ in range(6):
        await clock.advance(1.0)
        await b.beat()
    async with asyncio.timeout(10), b.lock("disk 2000 of /DC0/vm/a"):  # a is lost: its hold lapsed
        pass
    stuck.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stuck

    async with a.lock("admission"):
        restarted = Cluster(databases(), clock, _identity("a"), heartbeat=1.0, lapse=5.0)
        await restarted.join("uuid-1")  # a's last run held it: gone with the new start
        async with asyncio.timeout(10), b.lock("admission"):
            pass


async def test_a_clock_off_the_database_servers_is_refused_at_join_and_logged_at_heartbeats(
    databases: Callable[[], Database],
    store_target: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On PostgreSQL a hub whose clock is off the server's by more than the bound is refused (an unskewed one
    joins, its skew measured and shown); a skew grown at runtime is logged at the heartbeat and shown in the
    hub's row. SQLite has one machine's clock: nothing to compare."""
    postgres = store_target.startswith("postgresql")
    clock = ManualClock(START)
    monkeypatch.setattr(cluster_module, "real_time", lambda: time.time() + 60.0)
    skewed = Cluster(databases(), clock, _identity("a"), heartbeat=1.0, lapse=5.0)
    if postgres:
        with pytest.raises(ClockSkew, match=r"clock is \+60\.\d s off the database server's .*synchronised clocks "
                                            r"\(NTP\): at most 1\.25 s"):  # fmt: skip
            await skewed.join("uuid-1")
        assert await skewed.members() == []
    else:
        await skewed.join("uuid-1")
        assert skewed.skew is None
    monkeypatch.setattr(cluster_module, "real_time", time.time)
    b = Cluster(databases(), clock, _identity("b"), heartbeat=1.0, lapse=5.0)
    await b.join("uuid-1")
    assert (b.skew is not None and abs(b.skew) < 1.0) if postgres else b.skew is None
    monkeypatch.setattr(cluster_module, "real_time", lambda: time.time() - 30.0)
    with caplog.at_level(logging.ERROR, logger="sendense_nbd.hub.cluster"):
        assert await b.beat() is True  # a hub already running keeps running: it is told, loudly
    (row,) = [member for member in await b.members() if member.id == "b"]
    if postgres:
        assert row.clock_skew is not None and -31.0 < row.clock_skew < -29.0
        assert row.to_json()["clock_skew"] == row.clock_skew
        assert "clock is -30.0 s off the database server's (at most 1.25 s)" in caplog.text
    else:
        assert row.clock_skew is None and "off the database server" not in caplog.text


async def test_a_second_process_with_a_live_hubs_id_is_refused_and_a_taken_over_one_stops(
    databases: Callable[[], Database],
) -> None:
    """A hub ID whose row another process's heartbeat keeps live is refused; once that row lapsed, the ID is
    taken, and the first process learns at its next beat (it must stop; leaving then leaves the new row be).
    A predecessor on this host that runs no longer is taken over at once."""
    clock = ManualClock(START)
    first = Cluster(databases(), clock, _identity("a"), heartbeat=1.0, lapse=5.0)
    first.token = "0123 elsewhere.example 4242"  # as another machine's process
    await first.join("uuid-1")
    second = Cluster(databases(), clock, _identity("a"), heartbeat=1.0, lapse=5.0)
    with pytest.raises(HubIdInUse, match="hub ID a is in use: another process runs with it \\(on elsewhere.example"):
        await second.join("uuid-1")
    await clock.advance(3.0)
    assert await first.beat() is True
    with pytest.raises(HubIdInUse, match="lapses within 5 s"):
        await second.join("uuid-1")
    await clock.advance(6.0)  # the first one's heartbeat lapsed (it hung, or its machine lost the database)
    await second.join("uuid-1")
    with pytest.raises(HubIdInUse, match="hub ID a was taken over by another process"):
        await first.beat()
    await first.leave()
    (row,) = await second.members()
    assert row.state is HubState.LIVE and row.live
    assert await second.beat() is True

    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    dead = f"4567 {socket.gethostname()} {gone.pid}"  # as the row of a process of this host that died
    await second.db.run(lambda c: c.execute("UPDATE hubs SET token = ? WHERE id = ?", (dead, "a")))
    restarted = Cluster(databases(), clock, _identity("a"), heartbeat=1.0, lapse=5.0)
    await restarted.join("uuid-1")  # its heartbeat is fresh, but its process is gone
    assert await restarted.beat() is True


class FailingOnce:
    """A connection whose first statement starting with ``prefix`` raises (the database failing over)."""

    def __init__(self, connection: Connection, failures: list[str]) -> None:
        self.connection, self.failures = connection, failures

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        if self.failures and sql.startswith(self.failures[0]):
            self.failures.pop()
            raise StoreUnavailable("the connection to the hub store failed (injected)")
        return self.connection.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Cursor:
        return self.connection.executemany(sql, parameters)


async def test_a_failed_lock_release_is_deleted_by_the_next_beat_and_a_lock_wait_is_bounded(
    databases: Callable[[], Database], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A release whose DELETE fails counts as released in the hub and leaves its row: another hub's wait for
    the lock ends at its limit with an error naming the holder; the holder's next heartbeat deletes the row
    (never that of a lock it holds), and the other hub then takes it."""
    clock = ManualClock(START)
    a, b = (Cluster(databases(), clock, _identity(n), heartbeat=1.0, lapse=5.0) for n in "ab")
    for member in (a, b):
        await member.join("uuid-1")
    failures = ["DELETE FROM locks WHERE name"]
    run = a.db.run
    monkeypatch.setattr(a.db, "run", lambda function: run(lambda c: function(FailingOnce(c, failures))))
    with caplog.at_level(logging.WARNING, logger="sendense_nbd.hub.cluster"):
        async with a.lock("admission"):
            pass
    assert failures == [] and "releasing the cluster lock 'admission' failed" in caplog.text
    started = time.monotonic()
    with pytest.raises(
        ClusterLockTimeout, match=r"cluster lock 'admission' is held by hub a since 2026-01-01T00:00:00"
    ):
        async with b.lock("admission", wait=0.5):
            raise AssertionError("b took the lock a's row still holds")
    assert 0.4 < time.monotonic() - started < 5.0
    async with a.lock("disk 2000 of /DC0/vm/a"):
        await a.beat()  # deletes the row a failed to delete, not that of the lock it holds
        with pytest.raises(ClusterLockTimeout, match="held by hub a"):
            async with b.lock("disk 2000 of /DC0/vm/a", wait=0.3):
                pass
    assert "deleted the rows of cluster locks this hub had released: admission" in caplog.text
    async with asyncio.timeout(10), b.lock("admission", wait=1.0):
        pass


async def test_a_hub_whose_id_another_process_took_over_stops(tmp_path: Path, store_target: str) -> None:
    """The heartbeat that finds another process's token in the hub's row ends the hub's background work with
    :class:`HubIdInUse` (``ended()`` raises it: ``sendense-nbd hub`` then stops serving); its stop leaves the
    other process's row live."""
    config = HubConfig(repo=str(tmp_path / "one"), db=store_target, nbd_ports=free_port_range(2), hub_id="one",
                       heartbeat=0.1, hub_lost=5.0)  # fmt: skip
    hub = Hub(config)
    other = Database(store_target)
    try:
        await hub.start()
        await other.run(lambda c: c.execute("UPDATE hubs SET token = ? WHERE id = ?", ("x elsewhere 1", "one")))
        with pytest.raises(HubIdInUse, match="hub ID one was taken over by another process"):
            async with asyncio.timeout(10):
                await hub.ended()
    finally:
        hub.close()
        await hub.wait_closed()
    (row,) = await other.run(lambda c: c.execute("SELECT state, token FROM hubs").fetchall())
    other.close()
    assert tuple(row) == ("live", "x elsewhere 1")
