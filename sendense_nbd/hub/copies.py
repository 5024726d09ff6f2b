"""The hub's offsite copies: each completed point copied to the S3 targets of the policies covering its VM.

After a backup completes, every policy covering the VM that has a ``copy``
target gets a ``pending`` copy of each new point (table ``offsite_copies``,
:mod:`.copy_records`). A pending copy's point (and the points below it) is protected from
retention merges (like a point a restore serves), so its file cannot change
mid-upload and its chain stays incremental; the disk's local retention runs
again when its copies ended, and catches up. Copies of one disk and policy run one at a time, oldest first (a
chain is built point by point), at most :data:`UPLOADS` at once across the
hub, each in a thread (boto3 blocks): the point's digests are recorded
first (the copy carries them), then the chain decides
(:func:`~sendense_nbd.offsite.chains.starts_chain`) whether the point joins
the disk's open chain as an overlay or starts a new one as a full image,
and :func:`~sendense_nbd.offsite.copier.copy_point` uploads it to the
policy's target, recorded in the copy's row. Uploads are journaled in
``offsite_uploads``: a restarted hub resumes the copies left pending
(:meth:`Copies.resume`) without resending parts S3 has, and so does the hub that
takes a lost one over. Hubs sharing a repository make a disk's copies in turn
(a cluster lock per disk and policy), whichever hub recorded them.

A chain continues only in the place it was written (endpoint, bucket,
prefix, lock mode): a policy whose target changed starts a new chain there.
Every copy is read, served and deleted where it was written, whatever its
policy says now.

A failed copy ends ``failed`` (with the error, and an alert) and seals its
chain: the next copy starts a new chain with a full. After each copy, sealed
chains whose lock has expired are deleted (offsite retention: whole chains,
never a merge). Copies are listed, served read-only over NBD straight from
the bucket, downloaded into the restore directory, verified against their
digests and deleted (a locked copy's delete is refused as S3 refuses it). A
copy uploading now is refused too, whichever hub of the cluster is asked: the
hub uploading a copy marks its row (``uploader``) from the upload's start until
its end is recorded, and the mark counts while that hub is live (a lost or
stopped hub's lapses, as its cluster locks do).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import attrs

from sendense_nbd.errors import (
    BadRequest,
    ClusterLockTimeout,
    Conflict,
    CopyDamaged,
    OffsiteError,
    SendenseError,
    UnknownCopy,
    UnknownPoint,
    UnknownPolicy,
    UploadTakenOver,
)
from sendense_nbd.hub.alerts import AlertKind, Alerts
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.cluster import Cluster
from sendense_nbd.hub.copy_records import (
    COMPLETED,
    DELETED,
    FAILED,
    PENDING,
    CopyRecord,
    LeftObject,
    UploadJournal,
    left_objects,
    uploads_of,
)
from sendense_nbd.hub.db import STORE_ERRORS, Connection, Database, rows
from sendense_nbd.hub.openers import CopyOpener
from sendense_nbd.hub.repository import Point, Repository
from sendense_nbd.hub.serving import ExportSpec
from sendense_nbd.hub.transport import ExportTLS, PeerCheck
from sendense_nbd.hub.verify import record_digests
from sendense_nbd.offsite.chains import Chain, expired, lock_until, starts_chain
from sendense_nbd.offsite.copier import PointFiles, Written, copy_point, delete_copies
from sendense_nbd.offsite.manifest import Manifest
from sendense_nbd.offsite.s3 import Bucket
from sendense_nbd.policy.model import Policy
from sendense_nbd.policy.offsite import CopyTarget

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["COMPLETED", "DELETED", "FAILED", "PENDING", "UPLOADS", "CopyRecord", "Copies"]

#: Copies uploading at once across the hub (each holds one part buffer).
UPLOADS = 2
#: Seconds :meth:`Copies.close` waits for upload threads to stop between parts.
CLOSE_WAIT = 30.0
#: Seconds before a copy the bucket failed is tried again (then it fails, and its chain is sealed).
RETRY_DELAYS = (60.0, 300.0, 900.0)


@attrs.define
class _Served:
    """A copy served over NBD from the bucket (in an export worker, or the hub's event loop)."""

    port: int
    uri: str
    #: The client certificate name the export admits (None: any client the hub's TLS admits).
    reader: str | None = None


@attrs.frozen
class _Plan:
    """How a pending copy is made: its target and chain length, the point and, joining a chain, its
    local base and the chain's copies (manifest and version, full first)."""

    target: CopyTarget
    length: int
    point: Point
    base: Point | None
    older: list[tuple[Manifest, str]]


class Copies:
    """The offsite copies of one hub (module docstring); :meth:`close` stops their tasks and exports.

    ``secrets``: the hub's secrets directory (a copy target's secret file must be in it; None: anywhere).
    """

    def __init__(
        self,
        db: Database,
        repository: Repository,
        *,
        clock: Clock,
        cluster: Cluster,
        policies: Callable[[], Awaitable[list[Policy]]],
        restore_dir: str,
        serve: Callable[[str, int | None, ExportSpec], Awaitable[int]],
        release: Callable[[str], Awaitable[object]],
        tls: ExportTLS | None = None,
        secrets: str | None = None,
        alerts: Alerts | None = None,
        retain: Callable[[str, int], Awaitable[object]] | None = None,
    ) -> None:
        self.db = db
        self.repository = repository
        self.clock = clock
        #: This hub's membership: its ID marks the copies it uploads, and another hub's mark counts while it is live.
        self.cluster = cluster
        #: Every stored policy (enabled or not).
        self.policies = policies
        self.restore_dir = restore_dir
        self.secrets = secrets
        self.alerts = alerts
        #: Local retention of a disk (vm_path, disk_key), run when a copy of it ended: retention after a
        #: backup keeps every point a pending copy needs, so it catches up here.
        self.retain = retain
        #: Temporary files (a copy's digests while they are checked): the repository's own, swept at start.
        self.scratch = os.path.join(repository.root, "tmp")
        self._lease, self._release = serve, release
        #: The hub's NBD TLS: a copy's export is routed as a restore's, and bound to its reader.
        self._tls = tls if tls is not None else ExportTLS()
        self._tasks: set[asyncio.Task[None]] = set()
        self._uploads = asyncio.Semaphore(UPLOADS)
        self._readers = asyncio.Semaphore(1)
        self._chains: dict[tuple[str, str, int], asyncio.Lock] = {}
        self._stop = threading.Event()
        #: Blocking calls running in threads (upload, delete, open): :meth:`close` waits for them.
        self._busy = 0
        self._idle = threading.Condition()
        #: The copies whose upload runs now on this hub (a delete of one is refused), each also marked in its row
        #: (``uploader``: this hub's ID) for the other hubs of the cluster.
        self._running: set[str] = set()
        self._served: dict[str, _Served] = {}
        #: Seconds before each new try of a copy the bucket failed (:data:`RETRY_DELAYS`).
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS
        self._serving: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- after a backup ---------------------------------------------------------------

    async def after_backup(self, vm_path: str, point_ids: Iterable[str]) -> list[str]:
        """Record a pending copy of each point for every policy covering the VM with a copy target, and
        start them; the copies' IDs."""
        targets = [p for p in await self.policies() if p.copy is not None and p.vms.select([vm_path])]
        points = [await self.repository.point(point_id) for point_id in point_ids]
        made = [
            CopyRecord(_new_id(), policy.name, point.id, vm_path, point.disk_key, None, PENDING, None,
                       self.clock.now(), None, None, None, False)
            for policy in targets for point in points
        ]  # fmt: skip

        def insert(connection: Connection) -> None:
            for record in made:
                row = record.row()
                names, marks = ", ".join(row), ", ".join("?" * len(row))
                connection.execute(f"INSERT INTO offsite_copies ({names}) VALUES ({marks})", tuple(row.values()))

        await self.db.run(insert)
        for record in made:
            self._spawn(self._copy(record.id), f"offsite copy {record.id}")
        return [record.id for record in made]

    async def forget_uploads(self) -> None:
        """At a (re)start, before :meth:`resume`: this hub uploads nothing yet, so the marks of the uploads its
        last run left (killed mid-upload) are cleared."""
        await self.db.run(
            lambda c: c.execute("UPDATE offsite_copies SET uploader = NULL WHERE uploader = ?", (self.cluster.id,))
        )

    async def resume(self) -> list[str]:
        """After a (re)start: go on with the copies left pending (their uploads resume); their IDs."""
        pending = await self._select("state = ? ORDER BY created, seq", (PENDING,))
        for record in pending:
            self._spawn(self._copy(record.id), f"offsite copy {record.id}")
        return [record.id for record in pending]

    async def protected(self) -> set[str]:
        """The points with a pending copy: retention keeps them (and the points below them)."""
        return {record.point_id for record in await self._select("state = ?", (PENDING,))}

    async def settled(self) -> None:
        """Wait until every copy started so far has ended."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop the copies (uploads stop between parts, resumable; their threads are waited for up to
        :data:`CLOSE_WAIT` seconds) and the copies' exports."""
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for copy_id in list(self._served):
            await self.stop_serving(copy_id)
        if not await asyncio.to_thread(self._wait_idle, CLOSE_WAIT):
            log.warning("offsite copies: %d S3 calls still running after %g s; closing anyway", self._busy, CLOSE_WAIT)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a thread that :meth:`close` waits for."""
        return await asyncio.to_thread(self._tracked, function, *args)

    def _tracked(self, function: Callable[..., T], *args: Any) -> T:
        with self._idle:
            self._busy += 1
        try:
            return function(*args)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    # -- one copy ------------------------------------------------------------------------

    async def _copy(self, copy_id: str) -> None:
        """Make the disk's pending copies in this policy, oldest first, up to this one (tasks may reach the
        disk's lock out of order; hubs sharing the repository take it in turn); a failure fails that copy and
        seals its chain. Another hub holding the chain's or the disk's cluster lock past its wait limit leaves the
        copies pending: this is tried again (logged)."""
        record = await self.get(copy_id)
        lock = self._chains.setdefault((record.policy, record.vm_path, record.disk_key), asyncio.Lock())
        tried: set[str] = set()
        try:
            async with lock, self.repository.cluster_lock(chain_lock(record.policy, record.vm_path, record.disk_key)):
                while (oldest := await self._oldest_pending(record)) is not None and oldest.id not in tried:
                    tried.add(oldest.id)
                    await self._one(oldest)
                    if oldest.id == copy_id:
                        break
        except ClusterLockTimeout as exc:
            log.warning("offsite copy %s stays pending and waits again: %s", copy_id, exc)
            self._spawn(self._copy(copy_id), f"offsite copy {copy_id}")
            return
        if tried and self.retain is not None:
            try:
                await self.retain(record.vm_path, record.disk_key)
            except (SendenseError, OSError) + STORE_ERRORS as exc:
                log.error("retention of %s disk %s after its copies: %s", record.vm_path, record.disk_key, exc)

    async def _oldest_pending(self, record: CopyRecord) -> CopyRecord | None:
        found = await self._select(
            "policy = ? AND vm_path = ? AND disk_key = ? AND state = ? ORDER BY created, seq LIMIT 1",
            (record.policy, record.vm_path, record.disk_key, PENDING),
        )
        return found[0] if found else None

    async def _one(self, record: CopyRecord) -> None:
        """Make one pending copy (the bucket failing: tried again after each of :attr:`retry_delays`, its
        upload resumed), then apply offsite retention to its disk."""
        for delay in (*self.retry_delays, None):
            try:
                await self._make(record)
                break
            except (asyncio.CancelledError, ClusterLockTimeout):  # the copy stays pending (see _copy)
                raise
            except UploadTakenOver as exc:  # pending still, the other hub's
                log.warning("%s", exc)
                return
            except OffsiteError as exc:
                if delay is None:
                    await self._fail(record, str(exc))
                    return
                log.warning("offsite copy %s of point %s: %s; trying again in %g s", record.id, record.point_id,
                            exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
            except Exception as exc:  # noqa: BLE001 - any other failure fails the copy, recorded and logged
                await self._fail(record, str(exc))
                return
        try:
            await self.expire(record.policy, record.vm_path, record.disk_key)
        except SendenseError as exc:
            log.warning("offsite retention of %s disk %s: %s", record.vm_path, record.disk_key, exc)

    async def _make(self, record: CopyRecord) -> None:
        """Upload the copy and record it made. From its start (its target recorded) until its end is recorded,
        it is uploading: in :attr:`_running` and marked in its row with this hub's ID, so a delete through any
        hub of the cluster is refused (:meth:`delete`)."""
        await record_digests(self.repository, record.point_id, readers=self._readers)
        async with self._uploads:
            plan = await self._plan(record)
            self._running.add(record.id)
            try:
                if not await self._placed_at(record, plan.target):
                    return  # deleted while it waited, or another live hub uploads it
                point, base = plan.point, plan.base
                digests = await self.repository.digests_file(point) if point.digests else None
                async with self.repository.export_point(point, base=base) as path:
                    files = PointFiles(
                        point.vm_path, point.disk_key, point.id, point.completed or point.created, point.size, path,
                        None if base is None else f"{base.id}.qcow2", digests,
                    )  # fmt: skip
                    written = await self._blocking(self._upload, plan.target, files, plan.older, record.id)
                await self._completed(record, written, sealed=len(plan.older) + 1 >= plan.length)
            finally:
                self._running.discard(record.id)
                await self._unmark(record.id)
        await self._abort_uploads(record)  # an earlier try's upload of a key this one did not take

    async def _plan(self, record: CopyRecord) -> _Plan:
        """Where and how the copy is made now: the policy's target, a new chain or the open one."""
        target, policy = await self._policy_target(record.policy)
        length = target.chain_length(policy.full_every)
        point = await self.repository.point(record.point_id)
        chain = await self._open_chain(record)
        base = await self._base(point) if self._joins(chain, point, target, length) else None
        older = [(c.manifest, c.manifest_version) for c in chain if c.manifest and c.manifest_version]
        return _Plan(target, length, point, base, older if base is not None else [])

    def _joins(self, chain: list[CopyRecord], point: Point, target: CopyTarget, length: int) -> bool:
        """Whether the point's copy joins ``chain`` (the disk's open chain): in the same place, its lock
        not lapsing (:func:`~sendense_nbd.offsite.chains.starts_chain`), the point on its newest copy."""
        if not chain or chain[-1].manifest is None:
            return False
        placed = chain[-1].target or target
        if placed.place() != target.place():
            return False  # the policy's target moved: a new chain starts there
        state = Chain(chain[0].chain_id or "", tuple(c.point_id for c in chain), chain[-1].manifest.created, False)
        return not starts_chain(state, point.backing, length, now=self.clock.now(), target=placed)

    async def _placed_at(self, record: CopyRecord, target: CopyTarget) -> bool:
        """Record where the copy is being written (before anything is), and that this hub uploads it now; False
        when it is pending no more, or another live hub uploads it (it took this one over while this hub was
        lost): the mark is compared and set in one statement."""
        text, me, now = json.dumps(target.to_json()), self.cluster.id, self.clock.now()

        def place(connection: Connection) -> bool:
            found = connection.execute("SELECT uploader FROM offsite_copies WHERE id = ? AND state = ?",
                                       (record.id, PENDING)).fetchone()  # fmt: skip
            if found is None:
                return False
            other = found[0]
            if other not in (None, me) and self.cluster.live(connection, other, now):
                log.warning("offsite copy %s: hub %s uploads it; left to it", record.id, other)
                return False
            marked = "uploader IS NULL" if other is None else "uploader = ?"
            changed = connection.execute(
                f"UPDATE offsite_copies SET target = ?, uploader = ? WHERE id = ? AND state = ? AND {marked}",
                (text, me, record.id, PENDING, *([] if other is None else [other])),
            )
            return bool(changed.rowcount == 1)

        return bool(await self.db.run(place))

    async def _unmark(self, copy_id: str) -> None:
        """The copy's upload on this hub ended: its row's mark is cleared (unless another hub's is there now). A
        store failing leaves it, logged: this hub no longer counts it (not in :attr:`_running`), a copy that
        ended (completed, failed) is refused by no mark, and the other hubs count a pending one's until this hub's
        next try of it ends, or this hub stops."""
        mark = (copy_id, self.cluster.id)
        try:
            await self.db.run(
                lambda c: c.execute("UPDATE offsite_copies SET uploader = NULL WHERE id = ? AND uploader = ?", mark)
            )
        except STORE_ERRORS as exc:
            log.warning("offsite copy %s: its upload's mark stays in the store: %s", copy_id, exc)

    async def _completed(self, record: CopyRecord, written: Written, *, sealed: bool) -> None:
        """Record a copy made (unless it was deleted meanwhile) and seal the disk's older chains."""

        def update(connection: Connection) -> int:
            done = connection.execute(
                "UPDATE offsite_copies SET state = ?, chain_id = ?, completed = ?, manifest = ?, "
                "manifest_version = ?, sealed = ? WHERE id = ? AND state = ?",
                (COMPLETED, written.manifest.chain_id, self.clock.now(), written.manifest.encode().decode(),
                 written.version, int(sealed), record.id, PENDING),
            ).rowcount  # fmt: skip
            if done:
                for key, version in _named(written):  # its manifest names them now; others stay left
                    connection.execute(
                        "DELETE FROM offsite_objects WHERE copy_id = ? AND key = ? AND version = ?",
                        (record.id, key, version),
                    )
                connection.execute(
                    "UPDATE offsite_copies SET sealed = 1 "
                    "WHERE policy = ? AND vm_path = ? AND disk_key = ? AND id != ?",
                    (record.policy, record.vm_path, record.disk_key, record.id),
                )
            return done

        if not await self.db.run(update):
            log.warning(
                "offsite copy %s was deleted while it uploaded: its objects (%s) stay in the bucket until their lock "
                "ends", record.id, written.manifest.key,
            )  # fmt: skip
            return
        log.info("offsite copy %s: point %s in chain %s (%s)", record.id, record.point_id, written.manifest.chain_id,
                 written.manifest.kind)  # fmt: skip

    async def _base(self, point: Point) -> Point | None:
        """The point's local base, the chain's newest copy (None when retention merged it away: a new chain)."""
        try:
            return await self.repository.point(point.backing or "")
        except UnknownPoint:
            return None

    def _connect(self, target: CopyTarget) -> Bucket:
        """The target's bucket (blocking: the secret file is read, the clients made)."""
        return Bucket.connect(target, secrets=self.secrets)

    def _upload(self, target: CopyTarget, files: PointFiles, older: list[tuple[Manifest, str]], copy_id: str) -> Any:
        bucket = self._connect(target)  # the secret is read again: a rotated one is taken
        bucket.check_lock()
        journal = UploadJournal(self.db, target, copy_id, self.cluster.id)
        return copy_point(bucket, files, older, copy_id=copy_id, now=self.clock.now(), journal=journal, stop=self._stop)

    async def _open_chain(self, record: CopyRecord) -> list[CopyRecord]:
        """The completed copies of the disk's newest chain in this policy (oldest first), [] when it is sealed."""
        done = await self._select(
            "policy = ? AND vm_path = ? AND disk_key = ? AND state = ? ORDER BY completed, seq",
            (record.policy, record.vm_path, record.disk_key, COMPLETED),
        )
        if not done or done[-1].sealed:
            return []
        return [c for c in done if c.chain_id == done[-1].chain_id]

    async def _fail(self, record: CopyRecord, error: str) -> None:
        """Record a copy failed (sealing its disk's chains), abort the uploads it left open, alert."""
        log.error("offsite copy %s of point %s failed: %s", record.id, record.point_id, error)
        await self.db.run(
            lambda c: (
                c.execute(
                    "UPDATE offsite_copies SET state = ?, error = ? WHERE id = ? AND state = ?",
                    (FAILED, error[:4096], record.id, PENDING),
                ),
                c.execute(
                    "UPDATE offsite_copies SET sealed = 1 WHERE policy = ? AND vm_path = ? AND disk_key = ?",
                    (record.policy, record.vm_path, record.disk_key),
                ),
            )
        )
        await self._abort_uploads(record)
        if self.alerts is not None:
            await self.alerts.fire(
                AlertKind.COPY_FAILED, f"offsite copy of {record.vm_path} disk {record.disk_key} failed",
                f"the offsite copy {record.id} of point {record.point_id} (policy {record.policy}) failed: {error}; "
                f"its chain is sealed, the next point's copy starts a new chain with a full",
                key=record.id, detail={"copy_id": record.id, "point_id": record.point_id, "policy": record.policy},
            )  # fmt: skip

    async def _abort_uploads(self, record: CopyRecord) -> None:
        """Abort the multipart uploads a copy left open (a failed one, or an earlier try of another key):
        their parts would stay until a lifecycle rule ends them."""
        left = await self.db.run(lambda c: uploads_of(c, record.id))
        if not left:
            return
        try:
            target = await self._target_of(await self.get(record.id))
            bucket = await self._blocking(self._connect, target)
            for key, upload in left:
                await self._blocking(bucket.abort_upload, key, upload)
        except (SendenseError, OSError) as exc:
            log.warning("offsite copy %s: its uploads stay open (a lifecycle rule may end them): %s", record.id, exc)
            return
        await self.db.run(lambda c: c.execute("DELETE FROM offsite_uploads WHERE copy_id = ?", (record.id,)))

    async def _policy_target(self, name: str) -> tuple[CopyTarget, Policy]:
        """A policy's copy target now (the policy may have been edited or deleted since the copy was recorded)."""
        for policy in await self.policies():
            if policy.name == name and policy.copy is not None:
                return policy.copy, policy
        raise UnknownPolicy(f"policy {name} has no copy target any more")

    async def _target_of(self, record: CopyRecord) -> CopyTarget:
        """Where a copy was written: its recorded target, with the policy's credentials when the policy
        still writes to that bucket (a rotated key); a copy that recorded none follows its policy."""
        try:
            current: CopyTarget | None = (await self._policy_target(record.policy))[0]
        except UnknownPolicy:
            current = None
        placed = record.target
        if placed is None:
            if current is None:
                raise UnknownPolicy(f"offsite copy {record.id}: policy {record.policy} has no copy target any more")
            return current
        if current is not None and (current.endpoint, current.bucket) == (placed.endpoint, placed.bucket):
            return attrs.evolve(placed, access_key=current.access_key, secret_file=current.secret_file)
        return placed

    # -- offsite retention ---------------------------------------------------------------

    async def expire(self, policy_name: str, vm_path: str, disk_key: int) -> list[str]:
        """Delete the disk's sealed chains of this policy whose lock is over (whole chains, newest copy
        first, each where it was written); the deleted copies' IDs. A chain S3 still refuses stays for
        the next time."""
        deleted: list[str] = []
        for copies in (await self._chains_of(policy_name, vm_path, disk_key)).values():
            newest = copies[-1]
            target = await self._target_of(newest)
            made = newest.manifest.created if newest.manifest is not None else newest.created
            if expired(Chain(newest.chain_id or "", (), made, newest.sealed), target, self.clock.now()):
                deleted += await self._delete(target, copies)
        await self._delete_left(policy_name, vm_path, disk_key)
        return deleted

    async def _delete_left(self, policy_name: str, vm_path: str, disk_key: int) -> None:
        """Delete the object versions of the disk's copies that failed (or were deleted while uploading)
        once their lock is over; one S3 still refuses stays for the next time."""
        now = self.clock.now()
        left = [
            o for o in await self.db.run(lambda c: left_objects(c, policy_name, vm_path, disk_key)) if o.until <= now
        ]
        for found in left:
            try:
                bucket = await self._blocking(self._connect, await self._target_of(await self.get(found.copy_id)))
                await self._blocking(bucket.delete, found.key, found.version)
            except OffsiteError as exc:
                log.warning("offsite copy %s: its left object %s stays: %s", found.copy_id, found.key, exc)
                continue
            await self.db.run(functools.partial(_forget_left, found))
            log.info(
                "offsite copy %s: its left object %s (version %s) deleted", found.copy_id, found.key, found.version
            )

    async def _chains_of(self, policy_name: str, vm_path: str, disk_key: int) -> dict[str, list[CopyRecord]]:
        """The disk's completed copies in this policy by chain, each chain oldest first."""
        done = await self._select(
            "policy = ? AND vm_path = ? AND disk_key = ? AND state = ? ORDER BY completed, seq",
            (policy_name, vm_path, disk_key, COMPLETED),
        )
        chains: dict[str, list[CopyRecord]] = {}
        for record in done:
            chains.setdefault(record.chain_id or "", []).append(record)
        return chains

    async def _delete(self, target: CopyTarget, copies: list[CopyRecord]) -> list[str]:
        """Delete copies from the bucket, newest first, each marked deleted as it goes."""
        bucket = await self._blocking(self._connect, target)
        deleted = []
        for record in reversed(copies):
            if record.manifest is not None and record.manifest_version is not None:
                pair = [(record.manifest, record.manifest_version)]
                await self._blocking(delete_copies, bucket, pair)
            await self._set_state(record.id, DELETED)
            deleted.append(record.id)
            log.info("offsite copy %s (point %s) deleted from %s", record.id, record.point_id, target.bucket)
        return deleted

    async def _set_state(self, copy_id: str, state: str) -> None:
        def update(connection: Connection) -> None:
            connection.execute("UPDATE offsite_copies SET state = ? WHERE id = ?", (state, copy_id))

        await self.db.run(update)

    # -- reading -------------------------------------------------------------------------

    async def _select(self, where: str, args: tuple[object, ...]) -> list[CopyRecord]:
        found = await self.db.run(lambda c: rows(c.execute(f"SELECT * FROM offsite_copies WHERE {where}", args)))
        return [CopyRecord.from_row(row) for row in found]

    async def records(self, vm_path: str | None = None) -> list[CopyRecord]:
        """Every copy not deleted (of one VM, when given), oldest first, each completed one with the date
        its lock holds until, each uploading one with the (live) hub uploading it."""
        if vm_path is None:
            found = await self._select("state != ? ORDER BY created, seq", (DELETED,))
        else:
            found = await self._select("state != ? AND vm_path = ? ORDER BY created, seq", (DELETED, vm_path))
        uploading = await self._uploading(found)
        return [
            attrs.evolve(record, locked_until=until, uploader=record.uploader if record.uploader in uploading else None)
            for record, until in zip(found, _locks(found), strict=True)
        ]

    async def _uploading(self, records: list[CopyRecord]) -> set[str]:
        """The hubs marked as uploading one of ``records`` that are live (the others' marks count for nothing)."""
        marked = {record.uploader for record in records if record.uploader is not None}
        if not marked:
            return set()
        now = self.clock.now()
        return await self.db.run(lambda c: {hub for hub in marked if self.cluster.live(c, hub, now)})

    async def get(self, copy_id: str) -> CopyRecord:
        """One copy; :class:`UnknownCopy` if there is none."""
        found = await self._select("id = ?", (copy_id,))
        if not found:
            raise UnknownCopy(f"no offsite copy {copy_id}")
        return found[0]

    async def show(self, copy_id: str) -> CopyRecord:
        """One copy with the date its lock holds until and the live hub uploading it (:meth:`records`)."""
        record = await self.get(copy_id)
        chain = await self._select(
            "policy = ? AND chain_id = ? AND state = ?", (record.policy, record.chain_id, COMPLETED)
        )
        until = dict(zip([c.id for c in chain], _locks(chain), strict=True)).get(record.id)
        uploader = record.uploader if record.uploader in await self._uploading([record]) else None
        return attrs.evolve(record, locked_until=until, uploader=uploader)

    async def _chain_of(self, copy_id: str) -> tuple[CopyTarget, list[CopyRecord]]:
        """A completed copy's target (where it was written) and its chain up to it (full first)."""
        record = await self.get(copy_id)
        if record.state == DELETED:
            raise UnknownCopy(f"offsite copy {copy_id} is deleted")
        if record.state != COMPLETED or record.manifest is None:
            raise Conflict(f"offsite copy {copy_id} is {record.state}: only a completed copy can be read", record.state)
        target = await self._target_of(record)
        copies = await self._select(
            "chain_id = ? AND policy = ? AND state = ?", (record.chain_id, record.policy, COMPLETED)
        )
        by_point = {c.point_id: c for c in copies}
        missing = [p for p in record.manifest.chain if p not in by_point]
        if missing:
            raise Conflict(f"offsite copy {copy_id}: the copies of points {missing} below it are gone", "incomplete")
        return target, [by_point[p] for p in record.manifest.chain]

    async def serve(self, copy_id: str, reader: str | None = None) -> dict[str, object]:
        """Serve a copy read-only over NBD straight from the bucket (ranged GETs, bounded cache), routed as a
        restore's export; with client certificates only to ``reader``'s
        (:meth:`~sendense_nbd.hub.transport.ExportTLS.reader_check`: :class:`BadRequest` when it is missing,
        or cannot be enforced). A copy served already is :class:`Conflict` ``served`` for another reader.
        One request at a time per copy: a second one waits and answers the running export."""
        route = self._tls.restore_route()
        admit = self._tls.reader_check(route, reader, f"the export of offsite copy {copy_id}")
        async with self._serve_lock(copy_id):
            if copy_id in self._served:
                served = self._served[copy_id]
                if served.reader != reader:
                    raise Conflict(
                        f"offsite copy {copy_id} is served to {served.reader!r} already: stop its export first "
                        f"(DELETE /copies/{copy_id}/export)",
                        "served",
                    )
                return self._view(copy_id)
            target, chain = await self._chain_of(copy_id)
            self._served[copy_id] = await self._start_export(copy_id, target, chain, route, (admit, reader))
            return self._view(copy_id)

    def _serve_lock(self, copy_id: str) -> asyncio.Lock:
        lock = self._serving.get(copy_id)
        if lock is None:
            lock = self._serving[copy_id] = asyncio.Lock()
        return lock

    async def _start_export(
        self, copy_id: str, target: CopyTarget, chain: list[CopyRecord], route: Any,
        reader: tuple[PeerCheck | None, str | None],
    ) -> _Served:  # fmt: skip
        """Serve the copy, read from the bucket, on a leased port (``serve``: in an export worker, or the hub's
        event loop), TLS as its route says, admitting the reader (its check and its name)."""
        admit, name_of_reader = reader
        manifests = tuple(c.manifest for c in chain if c.manifest is not None)
        opener = CopyOpener(target, manifests, self.secrets)
        name = f"copy-{copy_id}"
        image = f"s3://{target.bucket}/{manifests[-1].image.file_name}"
        spec = ExportSpec(name, chain[-1].disk_key, name, image, True, route.tls, opener, admit)
        port = await self._lease(name, chain[-1].disk_key, spec)
        return _Served(port, route.uri(port, name), name_of_reader)

    def _view(self, copy_id: str) -> dict[str, object]:
        served = self._served[copy_id]
        export = served.uri.rsplit("/", 1)[-1]
        return {"copy_id": copy_id, "port": served.port, "uri": served.uri, "export": export, "reader": served.reader}

    async def stop_serving(self, copy_id: str) -> dict[str, object]:
        """Stop serving a copy (its clients are drained)."""
        async with self._serve_lock(copy_id):
            served = self._served.pop(copy_id, None)
            if served is None:
                await self.get(copy_id)
                return {"copy_id": copy_id, "stopped": False}
            await self._release(f"copy-{copy_id}")
            return {"copy_id": copy_id, "stopped": True}

    async def export_lost(self, owner: str) -> None:
        """The export worker serving a copy's export (``owner``: ``copy-ID``) died: the export is forgotten and
        its port released."""
        copy_id = owner.removeprefix("copy-")
        async with self._serve_lock(copy_id):
            if self._served.pop(copy_id, None) is not None:
                await self._release(owner)

    async def download(self, copy_id: str, name: str) -> dict[str, object]:
        """Download a copy's chain into a new folder ``name`` of the restore directory, each file checked by
        its sha256, then the whole view by the digests recorded at backup time; the top file's path. A
        folder that exists is :class:`Conflict` ``exists``; a download that fails leaves no folder."""
        target, chain = await self._chain_of(copy_id)
        folder = os.path.join(self.restore_dir, name)
        try:
            await asyncio.to_thread(os.mkdir, folder, 0o700)
        except FileExistsError:
            raise Conflict(f"{name} exists in the restore directory {self.restore_dir}", "exists") from None
        try:
            top = await self._download_into(target, chain, folder)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        return {"copy_id": copy_id, "path": top, "verified": True}

    async def _download_into(self, target: CopyTarget, chain: list[CopyRecord], folder: str) -> str:
        from sendense_nbd.offsite.restore import download, recorded_digests, verify
        from sendense_nbd.storage import ImageFormat, open_image

        bucket = await self._blocking(self._connect, target)
        manifests = [c.manifest for c in chain if c.manifest is not None]
        top = await self._blocking(download, bucket, manifests, folder)
        recorded = await self._blocking(recorded_digests, bucket, manifests[-1], self.scratch)
        await verify(await asyncio.to_thread(open_image, top, ImageFormat.QCOW2, readonly=True), recorded, top)
        return top

    async def verify(self, copy_id: str) -> dict[str, object]:
        """Read a copy's whole view from the bucket and compare it with its digests; the verdict (``verified``
        false when the copy differs: :class:`CopyDamaged`; the bucket failing is an error, not a verdict)."""
        from sendense_nbd.offsite.remote import open_copy
        from sendense_nbd.offsite.restore import recorded_digests, verify

        target, chain = await self._chain_of(copy_id)
        bucket = await self._blocking(self._connect, target)
        manifests = [c.manifest for c in chain if c.manifest is not None]
        try:
            recorded = await self._blocking(recorded_digests, bucket, manifests[-1], self.scratch)
            await verify(await self._blocking(open_copy, bucket, manifests), recorded, f"copy {copy_id}")
        except CopyDamaged as exc:
            return {"copy_id": copy_id, "verified": False, "error": str(exc)}
        return {"copy_id": copy_id, "verified": True, "error": None}

    async def delete(self, copy_id: str) -> list[str]:
        """Delete a copy and the copies above it in its chain (they need it), newest first; a copy Object
        Lock protects is refused as S3 refuses it (:class:`~sendense_nbd.errors.CopyLocked`), a copy
        uploading now on any hub of the cluster is :class:`Conflict` ``uploading`` (naming the hub)."""
        while True:  # again when a pending copy ended meanwhile (a copy's states only move on)
            record = await self.get(copy_id)
            if record.state == DELETED:
                raise UnknownCopy(f"offsite copy {copy_id} is deleted")
            if copy_id in self._running:
                raise _uploading(copy_id, self.cluster.id)
            if record.state == COMPLETED:
                break
            done, uploader = await self.db.run(functools.partial(self._mark_deleted, record, self.clock.now()))
            if uploader is not None:
                raise _uploading(copy_id, uploader)
            if done:
                return [copy_id]
        chain = await self._select(
            "chain_id = ? AND policy = ? AND state = ? ORDER BY completed, seq",
            (record.chain_id, record.policy, COMPLETED),
        )
        above = chain[[c.id for c in chain].index(copy_id) :]
        return await self._delete(await self._target_of(record), above)

    def _mark_deleted(self, record: CopyRecord, now: float, connection: Connection) -> tuple[bool, str | None]:
        """Mark a copy that is not completed deleted, in one transaction with the check that no hub uploads it:
        ``(True, None)`` done, ``(False, hub)`` refused (that hub uploads it), ``(False, None)`` its state moved
        on since ``record`` was read. A mark counts while its hub is live (:meth:`Cluster.live`, as a cluster
        lock's hold), this hub's while the upload is in :attr:`_running`."""
        found = connection.execute("SELECT state, uploader FROM offsite_copies WHERE id = ?", (record.id,)).fetchone()
        if found is None or found[0] != record.state:
            return False, None
        uploader = found[1]
        if record.state == PENDING and uploader is not None:
            mine = uploader == self.cluster.id
            if (record.id in self._running) if mine else self.cluster.live(connection, uploader, now):
                return False, uploader
        connection.execute("UPDATE offsite_copies SET state = ? WHERE id = ?", (DELETED, record.id))
        return True, None

    async def check_target(self, target: CopyTarget) -> None:
        """Refuse a copy target (400) whose secret file is not the hub user's alone (or not in the hub's
        secrets directory), or whose bucket cannot be reached or has no Object Lock, before a policy with
        it is stored."""
        try:
            await self._blocking(lambda: self._connect(target).check_lock())
        except OffsiteError as exc:
            raise BadRequest(f"copy: {exc}") from exc


def _uploading(copy_id: str, hub: str) -> Conflict:
    """The refusal of a delete of a copy that ``hub`` uploads now."""
    return Conflict(
        f"offsite copy {copy_id} is uploading on hub {hub}: delete it once it is completed or failed", "uploading"
    )


def chain_lock(policy: str, vm_path: str, disk_key: int) -> str:
    """The name of the cluster lock under which a hub makes a disk's copies in one policy."""
    return f"copies of disk {disk_key} of {vm_path} ({policy})"


def _locks(records: list[CopyRecord]) -> list[float | None]:
    """Until when each record's objects are locked: its chain's newest copy's date + its retain and margin
    (None for a copy not completed, or one that recorded no target)."""
    newest: dict[tuple[str, str | None], CopyRecord] = {}
    for record in records:
        if record.state == COMPLETED and record.manifest is not None:
            known = newest.get((record.policy, record.chain_id))
            if known is None or known.manifest is None or known.manifest.created < record.manifest.created:
                newest[(record.policy, record.chain_id)] = record
    found: list[float | None] = []
    for record in records:
        top = newest.get((record.policy, record.chain_id)) if record.state == COMPLETED else None
        if top is None or top.manifest is None or top.target is None:
            found.append(None)
        else:
            found.append(lock_until(top.manifest.created, top.target))
    return found


def _named(written: Written) -> list[tuple[str, str]]:
    """The object versions a finished copy's manifest names, and the manifest's own."""
    manifest = written.manifest
    stored = [manifest.image] + ([manifest.digests] if manifest.digests is not None else [])
    return [(s.key, s.version) for s in stored] + [(manifest.key, written.version)]


def _forget_left(found: LeftObject, connection: Connection) -> None:
    """Forget a left object version (deleted from the bucket)."""
    connection.execute(
        "DELETE FROM offsite_objects WHERE copy_id = ? AND key = ? AND version = ?",
        (found.copy_id, found.key, found.version),
    )


def _new_id() -> str:
    return f"c{uuid.uuid4().hex[:15]}"
