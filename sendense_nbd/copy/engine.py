"""The async copy engine: workers, a bounded queue, retries, checkpoints, progress.

Theory of operation:

* The source's ``base:allocation`` extents are read a window at a time (at
  most :data:`EXTENT_WINDOW` bytes and
  :data:`~sendense_nbd.copy.endpoints.MAX_EXTENTS` extents) and each window
  is turned into a :class:`~sendense_nbd.copy.plan.Plan` of its own, so
  memory stays bounded however fragmented the disk; holes are never read. A
  changed-area copy asks only about the changed areas. With
  ``target_mode="auto"`` the target is probed first (:func:`probe_target_mode`,
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
  overlay, or zero buffers with ``overlay_zeroes="buffers"`` or when the
  target lacks WRITE_ZEROES). Only data segments count as moved bytes for
  the rate and ETA.
* Faults: a transient failure (EIO, ENOMEM, a lost connection, a timeout)
  is retried with exponential backoff, up to ``retries`` times per item;
  endpoints reconnect by themselves. A write only counts as finished after a
  FLUSH covered it: workers flush after every ``checkpoint_bytes`` of data
  written (zeroed areas are cheap to redo and do not count), once
  :data:`MAX_PENDING` items wait for one (so the bookkeeping stays bounded
  on a disk of tiny extents), and at the end (doc/proto.md,
  "NBD_CMD_FLUSH"). When the target reconnects, writes it
  completed in the old connection but that no FLUSH covered are queued again
  (an unflushed qcow2 server may lose them); everything durable is kept and
  never copied again. :class:`CopyError` names the offset and carries the
  durable ranges (with the ranges the plan skips: nothing is left to do there).
* ``verify=True``, after the final FLUSH, reads every byte of the copied
  scope again: the source through new connections
  (:meth:`~sendense_nbd.copy.endpoints.Endpoint.reopen`), never trusting its
  allocation map or what the copy read, and the target; chunks are compared
  byte for byte and :class:`VerifyError` names the first mismatching byte.
* Progress (:class:`Progress`) is delivered synchronously to a callback at
  most every ``progress_interval`` seconds, and the final event always.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

import attrs

from sendense_nbd.copy.endpoints import Endpoint
from sendense_nbd.copy.plan import (
    DEFAULT_MERGE_GAP,
    DEFAULT_REQUEST_SIZE,
    Action,
    RangeSet,
    TargetMode,
    WorkItem,
    merge_areas,
    plan,
)
from sendense_nbd.errors import CopyError, EndpointError, VerifyError, first_error
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage import is_zero

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
class Progress:
    """A snapshot of a running copy; byte counts are of finished items."""

    copied: int  # data written
    zeroed: int  # made zero on the target without sending data
    skipped: int  # left alone (holes and zeroes on a fresh target, unchanged areas)
    total: int
    elapsed: float
    #: Bytes of data per second: zeroes and skipped bytes do not count.
    rate: float
    #: Seconds left for the data still to copy (None before there is a rate).
    eta: float | None
    done: bool = False
    #: Set on the final event of a failed copy.
    error: str | None = None
    #: Bytes the copy reads and checks (holes and unchanged areas excluded): what the ETA counts down.
    to_read: int = 0

    @property
    def processed(self) -> int:
        return self.copied + self.zeroed + self.skipped

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else 100.0 * self.processed / self.total


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


ProgressCallback = Callable[[Progress], None]
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
class _Done:
    """A finished item waiting for a FLUSH, and what it contributed."""

    item: WorkItem
    generation: int
    copied: int
    zeroed: int
    skipped: int


class _Reporter:
    def __init__(self, callback: ProgressCallback | None, total: int, scope: int, interval: float) -> None:
        self.callback = callback
        self.total = total
        self.scope = scope  # bytes the windows will plan
        self.planned_scope = 0
        self.planned_copy = 0
        self.interval = interval
        self.start = time.monotonic()
        self.last = -math.inf
        self.copied = self.zeroed = self.skipped = 0
        self.copy_processed = 0  # bytes of COPY items finished, whatever they turned into

    def planned(self, copy_bytes: int, scope_bytes: int) -> None:
        self.planned_copy += copy_bytes
        self.planned_scope += scope_bytes

    @property
    def copy_total(self) -> int:
        """Bytes to read: exact once every window is planned, extrapolated before."""
        if not self.planned_scope or self.planned_scope >= self.scope:
            return self.planned_copy
        unplanned = self.scope - self.planned_scope
        return self.planned_copy + unplanned * self.planned_copy // self.planned_scope

    def count(self, done: _Done, sign: int = 1) -> None:
        self.copied += sign * done.copied
        self.zeroed += sign * done.zeroed
        self.skipped += sign * done.skipped
        if done.item.action is Action.COPY:
            self.copy_processed += sign * done.item.length

    def snapshot(self, done: bool = False, error: str | None = None) -> Progress:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.copied / elapsed
        copy_total = self.copy_total
        left = max(0, copy_total - self.copy_processed)
        eta = 0.0 if done or left == 0 else (left / rate if rate > 0 else None)
        return Progress(self.copied, self.zeroed, self.skipped, self.total, elapsed, rate, eta, done, error, copy_total)

    def maybe_report(self) -> None:
        now = time.monotonic()
        if self.callback is not None and now - self.last >= self.interval:
            self.last = now
            self.callback(self.snapshot())

    def final(self, error: str | None = None) -> None:
        if self.callback is not None:
            self.callback(self.snapshot(done=True, error=error))


class _Copier:
    def __init__(
        self,
        source: Endpoint,
        target: Endpoint,
        *,
        scope: Sequence[tuple[int, int]] | None,
        request_size: int,
        block: int,
        mode: TargetMode,
        workers: int,
        retries: int,
        backoff: float,
        checkpoint_bytes: int,
        zero_buffers: bool,
        reporter: _Reporter,
    ) -> None:
        self.source = source
        self.target = target
        self.size = source.size
        self.full = scope is None
        self.scope = [(0, self.size)] if scope is None else scope
        self.request_size = request_size
        self.block = block
        self.mode = mode
        self.skip_zeroes = self.full and mode is TargetMode.FRESH
        self.workers = workers
        self.retries = retries
        self.backoff = backoff
        self.checkpoint_bytes = checkpoint_bytes
        self.zero_buffers = zero_buffers or not target.can_zero
        self.reporter = reporter
        self.segment = max(ZERO_SEGMENT, request_size // 64 // ZERO_SEGMENT * ZERO_SEGMENT)
        self._zeroes = memoryview(bytes(request_size))
        self.durable = RangeSet()
        self.pending: list[_Done] = []
        self.unbatched_bytes = 0  # finished, not yet in a running FLUSH's batch
        self.batched: set[int] = set()
        self.flushes_running = 0
        self.redo: collections.deque[WorkItem] = collections.deque()
        self.seen_generation = target.generation
        self.generation_base = target.generation
        self.flush_failures = 0
        self.written = 0
        self.retry_count = 0

    # -- one item -----------------------------------------------------------------------

    async def _zero(self, offset: int, length: int) -> None:
        if self.zero_buffers:
            step = len(self._zeroes)
            for start in range(offset, offset + length, step):
                await self.target.write(offset=start, data=self._zeroes[: min(step, offset + length - start)])
        else:
            await self.target.zero(offset=offset, length=length, punch=self.mode is not TargetMode.OVERLAY)

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

    async def _do(self, item: WorkItem, buffer: memoryview) -> _Done:
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
        return _Done(item, generation, copied, zeroed, skipped)

    async def _attempt(self, item: WorkItem, buffer: memoryview) -> _Done:
        for attempt in range(self.retries + 1):
            try:
                return await self._do(item, buffer)
            except EndpointError as exc:
                if not exc.transient or attempt == self.retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise CopyError(
                        f"{item.action.value} of {item.length} bytes at offset {item.offset} failed{tries}: {exc}",
                        offset=item.offset,
                        completed=self.durable.ranges(),
                    ) from exc
                await self._pause(attempt)
        raise AssertionError("unreachable")

    async def _retrying(self, what: str, offset: int, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retrying transient endpoint errors with backoff; CopyError when it gives up."""
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except EndpointError as exc:
                if not exc.transient or attempt == self.retries:
                    raise CopyError(f"{what}: {exc}", offset=offset, completed=self.durable.ranges()) from exc
                await self._pause(attempt)
        raise AssertionError("unreachable")

    async def _pause(self, attempt: int) -> None:
        """Exponential backoff before the next attempt."""
        self.retry_count += 1
        await asyncio.sleep(min(MAX_BACKOFF, self.backoff * 2**attempt))

    # -- durability -----------------------------------------------------------------------

    def _invalidate(self) -> None:
        """After a target reconnect, queue again what no FLUSH covered."""
        current = self.target.generation
        if current == self.seen_generation:
            return
        self.seen_generation = current
        keep = []
        for done in self.pending:
            if done.generation == current:
                keep.append(done)
            else:
                self.reporter.count(done, -1)
                self.redo.append(done.item)
        self.pending = keep
        self._recount()

    def _recount(self) -> None:
        self.unbatched_bytes = sum(d.copied for d in self.pending if id(d) not in self.batched)

    def _finished(self, done: _Done) -> None:
        self._invalidate()
        if done.generation != self.target.generation:  # completed on a connection that is gone
            self.redo.append(done.item)
            return
        self.reporter.count(done)
        self.pending.append(done)
        self.unbatched_bytes += done.copied
        self.reporter.maybe_report()

    async def checkpoint(self) -> None:
        """FLUSH; the writes that completed before it are then durable.

        Several checkpoints may run at once, each covering the writes that
        completed since the previous one started. Raises EndpointError.
        """
        self._invalidate()
        generation = self.target.generation
        batch = [d for d in self.pending if d.generation == generation and id(d) not in self.batched]
        ids = {id(d) for d in batch}
        self.batched |= ids
        self.unbatched_bytes -= sum(d.copied for d in batch)
        self.flushes_running += 1
        try:
            await self.target.flush()
        except EndpointError:
            self.batched -= ids
            self._invalidate()
            if self.target.generation == generation:  # a failed FLUSH on a live connection: write again
                for done in self.pending:
                    if id(done) in ids:
                        self.reporter.count(done, -1)
                        self.redo.append(done.item)
                self.pending = [d for d in self.pending if id(d) not in ids]
            self._recount()
            raise
        finally:
            self.flushes_running -= 1
        self.batched -= ids
        self._invalidate()
        if self.target.generation != generation:
            return
        for done in batch:
            self.durable.add(done.item.offset, done.item.length)
        self.pending = [d for d in self.pending if id(d) not in ids]

    async def _maybe_checkpoint(self) -> None:
        if self.flushes_running >= MAX_FLUSHES:
            return
        if self.unbatched_bytes < self.checkpoint_bytes and len(self.pending) - len(self.batched) < MAX_PENDING:
            return
        try:
            await self.checkpoint()
            self.flush_failures = 0
        except EndpointError as exc:
            self.retry_count += 1
            self.flush_failures += 1
            if not exc.transient or self.flush_failures > self.retries:
                raise CopyError(f"flushing the target failed: {exc}", completed=self.durable.ranges()) from exc

    # -- passes ---------------------------------------------------------------------------

    async def planned_items(self) -> AsyncIterator[WorkItem]:
        """The work of the whole copy, planned one bounded window of the source's map at a time."""
        done = 0
        for area_start, area_length in self.scope:
            if done < area_start:
                yield WorkItem(done, area_start - done, Action.SKIP)
            pos, end = area_start, area_start + area_length
            while pos < end:
                extents = await self._source_extents(pos, min(EXTENT_WINDOW, end - pos))
                stop = min(end, -(-_reach(extents, pos) // self.block) * self.block)
                window = plan(
                    extents,
                    size=self.size,
                    mode=self.mode,
                    request_size=self.request_size,
                    min_block=self.block,
                    changed=None if self.full else [(pos, stop - pos)],
                    merge_gap=0,
                    span=(pos, stop),
                )
                self.reporter.planned(window.copy_bytes, stop - pos)
                for item in window.items():
                    yield item
                pos = stop
            done = end
        if done < self.size:
            yield WorkItem(done, self.size - done, Action.SKIP)

    async def _source_extents(self, offset: int, length: int) -> list[Extent]:
        return await self._retrying(
            "reading the source's allocation map", offset, lambda: self.source.extents(offset=offset, length=length)
        )

    async def run_pass(self, items: AsyncIterator[WorkItem] | Iterable[WorkItem]) -> None:
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=self.workers)

        async def produce() -> None:
            async for item in _aiter(items):
                if item.action is Action.SKIP:
                    self.durable.add(item.offset, item.length)  # nothing to do there
                    self.reporter.count(_Done(item, 0, 0, 0, item.length))
                    self.reporter.maybe_report()
                    continue
                await queue.put(item)
            for _ in range(self.workers):
                await queue.put(None)

        async def work() -> None:
            buffer = memoryview(bytearray(self.request_size))
            while True:
                if self.redo:
                    item = self.redo.popleft()
                else:
                    queued = await queue.get()
                    if queued is None:
                        return
                    item = queued
                self._finished(await self._attempt(item, buffer))
                await self._maybe_checkpoint()

        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(self.workers):
                group.create_task(work())

    async def run(self, *, flush: bool) -> bool:
        await self.run_pass(self.planned_items())
        for attempt in range(self.retries + 1):
            self._invalidate()
            if self.redo:
                redo, self.redo = list(self.redo), collections.deque()
                await self.run_pass(redo)
                continue
            if not flush:
                return False
            try:
                await self.checkpoint()
            except EndpointError as exc:
                if not exc.transient or attempt == self.retries:
                    raise CopyError(f"flushing the target failed: {exc}", completed=self.durable.ranges()) from exc
                await self._pause(attempt)
                continue
            if not self.redo and not self.pending:
                return True
        raise CopyError("the target kept losing its connection; giving up", completed=self.durable.ranges())

    # -- verification -----------------------------------------------------------------------

    def _verify_chunks(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` chunks of the copied scope, ``request_size`` at most."""
        for area_start, area_length in self.scope:
            for start in range(area_start, area_start + area_length, self.request_size):
                yield start, min(self.request_size, area_start + area_length - start)

    async def verify(self, source: Endpoint) -> None:
        """Compare ``source`` (freshly connected) with the target over the scope; raise on the first difference."""
        first: list[int] = []
        queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue(maxsize=self.workers)

        async def produce() -> None:
            for chunk in self._verify_chunks():
                if first and chunk[0] > min(first):
                    break
                await queue.put(chunk)
            for _ in range(self.workers):
                await queue.put(None)

        async def read(endpoint: Endpoint, offset: int, view: memoryview) -> None:
            await self._retrying("verify", offset, lambda: endpoint.read_into(offset=offset, buffer=view))

        async def work() -> None:
            source_buffer = memoryview(bytearray(self.request_size))
            target_buffer = memoryview(bytearray(self.request_size))
            while (chunk := await queue.get()) is not None:
                offset, length = chunk
                src, dst = source_buffer[:length], target_buffer[:length]
                await read(source, offset, src)
                await read(self.target, offset, dst)
                if src != dst:
                    first.append(offset + _first_difference(src, dst))

        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(self.workers):
                group.create_task(work())
        if first:
            offset = min(first)
            raise VerifyError(f"verify: source and target differ at offset {offset}", offset=offset)


async def _aiter(items: AsyncIterator[WorkItem] | Iterable[WorkItem]) -> AsyncIterator[WorkItem]:
    if isinstance(items, AsyncIterator):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _first_difference(a: memoryview, b: memoryview) -> int:
    step = 4096
    for start in range(0, len(a), step):
        if a[start : start + step] != b[start : start + step]:
            for i in range(start, min(len(a), start + step)):
                if a[i] != b[i]:
                    return i
    return len(a)


def _mode(value: TargetMode | str) -> TargetMode:
    return value if isinstance(value, TargetMode) else TargetMode(value)


async def _resolve_mode(target: Endpoint, mode: TargetMode) -> TargetMode:
    if mode is not TargetMode.AUTO:
        return mode
    try:
        return await probe_target_mode(target)
    except EndpointError as exc:
        raise CopyError(str(exc), offset=exc.offset) from exc


async def copy(
    source: Endpoint,
    target: Endpoint,
    *,
    connections: int = 4,
    requests: int = 16,
    request_size: int = DEFAULT_REQUEST_SIZE,
    target_mode: TargetMode | str = TargetMode.AUTO,
    changed_areas: Iterable[tuple[int, int]] | None = None,
    merge_gap: int = DEFAULT_MERGE_GAP,
    verify: bool = False,
    flush: bool = True,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.5,
    retries: int = 5,
    backoff: float = 0.1,
    checkpoint_bytes: int = 1 << 30,
    overlay_zeroes: str = "write-zeroes",
) -> CopyResult:
    """Copy ``source`` to ``target`` (both open :class:`Endpoint` objects).

    ``changed_areas`` (``(offset, length)``, e.g. from CBT) limits the copy
    to those areas. ``overlay_zeroes`` is ``"write-zeroes"`` (WRITE_ZEROES
    with NO_HOLE: the server must make the range read zeroes, as qemu and our
    qcow2 server do with the zero flag) or ``"buffers"`` (send zero data).
    Success is reported only after the target's FLUSH (unless ``flush=False``).
    """
    if connections < 1 or requests < 1 or retries < 0:
        raise ValueError("connections and requests must be positive, retries not negative")
    if overlay_zeroes not in ("write-zeroes", "buffers"):
        raise ValueError(f"overlay_zeroes is 'write-zeroes' or 'buffers', not {overlay_zeroes!r}")
    size = source.size
    if target.size < size:
        raise CopyError(f"the target ({target.size} bytes) is smaller than the source ({size} bytes)")
    block = math.lcm(source.min_block, target.min_block)
    limit = min(request_size, source.max_request, target.max_request)
    limit = max(block, limit // block * block)
    scope = None
    if changed_areas is not None:
        scope = merge_areas(changed_areas, size=size, merge_gap=merge_gap, min_block=block)
    mode = await _resolve_mode(target, _mode(target_mode))
    reporter = _Reporter(progress, size, size if scope is None else sum(n for _, n in scope), progress_interval)
    streams = max(1, min(connections, source.connections, target.connections))
    copier = _Copier(
        source,
        target,
        scope=scope,
        request_size=limit,
        block=block,
        mode=mode,
        workers=streams * requests,
        retries=retries,
        backoff=backoff,
        checkpoint_bytes=checkpoint_bytes,
        zero_buffers=mode is TargetMode.OVERLAY and overlay_zeroes == "buffers",
        reporter=reporter,
    )
    try:
        try:
            flushed = await copier.run(flush=flush)
            if verify:
                await _verify(copier, source)
        except BaseExceptionGroup as group:
            raise first_error(group, prefer=CopyError) from None
    except Exception as exc:
        reporter.final(error=str(exc))
        raise
    reporter.final()
    return _result(copier, flushed=flushed, verified=verify)


def _result(copier: _Copier, *, flushed: bool, verified: bool) -> CopyResult:
    snapshot = copier.reporter.snapshot(done=True)
    return CopyResult(
        size=copier.size,
        copied=snapshot.copied,
        zeroed=snapshot.zeroed,
        skipped=snapshot.skipped,
        written=copier.written,
        retries=copier.retry_count,
        reconnects=copier.target.generation - copier.generation_base,
        elapsed=snapshot.elapsed,
        target_mode=copier.mode,
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
