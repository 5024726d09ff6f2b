"""The async copy engine: workers, a bounded queue, retries, checkpoints, progress.

Theory of operation (the names in ``code`` are :class:`CopyOptions` fields):

* The source's ``base:allocation`` extents are read a window at a time (at
  most :data:`EXTENT_WINDOW` bytes and
  :data:`~sendense_nbd.copy.endpoints.MAX_EXTENTS` extents) and each window
  is turned into a :class:`~sendense_nbd.copy.plan.Plan` of its own, so
  memory stays bounded however fragmented the disk; holes are never read. A
  changed-area copy asks only about the changed areas. With
  ``target_mode`` AUTO the target is probed first (:func:`probe_target_mode`,
  windowed too).
* A producer walks the windows' items lazily into a queue of ``workers``
  slots; ``workers = connections * requests`` (connections: the fewer the
  two endpoints really opened — one without multi-conn). Each worker owns one
  ``request_size`` buffer, so memory is about ``connections * requests *
  request_size`` whatever the disk size. The ETA's byte count (``to_read``)
  is extrapolated from the windows planned so far until the last one is.
* A COPY item is read into the worker's buffer, then every byte is checked
  for zeroes (:func:`~sendense_nbd.storage.is_zero`, in segments of at least
  64 KiB): data segments are written, zero segments are skipped on a fresh
  target in a full copy and become WRITE_ZEROES otherwise (NO_HOLE on an
  overlay, or zero buffers with ``overlay_zeroes`` BUFFERS or when the
  target lacks WRITE_ZEROES). Only data segments count as moved bytes for
  the rate and ETA.
* Faults: a transient failure (EIO, ENOMEM, a lost connection, a timeout)
  is retried with exponential backoff, up to ``retries`` times per item;
  endpoints reconnect by themselves. A write only counts as finished after a
  FLUSH covered it (the :class:`~sendense_nbd.copy.ledger.Ledger` keeps
  that account): workers flush after every ``checkpoint_bytes`` of data
  written (zeroed areas are cheap to redo and do not count), once
  :data:`MAX_PENDING` items wait for one (so the bookkeeping stays bounded
  on a disk of tiny extents), and at the end (doc/proto.md,
  "NBD_CMD_FLUSH"). When the target reconnects, writes it
  completed in the old connection but that no FLUSH covered are queued again
  (an unflushed qcow2 server may lose them); everything durable is kept and
  never copied again. :class:`CopyError` names the offset and carries the
  durable ranges (with the ranges the plan skips: nothing is left to do there).
* ``verify``, after the final FLUSH, reads every byte of the copied
  scope again: the source through new connections
  (:meth:`~sendense_nbd.copy.endpoints.Endpoint.reopen`), never trusting its
  allocation map or what the copy read, and the target; chunks are compared
  byte for byte and :class:`VerifyError` names the first mismatching byte.
* Progress (:class:`~sendense_nbd.copy.progress.Progress`) is delivered
  synchronously to a callback at most every ``progress_interval`` seconds,
  and the final event always.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

import attrs

from sendense_nbd.copy.endpoints import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    Endpoint,
    open_source,
    open_target,
)
from sendense_nbd.copy.ledger import Ledger
from sendense_nbd.copy.options import CopyOptions, OverlayZeroes
from sendense_nbd.copy.plan import DEFAULT_REQUEST_SIZE, Action, TargetMode, WorkItem, merge_areas, plan
from sendense_nbd.copy.progress import Outcome, ProgressCallback, Reporter
from sendense_nbd.errors import CopyError, EndpointError, VerifyError, first_error
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage import ImageFormat, is_zero

ZERO_SEGMENT = 64 * 1024
MAX_BACKOFF = 8.0
#: A target whose allocated areas are this small is read to see if it is fresh.
PROBE_READ_LIMIT = 16 << 20
#: Checkpoint FLUSHes in flight at once.
MAX_FLUSHES = 4
#: Finished items waiting for a FLUSH that trigger a checkpoint whatever their bytes (tiny extents).
MAX_PENDING = 1 << 16
#: Bytes of the disk one allocation-map query describes (fewer when it is fragmented).
EXTENT_WINDOW = 1 << 30


@attrs.frozen(slots=True)
class CopyResult:
    """What a finished copy did."""

    size: int
    copied: int
    zeroed: int
    skipped: int
    #: Data bytes sent, counting those sent again after failures.
    written: int
    retries: int
    reconnects: int
    elapsed: float
    target_mode: TargetMode
    flushed: bool
    verified: bool


T = TypeVar("T")


async def probe_target_mode(target: Endpoint) -> TargetMode:
    """``overlay`` when the target has a backing chain (known, or
    ``qemu:allocation-depth`` above 1 anywhere); ``fresh`` when it reads
    zeroes everywhere (``base:allocation`` ZERO, and the few allocated
    areas — qemu allocates a new raw file's first block — read back as
    zeroes); else ``raw``. The maps are walked a window at a time."""
    if target.has_backing:
        return TargetMode.OVERLAY
    async for depths in walk_extents(target.allocation_depth, 0, target.size):
        if any(extent.status > 1 for extent in depths):
            return TargetMode.OVERLAY
    allocated = 0
    buffer = memoryview(bytearray(DEFAULT_REQUEST_SIZE))
    async for extents in walk_extents(target.extents, 0, target.size):
        for extent in extents:
            if extent.zero:
                continue
            offset, end = extent.offset, min(extent.end, target.size)
            allocated += end - offset
            if allocated > PROBE_READ_LIMIT:
                return TargetMode.RAW
            for start in range(offset, end, DEFAULT_REQUEST_SIZE):
                view = buffer[: min(DEFAULT_REQUEST_SIZE, end - start)]
                await target.read_into(offset=start, buffer=view)
                if not is_zero(view):
                    return TargetMode.RAW
    return TargetMode.FRESH


class Describe(Protocol):
    """An allocation-map query of an :class:`Endpoint` (None: it has no such map)."""

    def __call__(self, *, offset: int, length: int) -> Awaitable[list[Extent] | None]: ...


async def walk_extents(describe: Describe, start: int, end: int) -> AsyncIterator[list[Extent]]:
    """Consecutive batches of extents over ``[start, end)``, one bounded
    query each (nothing when ``describe`` returns None: no map)."""
    pos = start
    while pos < end:
        extents = await describe(offset=pos, length=min(EXTENT_WINDOW, end - pos))
        if extents is None:
            return
        reach = _reach(extents, pos)
        yield extents
        pos = reach


def _reach(extents: Sequence[Extent], pos: int) -> int:
    """Where consecutive ``extents`` from ``pos`` end; raise if they do not start there or move on."""
    if not extents or extents[0].offset != pos or extents[-1].end <= pos:
        raise EndpointError(f"the allocation map at offset {pos} is empty or out of place", transient=False, offset=pos)
    return extents[-1].end


@attrs.frozen(slots=True)
class _Shape:
    """What :func:`copy` worked out from the options and the two endpoints."""

    size: int
    #: Sorted ``(offset, length)`` areas to copy; None: the whole disk.
    scope: Sequence[tuple[int, int]] | None
    block: int
    request_size: int
    mode: TargetMode
    workers: int

    @property
    def areas(self) -> Sequence[tuple[int, int]]:
        """The areas to copy, the whole disk being one."""
        return [(0, self.size)] if self.scope is None else self.scope

    @property
    def scope_bytes(self) -> int:
        """Bytes in those areas."""
        return self.size if self.scope is None else sum(n for _, n in self.scope)


class _Mover:
    """Carries out one work item: read the source, find the zeroes, write or zero the target."""

    def __init__(self, source: Endpoint, target: Endpoint, shape: _Shape, overlay_zeroes: OverlayZeroes) -> None:
        self.source = source
        self.target = target
        self.punch = shape.mode is not TargetMode.OVERLAY
        self.skip_zeroes = shape.scope is None and shape.mode is TargetMode.FRESH
        buffers = shape.mode is TargetMode.OVERLAY and overlay_zeroes is OverlayZeroes.BUFFERS
        self.zero_buffers = buffers or not target.can_zero
        self.segment = max(ZERO_SEGMENT, shape.request_size // 64 // ZERO_SEGMENT * ZERO_SEGMENT)
        self._zeroes = memoryview(bytes(shape.request_size))
        #: Data bytes sent, failed attempts included.
        self.written = 0

    async def _zero(self, offset: int, length: int) -> None:
        if self.zero_buffers:
            step = len(self._zeroes)
            for start in range(offset, offset + length, step):
                await self.target.write(offset=start, data=self._zeroes[: min(step, offset + length - start)])
        else:
            await self.target.zero(offset=offset, length=length, punch=self.punch)

    def _runs(self, view: memoryview) -> Iterator[tuple[int, int, bool]]:
        """``(start, length, zero)`` runs of the buffer, checked segment by segment."""
        step = self.segment
        run_start, run_zero = 0, is_zero(view[:step])
        for start in range(step, len(view), step):
            zero = is_zero(view[start : start + step])
            if zero != run_zero:
                yield run_start, start - run_start, run_zero
                run_start, run_zero = start, zero
        yield run_start, len(view) - run_start, run_zero

    async def do(self, item: WorkItem, buffer: memoryview) -> Outcome:
        """Carry out ``item`` (raises EndpointError); ``buffer`` holds ``request_size`` bytes."""
        generation = self.target.generation
        copied = zeroed = skipped = 0
        if item.action is Action.ZERO:
            await self._zero(item.offset, item.length)
            zeroed = item.length
        else:
            view = buffer[: item.length]
            await self.source.read_into(offset=item.offset, buffer=view)
            for start, length, zero in self._runs(view):
                if not zero:
                    await self.target.write(offset=item.offset + start, data=view[start : start + length])
                    self.written += length
                    copied += length
                elif self.skip_zeroes:
                    skipped += length
                else:
                    await self._zero(item.offset + start, length)
                    zeroed += length
        return Outcome(item, generation, copied, zeroed, skipped)


class _Copier:
    """The passes of one copy: workers, retries and checkpoints, then the verify."""

    def __init__(
        self, source: Endpoint, target: Endpoint, options: CopyOptions, shape: _Shape, reporter: Reporter
    ) -> None:
        self.source = source
        self.target = target
        self.options = options
        self.shape = shape
        self.reporter = reporter
        self.mover = _Mover(source, target, shape, options.overlay_zeroes)
        self.ledger: Ledger[Outcome] = Ledger(target.generation)
        self.generation_base = target.generation
        self.flush_failures = 0
        self.retry_count = 0

    def _completed(self) -> tuple[tuple[int, int], ...]:
        return self.ledger.durable.ranges()

    # -- retries ------------------------------------------------------------------------

    async def _attempt(self, item: WorkItem, buffer: memoryview) -> Outcome:
        retries = self.options.retries
        for attempt in range(retries + 1):
            try:
                return await self.mover.do(item, buffer)
            except EndpointError as exc:
                if not exc.transient or attempt == retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise CopyError(
                        f"{item.action.value} of {item.length} bytes at offset {item.offset} failed{tries}: {exc}",
                        offset=item.offset,
                        completed=self._completed(),
                    ) from exc
                await self._pause(attempt)
        raise AssertionError("unreachable")

    async def _retrying(self, what: str, offset: int, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retrying transient endpoint errors with backoff; CopyError when it gives up."""
        retries = self.options.retries
        for attempt in range(retries + 1):
            try:
                return await call()
            except EndpointError as exc:
                if not exc.transient or attempt == retries:
                    raise CopyError(f"{what}: {exc}", offset=offset, completed=self._completed()) from exc
                await self._pause(attempt)
        raise AssertionError("unreachable")

    async def _pause(self, attempt: int) -> None:
        """Exponential backoff before the next attempt."""
        self.retry_count += 1
        await asyncio.sleep(min(MAX_BACKOFF, self.options.backoff * 2**attempt))

    # -- durability -----------------------------------------------------------------------

    def _sync(self) -> None:
        """Tell the ledger the target's generation; take back what a lost connection may have lost."""
        for outcome in self.ledger.reconnected(self.target.generation):
            self.reporter.count(outcome, -1)

    def _finished(self, outcome: Outcome) -> None:
        self._sync()
        if self.ledger.record(outcome, began=outcome.generation):
            self.reporter.count(outcome)
            self.reporter.maybe_report()

    async def checkpoint(self) -> None:
        """FLUSH; the writes that completed before it are then durable.

        Several checkpoints may run at once, each covering the writes that
        completed since the previous one started. Raises EndpointError.
        """
        self._sync()
        token = self.ledger.begin_flush()
        try:
            await self.target.flush()
        except BaseException:  # failed or cancelled: what it covered must be written again
            self._sync()
            for outcome in self.ledger.flush_failed(token):
                self.reporter.count(outcome, -1)
            raise
        self._sync()
        self.ledger.flush_ok(token)

    async def _maybe_checkpoint(self) -> None:
        ledger = self.ledger
        if ledger.flushes >= MAX_FLUSHES:
            return
        if ledger.unbatched_weight < self.options.checkpoint_bytes and ledger.unbatched < MAX_PENDING:
            return
        try:
            await self.checkpoint()
            self.flush_failures = 0
        except EndpointError as exc:
            self.retry_count += 1
            self.flush_failures += 1
            if not exc.transient or self.flush_failures > self.options.retries:
                raise CopyError(f"flushing the target failed: {exc}", completed=self._completed()) from exc

    # -- passes ---------------------------------------------------------------------------

    async def planned_items(self) -> AsyncIterator[WorkItem]:
        """The work of the whole copy, planned one bounded window of the source's map at a time."""
        size = self.shape.size
        done = 0
        for area_start, area_length in self.shape.areas:
            if done < area_start:
                yield WorkItem(done, area_start - done, Action.SKIP)
            pos, end = area_start, area_start + area_length
            while pos < end:
                window, stop = await self._window(pos, end)
                for item in window:
                    yield item
                pos = stop
            done = end
        if done < size:
            yield WorkItem(done, size - done, Action.SKIP)

    async def _window(self, pos: int, end: int) -> tuple[Iterator[WorkItem], int]:
        """The items of one window of the map from ``pos`` (up to ``end``), and where it stops."""
        shape = self.shape
        extents = await self._retrying(
            "reading the source's allocation map",
            pos,
            lambda: self.source.extents(offset=pos, length=min(EXTENT_WINDOW, end - pos)),
        )
        stop = min(end, -(-_reach(extents, pos) // shape.block) * shape.block)
        window = plan(
            extents,
            size=shape.size,
            mode=shape.mode,
            request_size=shape.request_size,
            min_block=shape.block,
            changed=None if shape.scope is None else [(pos, stop - pos)],
            merge_gap=0,
            span=(pos, stop),
        )
        self.reporter.planned(window.copy_bytes, stop - pos)
        return window.items(), stop

    async def run_pass(self, items: AsyncIterator[WorkItem] | None = None) -> None:
        """Carry out ``items`` and everything queued for redo, with ``workers`` workers."""
        workers = self.shape.workers
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=workers)

        async def produce() -> None:
            if items is not None:
                async for item in items:
                    if item.action is Action.SKIP:
                        self.ledger.skip(item.offset, item.length)  # nothing to do there
                        self.reporter.count(Outcome(item, 0, 0, 0, item.length))
                        self.reporter.maybe_report()
                        continue
                    await queue.put(item)
            for _ in range(workers):
                await queue.put(None)

        async def work() -> None:
            buffer = memoryview(bytearray(self.shape.request_size))
            while True:
                redo = self.ledger.take_redo()
                if redo is not None:
                    item = redo.item
                else:
                    queued = await queue.get()
                    if queued is None:
                        return
                    item = queued
                self._finished(await self._attempt(item, buffer))
                await self._maybe_checkpoint()

        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(workers):
                group.create_task(work())

    async def run(self) -> bool:
        """The copy, then the redo passes and final FLUSH; whether the target was flushed."""
        await self.run_pass(self.planned_items())
        retries = self.options.retries
        for attempt in range(retries + 1):
            self._sync()
            if self.ledger.redo:
                await self.run_pass()
                continue
            if not self.options.flush:
                return False
            try:
                await self.checkpoint()
            except EndpointError as exc:
                if not exc.transient or attempt == retries:
                    raise CopyError(f"flushing the target failed: {exc}", completed=self._completed()) from exc
                await self._pause(attempt)
                continue
            if self.ledger.settled:
                return True
        raise CopyError("the target kept losing its connection; giving up", completed=self._completed())

    # -- verification -----------------------------------------------------------------------

    def _verify_chunks(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` chunks of the copied scope, ``request_size`` at most."""
        step = self.shape.request_size
        for area_start, area_length in self.shape.areas:
            for start in range(area_start, area_start + area_length, step):
                yield start, min(step, area_start + area_length - start)

    async def verify(self, source: Endpoint) -> None:
        """Compare ``source`` (freshly connected) with the target over the scope; raise on the first difference."""
        workers, request_size = self.shape.workers, self.shape.request_size
        first: list[int] = []
        queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(maxsize=workers)

        async def produce() -> None:
            for chunk in self._verify_chunks():
                if first and chunk[0] > min(first):
                    break
                await queue.put(chunk)
            for _ in range(workers):
                await queue.put(None)

        async def read(endpoint: Endpoint, offset: int, view: memoryview) -> None:
            await self._retrying("verify", offset, lambda: endpoint.read_into(offset=offset, buffer=view))

        async def work() -> None:
            source_buffer = memoryview(bytearray(request_size))
            target_buffer = memoryview(bytearray(request_size))
            while (chunk := await queue.get()) is not None:
                offset, length = chunk
                src, dst = source_buffer[:length], target_buffer[:length]
                await read(source, offset, src)
                await read(self.target, offset, dst)
                if src != dst:
                    first.append(offset + _first_difference(src, dst))

        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(workers):
                group.create_task(work())
        if first:
            offset = min(first)
            raise VerifyError(f"verify: source and target differ at offset {offset}", offset=offset)


def _first_difference(a: memoryview, b: memoryview) -> int:
    step = 4096
    for start in range(0, len(a), step):
        if a[start : start + step] != b[start : start + step]:
            for i in range(start, min(len(a), start + step)):
                if a[i] != b[i]:
                    return i
    return len(a)


async def _resolve_mode(target: Endpoint, mode: TargetMode) -> TargetMode:
    if mode is not TargetMode.AUTO:
        return mode
    try:
        return await probe_target_mode(target)
    except EndpointError as exc:
        raise CopyError(str(exc), offset=exc.offset) from exc


async def _shape(
    source: Endpoint, target: Endpoint, options: CopyOptions, changed_areas: Iterable[tuple[int, int]] | None
) -> _Shape:
    size = source.size
    if target.size < size:
        raise CopyError(f"the target ({target.size} bytes) is smaller than the source ({size} bytes)")
    block = math.lcm(source.min_block, target.min_block)
    limit = min(options.request_size, source.max_request, target.max_request)
    scope = None
    if changed_areas is not None:
        scope = merge_areas(changed_areas, size=size, merge_gap=options.merge_gap, min_block=block)
    mode = await _resolve_mode(target, options.target_mode)
    streams = max(1, min(options.connections, source.connections, target.connections))
    return _Shape(
        size=size,
        scope=scope,
        block=block,
        request_size=max(block, limit // block * block),
        mode=mode,
        workers=streams * options.requests,
    )


async def copy(
    source: Endpoint,
    target: Endpoint,
    options: CopyOptions | None = None,
    *,
    changed_areas: Iterable[tuple[int, int]] | None = None,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Copy ``source`` to ``target`` (both open :class:`Endpoint` objects) as ``options`` say.

    ``changed_areas`` (``(offset, length)``, e.g. from CBT) limits the copy
    to those areas. ``progress`` is called with
    :class:`~sendense_nbd.copy.progress.Progress` events. Success is
    reported only after the target's FLUSH (unless ``options.flush`` is off).
    """
    options = CopyOptions() if options is None else options
    shape = await _shape(source, target, options, changed_areas)
    reporter = Reporter(progress, total=shape.size, scope=shape.scope_bytes, interval=options.progress_interval)
    copier = _Copier(source, target, options, shape, reporter)
    try:
        try:
            flushed = await copier.run()
            if options.verify:
                await _verify(copier, source)
        except BaseExceptionGroup as group:
            raise first_error(group, prefer=CopyError) from None
    except Exception as exc:
        reporter.final(error=str(exc))
        raise
    reporter.final()
    return _result(copier, flushed=flushed, verified=options.verify)


async def copy_between(
    src: str,
    dst: str,
    options: CopyOptions | None = None,
    *,
    fmt: ImageFormat | None = None,
    changed_areas: Iterable[tuple[int, int]] | None = None,
    progress: ProgressCallback | None = None,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    trusted: bool = False,
) -> CopyResult:
    """:func:`copy` between two NBD URIs or local images, opened and closed here.

    A local ``dst`` of format ``fmt`` that does not exist is created with the source's size.
    ``trusted``: the operator named both ends (an ``rbd:`` name may then carry any Ceph option).
    """
    options = CopyOptions() if options is None else options
    source = await open_source(
        src,
        connections=options.connections,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        trusted=trusted,
    )
    try:
        target = await open_target(
            dst,
            fmt=fmt,
            size=source.size,
            connections=options.connections,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            trusted=trusted,
        )
        try:
            return await copy(source, target, options, changed_areas=changed_areas, progress=progress)
        finally:
            await target.close()
    finally:
        await source.close()


def _result(copier: _Copier, *, flushed: bool, verified: bool) -> CopyResult:
    snapshot = copier.reporter.snapshot(done=True)
    return CopyResult(
        size=copier.shape.size,
        copied=snapshot.copied,
        zeroed=snapshot.zeroed,
        skipped=snapshot.skipped,
        written=copier.mover.written,
        retries=copier.retry_count,
        reconnects=copier.target.generation - copier.generation_base,
        elapsed=snapshot.elapsed,
        target_mode=copier.shape.mode,
        flushed=flushed,
        verified=verified,
    )


async def _verify(copier: _Copier, source: Endpoint) -> None:
    """Verify against the source reached again through new connections."""
    try:
        fresh = await source.reopen()
    except EndpointError as exc:
        raise CopyError(f"verify: {exc}", offset=exc.offset) from exc
    try:
        await copier.verify(fresh)
    finally:
        if fresh is not source:
            await fresh.close()
