"""The repository's space over time: an in-process hub on a hand-moved clock samples ``GET /repository``'s
numbers when it starts, every 10 minutes on its clock and after each backup (at most one a minute),
keeps 35 days, and ``GET /repository/history?hours=N`` lists the last N hours."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.space_history import INTERVAL, SpaceSample
from tests.hub.operating import START, LocalHub, local_hub
from tests.hub.test_retention import _AcceptingNode

pytestmark = pytest.mark.peer

VM = "/DC0/vm/web01"
DAY = 86400.0


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[LocalHub]:
    node = _AcceptingNode()
    await node.start()
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=node.url) as running:
            await _samples(running, 1)  # the one taken at the start
            yield running
    finally:
        await node.close()


async def _samples(hub: LocalHub, count: int) -> list[SpaceSample]:
    """The hub's samples once there are ``count`` (the sampler runs in the background)."""
    deadline = time.monotonic() + 20
    while len(found := await hub.hub.space_history(0)) < count:
        assert time.monotonic() < deadline, f"{count} samples expected, {len(found)} taken"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # and no more than that
    found = await hub.hub.space_history(0)
    assert len(found) == count, found
    return found


async def _backup(hub: LocalHub) -> None:
    job = await hub.ok("POST", "/backups", {"vm_path": VM, "disks": [{"key": 2000, "capacity": 4 << 20}]})
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", {"status": "completed", "disks": [{"disk_key": 2000}]})
    await hub.hub.settled()


async def test_the_hub_samples_what_get_repository_shows_every_ten_minutes(hub: LocalHub) -> None:
    [first] = await _samples(hub, 1)
    usage = await hub.ok("GET", "/repository")
    assert first.t == START and first.total == usage["total"] > 0
    assert 0 < first.used <= first.total and 0 < first.free <= first.total
    await hub.clock.advance(INTERVAL)
    assert [s.t for s in await _samples(hub, 2)] == [START, START + INTERVAL]
    await hub.clock.advance(INTERVAL - 1)
    await _samples(hub, 2)
    await hub.clock.advance(1)
    history = await _samples(hub, 3)
    assert [s.t for s in history] == [START, START + INTERVAL, START + 2 * INTERVAL]
    answer = await hub.ok("GET", "/repository/history")
    assert answer["since"] == START + 2 * INTERVAL - 168 * 3600
    assert answer["samples"] == [s.to_json() for s in history]
    assert set(answer["samples"][0]) == {"t", "total", "used", "free"}


async def test_a_backup_adds_a_sample_at_most_once_a_minute(hub: LocalHub) -> None:
    await hub.clock.advance(120)
    await _backup(hub)
    assert [s.t for s in await _samples(hub, 2)] == [START, START + 120]
    await hub.clock.advance(59)
    await _backup(hub)
    await _samples(hub, 2)
    await hub.clock.advance(1)
    await _backup(hub)
    assert [s.t for s in await _samples(hub, 3)][-1] == START + 180


async def test_35_days_are_kept_and_hours_picks_the_last_of_them(hub: LocalHub) -> None:
    await hub.clock.advance(8 * DAY)
    await _samples(hub, 2)

    async def times(query: str) -> list[float]:
        return [s["t"] for s in (await hub.ok("GET", "/repository/history" + query))["samples"]]

    assert await times("") == [START + 8 * DAY]  # the default: the last 168 hours
    assert await times("?hours=1") == [START + 8 * DAY]
    assert await times("?hours=192") == [START, START + 8 * DAY]
    assert await times("?hours=840") == [START, START + 8 * DAY]
    await hub.clock.advance(30 * DAY)  # 38 days after the first: it goes
    history = await _samples(hub, 2)
    assert [s.t for s in history] == [START + 8 * DAY, START + 38 * DAY]
    assert await times("?hours=840") == [START + 8 * DAY, START + 38 * DAY]


@pytest.mark.parametrize("query", ["hours=0", "hours=841", "hours=-1", "hours=1.5", "hours=x", "hours=", "days=1"])
async def test_a_bad_hours_is_400(hub: LocalHub, query: str) -> None:
    status, answer = await hub.call("GET", "/repository/history?" + query)
    assert status == 400 and answer["error"]["code"] == "bad_request", answer
    assert "hours" in answer["error"]["message"]
