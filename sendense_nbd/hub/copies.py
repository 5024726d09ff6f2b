"""The hub's offsite copies: each completed point copied to the S3 targets of the policies covering its VM.

After a backup completes, every policy covering the VM that has a ``copy``
target gets a ``pending`` copy of each new point (table ``offsite_copies``).
A pending copy's point is protected from retention merges (like a point a
restore serves), so its file cannot change mid-upload. Copies of one disk
and target run in order (a chain is built point by point), at most
:data:`UPLOADS` at once across the hub, each in a thread (boto3 blocks):
the point's digests are recorded first (the copy carries them), then the
chain decides (:func:`~sendense_nbd.offsite.chains.starts_chain`) whether
the point joins the disk's open chain as an overlay or starts a new one as a
full image, and :func:`~sendense_nbd.offsite.copier.copy_point` uploads it.
Uploads are journaled in ``offsite_uploads``: a restarted hub resumes the
copies left pending (:meth:`Copies.resume`) without resending parts S3 has.

A failed copy ends ``failed`` (with the error) and seals its chain: the next
copy starts a new chain with a full. After each copy, sealed chains whose
lock has expired are deleted (offsite retention: whole chains, never a
merge). Copies are listed, served read-only over NBD straight from the
bucket, downloaded into the restore directory, verified against their
digests and deleted (a locked copy's delete is refused as S3 refuses it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs

from sendense_nbd.errors import BadRequest, Conflict, OffsiteError, SendenseError, UnknownCopy, UnknownPoint
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.db import Database, rows
from sendense_nbd.hub.repository import Point, Repository
from sendense_nbd.hub.transport import ExportTLS, PeerCheck
from sendense_nbd.hub.verify import record_digests
from sendense_nbd.offsite.chains import Chain, expired, starts_chain
from sendense_nbd.offsite.copier import PointFiles, copy_point, delete_copies
from sendense_nbd.offsite.manifest import Manifest
from sendense_nbd.offsite.s3 import Bucket
from sendense_nbd.offsite.upload import Recorded
from sendense_nbd.policy.model import Policy
from sendense_nbd.policy.offsite import CopyTarget

log = logging.getLogger(__name__)

#: Copies uploading at once across the hub (each holds one part buffer).
UPLOADS = 2
PENDING, COMPLETED, FAILED, DELETED = "pending", "completed", "failed", "deleted"

_TABLES = (
    """CREATE TABLE IF NOT EXISTS offsite_copies (
        id TEXT PRIMARY KEY, policy TEXT NOT NULL, point_id TEXT NOT NULL, vm_path TEXT NOT NULL,
        disk_key INTEGER NOT NULL, chain_id TEXT, state TEXT NOT NULL, error TEXT, created REAL NOT NULL,
        completed REAL, manifest TEXT, manifest_version TEXT, sealed INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS offsite_copies_disk ON offsite_copies (policy, vm_path, disk_key, created)",
    """CREATE TABLE IF NOT EXISTS offsite_uploads (
        bucket TEXT NOT NULL, key TEXT NOT NULL, upload TEXT NOT NULL, part_size INTEGER NOT NULL,
        parts TEXT NOT NULL, PRIMARY KEY (bucket, key))""",
)


@attrs.frozen
class CopyRecord:
    """One copy of a point to one policy's target, as the hub records it."""

    id: str
    policy: str
    point_id: str
    vm_path: str
    disk_key: int
    chain_id: str | None
    state: str
    error: str | None
    created: float
    completed: float | None
    manifest: Manifest | None
    manifest_version: str | None
    #: Set on a chain's newest copy when no copy will join its chain any more.
    sealed: bool

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CopyRecord:
        """From its row (the manifest as its JSON)."""
        text = row.pop("manifest")
        manifest = None if text is None else Manifest.decode(text.encode(), f"copy {row['id']}")
        return cls(**{**row, "manifest": manifest, "sealed": bool(row["sealed"])})

    def to_json(self) -> dict[str, object]:
        """The copy as ``GET /copies`` shows it."""
        found = self.manifest
        return {
            **attrs.asdict(self, recurse=False),
            "manifest": None if found is None else found.to_json(),
            "kind": None if found is None else found.kind,
            "locked_until": None,
        }


class UploadJournal:
    """The uploads of one bucket recorded in the hub's store (blocking calls, from upload threads)."""

    def __init__(self, db: Database, bucket: str) -> None:
        self.db = db
        self.bucket = bucket

    def recorded(self, key: str) -> Recorded | None:
        """The upload of ``key`` recorded so far."""
        found = self.db.call(
            lambda c: rows(c.execute("SELECT * FROM offsite_uploads WHERE bucket = ? AND key = ?", (self.bucket, key)))
        )
        if not found:
            return None
        parts = {int(n): (size, md5) for n, (size, md5) in json.loads(found[0]["parts"]).items()}
        return Recorded(found[0]["upload"], found[0]["part_size"], parts)

    def begun(self, key: str, upload: str, part_size: int) -> None:
        """A new upload of ``key``."""
        self.db.call(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO offsite_uploads VALUES (?, ?, ?, ?, '{}')",
                (self.bucket, key, upload, part_size),
            )
        )

    def part(self, key: str, number: int, size: int, md5: str) -> None:
        """S3 has part ``number``."""

        def add(connection: sqlite3.Connection) -> None:
            where = (self.bucket, key)
            found = connection.execute("SELECT parts FROM offsite_uploads WHERE bucket = ? AND key = ?", where)
            parts = json.loads(found.fetchone()[0])
            parts[str(number)] = [size, md5]
            connection.execute(
                "UPDATE offsite_uploads SET parts = ? WHERE bucket = ? AND key = ?", (json.dumps(parts), *where)
            )

        self.db.call(add)

    def finished(self, key: str) -> None:
        """Forget the upload of ``key``."""
        self.db.call(
            lambda c: c.execute("DELETE FROM offsite_uploads WHERE bucket = ? AND key = ?", (self.bucket, key))
        )


@attrs.define
class _Served:
    """A copy served over NBD from the bucket."""

    server: Any
    device: Any
    port: int
    uri: str
    #: The client certificate name the export admits (None: any client the hub's TLS admits).
    reader: str | None = None


class Copies:
    """The offsite copies of one hub (module docstring); :meth:`close` stops their tasks and exports."""

    def __init__(
        self,
        db: Database,
        repository: Repository,
        *,
        clock: Clock,
        policies: Callable[[], Awaitable[list[Policy]]],
        restore_dir: str,
        serve: Callable[[str, int | None], Awaitable[tuple[socket.socket, int]]],
        release: Callable[[str], Awaitable[object]],
        tls: ExportTLS | None = None,
    ) -> None:
        self.db = db
        self.repository = repository
        self.clock = clock
        #: Every stored policy (enabled or not).
        self.policies = policies
        self.restore_dir = restore_dir
        self._lease, self._release = serve, release
        #: The hub's NBD TLS: a copy's export is routed as a restore's, and bound to its reader.
        self._tls = tls if tls is not None else ExportTLS()
        db.call(lambda c: [c.execute(statement) for statement in _TABLES])
        self._tasks: set[asyncio.Task[None]] = set()
        self._uploads = asyncio.Semaphore(UPLOADS)
        self._readers = asyncio.Semaphore(1)
        self._chains: dict[tuple[str, str, int], asyncio.Lock] = {}
        self._stop = threading.Event()
        self._served: dict[str, _Served] = {}

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

        def insert(connection: sqlite3.Connection) -> None:
            for record in made:
                row = {**attrs.asdict(record, recurse=False), "manifest": None, "sealed": 0}
                names, marks = ", ".join(row), ", ".join("?" * len(row))
                connection.execute(f"INSERT INTO offsite_copies ({names}) VALUES ({marks})", tuple(row.values()))

        await self.db.run(insert)
        for record in made:
            self._spawn(self._copy(record.id), f"offsite copy {record.id}")
        return [record.id for record in made]

    async def resume(self) -> list[str]:
        """After a (re)start: go on with the copies left pending (their uploads resume); their IDs."""
        pending = await self._select("state = ? ORDER BY created", (PENDING,))
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
        """Stop the copies (uploads stop between parts, resumable) and the copies' exports."""
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for copy_id in list(self._served):
            await self.stop_serving(copy_id)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one copy ------------------------------------------------------------------------

    async def _copy(self, copy_id: str) -> None:
        """Make one pending copy (in its disk's order); a failure fails it and seals its chain."""
        record = await self.get(copy_id)
        lock = self._chains.setdefault((record.policy, record.vm_path, record.disk_key), asyncio.Lock())
        async with lock:
            record = await self.get(copy_id)
            if record.state != PENDING:
                return
            try:
                await self._make(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure fails the copy, recorded and logged
                log.error("offsite copy %s of point %s failed: %s", copy_id, record.point_id, exc)
                await self._fail(record, str(exc))
                return
            try:
                await self.expire(record.policy, record.vm_path, record.disk_key)
            except SendenseError as exc:
                log.warning("offsite retention of %s disk %s: %s", record.vm_path, record.disk_key, exc)

    async def _make(self, record: CopyRecord) -> None:
        target, policy = await self._target(record.policy)
        await record_digests(self.repository, record.point_id, readers=self._readers)
        point = await self.repository.point(record.point_id)
        chain = await self._open_chain(record)
        length = target.chain_length(policy.full_every)
        state = None if not chain else Chain(chain[0].chain_id or "", tuple(c.point_id for c in chain), 0, False)
        base = None if starts_chain(state, point.backing, length) else await self._base(point)
        older = (
            []
            if base is None
            else [(c.manifest, c.manifest_version) for c in chain if c.manifest and c.manifest_version]
        )
        digests = self.repository.digest_path(point) if point.digests else None
        async with self._uploads, self.repository.export_point(point, base=base) as path:
            files = PointFiles(
                point.vm_path, point.disk_key, point.id, point.completed or point.created, point.size, path,
                None if base is None else f"{base.id}.qcow2", digests,
            )  # fmt: skip
            written = await asyncio.to_thread(self._upload, target, files, older, record.id)
        sealed = len(older) + 1 >= length
        await self.db.run(
            lambda c: (
                c.execute(
                    "UPDATE offsite_copies SET sealed = 1 "
                    "WHERE policy = ? AND vm_path = ? AND disk_key = ? AND id != ?",
                    (record.policy, record.vm_path, record.disk_key, record.id),
                ),
                c.execute(
                    "UPDATE offsite_copies SET state = ?, chain_id = ?, completed = ?, manifest = ?, "
                    "manifest_version = ?, sealed = ? WHERE id = ?",
                    (COMPLETED, written.manifest.chain_id, self.clock.now(), written.manifest.encode().decode(),
                     written.version, int(sealed), record.id),
                ),
            )
        )  # fmt: skip
        log.info("offsite copy %s: point %s in chain %s (%s)", record.id, point.id, written.manifest.chain_id,
                 written.manifest.kind)  # fmt: skip

    async def _base(self, point: Point) -> Point | None:
        """The point's local base, the chain's newest copy (None when retention merged it away: a new chain)."""
        try:
            return await self.repository.point(point.backing or "")
        except UnknownPoint:
            return None

    def _upload(self, target: CopyTarget, files: PointFiles, older: list[tuple[Manifest, str]], copy_id: str) -> Any:
        bucket = Bucket.connect(target)  # the secret is read again: a rotated one is taken
        bucket.check_lock()
        journal = UploadJournal(self.db, target.bucket)
        return copy_point(bucket, files, older, copy_id=copy_id, now=self.clock.now(), journal=journal, stop=self._stop)

    async def _open_chain(self, record: CopyRecord) -> list[CopyRecord]:
        """The completed copies of the disk's newest chain in this target (oldest first), [] when it is sealed."""
        done = await self._select(
            "policy = ? AND vm_path = ? AND disk_key = ? AND state = ? ORDER BY completed",
            (record.policy, record.vm_path, record.disk_key, COMPLETED),
        )
        if not done or done[-1].sealed:
            return []
        return [c for c in done if c.chain_id == done[-1].chain_id]

    async def _fail(self, record: CopyRecord, error: str) -> None:
        await self.db.run(
            lambda c: (
                c.execute(
                    "UPDATE offsite_copies SET state = ?, error = ? WHERE id = ?", (FAILED, error[:4096], record.id)
                ),
                c.execute(
                    "UPDATE offsite_copies SET sealed = 1 WHERE policy = ? AND vm_path = ? AND disk_key = ?",
                    (record.policy, record.vm_path, record.disk_key),
                ),
            )
        )

    async def _target(self, name: str) -> tuple[CopyTarget, Policy]:
        """A policy's copy target (the policy may have been edited or deleted since the copy was recorded)."""
        for policy in await self.policies():
            if policy.name == name and policy.copy is not None:
                return policy.copy, policy
        raise OffsiteError(f"policy {name} has no copy target any more")

    # -- offsite retention ---------------------------------------------------------------

    async def expire(self, policy_name: str, vm_path: str, disk_key: int) -> list[str]:
        """Delete the disk's sealed chains in this target whose lock is over (whole chains, newest copy
        first); the deleted copies' IDs. A chain S3 still refuses stays for the next time."""
        target, _ = await self._target(policy_name)
        done = await self._select(
            "policy = ? AND vm_path = ? AND disk_key = ? AND state = ? ORDER BY completed",
            (policy_name, vm_path, disk_key, COMPLETED),
        )
        chains: dict[str, list[CopyRecord]] = {}
        for record in done:
            chains.setdefault(record.chain_id or "", []).append(record)
        deleted: list[str] = []
        for copies in chains.values():
            newest = copies[-1]
            made = newest.manifest.created if newest.manifest is not None else newest.created
            if expired(Chain(newest.chain_id or "", (), made, newest.sealed), target, self.clock.now()):
                deleted += await self._delete(target, copies)
        return deleted

    async def _delete(self, target: CopyTarget, copies: list[CopyRecord]) -> list[str]:
        """Delete copies from the bucket, newest first, each marked deleted as it goes."""
        bucket = await asyncio.to_thread(Bucket.connect, target)
        deleted = []
        for record in reversed(copies):
            if record.manifest is not None and record.manifest_version is not None:
                pair = [(record.manifest, record.manifest_version)]
                await asyncio.to_thread(delete_copies, bucket, pair)
            await self._set_state(record.id, DELETED)
            deleted.append(record.id)
            log.info("offsite copy %s (point %s) deleted from %s", record.id, record.point_id, target.bucket)
        return deleted

    async def _set_state(self, copy_id: str, state: str) -> None:
        def update(connection: sqlite3.Connection) -> None:
            connection.execute("UPDATE offsite_copies SET state = ? WHERE id = ?", (state, copy_id))

        await self.db.run(update)

    # -- reading -------------------------------------------------------------------------

    async def _select(self, where: str, args: tuple[object, ...]) -> list[CopyRecord]:
        found = await self.db.run(lambda c: rows(c.execute(f"SELECT * FROM offsite_copies WHERE {where}", args)))
        return [CopyRecord.from_row(row) for row in found]

    async def records(self, vm_path: str | None = None) -> list[CopyRecord]:
        """Every copy not deleted (of one VM, when given), oldest first."""
        if vm_path is None:
            return await self._select("state != ? ORDER BY created", (DELETED,))
        return await self._select("state != ? AND vm_path = ? ORDER BY created", (DELETED, vm_path))

    async def get(self, copy_id: str) -> CopyRecord:
        """One copy; :class:`UnknownCopy` if there is none."""
        found = await self._select("id = ?", (copy_id,))
        if not found:
            raise UnknownCopy(f"no offsite copy {copy_id}")
        return found[0]

    async def _chain_of(self, copy_id: str) -> tuple[CopyTarget, list[CopyRecord]]:
        """A completed copy's target and its chain up to it (full first)."""
        record = await self.get(copy_id)
        if record.state != COMPLETED or record.manifest is None:
            raise OffsiteError(f"offsite copy {copy_id} is {record.state}, not a completed copy")
        target, _ = await self._target(record.policy)
        copies = await self._select(
            "chain_id = ? AND policy = ? AND state = ?", (record.chain_id, record.policy, COMPLETED)
        )
        by_point = {c.point_id: c for c in copies}
        missing = [p for p in record.manifest.chain if p not in by_point]
        if missing:
            raise OffsiteError(f"offsite copy {copy_id}: the copies of points {missing} below it are gone")
        return target, [by_point[p] for p in record.manifest.chain]

    async def serve(self, copy_id: str, reader: str | None = None) -> dict[str, object]:
        """Serve a copy read-only over NBD straight from the bucket (ranged GETs, bounded cache), routed as a
        restore's export; with client certificates only to ``reader``'s
        (:meth:`~sendense_nbd.hub.transport.ExportTLS.reader_check`: :class:`BadRequest` when it is missing,
        or cannot be enforced). A copy served already is :class:`Conflict` ``served`` for another reader."""
        from sendense_nbd.offsite.remote import open_copy

        route = self._tls.restore_route()
        admit = self._tls.reader_check(route, reader, f"the export of offsite copy {copy_id}")
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
        bucket = await asyncio.to_thread(Bucket.connect, target)
        device = await asyncio.to_thread(open_copy, bucket, [c.manifest for c in chain if c.manifest is not None])
        name = f"copy-{copy_id}"
        try:
            sock, port = await self._lease(name, chain[-1].disk_key)
            server = self._server(name, device, sock, route.tls, admit)
            await server.start()
        except BaseException:
            await self._release(name)
            device.close()
            raise
        self._served[copy_id] = _Served(server, device, port, route.uri(port, name), reader)
        return self._view(copy_id)

    def _server(self, name: str, device: Any, sock: socket.socket, tls: bool, admit: PeerCheck | None) -> Any:
        """The NBD server of a copy's export (read-only, persistent), TLS as its route says."""
        from sendense_nbd.protocol.constants import TLSMode
        from sendense_nbd.server import Export, NBDServer

        return NBDServer(
            [Export(name, device, readonly=True)], sockets=[sock], shared=10, persistent=True,
            tls=TLSMode.REQUIRE if tls else TLSMode.OFF, tls_context=self._tls.context if tls else None,
            admit_peer=admit,
        )  # fmt: skip

    def _view(self, copy_id: str) -> dict[str, object]:
        served = self._served[copy_id]
        export = served.uri.rsplit("/", 1)[-1]
        return {"copy_id": copy_id, "port": served.port, "uri": served.uri, "export": export, "reader": served.reader}

    async def stop_serving(self, copy_id: str) -> dict[str, object]:
        """Stop serving a copy (its clients are drained)."""
        served = self._served.pop(copy_id, None)
        if served is None:
            await self.get(copy_id)
            return {"copy_id": copy_id, "stopped": False}
        try:
            served.server.close()
            await served.server.wait_closed()
        finally:
            await asyncio.to_thread(served.device.close)
            await self._release(f"copy-{copy_id}")
        return {"copy_id": copy_id, "stopped": True}

    async def download(self, copy_id: str, name: str) -> dict[str, object]:
        """Download a copy's chain into a new folder ``name`` of the restore directory, each file checked by
        its sha256, then the whole view by the digests recorded at backup time; the top file's path."""
        from sendense_nbd.offsite.restore import download, recorded_digests, verify
        from sendense_nbd.storage import ImageFormat, open_image

        target, chain = await self._chain_of(copy_id)
        folder = os.path.join(self.restore_dir, name)
        try:
            await asyncio.to_thread(os.mkdir, folder, 0o700)
        except FileExistsError:
            raise BadRequest(f"{name} exists in the restore directory {self.restore_dir}") from None
        bucket = await asyncio.to_thread(Bucket.connect, target)
        manifests = [c.manifest for c in chain if c.manifest is not None]
        top = await asyncio.to_thread(download, bucket, manifests, folder)
        recorded = await asyncio.to_thread(recorded_digests, bucket, manifests[-1])
        await verify(await asyncio.to_thread(open_image, top, ImageFormat.QCOW2, readonly=True), recorded, top)
        return {"copy_id": copy_id, "path": top, "verified": True}

    async def verify(self, copy_id: str) -> dict[str, object]:
        """Read a copy's whole view from the bucket and compare it with its digests; the verdict."""
        from sendense_nbd.offsite.remote import open_copy
        from sendense_nbd.offsite.restore import recorded_digests, verify

        target, chain = await self._chain_of(copy_id)
        bucket = await asyncio.to_thread(Bucket.connect, target)
        manifests = [c.manifest for c in chain if c.manifest is not None]
        try:
            recorded = await asyncio.to_thread(recorded_digests, bucket, manifests[-1])
            await verify(await asyncio.to_thread(open_copy, bucket, manifests), recorded, f"copy {copy_id}")
        except OffsiteError as exc:
            return {"copy_id": copy_id, "verified": False, "error": str(exc)}
        return {"copy_id": copy_id, "verified": True, "error": None}

    async def delete(self, copy_id: str) -> list[str]:
        """Delete a copy and the copies above it in its chain (they need it), newest first; a copy Object
        Lock protects is refused as S3 refuses it (:class:`~sendense_nbd.errors.CopyLocked`)."""
        record = await self.get(copy_id)
        if record.state == DELETED:
            raise UnknownCopy(f"offsite copy {copy_id} is deleted")
        target, _ = await self._target(record.policy)
        if record.state != COMPLETED:
            await self.db.run(
                lambda c: c.execute("UPDATE offsite_copies SET state = ? WHERE id = ?", (DELETED, copy_id))
            )
            return [copy_id]
        chain = await self._select(
            "chain_id = ? AND policy = ? AND state = ? ORDER BY completed", (record.chain_id, record.policy, COMPLETED)
        )
        above = chain[[c.id for c in chain].index(copy_id) :]
        return await self._delete(target, above)

    async def check_target(self, target: CopyTarget) -> None:
        """Refuse a copy target (400) whose secret file is not the hub user's alone, or whose bucket cannot
        be reached or has no Object Lock, before a policy with it is stored."""
        try:
            await asyncio.to_thread(lambda: Bucket.connect(target).check_lock())
        except OffsiteError as exc:
            raise BadRequest(f"copy: {exc}") from exc


def _new_id() -> str:
    return f"c{uuid.uuid4().hex[:15]}"
