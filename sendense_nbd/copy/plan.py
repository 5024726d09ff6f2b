"""Copy planning: from source extents to COPY / ZERO / SKIP work items (pure, no I/O).

Theory of operation:

1. *Scope.* A full copy covers ``[0, size)``. A changed-area copy (CBT
   incremental) covers only the listed ``(offset, length)`` areas, after
   :func:`merge_areas` joined neighbours whose gap is at most ``merge_gap``
   (1 MiB, as the system we replace did: one larger request beats two small
   ones plus a seek) and widened them to the target's ``min_block``. Bytes out
   of scope become SKIP items, so a plan always covers every byte of the disk
   exactly once.
2. *Classification.* Inside the scope, each source extent of the
   ``base:allocation`` context (doc/proto.md, "Metadata querying") is data
   or reads-as-zero (flag ``NBD_STATE_ZERO``; a hole without that flag may
   read as anything, so it is data). Data becomes COPY. A zero area becomes
   SKIP when the target already reads zeroes there — a ``fresh`` target in a
   full copy — and ZERO otherwise: on a ``raw`` target the engine may let the
   server punch a hole, on an ``overlay`` (a qcow2 over a backing chain) it
   must write zeroes that hide the backing file. A changed area that now
   reads as zero is never skipped, whatever the mode: the target holds the
   old data.
3. *Alignment.* Requests must be multiples of the target's ``min_block``
   (doc/proto.md, "Block size constraints"). Zero areas shrink inward to
   block boundaries and the cut-off fragments are copied (reading them
   returns zeroes, so copying them is always correct); data never shrinks.
4. *Splitting.* :meth:`Plan.items` lazily splits COPY ranges at
   ``request_size`` and ZERO ranges at ``zero_size``; SKIP ranges are not
   split. The unsplit ranges are kept (one per extent run, not per request).
5. *Windows.* With ``span`` a plan covers only that part of the disk, so
   the engine can plan (and hold the extents of) one bounded window at a
   time: memory stays O(window) however fragmented the disk is.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence

import attrs

from sendense_nbd.protocol.extents import Extent

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_REQUEST_SIZE = 256 * 1024  # nbdcopy's default: as fast here, a sixteenth of the memory
DEFAULT_ZERO_SIZE = 256 * MiB
#: Changed areas closer than this are copied as one by default (``CopyOptions.merge_gap``): fewer, larger
#: requests for the unchanged bytes between them, which suits a LAN. Backups default to 0, only changed
#: bytes (``BackupSpec.merge_gap``, docs/BACKUP_CLIENT.md).
DEFAULT_MERGE_GAP = 1 * MiB


class Action(enum.Enum):
    """What the engine does with a range of the target."""

    COPY = "copy"  # read the source, write the target (zero detection may still turn it into ZERO/SKIP)
    ZERO = "zero"  # make the target read zeroes
    SKIP = "skip"  # leave the target alone


class TargetMode(enum.Enum):
    """What the target reads where the copy does not write."""

    #: Probe the target (the engine resolves this before planning).
    AUTO = "auto"
    #: Reads zeroes everywhere (new sparse file, new qcow2 without backing).
    FRESH = "fresh"
    #: Holds arbitrary data and no backing chain: zero areas may become holes.
    RAW = "raw"
    #: Has a backing chain: zero areas must be written as zeroes, never holes.
    OVERLAY = "overlay"


def _nonnegative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value}")


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.frozen(slots=True)
class WorkItem:
    """One range of the disk and what to do with it."""

    offset: int = attrs.field(validator=_nonnegative)
    length: int = attrs.field(validator=_positive)
    action: Action

    @property
    def end(self) -> int:
        """The first byte after the item."""
        return self.offset + self.length


@attrs.frozen(slots=True)
class Plan:
    """Unsplit ranges covering ``[0, size)`` in order; :meth:`items` splits them."""

    size: int
    ranges: tuple[WorkItem, ...]
    request_size: int
    zero_size: int

    def items(self) -> Iterator[WorkItem]:
        """Work items in disk order: COPY at most ``request_size``, ZERO at most ``zero_size``."""
        for item in self.ranges:
            if item.action is Action.SKIP:
                yield item
                continue
            limit = self.request_size if item.action is Action.COPY else self.zero_size
            for start in range(item.offset, item.end, limit):
                yield WorkItem(start, min(limit, item.end - start), item.action)

    def bytes_for(self, action: Action) -> int:
        """Bytes of the ranges with ``action``."""
        return sum(item.length for item in self.ranges if item.action is action)

    @property
    def copy_bytes(self) -> int:
        """Bytes to read and check."""
        return self.bytes_for(Action.COPY)

    @property
    def zero_bytes(self) -> int:
        """Bytes to make zero."""
        return self.bytes_for(Action.ZERO)

    @property
    def skip_bytes(self) -> int:
        """Bytes left alone."""
        return self.bytes_for(Action.SKIP)


def _round_down(value: int, block: int) -> int:
    return value - value % block


def _round_up(value: int, block: int, limit: int) -> int:
    return min(limit, -(-value // block) * block)


def merge_areas(
    areas: Iterable[tuple[int, int]], *, size: int, merge_gap: int = DEFAULT_MERGE_GAP, min_block: int = 1
) -> list[tuple[int, int]]:
    """Sort changed ``(offset, length)`` areas, clip them to ``size``, widen
    them to ``min_block`` and join those whose gap is at most ``merge_gap``."""
    if merge_gap < 0:
        raise ValueError("merge_gap must not be negative")
    spans = []
    for offset, length in areas:
        if offset < 0 or length < 0:
            raise ValueError(f"bad changed area ({offset}, {length})")
        end = min(size, offset + length)
        if offset < end:
            spans.append((_round_down(offset, min_block), _round_up(end, min_block, size)))
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= merge_gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


def _classify(extents: Iterable[Extent], scope: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, zero)`` pieces of the scope; bytes no extent describes are data."""
    ordered = sorted((e.offset, e.end, e.zero) for e in extents if e.length > 0)
    index = 0
    for area_start, area_length in scope:
        area_end = area_start + area_length
        pos = area_start
        while index < len(ordered) and ordered[index][1] <= pos:
            index += 1
        probe = index
        while pos < area_end:
            if probe < len(ordered) and ordered[probe][0] <= pos:
                _, ext_end, zero = ordered[probe]
                end = min(ext_end, area_end)
                if end > pos:
                    yield pos, end, zero
                    pos = end
                if ext_end <= pos:
                    probe += 1
                continue
            # Not described: treat as data, up to the next extent.
            end = area_end if probe >= len(ordered) else min(area_end, ordered[probe][0])
            yield pos, end, False
            pos = end


def _append(out: list[WorkItem], start: int, end: int, action: Action) -> None:
    if end <= start:
        return
    if out and out[-1].action is action and out[-1].end == start:
        out[-1] = WorkItem(out[-1].offset, end - out[-1].offset, action)
    else:
        out.append(WorkItem(start, end - start, action))


def plan(
    extents: Iterable[Extent],
    *,
    size: int,
    mode: TargetMode,
    request_size: int = DEFAULT_REQUEST_SIZE,
    zero_size: int = DEFAULT_ZERO_SIZE,
    min_block: int = 1,
    changed: Iterable[tuple[int, int]] | None = None,
    merge_gap: int = DEFAULT_MERGE_GAP,
    span: tuple[int, int] | None = None,
) -> Plan:
    """Plan a copy of ``size`` bytes.

    ``extents`` are the source's ``base:allocation`` map (bytes they do not
    describe count as data);
    ``changed`` (CBT) limits the copy to those areas. ``request_size`` and
    ``zero_size`` are rounded down to ``min_block`` (but are at least one block).
    ``span`` (``(start, end)``, block-aligned except at ``size``) limits the
    plan's ranges to that window of the disk.
    """
    if mode is TargetMode.AUTO:
        raise ValueError("resolve TargetMode.AUTO (probe the target) before planning")
    if size < 0 or min_block <= 0 or request_size <= 0 or zero_size <= 0:
        raise ValueError("size must not be negative; block and request sizes must be positive")
    request_size = max(min_block, _round_down(request_size, min_block))
    zero_size = max(min_block, _round_down(zero_size, min_block))
    full = changed is None
    scope = (
        [(0, size)] if changed is None else merge_areas(changed, size=size, merge_gap=merge_gap, min_block=min_block)
    )
    low, high = (0, size) if span is None else (max(0, span[0]), min(size, span[1]))
    if span is not None:
        scope = [(max(o, low), min(o + n, high) - max(o, low)) for o, n in scope if min(o + n, high) > max(o, low)]
    zero_action = Action.SKIP if full and mode is TargetMode.FRESH else Action.ZERO
    out: list[WorkItem] = []
    pos = low
    for start, end, zero in _classify(extents, scope):
        _append(out, pos, start, Action.SKIP)  # out of scope
        if zero:
            inner_start, inner_end = _round_up(start, min_block, size), _round_down(end, min_block)
            if end == size:
                inner_end = end
            if inner_start < inner_end:
                _append(out, start, inner_start, Action.COPY)
                _append(out, inner_start, inner_end, zero_action)
                _append(out, inner_end, end, Action.COPY)
            else:
                _append(out, start, end, Action.COPY)
        else:
            _append(out, start, end, Action.COPY)
        pos = end
    _append(out, pos, high, Action.SKIP)
    return Plan(size, tuple(out), request_size, zero_size)
