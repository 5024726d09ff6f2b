"""The retention preview (``POST /policies/preview``, ``GET /policies/{name}/preview``): per VM the policy
covers, each disk's points with keep and the rules that keep them, by the code retention runs. An
in-process hub on a hand-moved clock makes real qcow2 points; the preview taken while a backup's retention
waits for the disk's lock is what that retention then leaves (one policy's preview: its rules alone; with
two policies covering the VM, the union of their previews stays)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.policy.model import Policy
from tests.hub.operating import LocalHub, local_hub
from tests.hub.test_retention import _AcceptingNode

pytestmark = pytest.mark.peer

VM, OTHER = "/DC0/vm/web01", "/DC1/vm/db01"
DISKS = (2000, 2001)
#: Noon UTC, 2026-03-01.
MARCH = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC).timestamp()
DAY = 86400.0
#: Keeps the newest point, and the newest of each of two months besides.
GFS = {
    "name": "gfs", "node": "nowhere", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 3600},
    "retention": {"keep_last": 1, "keep_monthly": 2}, "enabled": False,
}  # fmt: skip


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[LocalHub]:
    node = _AcceptingNode()
    await node.start()
    try:
        clock = ManualClock(MARCH)
        async with local_hub(tmp_path / "repo", clock=clock, node_url=node.url, keep_points=100) as running:
            for index, day in enumerate([0, 31, 62, 62.5, 63]):  # March, April, May (three); --keep 100 keeps all
                await clock.advance(MARCH + day * DAY - clock.now())
                for vm_path in (VM, OTHER):
                    await _backup(running, vm_path, index)
            yield running
    finally:
        await node.close()


async def _backup(hub: LocalHub, vm_path: str, index: int) -> None:
    """A backup of both disks (change IDs ``c{index}``), completed; its retention runs in the background."""
    disks = [{"key": key, "capacity": 4 << 20} for key in DISKS]
    job = await hub.ok("POST", "/backups", {"vm_path": vm_path, "disks": disks})
    report = [{"disk_key": key, "change_id": f"c{index}"} for key in DISKS]
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", {"status": "completed", "disks": report})


async def _changes(hub: LocalHub, vm_path: str, disk_key: int) -> list[str]:
    return [str(p.change_id) for p in await hub.hub.points(vm_path) if p.disk_key == disk_key]


def _verdicts(preview: dict[str, Any], disk_key: int) -> list[tuple[bool, list[str]]]:
    [vm] = preview["vms"]
    [disk] = [d for d in vm["disks"] if d["disk_key"] == disk_key]
    return [(point["keep"], point["rules"]) for point in disk["points"]]


def _kept(preview: dict[str, Any]) -> set[str]:
    return {p["id"] for vm in preview["vms"] for d in vm["disks"] for p in d["points"] if p["keep"]}


async def test_a_preview_names_the_rules_that_keep_each_point(hub: LocalHub) -> None:
    await hub.hub.settled()
    preview = await hub.ok("POST", "/policies/preview", GFS)  # its node is not registered: no matter
    assert preview["policy"] == "gfs" and [vm["vm_path"] for vm in preview["vms"]] == [VM]  # OTHER: not covered
    points = await hub.hub.points(VM)
    for disk_key in DISKS:
        # March and April: monthly; May 62 and 62.5 go (May is covered by the newest, kept by last)
        assert _verdicts(preview, disk_key) == [
            (True, ["monthly"]), (True, ["monthly"]), (False, []), (False, []), (True, ["last"]),
        ]  # fmt: skip
        [disk] = [d for d in preview["vms"][0]["disks"] if d["disk_key"] == disk_key]
        shown = [(p["id"], p["time"], p["kind"], p["size"]) for p in disk["points"]]
        assert shown == [(p.id, p.completed, p.kind.value, p.size) for p in points if p.disk_key == disk_key]
        assert (disk["keep"], disk["remove"]) == (3, 2)
    assert (await hub.ok("GET", "/policies"))["policies"] == []  # nothing stored
    everything = await hub.ok("POST", "/policies/preview", {**GFS, "retention": None})
    assert _verdicts(everything, 2000) == [(True, ["all"])] * 5
    nobody = await hub.ok("POST", "/policies/preview", {**GFS, "vms": {"include": ["/DC9"]}})
    assert nobody == {"policy": "gfs", "vms": []}
    assert [p.to_json() for p in await hub.hub.retention_preview(Policy.from_json(GFS))] == preview["vms"]


async def test_retention_then_drops_exactly_what_the_preview_said(hub: LocalHub) -> None:
    await hub.hub.settled()
    policy = Policy.from_json({**GFS, "node": None})
    await hub.hub.scheduler.store.add(policy, hub.clock.now())
    await hub.clock.advance(3600)
    repository = hub.hub._repository
    async with repository.disk_lock(VM, DISKS[0]), repository.disk_lock(VM, DISKS[1]):
        # the backup's retention waits for the disks: the preview sees the points it will judge
        await _backup(hub, VM, 5)
        preview = await hub.ok("GET", "/policies/gfs/preview")
        assert preview == await hub.ok("POST", "/policies/preview", GFS)
    await hub.hub.settled()
    assert {p.id for p in await hub.hub.points(VM)} == _kept(preview)
    assert await _changes(hub, VM, 2000) == await _changes(hub, VM, 2001) == ["c0", "c1", "c5"]
    assert len(await hub.hub.points(OTHER)) == 10  # no policy covers it: --keep 100


async def test_with_two_policies_the_union_of_their_previews_stays(hub: LocalHub) -> None:
    await hub.hub.settled()
    recent = {**GFS, "name": "recent", "vms": {"include": [VM]}, "retention": {"keep_daily": 2}}
    for spec in (GFS, recent):
        await hub.hub.scheduler.store.add(Policy.from_json({**spec, "node": None}), hub.clock.now())
    await hub.clock.advance(3600)
    async with hub.hub._repository.disk_lock(VM, DISKS[0]), hub.hub._repository.disk_lock(VM, DISKS[1]):
        await _backup(hub, VM, 5)
        previews = [await hub.ok("GET", f"/policies/{name}/preview") for name in ("gfs", "recent")]
    # recent alone: the newest of each of the last two days (May 2 12:00, May 3 13:00); gfs drops the first
    daily, out = (True, ["daily"]), (False, [])
    assert _verdicts(previews[1], 2000) == [out, out, daily, out, out, daily]
    assert _verdicts(previews[0], 2000)[2] == out
    await hub.hub.settled()
    assert {p.id for p in await hub.hub.points(VM)} == _kept(previews[0]) | _kept(previews[1])
    assert await _changes(hub, VM, 2000) == await _changes(hub, VM, 2001) == ["c0", "c1", "c2", "c5"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "gfs", "vms": {"include": ["/DC0/vm"]}}, "a policy needs vms and schedule"),
        ({**GFS, "keep": 1}, "unknown field 'keep'"),
        ({**GFS, "retention": {"keep_last": -1}}, "retention.keep_last must be an integer"),
        ({**GFS, "vms": {"include": []}}, "vms.include names at least one"),
    ],
)
async def test_a_bad_policy_is_400(hub: LocalHub, body: dict[str, Any], message: str) -> None:
    status, answer = await hub.call("POST", "/policies/preview", body)
    assert status == 400 and message in answer["error"]["message"], answer


@pytest.mark.parametrize("name", ["nosuch", "bad%20name"])
async def test_the_preview_of_an_unknown_policy_is_404(hub: LocalHub, name: str) -> None:
    status, answer = await hub.call("GET", f"/policies/{name}/preview")
    assert status == 404 and answer["error"]["code"] == "not_found", answer
