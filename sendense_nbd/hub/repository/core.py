"""The repository every store shares: the points table, their life cycle, GFS retention and the disk locks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from sendense_nbd.backup.records import FullReason, SyncType
from sendense_nbd.errors import RepositoryError, UnknownPoint
from sendense_nbd.hub.clock import Clock, SystemClock
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.hub.repository import restores
from sendense_nbd.hub.repository.local import LocalStore
from sendense_nbd.hub.repository.points import Point, PointStatus, VerifyState
from sendense_nbd.hub.repository.store import Space, Store
from sendense_nbd.hub.requests import ReportedDisk
from sendense_nbd.policy.model import Retention
from sendense_nbd.policy.retention import Candidate, select
from sendense_nbd.storage.files import remove_quietly
from sendense_nbd.storage.modes import ImageFormat

if TYPE_CHECKING:
    from sendense_nbd.storage.base import BlockDevice

log = logging.getLogger(__name__)

#: Seconds sealing a point may take (an RBD snapshot: a cluster whose mons answer but whose OSDs do not
#: would otherwise hold the job's completion, and the job's lock, forever).
SEAL_TIMEOUT = 120.0


class SharedLock(Protocol):
    """The cluster's lock of a name (:meth:`~sendense_nbd.hub.cluster.Cluster.lock`)."""

    def __call__(self, name: str, *, wait: float = ...) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the lock ``name``, waiting ``wait`` seconds at most."""
        ...


class Repository:
    """The points of every VM's disks: their rows in the hub's store (``db``) and their data in ``store``
    (default: qcow2 files under ``root``, :class:`~sendense_nbd.hub.repository.local.LocalStore`)."""

    def __init__(self, root: str, db: Database, *, clock: Clock | None = None, store: Store | None = None) -> None:
        #: The hub's own directory (its store, lock and restores); a local store's data lives here too.
        self.root = os.path.abspath(root)
        self.db = db
        self.store: Store = store or LocalStore(root)
        #: Points' creation and completion times (and so retention's periods) come from it.
        self.clock: Clock = clock or SystemClock()
        self._disk_locks: dict[tuple[str, int], asyncio.Lock] = {}
        #: The cluster's lock of a name, where other hubs share the store (set by the hub), else None.
        self.shared_lock: SharedLock | None = None

    @contextlib.asynccontextmanager
    async def disk_lock(self, vm_path: str, disk_key: int) -> AsyncIterator[None]:
        """Hold the lock of one disk's chain: digests, verify and retention merges take it (FIFO, one at a time
        in this hub), and, where hubs share the store, the cluster's lock of the disk too."""
        async with self._disk_locks.setdefault((vm_path, disk_key), asyncio.Lock()):
            async with self.cluster_lock(f"disk {disk_key} of {vm_path}"):
                yield

    def cluster_lock(self, name: str, *, wait: float | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        """The cluster's lock ``name`` where other hubs share the store (waiting ``wait`` seconds at most; None:
        the lock's default), else nothing to take."""
        if self.shared_lock is None:
            return contextlib.nullcontext()
        return self.shared_lock(name) if wait is None else self.shared_lock(name, wait=wait)

    async def points(self, vm_path: str, disk_key: int | None = None) -> list[Point]:
        """A VM's completed points (of one disk, when given), by disk and age."""

        def read(connection: Connection) -> list[Point]:
            sql = "SELECT * FROM points WHERE vm_path = ? AND status = ?"
            args: list[object] = [vm_path, PointStatus.COMPLETED.value]
            if disk_key is not None:
                sql += " AND disk_key = ?"
                args.append(disk_key)
            found = connection.execute(sql + " ORDER BY disk_key, created, seq", args)  # seq: a tie's order
            return [Point.from_row(r) for r in rows(found)]

        return await self.db.run(read)

    async def vm_paths(self) -> list[str]:
        """The VMs that have completed points, sorted."""

        def read(connection: Connection) -> list[str]:
            found = connection.execute(
                "SELECT DISTINCT vm_path FROM points WHERE status = ? ORDER BY vm_path", (PointStatus.COMPLETED.value,)
            )
            return [row[0] for row in found]

        return await self.db.run(read)

    async def point(self, point_id: str) -> Point:
        """One point by ID; :class:`UnknownPoint` if there is none."""

        def read(connection: Connection) -> list[Point]:
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
        """The point the disk's next incremental builds on, or None and why the next backup is full (a damaged
        point in its chain; the latest alone when the store's points are independent)."""
        latest = await self.latest(vm_path, disk_key)
        if latest is None:
            return None, FullReason.FIRST_BACKUP
        try:
            chain = [latest] if self.store.independent else await self.chain(latest)
        except RepositoryError:  # a point below is gone (or mid-merge)
            return None, FullReason.BASE_MISSING
        if any(p.verify_state is VerifyState.DAMAGED for p in chain):
            return None, FullReason.VERIFY_FAILED
        if not latest.change_id:
            return None, FullReason.BASE_MISSING
        if self.store.independent and (missing := await asyncio.to_thread(self.store.check, [latest])) is not None:
            log.warning("%s disk %s: the next backup is full: %s", vm_path, disk_key, missing)
            return None, FullReason.BASE_MISSING  # its snapshot is gone (or unreadable): no rollback onto it
        return latest, None

    async def new_point(
        self, vm_path: str, disk_key: int, job_id: str, *, incremental: bool, capacity: int | None
    ) -> Point:
        """Create the data a backup job writes: an incremental on the latest point, or a full."""
        latest = await self.latest(vm_path, disk_key)
        base = latest if incremental and latest and latest.verify_state is not VerifyState.DAMAGED else None
        if base is None and capacity is None and incremental and latest is not None:
            capacity = latest.size  # a full after a damaged point: the disk's size is known
        if base is None and capacity is None:
            raise RepositoryError(f"{vm_path} disk {disk_key}: a full point needs the disk's capacity")
        point_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        size = base.size if base else int(capacity or 0)
        create = functools.partial(self.store.create, vm_path, disk_key, point_id, base=base, capacity=size)
        path = await asyncio.to_thread(create)
        point = Point(
            point_id, vm_path, disk_key, job_id, SyncType.INCREMENTAL if base else SyncType.FULL, path,
            base.id if base else None, size, None, None, PointStatus.PENDING, self.clock.now(), None,
        )  # fmt: skip

        def insert(connection: Connection) -> None:
            row = point.to_json()
            names, marks = ", ".join(row), ", ".join("?" * len(row))
            connection.execute(f"INSERT INTO points ({names}) VALUES ({marks})", tuple(row.values()))

        await self.db.run(insert)
        return point

    def opener(self, point: Point, *, readonly: bool) -> Callable[[], BlockDevice]:
        """What opens the point as a block device (blocking: the exports call it in a thread); picklable, so
        an export worker process can open it."""
        return self.store.opener(point, readonly=readonly)

    def source(self, point: Point) -> str:
        """A file name the copy library reads the point's whole view through."""
        return self.store.source(point)

    def digest_path(self, point: Point) -> str:
        """Where the point's digest sidecar is (or goes)."""
        return self.store.digest_path(point)

    async def digests_file(self, point: Point) -> str:
        """The point's digest sidecar to read, brought from the repository when another hub of a cluster
        recorded it (a failure to fetch is logged: the read then finds no file)."""
        try:
            await asyncio.to_thread(self.store.fetch_digests, point)
        except (RepositoryError, OSError) as exc:
            log.warning("point %s: %s", point.id, exc)
        return self.store.digest_path(point)

    async def share_digests(self, point: Point) -> None:
        """Make a sidecar just written readable by every hub of the repository (RBD: an object in the pool)."""
        await asyncio.to_thread(self.store.share_digests, point)

    async def complete(self, results: list[tuple[str, ReportedDisk]]) -> None:
        """Seal the points' data, then mark them completed with what their disk's job reported, all in
        one transaction, unless their job ended meanwhile: a hub taking this one over fails its jobs, then
        rolls their heads back, so a point sealed after that would hold the base's data under the new
        change ID."""
        for point_id, _ in results:
            try:
                point = await self.point(point_id)
            except UnknownPoint:
                point = None
            if point is None or point.status is not PointStatus.PENDING:
                raise RepositoryError(f"restore point {point_id} is not pending")
            try:
                await asyncio.wait_for(asyncio.to_thread(self.store.seal, point), SEAL_TIMEOUT)
            except TimeoutError:
                raise RepositoryError(
                    f"sealing restore point {point_id} took over {SEAL_TIMEOUT:g} s: the store does not answer "
                    f"(are the Ceph cluster's OSDs up?); the job fails and its point is discarded"
                ) from None

        def update(connection: Connection) -> None:
            now = self.clock.now()
            for point_id, disk in results:
                cursor = connection.execute(
                    "UPDATE points SET status = ?, completed = ?, change_id = ?, disk_uuid = ?, bytes_changed = ?, "
                    "bytes_transferred = ? WHERE id = ? AND status = ? AND NOT EXISTS (SELECT 1 FROM jobs WHERE "
                    "jobs.id = points.job_id AND jobs.state NOT IN ('pending', 'running'))",
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
                    raise RepositoryError(
                        f"restore point {point_id} is not pending, or its job ended meanwhile (another hub took "
                        "this one over?): it is not completed"
                    )

        await self.db.run(update)

    async def discard(self, point_id: str) -> None:
        """Delete a pending (failed) point: its data first, so a full store has room for the hub's
        write again (after a crash between the two, :meth:`recover` discards the row)."""
        where = (point_id, PointStatus.PENDING.value)

        def read(connection: Connection) -> list[Point]:
            found = connection.execute("SELECT * FROM points WHERE id = ? AND status = ?", where)
            return [Point.from_row(r) for r in rows(found)]

        def delete(connection: Connection) -> None:
            connection.execute("DELETE FROM points WHERE id = ? AND status = ?", where)

        for point in await self.db.run(read):
            latest = await self.latest(point.vm_path, point.disk_key)
            await asyncio.to_thread(functools.partial(self.store.discard, point, latest=latest))
        await self.db.run(delete)

    async def discard_pending(self) -> list[str]:
        """Discard every pending point whose job no longer runs (after a crash, or a lost hub's); their ids.
        Other hubs' running jobs keep theirs."""

        def read(connection: Connection) -> list[str]:
            found = connection.execute(
                "SELECT id FROM points WHERE status = ? AND job_id NOT IN "
                "(SELECT id FROM jobs WHERE state IN ('pending', 'running'))",
                (PointStatus.PENDING.value,),
            )
            return [r[0] for r in found]

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
        they stay, and so do the points below them unless the store's points
        are independent. The newest point is never dropped. A dropped point's
        place goes to the point above it (see :meth:`_merge`), which keeps its
        ID, change ID and view. Each dropped point is marked ``merging`` first;
        drops a crash or an error left are finished first (as :meth:`recover`
        does) and counted as dropped.
        """
        async with self.disk_lock(vm_path, disk_key):  # never while its digests or a verify read the chain
            dropped = await self._finish_merges(vm_path, disk_key)
            chain = await self.points(vm_path, disk_key)
            shielded = set(await protected()) if protected is not None else set()
            keep = _kept(chain, rules, shielded, below=not self.store.independent)
            for point_id in [p.id for p in chain if p.id not in keep]:
                chain = await self.points(vm_path, disk_key)  # each merge changes a backing
                point = next((p for p in chain[:-1] if p.id == point_id), None)
                top = next((p for p in chain if point is not None and p.backing == point.id), None)
                if point is None or top is None:
                    log.warning("retention: %s disk %s: point %s left the chain", vm_path, disk_key, point_id)
                    continue
                blocked = await asyncio.to_thread(self.store.blocked, point)
                if blocked is not None:
                    log.warning("retention: %s disk %s: point %s stays: %s", vm_path, disk_key, point.id, blocked)
                    continue
                await self._drop(point, top)
                dropped.append(point.id)
                log.info("retention: %s disk %s: point %s merged into %s", vm_path, disk_key, point.id, top.id)
        return dropped

    async def _drop(self, point: Point, top: Point) -> None:
        def mark(connection: Connection) -> None:
            connection.execute("UPDATE points SET status = ? WHERE id = ?", (PointStatus.MERGING.value, point.id))

        await self.db.run(mark)
        await self._merge(point, top)

    async def _merge(self, base: Point, top: Point) -> None:
        """Drop ``base`` under ``top``, the point above it (the store's :meth:`~Store.drop`: a qcow2
        commit, or an RBD snapshot removed); ``top`` then takes ``base``'s kind and backing (a full
        stays full, a middle point keeps its own base). Safe to repeat after a crash at any step."""
        await asyncio.to_thread(self.store.drop, base, top)

        def record(connection: Connection) -> None:
            connection.execute("DELETE FROM points WHERE id = ?", (base.id,))
            connection.execute(
                "UPDATE points SET kind = ?, backing = ? WHERE id = ?", (base.kind.value, base.backing, top.id)
            )

        await self.db.run(record)
        await asyncio.to_thread(remove_quietly, self.store.digest_path(base))  # the survivor's view is unchanged

    async def recover(self, disks: Collection[tuple[str, int]] | None = None) -> tuple[list[str], list[str]]:
        """After a crash: take back what the predecessor held in the store, discard pending points, finish
        interrupted merges; (discarded, merged) ids. ``disks``: other hubs share the repository, so only
        these disks' locks are taken back (those of the jobs the predecessor left), and merges are left to
        a hub that starts alone (another hub may be merging)."""
        await asyncio.to_thread(functools.partial(self.store.reclaim, disks))
        discarded = await self.discard_pending()
        return discarded, [] if disks is not None else await self._finish_merges()

    async def _finish_merges(self, vm_path: str | None = None, disk_key: int | None = None) -> list[str]:
        """Finish the merges a crash or a failure left (of one disk, when given); the merged points' ids."""

        def read(connection: Connection) -> list[Point]:
            merging = connection.execute("SELECT * FROM points WHERE status = ?", (PointStatus.MERGING.value,))
            return [Point.from_row(r) for r in rows(merging)]

        merged = []
        for base in await self.db.run(read):
            if vm_path is not None and (base.vm_path, base.disk_key) != (vm_path, disk_key):
                continue
            try:
                await self._finish_merge(base)
            except RepositoryError as exc:
                if not self.store.independent:
                    raise  # a half-committed qcow2 chain: the operator must look (its views are not whole)
                await self._restore_point(base, exc)
                continue
            merged.append(base.id)
            log.info(
                "retention: %s disk %s: the interrupted merge of %s finished", base.vm_path, base.disk_key, base.id
            )
        return merged

    async def _finish_merge(self, base: Point) -> None:
        """Drop ``base`` (marked merging) under the point above it."""
        chain = await self.points(base.vm_path, base.disk_key)
        top = next((p for p in chain if p.backing == base.id), None)
        if top is None:
            raise RepositoryError(f"point {base.id} was being merged, but no point above it is left")
        await self._merge(base, top)

    async def _restore_point(self, point: Point, exc: RepositoryError) -> None:
        """A drop of an independent store's point failed (its snapshot has clones, the cluster refused):
        the point is whole still, so it is completed again and a later retention tries once more."""
        log.warning("retention: %s disk %s: point %s stays: %s", point.vm_path, point.disk_key, point.id, exc)
        await self.db.run(
            lambda c: c.execute("UPDATE points SET status = ? WHERE id = ?", (PointStatus.COMPLETED.value, point.id))
        )

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

        def read(connection: Connection) -> list[Point]:
            found = connection.execute(
                "SELECT * FROM points WHERE status = ? AND digests IS NULL ORDER BY created, seq",
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

    async def changes(self, point: Point, base: Point) -> list[tuple[int, int]]:
        """Where ``point``'s view may differ from ``base``'s, an older point of its chain (``(offset, length)``)."""
        chain = await self.chain(point)
        ids = [p.id for p in chain]
        if base.id not in ids:
            raise RepositoryError(f"point {base.id} is not below point {point.id}")
        above = chain[: ids.index(base.id)]
        return await asyncio.to_thread(self.store.changes, above, base)

    async def check(self, point: Point) -> str | None:
        """The store's structure check of the point's chain (of the point alone when the store's points are
        independent): the first finding, or None when it is sound."""
        try:
            chain = [point] if self.store.independent else await self.chain(point)
        except RepositoryError as exc:  # a base point is missing
            return str(exc)
        return await asyncio.to_thread(self.store.check, chain)

    async def space(self) -> Space:
        """The store's room now."""
        return await asyncio.to_thread(self.store.space)

    async def allocated(self, points: Sequence[Point]) -> dict[str, int | None]:
        """The bytes each point's own data takes, by ID (None: gone meanwhile)."""
        return await asyncio.to_thread(self.store.allocated, points)

    async def convert(self, point: Point, path: str, fmt: ImageFormat) -> None:
        """Write a point (its whole view) to a new standalone raw or qcow2 file with the copy engine,
        verified; ``path`` is never replaced and nothing is left behind on failure."""
        await restores.convert(self.source(point), path, fmt)

    async def clone(self, point: Point, name: str) -> None:
        """A new standalone image ``name`` of the point's view (RBD: a flattened clone of its snapshot)."""
        await asyncio.to_thread(self.store.clone, point, name)

    @contextlib.asynccontextmanager
    async def export_point(self, point: Point, *, base: Point | None = None) -> AsyncIterator[str]:
        """A qcow2 file of a completed point, for a copy elsewhere (offsite), while the context lasts.

        ``base`` None: a standalone qcow2 of the point's whole view. Else ``base`` (an older point of
        its chain): an overlay holding where the point differs from ``base``, whose backing is named
        ``<base-id>.qcow2`` (relative): files named ``<point-id>.qcow2`` in one folder form a chain
        qemu opens. The point's own file when it is exactly that (a local full, or a local overlay on
        ``base``), else a temporary file under ``ROOT/tmp`` that is removed afterwards.

        The disk's lock is held while the file is chosen or the temporary one written, not while the
        caller reads it (an upload may take hours: restores, retention, digests and verify of the disk
        would wait as long). The caller keeps the point and the points below it from retention
        meanwhile (the hub's offsite copies do: a pending copy's point is ``protected``), so the
        point's own file cannot be rewritten under it. Never call this while holding the lock.
        """
        folder: str | None = None
        try:
            async with self.disk_lock(point.vm_path, point.disk_key):
                path, folder = await self._exported(point, base)
            yield path
        finally:
            if folder is not None:
                await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _exported(self, point: Point, base: Point | None) -> tuple[str, str | None]:
        """The file :meth:`export_point` yields, and the temporary folder holding it (None: the point's own)."""
        point = await self.point(point.id)
        if point.status is not PointStatus.COMPLETED:
            raise RepositoryError(f"point {point.id} is not a completed restore point")
        own = await asyncio.to_thread(self.store.own_file, point, base)
        if own is not None:
            return own, None
        changes = None if base is None else await self.changes(point, base)
        folder = await asyncio.to_thread(_temporary_folder, os.path.join(self.root, "tmp"))
        try:
            name = f"{point.id}.qcow2"
            if changes is None:
                await restores.convert(self.source(point), os.path.join(folder, name), ImageFormat.QCOW2)
                return os.path.join(folder, name), folder
            assert base is not None
            made = await restores.write_overlay(
                self.source(point), folder, name, base_id=base.id, size=point.size, changes=changes
            )
            return made, folder
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise

    async def sweep_orphans(self, *, store: bool = True) -> tuple[list[str], list[str]]:
        """Remove the data no point knows of (a crash between creating a point's data and recording
        it, a temporary file) and the digests of points that are gone; ``(removed, unexpected)``:
        what the store removed, and what it found but left alone (not its own names). ``store`` False:
        only this hub's temporary files (other hubs share the store: its new images may be theirs)."""

        def read(connection: Connection) -> list[tuple[str, str]]:
            return [(path, point_id) for path, point_id in connection.execute("SELECT path, id FROM points")]

        removed: list[str] = []
        unexpected: list[str] = []
        if store:
            removed, unexpected = await asyncio.to_thread(self.store.sweep, lambda: self.db.call(read))
        else:
            log.warning("other hubs share the repository: its store is not swept at this start")
        return removed + await asyncio.to_thread(_clear, os.path.join(self.root, "tmp")), unexpected

    async def take_back(self, disks: Collection[tuple[str, int]]) -> list[str]:
        """Take back what a lost hub's clients still hold on these disks' data (RBD: exclusive locks, so the
        next rollback works at once); what was taken back."""
        if not disks or not self.store.independent:
            return []  # local files hold no locks after their process
        args = [item for vm_path, key in sorted(disks) for item in (vm_path, str(key))]
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sendense_nbd.hub.repository.takeback", self.root, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await child.communicate()
        if child.returncode != 0:
            why = err.decode(errors="replace")[-500:]
            raise RepositoryError(f"breaking the locks of {sorted(disks)} failed: {why}")
        broken: list[str] = json.loads(out or b"[]")
        return broken


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


def _kept(chain: list[Point], rules: Sequence[tuple[Retention, str]], protected: set[str], *, below: bool) -> set[str]:
    """The ids of a disk's points (oldest first) that stay: kept by any rules (:func:`kept_by_rules`),
    protected, or (``below``) below a protected point (its view reads them), and the newest."""
    keep = set(kept_by_rules(chain, rules))
    by_id = {p.id: p for p in chain}
    for point_id in protected & set(by_id):
        under: str | None = point_id
        while under is not None and under in by_id:
            keep.add(under)
            under = by_id[under].backing if below else None
    return keep


def _temporary_folder(parent: str) -> str:
    """A new private folder under ``parent`` (made 0700 if missing)."""
    os.makedirs(parent, mode=0o700, exist_ok=True)
    return tempfile.mkdtemp(dir=parent)


def _clear(parent: str) -> list[str]:
    """Remove what interrupted exports left under ``parent``; the paths removed."""
    try:
        entries = [entry.path for entry in os.scandir(parent)]
    except FileNotFoundError:
        return []
    for path in entries:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            remove_quietly(path)
        log.warning("removed %s: left by an interrupted point export", path)
    return entries
