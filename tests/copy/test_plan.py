"""Copy planning: coverage, limits, alignment, zero handling per target mode, CBT merging."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.copy.plan import Action, TargetMode, WorkItem, merge_areas, plan
from sendense_nbd.protocol.extents import Extent

HOLE, ZERO = 1, 2
MiB = 1 << 20
KiB = 1 << 10


@st.composite
def disks(draw: st.DrawFn) -> tuple[int, list[Extent]]:
    """A size and extents covering it (sometimes leaving a tail undescribed)."""
    lengths = draw(st.lists(st.integers(1, 3 * MiB), min_size=0, max_size=12))
    flags = draw(st.lists(st.sampled_from([0, HOLE, ZERO, HOLE | ZERO]), min_size=len(lengths), max_size=len(lengths)))
    extents, pos = [], 0
    for length, flag in zip(lengths, flags):
        extents.append(Extent(pos, length, flag))
        pos += length
    tail = draw(st.integers(0, MiB))
    return pos + tail, extents


def covers_exactly(items: list[WorkItem], size: int) -> None:
    pos = 0
    for item in items:
        assert item.offset == pos, (item, pos)
        pos = item.end
    assert pos == size


def reads_zero_at(extents: list[Extent], offset: int) -> bool:
    return any(e.offset <= offset < e.end and e.status & ZERO for e in extents)


modes = st.sampled_from([TargetMode.FRESH, TargetMode.RAW, TargetMode.OVERLAY])
blocks = st.sampled_from([1, 512, 4096, 65536])
request_sizes = st.sampled_from([64 * KiB, 100_000, MiB, 4 * MiB])


@settings(max_examples=300, deadline=None)
@given(disks(), modes, blocks, request_sizes)
def test_full_plan_covers_every_byte_once(disk, mode, block, request_size) -> None:
    size, extents = disk
    p = plan(extents, size=size, mode=mode, request_size=request_size, min_block=block, zero_size=2 * MiB)
    items = list(p.items())
    covers_exactly(items, size)
    covers_exactly(list(p.ranges), size)
    limit = max(block, request_size // block * block)
    for item in items:
        if item.action is Action.COPY:
            assert item.length <= limit
        if item.action is Action.ZERO:
            assert item.length <= max(block, 2 * MiB // block * block)
        # every boundary is block aligned, except the end of the disk
        assert item.offset % block == 0
        assert item.end % block == 0 or item.end == size
        if item.action is not Action.COPY:  # only source zeroes are zeroed or skipped
            assert reads_zero_at(extents, item.offset) and reads_zero_at(extents, item.end - 1)
    if mode is TargetMode.FRESH:
        assert not any(i.action is Action.ZERO for i in items)
    else:  # a full copy to a non-fresh target never leaves anything alone
        assert not any(i.action is Action.SKIP for i in items)
    assert p.copy_bytes + p.zero_bytes + p.skip_bytes == size


def test_hole_without_zero_flag_is_copied() -> None:
    p = plan([Extent(0, MiB, HOLE), Extent(MiB, MiB, HOLE | ZERO)], size=2 * MiB, mode=TargetMode.FRESH)
    assert p.ranges == (WorkItem(0, MiB, Action.COPY), WorkItem(MiB, MiB, Action.SKIP))


def test_zero_modes() -> None:
    extents = [Extent(0, MiB, 0), Extent(MiB, 2 * MiB, HOLE | ZERO), Extent(3 * MiB, MiB, 0)]
    for mode, action in (
        (TargetMode.FRESH, Action.SKIP),
        (TargetMode.RAW, Action.ZERO),
        (TargetMode.OVERLAY, Action.ZERO),
    ):
        p = plan(extents, size=4 * MiB, mode=mode)
        assert [r.action for r in p.ranges] == [Action.COPY, action, Action.COPY]
    with pytest.raises(ValueError):
        plan(extents, size=4 * MiB, mode=TargetMode.AUTO)


def test_unaligned_zero_area_shrinks_and_data_grows() -> None:
    extents = [Extent(0, 1000, 0), Extent(1000, 10000, ZERO), Extent(11000, 5384, 0)]
    p = plan(extents, size=16384, mode=TargetMode.RAW, min_block=4096)
    assert p.ranges == (
        WorkItem(0, 4096, Action.COPY),
        WorkItem(4096, 4096, Action.ZERO),
        WorkItem(8192, 8192, Action.COPY),
    )


def test_split_at_request_size() -> None:
    p = plan([], size=10 * MiB, mode=TargetMode.RAW, request_size=4 * MiB)
    assert [(i.offset, i.length) for i in p.items()] == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 2 * MiB)]


def test_changed_areas_merge_and_split() -> None:
    changed = [(0, 4096), (4096 + MiB, 4096), (10 * MiB, 4096), (20 * MiB, 9 * MiB)]
    merged = merge_areas(changed, size=64 * MiB)
    assert merged == [(0, MiB + 8192), (10 * MiB, 4096), (20 * MiB, 9 * MiB)]
    p = plan([], size=64 * MiB, mode=TargetMode.OVERLAY, changed=changed, request_size=4 * MiB)
    copies = [(i.offset, i.length) for i in p.items() if i.action is Action.COPY]
    assert copies == [(0, MiB + 8192), (10 * MiB, 4096), (20 * MiB, 4 * MiB), (24 * MiB, 4 * MiB), (28 * MiB, MiB)]
    assert p.skip_bytes == 64 * MiB - (MiB + 8192 + 4096 + 9 * MiB)


def test_changed_zero_area_is_written_even_on_fresh_target() -> None:
    p = plan([Extent(0, 8 * MiB, HOLE | ZERO)], size=8 * MiB, mode=TargetMode.FRESH, changed=[(MiB, MiB)])
    assert p.ranges == (
        WorkItem(0, MiB, Action.SKIP),
        WorkItem(MiB, MiB, Action.ZERO),
        WorkItem(2 * MiB, 6 * MiB, Action.SKIP),
    )


areas = st.lists(st.tuples(st.integers(0, 64 * MiB), st.integers(0, 4 * MiB)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(areas, st.sampled_from([0, 4096, MiB]), blocks, modes)
def test_changed_plan_properties(changed, gap, block, mode) -> None:
    size = 48 * MiB + 1234
    merged = merge_areas(changed, size=size, merge_gap=gap, min_block=block)
    # merged areas are sorted, disjoint, never joined across a gap > merge_gap, and cover every changed byte
    for (a, la), (b, _) in zip(merged, merged[1:]):
        assert b - (a + la) > gap
    for offset, length in changed:
        end = min(size, offset + length)
        if offset < end:
            assert any(m <= offset and end <= m + n for m, n in merged)
    extents = [Extent(0, 16 * MiB, 0), Extent(16 * MiB, 16 * MiB, HOLE | ZERO), Extent(32 * MiB, size - 32 * MiB, 0)]
    p = plan(extents, size=size, mode=mode, changed=changed, merge_gap=gap, min_block=block, request_size=MiB)
    items = list(p.items())
    covers_exactly(items, size)
    in_scope = sum(n for _, n in merged)
    assert p.copy_bytes + p.zero_bytes == in_scope
    for item in items:
        inside = any(m <= item.offset and item.end <= m + n for m, n in merged)
        assert inside == (item.action is not Action.SKIP)
        if item.action is Action.COPY:
            assert item.length <= MiB
