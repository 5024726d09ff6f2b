"""``/metrics``: the hub's state in the Prometheus text format, read at scrape time.

A scrape gathers every value first (one read transaction in the store's
thread, the filesystem's usage in another thread), then renders them through
a fresh :class:`~prometheus_client.CollectorRegistry`; nothing is kept
between scrapes and the event loop never waits on SQLite. Per-VM series are
bounded by :data:`MAX_VMS` (past it the rest are dropped, logged once).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sendense_nbd.errors import SendenseError
from sendense_nbd.hub.alerts import AlertKind
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.cluster import HUB_LOST
from sendense_nbd.hub.db import Connection, Database
from sendense_nbd.hub.repository.store import Space

log = logging.getLogger(__name__)

#: Seconds a scrape waits for the repository's space (an RBD pool asks the mons) before it leaves it out.
SPACE_TIMEOUT = 5.0

#: Most VMs given a ``sendense_last_good_point_age_seconds`` series.
MAX_VMS = 10_000
#: Upper bounds (seconds) of the backup duration histogram's buckets.
DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)
#: The states of a point's verification (an unverified point may have no state stored).
VERIFY_STATES = ("unverified", "verified", "damaged")
#: A hub's state in the metrics: beating, live but its heartbeat lapsed (another hub is about to take it
#: over), stopped cleanly, or taken over.
HUB_STATES = ("live", "lapsed", "stopped", "lost")


@attrs.frozen
class Snapshot:
    """Every value of one scrape."""

    jobs: dict[tuple[str, str], int]
    job_bytes: dict[str, int]
    #: Cumulative counts per bucket bound (the last is +Inf), and the sum of the durations.
    durations: tuple[tuple[float, int], ...]
    duration_sum: float
    last_good: dict[str, float]
    repository: dict[str, int]
    ports: dict[str, int]
    points: dict[str, int]
    alerts: dict[str, int]
    #: The cluster's hubs (a single hub is one), by :data:`HUB_STATES`.
    hubs: dict[str, int]
    #: Cluster locks held by live hubs, and the age of the oldest (0 with none).
    locks: int
    oldest_lock: float


class HubMetrics:
    """Renders the metrics of one hub: its store, repository filesystem and port pool."""

    def __init__(
        self,
        db: Database,
        *,
        repo: str,
        pool_size: int,
        clock: Clock,
        space: Callable[[], Awaitable[Space]] | None = None,
        hub: str = "local",
        lapse: float = HUB_LOST,
    ) -> None:
        self.db = db
        #: Seconds without a heartbeat before a hub counts as lapsed (``--hub-lost``).
        self.lapse = lapse
        #: The hub whose port pool the metrics count (each hub of a cluster has its own).
        self.hub = hub
        #: The repository's directory; ``space`` reads its room instead (an RBD pool) when given.
        self.repo = repo
        self._space = space
        self.pool_size = pool_size
        self.clock = clock
        self._warned = False

    async def render(self) -> bytes:
        """The metrics, in the Prometheus text format."""
        snapshot = await self.snapshot()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(snapshot))
        return generate_latest(registry)

    async def snapshot(self) -> Snapshot:
        """Gather the values: the store's in one read, the filesystem's usage alongside."""
        now = self.clock.now()
        read = self.db.run(lambda c: _read(c, now, self.hub, self.lapse))
        usage, (values, vms) = await asyncio.gather(self._room(), read)
        if vms > MAX_VMS and not self._warned:
            self._warned = True
            log.warning("more than %d VMs have a good point: the metrics show the first %d by path", MAX_VMS, MAX_VMS)
        leased = values.pop("leased")
        return Snapshot(
            **values,
            repository={} if usage is None else {"total": usage.total, "used": usage.used, "free": usage.free},
            ports={"leased": leased, "free": max(0, self.pool_size - leased)},
        )

    async def _room(self) -> Any:
        """The repository's space (a ``Space``, or ``shutil.disk_usage``'s answer); None when it cannot be read
        in :data:`SPACE_TIMEOUT` seconds (a Ceph cluster that does not answer): the scrape goes on without it."""
        room = self._space() if self._space is not None else asyncio.to_thread(shutil.disk_usage, self.repo)
        try:
            return await asyncio.wait_for(room, SPACE_TIMEOUT)
        except (SendenseError, OSError, TimeoutError) as exc:
            log.warning("metrics without the repository's space: %s", str(exc) or "it did not answer in time")
            return None


def _read(connection: Connection, now: float, hub: str, lapse: float) -> tuple[dict[str, Any], int]:
    """The store's values (in the store's thread), and how many VMs have a good point."""
    jobs = {(r[0], r[1]): r[2] for r in connection.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY 1, 2")}
    job_bytes = {
        r[0]: r[1] or 0
        for r in connection.execute("SELECT kind, SUM(bytes_sent) FROM jobs WHERE state = 'completed' GROUP BY 1")
    }
    bounds = ", ".join(f"SUM(CASE WHEN d <= {bound} THEN 1 ELSE 0 END)" for bound in DURATION_BUCKETS)
    row = connection.execute(
        f"SELECT {bounds}, COUNT(*), SUM(d) FROM (SELECT updated - created AS d FROM jobs "
        "WHERE kind = 'backup' AND state = 'completed') AS durations"
    ).fetchone()
    durations = tuple(zip((*DURATION_BUCKETS, float("inf")), (count or 0 for count in row[:-1]), strict=True))
    # As the scheduler's at-risk check (scheduler.last_good): every disk's newest good point, the oldest
    # of those; a VM with a disk that has none has no good point.
    good = connection.execute(
        "SELECT vm_path, MIN(newest) FROM (SELECT vm_path, MAX(CASE WHEN COALESCE(verify_state, 'unverified') "
        "!= 'damaged' THEN completed END) AS newest FROM points WHERE status = 'completed' "
        "GROUP BY vm_path, disk_key) AS newest_points GROUP BY vm_path HAVING COUNT(newest) = COUNT(*) "
        "ORDER BY vm_path LIMIT ?",
        (MAX_VMS + 1,),
    ).fetchall()
    points = {
        r[0]: r[1]
        for r in connection.execute(
            "SELECT COALESCE(verify_state, 'unverified'), COUNT(*) FROM points WHERE status = 'completed' GROUP BY 1"
        )
    }
    alerts = {
        r[0]: r[1]
        for r in connection.execute(
            "SELECT kind, COUNT(*) FROM alerts WHERE cleared IS NULL AND kind IN (?, ?) GROUP BY 1",
            (AlertKind.AT_RISK.value, AlertKind.LOW_SPACE.value),
        )
    }
    leased = connection.execute("SELECT COUNT(*) FROM leases WHERE hub = ? AND expires > ?", (hub, now)).fetchone()[0]
    values = {
        "jobs": jobs, "job_bytes": job_bytes, "durations": durations, "duration_sum": row[-1] or 0.0,
        "last_good": {vm: max(0.0, now - completed) for vm, completed in good[:MAX_VMS]},
        "points": points, "alerts": alerts, "leased": leased, **_cluster(connection, now, lapse),
    }  # fmt: skip
    return values, len(good)


def _cluster(connection: Connection, now: float, lapse: float) -> dict[str, Any]:
    """The hubs by state, and the cluster locks live hubs hold."""
    hubs = dict.fromkeys(HUB_STATES, 0)
    for state, heartbeat in connection.execute("SELECT state, heartbeat FROM hubs"):
        shown = "lapsed" if state == "live" and now - heartbeat > lapse else state
        if shown in hubs:
            hubs[shown] += 1
    count, oldest = connection.execute(
        "SELECT COUNT(*), MIN(locks.since) FROM locks JOIN hubs ON hubs.id = locks.hub "
        "WHERE hubs.state = 'live' AND hubs.heartbeat >= ?",
        (now - lapse,),
    ).fetchone()
    return {"hubs": hubs, "locks": count, "oldest_lock": 0.0 if oldest is None else max(0.0, now - oldest)}


class _Families(Collector):
    """The metric families of one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield every family (Prometheus calls this at render)."""
        s = self.snapshot
        jobs = GaugeMetricFamily("sendense_jobs", "Jobs in the store, by kind and state.", labels=["kind", "state"])
        for (kind, state), count in sorted(s.jobs.items()):
            jobs.add_metric([kind, state], count)
        yield jobs
        sent = CounterMetricFamily("sendense_job_bytes", "Bytes sent by completed jobs, by kind.", labels=["kind"])
        for kind, count in sorted(s.job_bytes.items()):
            sent.add_metric([kind], count)
        yield sent
        yield HistogramMetricFamily(
            "sendense_job_duration_seconds",
            "Durations of completed backup jobs (created to completed).",
            buckets=[(_bound(le), count) for le, count in s.durations],
            sum_value=s.duration_sum,
        )
        age = GaugeMetricFamily(
            "sendense_last_good_point_age_seconds",
            "Seconds since each VM's last good point: each disk's newest point no verify found damaged, the oldest.",
            labels=["vm"],
        )
        for vm, seconds in sorted(s.last_good.items()):
            age.add_metric([vm], seconds)
        yield age
        yield _gauge("sendense_repository_bytes", "The repository filesystem's size, use and free space.", "kind",
                     s.repository)  # fmt: skip
        yield _gauge("sendense_ports", "NBD ports of the pool, leased or free.", "state", s.ports)
        points = {state: s.points.get(state, 0) for state in VERIFY_STATES} | s.points
        yield _gauge("sendense_points", "Completed restore points, by verify state.", "verify_state", points)
        alerts = {kind.value: s.alerts.get(kind.value, 0) for kind in AlertKind}
        yield _gauge("sendense_alerts_active", "Active condition alerts, by kind.", "kind", alerts)
        yield _gauge("sendense_hubs", "The cluster's hubs, by state (lapsed: no heartbeat for --hub-lost).", "state",
                     s.hubs)  # fmt: skip
        yield GaugeMetricFamily("sendense_cluster_locks", "Cluster locks held by live hubs.", value=s.locks)
        oldest = "Age of the oldest cluster lock a live hub holds (0: none)."
        yield GaugeMetricFamily("sendense_cluster_lock_oldest_seconds", oldest, value=s.oldest_lock)


def _gauge(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
