"""The backup repository: per VM and disk, a full qcow2 and incremental overlays on it.

Layout::

    ROOT/vms/<vm-slug>/<disk-key>/<point-id>.qcow2     backing files named relative to their folder

A point (:class:`PointStatus`) is ``pending`` while its job writes it, then
``completed`` (with the disk's change ID) or discarded (its file deleted).
Only completed points are restore points or backing files. Its kind is the
backup's :class:`~sendense_nbd.backup.records.SyncType`: a full image or an
incremental overlay. The store holds both enums' values (the plain strings).
Retention (GFS rules, :mod:`sendense_nbd.policy.retention`) drops points
by merging: a dropped point's successor overlay is committed into it, its
image takes the successor's file name, and the result is checked (the
dropped point is ``merging`` meanwhile).

Each point may have a digest sidecar ``<point-id>.digests`` next to its image
(:mod:`sendense_nbd.copy.digests`, written by :mod:`sendense_nbd.hub.verify`)
and a verify state (:class:`VerifyState`). A merge keeps the surviving point's
sidecar (its view is unchanged) and removes the dropped point's. Work that
reads or rewrites a disk's chain (digests, verify, a merge) holds that disk's
:meth:`Repository.disk_lock`. A point whose chain holds a damaged point is never a base
(:meth:`Repository.base_for`).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import attrs

from sendense_nbd.backup.records import FullReason, SyncType
from sendense_nbd.errors import ImageError, RepositoryError, UnknownPoint
from sendense_nbd.hub.clock import Clock, SystemClock
from sendense_nbd.hub.db import Database, rows
from sendense_nbd.hub.requests import ReportedDisk
from sendense_nbd.policy.model import Retention
from sendense_nbd.policy.retention import Candidate, select
from sendense_nbd.storage.files import is_temporary, remove_quietly, sync_directory
from sendense_nbd.storage.modes import ImageFormat

log = logging.getLogger(__name__)


class PointStatus(enum.Enum):
    """Where a point is in its life; the values are what the store holds."""

    #: Its job is writing it.
    PENDING = "pending"
    #: A restore point, and a backing file for the next incremental.
    COMPLETED = "completed"
    #: Retention is committing it into the point above (:meth:`Repository.recover` finishes that).
    MERGING = "merging"


class VerifyState(enum.Enum):
    """What the last verify found of a point; the values are what the store holds."""

    UNVERIFIED = "unverified"
    VERIFIED = "verified"
    DAMAGED = "damaged"


@attrs.frozen
class Point:
    """A restore point: one disk's image at one backup, a full qcow2 or an overlay on ``backing``."""

    id: str
    vm_path: str
    disk_key: int
    job_id: str
    kind: SyncType
    path: str
    backing: str | None
    size: int
    change_id: str | None
    disk_uuid: str | None
    status: PointStatus
    created: float
    completed: float | None
    #: What the job that made the point reported (docs/HUB_API.md); None: not reported.
    bytes_changed: int | None = None
    bytes_transferred: int | None = None
    #: The last verify's finding, when (epoch seconds), the first bad byte offset and why.
    verify_state: VerifyState = VerifyState.UNVERIFIED
    verified_at: float | None = None
    bad_offset: int | None = None
    verify_error: str | None = None
    #: The digest sidecar's file name next to the image; None until it is computed.
    digests: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Point:
        """A point from its row in the store."""
        state = VerifyState(row.get("verify_state") or VerifyState.UNVERIFIED.value)
        return cls(
            **{**row, "kind": SyncType(row["kind"]), "status": PointStatus(row["status"]), "verify_state": state}
        )

    def to_json(self) -> dict[str, object]:
        """The point as the API shows it (and the store holds it): the enums as their values."""
        return {
            **attrs.asdict(self),
            "kind": self.kind.value,
            "status": self.status.value,
            "verify_state": self.verify_state.value,
        }

    @property
    def digest_path(self) -> str:
        """Where the point's digest sidecar is (or goes): ``<point-id>.digests`` next to its image."""
        return os.path.join(os.path.dirname(self.path), f"{self.id}.digests")


def vm_slug(vm_path: str) -> str:
    """A folder name for a VM: readable, and unique through a short hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", vm_path.strip("/"))[:80] or "vm"
    return f"{readable}-{hashlib.sha256(vm_path.encode()).hexdigest()[:8]}"


class Repository:
    """The points of every VM's disks: their images under ``root`` and their rows in the hub's store."""

    def __init__(self, root: str, db: Database, *, clock: Clock | None = None) -> None:
        self.root = os.path.abspath(root)
        self.db = db
        #: Points' creation and completion times (and so retention's periods) come from it.
        self.clock: Clock = clock or SystemClock()
        self._disk_locks: dict[tuple[str, int], asyncio.Lock] = {}

    def disk_lock(self, vm_path: str, disk_key: int) -> asyncio.Lock:
        """The lock of one disk's chain: digests, verify and retention merges take it (FIFO, one at a time)."""
        return self._disk_locks.setdefault((vm_path, disk_key), asyncio.Lock())

    def disk_dir(self, vm_path: str, disk_key: int) -> str:
        """The folder of one disk's images."""
        return os.path.join(self.root, "vms", vm_slug(vm_path), str(disk_key))

    async def points(self, vm_path: str, disk_key: int | None = None) -> list[Point]:
        """A VM's completed points (of one disk, when given), by disk and age."""

        def read(connection: sqlite3.Connection) -> list[Point]:
            sql = "SELECT * FROM points WHERE vm_path = ? AND status = ?"
            args: list[object] = [vm_path, PointStatus.COMPLETED.value]
            if disk_key is not None:
                sql += " AND disk_key = ?"
                args.append(disk_key)
            found = connection.execute(sql + " ORDER BY disk_key, created, rowid", args)  # rowid: a tie's order
            return [Point.from_row(r) for r in rows(found)]

        return await self.db.run(read)

    async def vm_paths(self) -> list[str]:
        """The VMs that have completed points, sorted."""

        def read(connection: sqlite3.Connection) -> list[str]:
            found = connection.execute(
                "SELECT DISTINCT vm_path FROM points WHERE status = ? ORDER BY vm_path", (PointStatus.COMPLETED.value,)
            )
            return [row[0] for row in found]

        return await self.db.run(read)

    async def point(self, point_id: str) -> Point:
        """One point by ID; :class:`UnknownPoint` if there is none."""

        def read(connection: sqlite3.Connection) -> list[Point]:
            return [
                Point.from_row(r) for r in rows(connection.execute("SELECT * FROM points WHERE id = ?", (point_id,)))
            ]

        found = await self.db.run(read)
        if not found:
            raise UnknownPoint(f"no restore point {point_id}")
        return found[0]

    async def latest(self, vm_path: str, disk_key: int) -> Point | None:
        """A disk's newest completed point, if any."""
        points = await self.points(vm_path, disk_key)
        return points[-1] if points else None

    async def base_for(self, vm_path: str, disk_key: int) -> tuple[Point | None, FullReason | None]:
        """The point the disk's next incremental builds on, or None and why the next backup is full."""
        latest = await self.latest(vm_path, disk_key)
        if latest is None:
            return None, FullReason.FIRST_BACKUP
        try:
            chain = await self.chain(latest)
        except RepositoryError:  # a point below is gone (or mid-merge)
            return None, FullReason.BASE_MISSING
        if any(p.verify_state is VerifyState.DAMAGED for p in chain):
            return None, FullReason.VERIFY_FAILED
        if not latest.change_id:
            return None, FullReason.BASE_MISSING
        return latest, None

    async def new_point(
        self, vm_path: str, disk_key: int, job_id: str, *, incremental: bool, capacity: int | None
    ) -> Point:
        """Create the image a backup job writes: an overlay on the latest point, or a full image."""
        from sendense_nbd.storage import create_image

        latest = await self.latest(vm_path, disk_key)
        base = latest if incremental and latest and latest.verify_state is not VerifyState.DAMAGED else None
        if base is None and capacity is None and incremental and latest is not None:
            capacity = latest.size  # a full after a damaged point: the disk's size is known
        if base is None and capacity is None:
            raise RepositoryError(f"{vm_path} disk {disk_key}: a full point needs the disk's capacity")
        folder = self.disk_dir(vm_path, disk_key)
        point_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        path = os.path.join(folder, f"{point_id}.qcow2")
        backing = os.path.basename(base.path) if base else None

        def create() -> int:
            os.makedirs(folder, exist_ok=True)
            create_image(
                path, None if base else capacity, ImageFormat.QCOW2, backing_file=backing, backing_format="qcow2"
            )
            return os.path.getsize(path)

        try:
            await asyncio.to_thread(create)
        except (OSError, ImageError) as exc:
            raise RepositoryError(f"cannot create {path}: {exc}") from exc
        size = base.size if base else int(capacity or 0)
        point = Point(
            point_id, vm_path, disk_key, job_id, SyncType.INCREMENTAL if base else SyncType.FULL, path,
            base.id if base else None, size, None, None, PointStatus.PENDING, self.clock.now(), None,
        )  # fmt: skip

        def insert(connection: sqlite3.Connection) -> None:
            row = point.to_json()
            names, marks = ", ".join(row), ", ".join("?" * len(row))
            connection.execute(f"INSERT INTO points ({names}) VALUES ({marks})", tuple(row.values()))

        await self.db.run(insert)
        return point

    async def complete(self, results: list[tuple[str, ReportedDisk]]) -> None:
        """Mark points completed with what their disk's job reported, all in one transaction."""

        def update(connection: sqlite3.Connection) -> None:
            now = self.clock.now()
            for point_id, disk in results:
                cursor = connection.execute(
                    "UPDATE points SET status = ?, completed = ?, change_id = ?, disk_uuid = ?, bytes_changed = ?, "
                    "bytes_transferred = ? WHERE id = ? AND status = ?",
                    (
                        PointStatus.COMPLETED.value,
                        now,
                        disk.change_id,
                        disk.disk_uuid,
                        disk.bytes_changed,
                        disk.bytes_transferred,
                        point_id,
                        PointStatus.PENDING.value,
                    ),
                )
                if cursor.rowcount != 1:
                    raise RepositoryError(f"restore point {point_id} is not pending")

        await self.db.run(update)

    async def discard(self, point_id: str) -> None:
        """Delete a pending (failed) point: its image first, so a full filesystem has room for the
        store's write again (after a crash between the two, :meth:`recover` discards the row)."""
        where = (point_id, PointStatus.PENDING.value)

        def read(connection: sqlite3.Connection) -> list[str]:
            return [r[0] for r in connection.execute("SELECT path FROM points WHERE id = ? AND status = ?", where)]

        def delete(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM points WHERE id = ? AND status = ?", where)

        for path in await self.db.run(read):
            await asyncio.to_thread(remove_quietly, path)
        await self.db.run(delete)

    async def discard_pending(self) -> list[str]:
        """Discard every pending point (after a crash); their ids."""

        def read(connection: sqlite3.Connection) -> list[str]:
            return [
                r[0] for r in connection.execute("SELECT id FROM points WHERE status = ?", (PointStatus.PENDING.value,))
            ]

        pending = await self.db.run(read)
        for point_id in pending:
            await self.discard(point_id)
        return pending

    async def apply_retention(
        self,
        vm_path: str,
        disk_key: int,
        rules: Sequence[tuple[Retention, str]],
        *,
        protected: Callable[[], Awaitable[Collection[str]]] | None = None,
    ) -> list[str]:
        """Drop the completed points of a disk that no set of ``rules`` keeps, oldest first; their ids.

        ``rules`` are ``(Retention, timezone)`` pairs (every policy covering
        the VM); :func:`sendense_nbd.policy.retention.select` decides for each
        over the points' completion times, and a point any of them keeps
        stays (no rules: everything stays). ``protected()`` (read under the
        disk's lock) names points in use (a restore serves or converts them):
        they and the points below them stay. The newest point is never
        dropped. A dropped point takes in the point above it (see
        :meth:`_merge`), which keeps its ID, change ID and view. Each dropped
        point is marked ``merging`` first; merges a crash or an error left
        are finished first (as :meth:`recover` does) and counted as dropped.
        """
        async with self.disk_lock(vm_path, disk_key):  # never while its digests or a verify read the chain
            dropped = await self._finish_merges(vm_path, disk_key)
            chain = await self.points(vm_path, disk_key)
            keep = _kept(chain, rules, set(await protected()) if protected is not None else set())
            for point_id in [p.id for p in chain if p.id not in keep]:
                chain = await self.points(vm_path, disk_key)  # each merge changes a backing
                point = next((p for p in chain[:-1] if p.id == point_id), None)
                top = next((p for p in chain if point is not None and p.backing == point.id), None)
                if point is None or top is None:
                    log.warning("retention: %s disk %s: point %s left the chain", vm_path, disk_key, point_id)
                    continue
                await self._drop(point, top)
                dropped.append(point.id)
                log.info("retention: %s disk %s: point %s merged into %s", vm_path, disk_key, point.id, top.id)
        return dropped

    async def _drop(self, point: Point, top: Point) -> None:
        def mark(connection: sqlite3.Connection) -> None:
            connection.execute("UPDATE points SET status = ? WHERE id = ?", (PointStatus.MERGING.value, point.id))

        await self.db.run(mark)
        await self._merge(point, top)

    async def _merge(self, base: Point, top: Point) -> None:
        """Drop ``base`` into ``top``, the overlay on it: ``top`` is committed into ``base``'s image,
        which is renamed over ``top``'s file (so the overlays above keep their backing name) and
        checked; ``top`` then takes ``base``'s kind and backing (a full stays full, a middle overlay
        keeps its own base). Safe to repeat after a crash at any step (the commit leaves ``top`` as it was).
        """
        from sendense_nbd.storage.qcow2.check import check_image
        from sendense_nbd.storage.qcow2.commit import commit

        def merge() -> None:
            if os.path.exists(base.path):
                commit(top.path)
                os.replace(base.path, top.path)  # base's image now holds the top's point in time
                sync_directory(os.path.dirname(top.path))
            result = check_image(top.path)
            if result.corruptions or result.check_errors:
                raise RepositoryError(f"{top.path}: qcow2 check failed after merging: {result.to_json()}")

        await asyncio.to_thread(merge)

        def record(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM points WHERE id = ?", (base.id,))
            connection.execute(
                "UPDATE points SET kind = ?, backing = ? WHERE id = ?", (base.kind.value, base.backing, top.id)
            )

        await self.db.run(record)
        await asyncio.to_thread(remove_quietly, base.digest_path)  # the survivor's view (and sidecar) is unchanged

    async def recover(self) -> tuple[list[str], list[str]]:
        """After a crash: discard pending points, finish interrupted merges; (discarded, merged) ids."""
        discarded = await self.discard_pending()
        return discarded, await self._finish_merges()

    async def _finish_merges(self, vm_path: str | None = None, disk_key: int | None = None) -> list[str]:
        """Finish the merges a crash or a failure left (of one disk, when given); the merged points' ids."""

        def read(connection: sqlite3.Connection) -> list[Point]:
            merging = connection.execute("SELECT * FROM points WHERE status = ?", (PointStatus.MERGING.value,))
            return [Point.from_row(r) for r in rows(merging)]

        merged = []
        for base in await self.db.run(read):
            if vm_path is not None and (base.vm_path, base.disk_key) != (vm_path, disk_key):
                continue
            chain = await self.points(base.vm_path, base.disk_key)
            top = next((p for p in chain if p.backing == base.id), None)
            if top is None:
                raise RepositoryError(f"point {base.id} was being merged, but no point above it is left")
            await self._merge(base, top)
            merged.append(base.id)
            log.info(
                "retention: %s disk %s: the interrupted merge of %s finished", base.vm_path, base.disk_key, base.id
            )
        return merged

    async def set_digests(self, point_id: str, name: str | None) -> None:
        """Record the file name of a point's digest sidecar (None: it has none)."""
        await self.db.run(lambda c: c.execute("UPDATE points SET digests = ? WHERE id = ?", (name, point_id)))

    async def set_verdict(
        self, point_id: str, state: VerifyState, *, at: float, bad_offset: int | None, error: str | None
    ) -> None:
        """Record what a verify found of a point."""
        await self.db.run(
            lambda c: c.execute(
                "UPDATE points SET verify_state = ?, verified_at = ?, bad_offset = ?, verify_error = ? WHERE id = ?",
                (state.value, at, bad_offset, error, point_id),
            )
        )

    async def without_digests(self) -> list[Point]:
        """The completed points whose digests are not recorded yet, oldest first."""

        def read(connection: sqlite3.Connection) -> list[Point]:
            found = connection.execute(
                "SELECT * FROM points WHERE status = ? AND digests IS NULL ORDER BY created",
                (PointStatus.COMPLETED.value,),
            )
            return [Point.from_row(r) for r in rows(found)]

        return await self.db.run(read)

    async def chain(self, point: Point) -> list[Point]:
        """The point and the points below it (its backing chain), top first."""
        by_id = {p.id: p for p in await self.points(point.vm_path, point.disk_key)}
        out = [point]
        while out[-1].backing is not None and len(out) <= len(by_id):
            below = by_id.get(out[-1].backing)
            if below is None:
                raise RepositoryError(f"point {out[-1].id}: its base point {out[-1].backing} is gone")
            out.append(below)
        return out

    async def sweep_orphans(self) -> tuple[list[str], list[str]]:
        """Remove the images under ``vms/`` that no point knows of (a crash between creating an
        image and recording it, or a temporary file of a create), and the digest sidecars of points
        that are gone; ``(removed, unexpected)`` paths. (A point's sidecar written but not yet
        recorded stays: the restarted hub computes it again and replaces it.)

        Only our own names are removed (``*.qcow2``, ``*.digests`` and temporary files at
        ``vms/<vm>/<disk-key>/``); anything else is reported and left alone.
        Points are matched by their last three path components, so a moved
        repository keeps its images.
        """

        def read(connection: sqlite3.Connection) -> set[tuple[str, ...]]:
            known = set()
            for path, point_id in connection.execute("SELECT path, id FROM points"):
                known |= {_tail(path), _tail(os.path.join(os.path.dirname(path), f"{point_id}.digests"))}
            return known

        known = await self.db.run(read)
        return await asyncio.to_thread(_sweep, os.path.join(self.root, "vms"), known)


def kept_by_rules(chain: Sequence[Point], rules: Sequence[tuple[Retention, str]]) -> dict[str, tuple[str, ...]]:
    """The points of a disk (oldest first) that any of ``rules`` keep, by ID, each with the names of the
    rules that keep it (:func:`~sendense_nbd.policy.retention.select` over the points' completion times),
    and the newest (``newest`` if no rule names it); no rules: every point (``all``)."""
    if not rules:
        return {p.id: ("all",) for p in chain}
    candidates = [Candidate(p.id, p.completed or p.created) for p in chain]
    keep: dict[str, tuple[str, ...]] = {}
    for retention, timezone in rules:
        for point_id, names in select(candidates, retention, timezone=timezone).keep.items():
            known = keep.get(point_id, ())
            keep[point_id] = known + tuple(name for name in names if name not in known)
    for newest in chain[-1:]:
        keep.setdefault(newest.id, ("newest",))
    return keep


def _kept(chain: list[Point], rules: Sequence[tuple[Retention, str]], protected: set[str]) -> set[str]:
    """The ids of a disk's points (oldest first) that stay: kept by any rules (:func:`kept_by_rules`),
    protected, or below a protected point (its view reads them), and the newest."""
    keep = set(kept_by_rules(chain, rules))
    by_id = {p.id: p for p in chain}
    for point_id in protected & set(by_id):
        below: str | None = point_id
        while below is not None and below in by_id:
            keep.add(below)
            below = by_id[below].backing
    return keep


def _tail(path: str) -> tuple[str, ...]:
    return tuple(os.path.normpath(path).split(os.sep)[-3:])


def _sweep(vms: str, known: set[tuple[str, ...]]) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    unexpected: list[str] = []
    for folder, dirs, files in os.walk(vms):  # never follows symlinks to directories
        depth = len(os.path.relpath(folder, vms).split(os.sep)) if folder != vms else 0
        entries = files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in entries:
            path = os.path.join(folder, name)
            ours = depth == 2 and (name.endswith((".qcow2", ".digests")) or is_temporary(name))
            if depth == 2 and _tail(path) in known:
                continue
            if ours and not os.path.islink(path):
                remove_quietly(path)
                removed.append(path)
            else:
                unexpected.append(path)
    for path in removed:
        log.warning("removed %s: no restore point knows it (left by a crash)", path)
    for path in unexpected:
        log.warning("unexpected file in the repository, left alone: %s", path)
    return removed, unexpected
