"""GFS retention applied to real qcow2 chains by the repository's merge: the points ``select`` removes
are dropped oldest first (a full's successor becomes the full, a middle overlay's successor keeps the
dropped point's base), the newest is never dropped, every kept point reads exactly as before
(qemu-img compare) and passes qemu-img check, a crash around a middle point's merge is finished
by ``recover``; the hub applies a policy job's rules, and ``--keep N`` to other jobs."""

from __future__ import annotations

import datetime as dt
import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from sendense_nbd.backup.records import FullReason, Mode, SyncType
from sendense_nbd.errors import RepositoryError
from sendense_nbd.hub.db import Connection
from sendense_nbd.hub.policies import PolicyStore
from sendense_nbd.hub.repository import LocalStore, Point, PointStatus, Repository, VerifyState
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec, ReportedDisk
from sendense_nbd.hub.service import Hub, HubConfig
from sendense_nbd.policy.model import Policy, Retention
from sendense_nbd.policy.retention import Candidate, select
from sendense_nbd.storage.qcow2 import commit as qcow2_commit
from sendense_nbd.storage.qcow2.commit import commit
from tests.conftest import require, run
from tests.hub.conftest import free_port_range, open_hub_store

pytestmark = pytest.mark.peer

VM = "/DC0/vm/web01"
DISK = 2000
MIB = 1 << 20
CHUNK = 64 << 10
#: Noon UTC, 2026-06-01 (a Monday).
MONDAY = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC).timestamp()


def _write(path: str, index: int) -> None:
    """Point ``index`` writes its own pattern at its own offset and over the previous point's
    offset, and zeroes the block two points back (a zero that must hide older data)."""
    commands = [
        f"write -P {0x10 + index} {index * CHUNK} {CHUNK}",
        f"write -P {0x80 + index} {(index - 1) % 8 * CHUNK} 4096",
    ]
    if index >= 2:
        commands.append(f"write -z {(index - 2) * CHUNK} 4096")
    args = [a for command in commands for a in ("-c", command)]
    run(require("qemu-io"), "-f", "qcow2", *args, path)


async def _chain(repository: Repository, tmp_path: Path, times: list[float]) -> tuple[list[Point], dict[str, Path]]:
    """One point per completion time (a full, then overlays), each with different data; the raw
    content every point reads as, taken before any retention."""
    points, content = [], {}
    for index, when in enumerate(times):
        point = await repository.new_point(VM, DISK, f"job{index}", incremental=index > 0, capacity=MIB)
        _write(point.path, index)
        await repository.complete([(point.id, ReportedDisk(DISK, f"change-{index}", None))])

        def stamp(connection: Connection, point_id: str = point.id, when: float = when) -> None:
            connection.execute("UPDATE points SET created = ?, completed = ? WHERE id = ?", (when, when, point_id))

        await repository.db.run(stamp)
        raw = tmp_path / f"{point.id}.raw"
        run(require("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", point.path, str(raw))
        content[point.id] = raw
        points.append(point)
    return points, content


async def _check_kept(repository: Repository, content: dict[str, Path], kept: list[str]) -> None:
    """The kept points, oldest first: a full and overlays each on the one before, every image checked
    and reading exactly as before; no other image left in the disk's folder."""
    chain = await repository.points(VM, DISK)
    assert [p.id for p in chain] == kept
    assert (chain[0].kind, chain[0].backing) == (SyncType.FULL, None)
    for below, above in zip(chain, chain[1:]):
        assert (above.kind, above.backing) == (SyncType.INCREMENTAL, below.id)
    for point in chain:
        assert point.status is PointStatus.COMPLETED
        assert point.change_id == f"change-{int(point.job_id.removeprefix('job'))}"
        run(require("qemu-img"), "check", "-f", "qcow2", point.path)
        run(require("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", point.path, str(content[point.id]))
    folder = LocalStore(repository.root).disk_dir(VM, DISK)
    assert sorted(f for f in os.listdir(folder) if f.endswith(".qcow2")) == sorted(f"{p}.qcow2" for p in kept)


@pytest.mark.parametrize(
    ("hours", "rules", "kept_indexes"),
    [
        # keep_last as --keep N was: the oldest ones go, each into the full below
        ([0, 1, 2, 3, 4], Retention(keep_last=2), [3, 4]),
        # two a day for three days, keep_daily 3: the mornings go, the first one a full, the others middles
        ([0, 10, 24, 34, 48, 58], Retention(keep_daily=3), [1, 3, 5]),
        # a middle run and the full: daily 2 keeps the last two days, weekly 2 the Sunday before
        ([-30, -20, -12, 0, 4, 24], Retention(keep_daily=2, keep_weekly=2), [1, 4, 5]),
        # last 1 + monthly 2 over three months: one per earlier month, the newest
        ([-24 * 62, -24 * 40, -24 * 31, -24 * 3, -24, 0], Retention(keep_last=1, keep_monthly=2), [1, 4, 5]),
        ([0, 5], Retention(keep_daily=1), [1]),  # down to a single full
        ([0, 5, 9], Retention(), [0, 1, 2]),  # no rule: everything stays
    ],
)
async def test_retention_drops_what_select_removes_and_keeps_every_view(
    repository: Repository, tmp_path: Path, hours: list[int], rules: Retention, kept_indexes: list[int]
) -> None:
    times = [MONDAY + h * 3600 for h in hours]
    points, content = await _chain(repository, tmp_path, times)
    decision = select([Candidate(p.id, t) for p, t in zip(points, times)], rules)
    assert sorted(decision.keep) == sorted(points[i].id for i in kept_indexes)  # the cases say what they test
    dropped = await repository.apply_retention(VM, DISK, [(rules, "UTC")])
    assert dropped == list(decision.remove)
    await _check_kept(repository, content, [points[i].id for i in kept_indexes])
    assert await repository.apply_retention(VM, DISK, [(rules, "UTC")]) == []  # nothing more to drop


async def test_periods_follow_the_time_zone(repository: Repository, tmp_path: Path) -> None:
    # 22:30 and 23:30 UTC on one day are 00:30 and 01:30 of the next in Berlin (summer): with 20:00 UTC
    # that day, UTC sees one day, Berlin two
    times = [MONDAY + h * 3600 for h in (8, 10.5, 11.5)]
    points, content = await _chain(repository, tmp_path, times)
    assert await repository.apply_retention(VM, DISK, [(Retention(keep_daily=5), "Europe/Berlin")]) == [points[1].id]
    await _check_kept(repository, content, [points[0].id, points[2].id])


async def test_a_crash_between_marking_a_middle_point_and_merging_it_is_finished_by_recover(
    repository: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    times = [MONDAY + h * 3600 for h in (0, 24, 30, 48)]  # day 2 has a morning point (a middle overlay)
    points, content = await _chain(repository, tmp_path, times)
    rules = Retention(keep_daily=3)

    async def crash(base: Point, top: Point) -> None:
        raise RuntimeError("the hub died here")

    monkeypatch.setattr(repository, "_merge", crash)
    with pytest.raises(RuntimeError, match="died"):
        await repository.apply_retention(VM, DISK, [(rules, "UTC")])
    monkeypatch.undo()
    middle = points[1]
    assert (await repository.point(middle.id)).status is PointStatus.MERGING
    assert [p.id for p in await repository.points(VM, DISK)] == [points[0].id, points[2].id, points[3].id]
    restarted = Repository(repository.root, repository.db)
    assert await restarted.recover() == ([], [middle.id])
    await _check_kept(restarted, content, [points[0].id, points[2].id, points[3].id])
    assert await restarted.apply_retention(VM, DISK, [(rules, "UTC")]) == []


async def test_a_crash_after_the_rename_of_a_middle_point_is_finished_by_recover(
    repository: Repository, tmp_path: Path
) -> None:
    times = [MONDAY + h * 3600 for h in (0, 24, 30, 48)]
    points, content = await _chain(repository, tmp_path, times)
    middle, top = points[1], points[2]

    def mark(connection: Connection) -> None:
        connection.execute("UPDATE points SET status = ? WHERE id = ?", (PointStatus.MERGING.value, middle.id))

    await repository.db.run(mark)
    commit(top.path)  # the merge's file work done, its record not: the hub died in between
    os.replace(middle.path, top.path)
    restarted = Repository(repository.root, repository.db)
    assert await restarted.recover() == ([], [middle.id])
    await _check_kept(restarted, content, [points[0].id, points[2].id, points[3].id])


class _AcceptingNode:
    """A node API that takes every backup the hub starts (the test reports their completion itself)."""

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def accept(request: web.Request) -> web.Response:
            return web.json_response({}, status=202)

        app = web.Application()
        app.add_routes([web.post("/api/v1/backups", accept)])
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _store(hub: Hub, change: Callable[[PolicyStore], Awaitable[object]]) -> None:
    """A change to the hub's policies through a second connection to its store (as another hub process would)."""
    db = open_hub_store(hub.config.repo)
    try:
        await change(PolicyStore(db))
    finally:
        db.close()


async def test_a_policy_job_applies_its_policy_rules_and_other_jobs_keep_the_last_keep(tmp_path: Path) -> None:
    node = _AcceptingNode()
    await node.start()
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4), node_url=node.url, keep_points=3))
    await hub.start()
    try:
        policy = Policy.from_json({"name": "two", "vms": {"include": [VM]}, "schedule": {"every": 3600},
                                   "retention": {"keep_last": 2}})  # fmt: skip
        await _store(hub, lambda store: store.add(policy, 0.0))
        other = "/DC0/vm/db01"
        for round_ in range(5):
            for vm, name in ((VM, "two"), (other, None)):
                request = BackupRequest(vm, Mode.AUTO, (DiskSpec(DISK, MIB),), policy=name)
                job = await hub.create_backup(request)
                await hub.complete(job.id, Completion(vm, (ReportedDisk(DISK, f"change-{round_}", None),)))
        await hub.settled()  # retention runs after the completion's answer
        kept = await hub.points(VM)
        assert [p.change_id for p in kept] == ["change-3", "change-4"]
        assert [p.kind for p in kept] == [SyncType.FULL, SyncType.INCREMENTAL]
        assert [p.change_id for p in await hub.points(other)] == ["change-2", "change-3", "change-4"]
        await _store(hub, lambda store: store.delete("two"))  # a job whose policy is gone: --keep applies
        job = await hub.create_backup(BackupRequest(VM, Mode.AUTO, (DiskSpec(DISK, MIB),), policy="two"))
        await hub.complete(job.id, Completion(VM, (ReportedDisk(DISK, "change-5", None),)))
        await hub.settled()
        assert [p.change_id for p in await hub.points(VM)] == ["change-3", "change-4", "change-5"]
    finally:
        await hub.wait_closed()
        await node.close()


async def test_a_failed_merge_is_finished_by_the_next_retention(
    repository: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    times = [MONDAY + h * 3600 for h in (0, 1, 2, 3)]
    points, content = await _chain(repository, tmp_path, times)
    rules = [(Retention(keep_last=2), "UTC")]
    real_commit = qcow2_commit.commit
    failures = []

    def full_disk_once(path: str) -> None:
        if not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_commit(path)

    monkeypatch.setattr(qcow2_commit, "commit", full_disk_once)
    with pytest.raises(OSError, match="No space"):
        await repository.apply_retention(VM, DISK, rules)
    assert failures == [points[1].path]  # the first dropped point's successor was being committed
    assert (await repository.point(points[0].id)).status is PointStatus.MERGING
    with pytest.raises(RepositoryError, match="is gone"):
        await repository.chain(points[3])  # what a stuck merge did to verify and restores
    # The next retention (no restart) finishes that merge first, then drops what its rules drop.
    assert await repository.apply_retention(VM, DISK, rules) == [points[0].id, points[1].id]
    await _check_kept(repository, content, [points[2].id, points[3].id])
    assert [p.id for p in await repository.chain(points[3])] == [points[3].id, points[2].id]


async def test_a_chain_with_a_damaged_point_below_is_no_base(repository: Repository, tmp_path: Path) -> None:
    points, _ = await _chain(repository, tmp_path, [MONDAY + h * 3600 for h in (0, 1, 2)])
    assert await repository.base_for(VM, DISK) == (await repository.point(points[2].id), None)
    await repository.set_verdict(points[1].id, VerifyState.DAMAGED, at=MONDAY, bad_offset=0, error="flipped")
    base, reason = await repository.base_for(VM, DISK)
    assert (base, reason) == (None, FullReason.VERIFY_FAILED)  # the newest point itself is not damaged
    await repository.set_verdict(points[1].id, VerifyState.VERIFIED, at=MONDAY, bad_offset=None, error=None)
    assert (await repository.base_for(VM, DISK))[0] == await repository.point(points[2].id)


#: March, April and May (three) 2026 at noon, midnight and noon.
MONTHS = [MONDAY + (d - 92) * 86400 for d in (0, 31, 62, 62.5, 63)]


@pytest.mark.parametrize(
    ("rules", "kept_indexes"),
    [
        ([(Retention(keep_last=2), "UTC")], [3, 4]),
        ([(Retention(keep_monthly=3), "UTC")], [0, 1, 4]),
        # two policies cover the VM: a point either keeps stays
        ([(Retention(keep_last=2), "UTC"), (Retention(keep_monthly=3), "UTC")], [0, 1, 3, 4]),
        ([], [0, 1, 2, 3, 4]),  # no rules: everything stays
    ],
)
async def test_a_point_any_rule_set_keeps_stays(
    repository: Repository, tmp_path: Path, rules: list[tuple[Retention, str]], kept_indexes: list[int]
) -> None:
    points, content = await _chain(repository, tmp_path, MONTHS)
    await repository.apply_retention(VM, DISK, rules)
    await _check_kept(repository, content, [points[i].id for i in kept_indexes])


async def test_a_point_being_restored_and_the_points_below_it_stay(repository: Repository, tmp_path: Path) -> None:
    points, content = await _chain(repository, tmp_path, MONTHS)
    restoring = {points[1].id, "a-point-of-another-disk"}

    async def protected() -> set[str]:
        return restoring

    rules = [(Retention(keep_last=1), "UTC")]
    assert await repository.apply_retention(VM, DISK, rules, protected=protected) == [points[2].id, points[3].id]
    await _check_kept(repository, content, [points[0].id, points[1].id, points[4].id])
    restoring.clear()  # the restore ended: the next retention drops what the rules drop
    assert await repository.apply_retention(VM, DISK, rules, protected=protected) == [points[0].id, points[1].id]
    await _check_kept(repository, content, [points[4].id])
