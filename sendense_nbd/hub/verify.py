"""Chunk digests recorded at backup time, and verify jobs that check points against them.

Digests: once a backup job's points are completed, a background task per
point computes the digest of every 4 MiB chunk of the point's whole view
(:mod:`sendense_nbd.copy.digests`) from the repository and writes the sidecar
``<point-id>.digests`` where its store keeps them (next to a local image),
then records the name in the point. An incremental point reads only the
chunks where it may differ from its base point (a local overlay's layer map,
an RBD snapshot's diff) and takes the others from its base point's sidecar;
without a usable base sidecar it reads every chunk. The tasks of one disk hold its
:meth:`~sendense_nbd.hub.repository.Repository.disk_lock`, so they run one at
a time in the order they were started and never during a retention merge; at most
:data:`READERS` chains are read at once across all disks and verify jobs (a task takes its disk's lock
first, so tasks waiting for a busy disk hold no reader slot).
A restarted hub computes the digests still missing (:meth:`Verifier.resume`).

Verify jobs (``POST /api/v1/verify``, kind ``verify``): for each point of a
VM, or of one point's chain, oldest first, under its disk's lock, the store's
check runs on its chain (the qcow2 check of every file; that every RBD
snapshot is there), then its whole chain is read again
and every chunk digest recomputed and compared with the sidecar. The point
is marked ``verified`` or ``damaged`` with the first bad chunk's offset
(``bad_offset``) or the check's finding (``verify_error``). A point without
digests is verified by structure only (its ``digests`` stays null); a
sidecar that cannot be read marks it damaged, as nothing proves its data.
A point whose chain holds a damaged point is never the base of an incremental
(:meth:`~sendense_nbd.hub.repository.Repository.base_for`). A VM has one verify job at a time
(``409 verify_running``); a sidecar is compared in its own chunk size; any failure fails the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import attrs

from sendense_nbd import fields
from sendense_nbd.copy.digests import CHUNK_SIZE, DigestFile, chunk_count, chunk_digests
from sendense_nbd.copy.endpoints import open_source
from sendense_nbd.errors import BadRequest, Conflict, JobStateError, SendenseError, UnknownPoint
from sendense_nbd.hub.clock import Clock
from sendense_nbd.hub.jobs import Job, JobKind, JobState, JobStore, PointVerdict, VerifyDetail, VerifyScope
from sendense_nbd.hub.repository import Point, PointStatus, Repository, VerifyState
from sendense_nbd.hub.requests import Failure

log = logging.getLogger(__name__)

#: Chunks read and hashed at once per point (each holds one chunk of memory).
REQUESTS = 4
#: Chains read at once by digest tasks and verify jobs together (memory: READERS x REQUESTS chunks).
READERS = 2
#: Chunks a verify recomputes before it compares them (16 GiB of disk, 4096 digests in memory).
WINDOW = 4096


@attrs.frozen
class VerifyRequest:
    """``POST /verify``: every point of a VM, or one point's chain."""

    vm_path: str | None = None
    point_id: str | None = None

    @classmethod
    def from_json(cls, body: object) -> VerifyRequest:
        """``{"vm_path"}`` or ``{"point_id"}``; an ID that cannot be a point's is an unknown point."""
        data = fields.json_object(body, "the body", frozenset({"vm_path", "point_id"}))
        if ("vm_path" in data) == ("point_id" in data):
            raise BadRequest("give vm_path or point_id (one of them)")
        if "vm_path" in data:
            return cls(vm_path=fields.vm_path(data["vm_path"]))
        point_id = fields.identifier(data["point_id"])
        if point_id is None:
            raise UnknownPoint(f"no restore point {str(data['point_id'])[:80]!r}")
        return cls(point_id=point_id)


def chunks_of(ranges: Iterable[tuple[int, int]], chunk_size: int = CHUNK_SIZE) -> set[int]:
    """The chunks that ``(offset, length)`` ranges touch."""
    chunks: set[int] = set()
    for offset, length in ranges:
        if length > 0:
            chunks.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return chunks


async def _digests_of(path: str, chunks: Iterable[int] | None = None) -> dict[int, bytes]:
    """Chunk digests of the view ``path`` reads (a point's whole chain), read through the copy library."""
    source = await open_source(path)
    try:
        return await chunk_digests(source, chunks=chunks, requests=REQUESTS)
    finally:
        await source.close()


async def _base_digests(repository: Repository, point: Point) -> DigestFile | None:
    """The digests of the point's base, when it has a readable sidecar of the same size."""
    if point.backing is None:
        return None
    try:
        base = await repository.point(point.backing)
        if base.digests is None:
            return None
        found = await asyncio.to_thread(DigestFile.read, await repository.digests_file(base), size=point.size)
    except SendenseError as exc:
        log.warning("point %s: the base's digests are not usable (%s); reading every chunk", point.id, exc)
        return None
    return found if found.chunk_size == CHUNK_SIZE else None  # another chunk size: read every chunk


async def record_digests(repository: Repository, point_id: str, *, readers: asyncio.Semaphore) -> None:
    """Compute and record a completed point's digests (nothing if it has them, or is gone); ``readers``
    bounds the chains read at once."""
    try:
        point = await repository.point(point_id)
    except UnknownPoint:
        return
    # The disk's lock first: a task waiting its turn on a disk never holds one of the readers' slots.
    async with repository.disk_lock(point.vm_path, point.disk_key), readers:
        try:
            point = await repository.point(point_id)  # a merge may have changed it meanwhile
        except UnknownPoint:
            return
        if point.status is not PointStatus.COMPLETED or point.digests is not None:
            return
        base = await _base_digests(repository, point)
        if base is None:
            found = await _digests_of(repository.source(point))
        else:
            assert point.backing is not None  # a base's digests were found
            own = chunks_of(await repository.changes(point, await repository.point(point.backing)))
            found = dict(enumerate(base.digests))
            found.update(await _digests_of(repository.source(point), own))
        dense = tuple(found[i] for i in range(chunk_count(point.size, CHUNK_SIZE)))
        sidecar = repository.digest_path(point)
        await asyncio.to_thread(DigestFile(point.size, CHUNK_SIZE, dense).write, sidecar)
        await repository.share_digests(point)
        await repository.set_digests(point.id, os.path.basename(sidecar))
        log.info("point %s: %d chunk digests recorded", point.id, len(dense))


async def verify_point(
    repository: Repository, point: Point, clock: Clock, *, readers: asyncio.Semaphore
) -> PointVerdict | None:
    """Check one point's chain and digests (under its disk's lock); the verdict, recorded in the point.
    None when the point is gone (retention merged it away meanwhile)."""
    async with repository.disk_lock(point.vm_path, point.disk_key), readers:
        try:
            point = await repository.point(point.id)
        except UnknownPoint:
            return None
        error = await repository.check(point)
        bad_offset = None
        if error is None and point.digests is not None:
            bad_offset, error = await _compare(repository, point)
        state = VerifyState.VERIFIED if error is None else VerifyState.DAMAGED
        verdict = PointVerdict(point.id, point.disk_key, state.value, bad_offset, error, point.digests)
        await repository.set_verdict(point.id, state, at=clock.now(), bad_offset=bad_offset, error=error)
        return verdict


async def _compare(repository: Repository, point: Point) -> tuple[int | None, str | None]:
    """Recompute a point's digests and compare with its sidecar: (first bad offset, why) or (None, None).

    The chain is read :data:`WINDOW` chunks at a time, so memory stays bounded; the first bad chunk ends it."""
    try:
        recorded = await asyncio.to_thread(DigestFile.read, await repository.digests_file(point), size=point.size)
    except SendenseError as exc:
        return None, f"the digests cannot be read: {exc}"
    try:
        source = await open_source(repository.source(point))
    except (SendenseError, OSError) as exc:
        return None, f"opening the chain failed: {exc}"
    try:
        for start in range(0, len(recorded.digests), WINDOW):
            window = range(start, min(start + WINDOW, len(recorded.digests)))
            found = await chunk_digests(source, chunks=window, requests=REQUESTS, chunk_size=recorded.chunk_size)
            bad = next((i for i in window if found[i] != recorded.digests[i]), None)
            if bad is not None:
                offset = bad * recorded.chunk_size
                return offset, f"chunk at offset {offset} ({recorded.chunk_size} bytes) differs from its digest"
    except (SendenseError, OSError, ValueError) as exc:  # ValueError: a chunk size the image cannot be read in
        return getattr(exc, "offset", None), f"reading the chain failed: {exc}"
    finally:
        await source.close()
    return None, None


class Verifier:
    """Digest tasks and verify jobs of one hub; :meth:`close` cancels and awaits them."""

    def __init__(
        self,
        repository: Repository,
        jobs: JobStore,
        *,
        clock: Clock,
        job_timeout: float,
        on_damaged: Callable[[Point, PointVerdict], Awaitable[None]] | None = None,
        on_failed: Callable[[Job], Awaitable[None]] | None = None,
    ) -> None:
        self._clock = clock
        self._repository = repository
        self._jobs = jobs
        self._job_timeout = job_timeout
        #: Called for each point a verify finds damaged (an alert); its failure is logged only.
        self.on_damaged = on_damaged
        #: Called with a verify job that failed (an alert).
        self.on_failed = on_failed
        self._tasks: set[asyncio.Task[None]] = set()
        self._readers = asyncio.Semaphore(READERS)
        self._starting = asyncio.Lock()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_name(), task.exception())

    def digests_after_backup(self, point_ids: Iterable[str]) -> None:
        """Start computing the digests of a completed job's points (in the background, per disk in order)."""
        for point_id in point_ids:
            self._spawn(record_digests(self._repository, point_id, readers=self._readers), f"digests of {point_id}")

    async def resume(self) -> list[str]:
        """After a (re)start: compute the digests completed points still miss; their ids."""
        missing = [point.id for point in await self._repository.without_digests()]
        self.digests_after_backup(missing)
        return missing

    async def start(self, request: VerifyRequest) -> Job:
        """A running verify job over a VM's points or one point's chain (404 for an unknown point)."""
        if request.point_id is not None:
            point = await self._repository.point(request.point_id)
            if point.status is not PointStatus.COMPLETED:
                raise UnknownPoint(f"no completed restore point {point.id}")
            points, vm_path, scope = (await self._repository.chain(point))[::-1], point.vm_path, VerifyScope.POINT
        else:
            assert request.vm_path is not None
            vm_path, scope = request.vm_path, VerifyScope.VM
            points = sorted(await self._repository.points(vm_path), key=lambda p: (p.created, p.disk_key))
        detail = VerifyDetail(request.point_id)
        async with self._starting:  # the check and the create as one step
            for state in (JobState.PENDING, JobState.RUNNING):
                for other in await self._jobs.list(vm_path=vm_path, kind=JobKind.VERIFY, state=state):
                    raise Conflict(
                        f"verify job {other.id} of {vm_path} has not ended: wait for it, or cancel it",
                        "verify_running",
                    )
            job = await self._jobs.create(JobKind.VERIFY, vm_path, scope, detail, lifetime=self._job_timeout)
            job = await self._jobs.transition(job.id, JobState.RUNNING)
        self._spawn(self._run(job.id, detail, points), f"verify job {job.id}")
        return job

    async def _run(self, job_id: str, detail: VerifyDetail, points: list[Point]) -> None:
        verdicts: list[PointVerdict] = []
        try:
            for point in points:
                if (await self._jobs.get(job_id)).state.terminal:
                    return  # cancelled, or timed out
                verdict = await verify_point(self._repository, point, self._clock, readers=self._readers)
                if verdict is None:
                    continue
                verdicts.append(verdict)
                if verdict.state == VerifyState.DAMAGED.value and self.on_damaged is not None:
                    try:
                        await self.on_damaged(point, verdict)
                    except Exception as exc:  # noqa: BLE001 - an alert never fails the verify
                        log.error("reporting damaged point %s failed: %s", point.id, exc)
            done = attrs.evolve(detail, points=tuple(verdicts))
            with contextlib.suppress(JobStateError):  # cancelled or timed out meanwhile
                await self._jobs.transition(job_id, JobState.COMPLETED, detail=done)
        except Exception as exc:  # noqa: BLE001 - any failure fails the job (else it stays running)
            log.exception("verify job %s failed: %s", job_id, exc)
            failed = attrs.evolve(detail, points=tuple(verdicts))
            try:
                job = await self._jobs.transition(
                    job_id, JobState.FAILED, error=Failure("verify", str(exc)), detail=failed
                )
            except JobStateError:
                return  # cancelled or timed out meanwhile
            if self.on_failed is not None:
                await self.on_failed(job)

    async def close(self) -> None:
        """Cancel the digest tasks and verify jobs, and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
