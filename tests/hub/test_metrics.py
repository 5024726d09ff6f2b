"""``/metrics`` of a real hub: Prometheus' own parser reads the counts of real jobs, points, ports,
verify results and alerts; the bearer token guards it like the API; per-VM series are bounded."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sendense_nbd.backup.records import Mode
from sendense_nbd.hub import metrics as metrics_module
from sendense_nbd.hub.alerts import AlertKind
from sendense_nbd.hub.api import build_app
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.cluster import HEARTBEAT, HUB_LOST, Cluster, Identity
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.metrics import HUB_STATES, HubMetrics
from sendense_nbd.hub.repository import VerifyState
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec
from sendense_nbd.hub.service import Hub, HubConfig
from tests.hub.conftest import free_port_range

MIB = 1 << 20
TOKEN = "metrics-t0ken"
POOL = 4
#: A sample: (metric name, labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Hub, str]]:
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(POOL)))
    await hub.start()
    runner = web.AppRunner(build_app(hub, token=TOKEN))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield hub, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        hub.close()
        await hub.wait_closed()


async def scrape(base: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics", headers=headers) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


async def complete(hub: Hub, vm: str, sent: int) -> str:
    job = await hub.create_backup(BackupRequest(vm, Mode.FULL, (DiskSpec(2000, MIB),)))
    disk = {"disk_key": 2000, "change_id": "52 aa/1", "bytes_transferred": sent, "bytes_changed": sent}
    await hub.complete(job.id, Completion.from_json({"status": "completed", "disks": [disk]}))
    return job.id


async def test_metrics_show_real_jobs_points_ports_verify_results_and_alerts(tmp_path: Path) -> None:
    async with served(tmp_path) as (hub, base):
        done = await complete(hub, "/DC0/vm/a", 3 * MIB)
        await complete(hub, "/DC0/vm/b", MIB)
        failed = await hub.create_backup(BackupRequest("/DC0/vm/c", Mode.FULL, (DiskSpec(2000, MIB),)))
        report = {"status": "failed", "error": {"stage": "copy", "message": "read error"}}
        await hub.complete(failed.id, Completion.from_json(report))
        cancelled = await hub.create_backup(BackupRequest("/DC0/vm/c", Mode.FULL, (DiskSpec(2000, MIB),)))
        await hub.cancel(cancelled.id)
        await hub.create_backup(BackupRequest("/DC0/vm/d", Mode.FULL, (DiskSpec(2000, MIB), DiskSpec(2001, MIB))))
        await hub.alerts.fire(AlertKind.AT_RISK, "/DC0/vm/c", "no good point", key="/DC0/vm/c")

        status, content_type, text = await scrape(base)
        assert status == 200 and content_type.startswith("text/plain; version="), (status, content_type)
        found = samples(text)
        for state, count in (("completed", 2), ("failed", 1), ("cancelled", 1), ("running", 1)):
            assert value(found, "sendense_jobs", kind="backup", state=state) == count, state
        assert ("sendense_jobs", frozenset({("kind", "backup"), ("state", "pending")})) not in found
        assert value(found, "sendense_job_bytes_total", kind="backup") == 4 * MIB
        jobs = [await hub.job(done)] + [j for j in await hub.backups("/DC0/vm/b")]
        assert value(found, "sendense_job_duration_seconds_count") == 2
        assert value(found, "sendense_job_duration_seconds_bucket", le="+Inf") == 2
        assert value(found, "sendense_job_duration_seconds_sum") == pytest.approx(
            sum(j.updated - j.created for j in jobs)
        )
        assert value(found, "sendense_job_duration_seconds_bucket", le="60.0") == 2  # each took well under a minute
        for vm in ("/DC0/vm/a", "/DC0/vm/b"):
            assert 0 <= value(found, "sendense_last_good_point_age_seconds", vm=vm) < 600
        assert {labels for name, labels in found if name == "sendense_last_good_point_age_seconds"} == {
            frozenset({("vm", "/DC0/vm/a")}), frozenset({("vm", "/DC0/vm/b")})
        }  # fmt: skip
        usage = shutil.disk_usage(hub.config.repo)
        assert value(found, "sendense_repository_bytes", kind="total") == usage.total
        assert 0 < value(found, "sendense_repository_bytes", kind="free") <= usage.total
        assert value(found, "sendense_ports", state="leased") == 2  # the running job's two disks
        assert value(found, "sendense_ports", state="free") == POOL - 2
        assert value(found, "sendense_points", verify_state="unverified") == 2
        assert value(found, "sendense_points", verify_state="damaged") == 0
        assert value(found, "sendense_alerts_active", kind="at_risk") == 1
        assert value(found, "sendense_alerts_active", kind="low_space") == 0

        # A verify finds a's point damaged: a has no good point left, the verify results move.
        [point] = await hub.points("/DC0/vm/a")
        await hub._repository.set_verdict(point.id, VerifyState.DAMAGED, at=point.created, bad_offset=0, error="x")
        [point_b] = await hub.points("/DC0/vm/b")
        await hub._repository.set_verdict(point_b.id, VerifyState.VERIFIED, at=point.created, bad_offset=None,
                                          error=None)  # fmt: skip
        await hub.alerts.clear(AlertKind.AT_RISK, "/DC0/vm/c")
        found = samples((await scrape(base))[2])
        assert value(found, "sendense_points", verify_state="damaged") == 1
        assert value(found, "sendense_points", verify_state="verified") == 1
        assert value(found, "sendense_points", verify_state="unverified") == 0
        assert {labels for name, labels in found if name == "sendense_last_good_point_age_seconds"} == {
            frozenset({("vm", "/DC0/vm/b")})
        }
        assert value(found, "sendense_alerts_active", kind="at_risk") == 0


async def test_metrics_show_the_clusters_hubs_and_the_locks_live_hubs_hold(tmp_path: Path) -> None:
    """Hubs by state (live, lapsed: no heartbeat for --hub-lost, stopped, lost: taken over) and the cluster
    locks live hubs hold, with the oldest one's age; a lapsed hub's lock no longer counts."""
    clock = ManualClock(time.time())
    db = Database("sqlite:" + str(tmp_path / "hub.db"))
    a, b, c = (
        Cluster(
            db,
            clock,
            Identity(
                id=name,
                api_url=f"http://127.0.0.1:{port}",
                nbd_host="127.0.0.1",
                ports=range(port, port + 1),
                store="rbd://pool?conf=/etc/ceph/ceph.conf",
                local=False,
            ),
            heartbeat=HEARTBEAT,
            lapse=HUB_LOST,
        )  # fmt: skip
        for name, port in (("a", 10900), ("b", 10901), ("c", 10902))
    )
    metrics = HubMetrics(db, repo=str(tmp_path), pool_size=1, clock=clock, hub="a", lapse=HUB_LOST)

    async def scraped() -> Samples:
        return samples((await metrics.render()).decode())

    try:
        for hub in (a, b, c):
            await hub.join(None)
        found = await scraped()
        assert {state: value(found, "sendense_hubs", state=state) for state in HUB_STATES} == {
            "live": 3, "lapsed": 0, "stopped": 0, "lost": 0,
        }  # fmt: skip
        assert value(found, "sendense_cluster_locks") == 0 and value(found, "sendense_cluster_lock_oldest_seconds") == 0
        async with b.lock("admission"), c.lock("disk 2000 of /DC0/vm/a"):
            await clock.advance(HUB_LOST / 2)
            found = await scraped()
            assert value(found, "sendense_cluster_locks") == 2
            assert value(found, "sendense_cluster_lock_oldest_seconds") == HUB_LOST / 2
            await clock.advance(HUB_LOST / 2 + 1)  # b's heartbeat lapses; a and c beat
            assert await a.beat() and await c.beat()
            found = await scraped()
            assert (value(found, "sendense_hubs", state="live"), value(found, "sendense_hubs", state="lapsed")) == (
                2,
                1,
            )
            assert value(found, "sendense_cluster_locks") == 1  # c's: a lapsed hub's hold no longer counts
            [lapsed] = await a.lost()
            assert await a.take_over(lapsed)
            await c.leave()
            found = await scraped()
        assert {state: value(found, "sendense_hubs", state=state) for state in HUB_STATES} == {
            "live": 1, "lapsed": 0, "stopped": 1, "lost": 1,
        }  # fmt: skip
        assert value(found, "sendense_cluster_locks") == 0
    finally:
        db.close()


async def test_metrics_need_the_bearer_token(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, base):
        for token in (None, "wrong", TOKEN + "x"):
            status, content_type, text = await scrape(base, token)
            assert status == 401 and "unauthorized" in text and "sendense_jobs" not in text, (token, text)
        assert (await scrape(base))[0] == 200
        async with aiohttp.ClientSession() as session:  # /metrics is at the root, not under /api/v1
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(base + "/api/v1/metrics", headers=headers) as response:
                assert response.status == 404


async def test_the_vm_series_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_VMS", 2)
    async with served(tmp_path) as (hub, base):
        for vm in ("/DC0/vm/a", "/DC0/vm/b", "/DC0/vm/c"):
            await complete(hub, vm, MIB)
        with caplog.at_level(logging.WARNING, logger="sendense_nbd.hub.metrics"):
            for _ in range(2):
                found = samples((await scrape(base))[2])
                ages = {dict(labels)["vm"] for name, labels in found if name == "sendense_last_good_point_age_seconds"}
                assert ages == {"/DC0/vm/a", "/DC0/vm/b"}
        assert [r.getMessage() for r in caplog.records if r.name == "sendense_nbd.hub.metrics"] == [
            "more than 2 VMs have a good point: the metrics show the first 2 by path"
        ]
