"""The pure qcow2 mapping (storage/qcow2/mapping.py) on hand-made L2 entries and tables.

Property tests compare :meth:`Layout.runs` with a byte-by-byte reading of the
entries, and check that every :meth:`Layout.plan_zero` decision makes the range
read as zeroes, leaves the rest of the cluster alone and never lets a backing
file show through. Hypothesis prints the failing example (it is the seed).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage.qcow2 import format as fmt
from sendense_nbd.storage.qcow2.mapping import FULL, ClusterKind, Layout, Run

CS = 65536
SUB = CS // fmt.SUBCLUSTERS
STANDARD = Layout(16, extended=False, zero_flag=True, name="test.qcow2")
EXTENDED = Layout(16, extended=True, zero_flag=True, name="test.qcow2")
V2 = Layout(16, extended=False, zero_flag=False, name="test.qcow2")
LAYOUTS = {"v3": STANDARD, "extended": EXTENDED, "v2": V2}

U, Z, D, C, S = ClusterKind


def entries_of(table: dict[int, tuple[int, int]], layout: Layout):  # type: ignore[no-untyped-def]
    """``entry_at`` over a {cluster index: (entry, bitmap)} table; missing clusters are unallocated."""
    return lambda guest: table.get(guest >> layout.cluster_bits, (0, 0))


def reads_as(layout: Layout, entry: int, bitmap: int, in_cluster: int) -> tuple[ClusterKind, int]:
    """How one byte of a cluster reads, straight from the spec: (kind, host offset for data)."""
    host = entry & fmt.OFFSET_MASK
    if entry & fmt.COMPRESSED:
        return C, 0
    if layout.extended:
        index = in_cluster // SUB
        if bitmap >> index & 1:
            return D, host + in_cluster
        return (Z, 0) if bitmap >> (32 + index) & 1 else (U, 0)
    if layout.zero_flag and entry & fmt.ZERO:
        return Z, 0
    return (D, host + in_cluster) if host else (U, 0)


# -- classify, decode, encode --------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "entry", "bitmap", "kind"),
    [
        (STANDARD, 0, 0, U),
        (STANDARD, fmt.ZERO, 0, Z),
        (STANDARD, 5 * CS | fmt.ZERO | fmt.COPIED, 0, Z),  # preallocated zero cluster
        (STANDARD, 5 * CS | fmt.COPIED, 0, D),
        (STANDARD, 5 * CS, 0, D),  # shared (refcount > 1): still data
        (STANDARD, fmt.COMPRESSED | 12345, 0, C),
        (V2, fmt.ZERO, 0, U),  # v2 has no zero flag
        (V2, 5 * CS | fmt.ZERO, 0, D),
        (EXTENDED, 0, 0, U),
        (EXTENDED, 5 * CS | fmt.COPIED, FULL, D),
        (EXTENDED, 0, FULL << 32, Z),
        (EXTENDED, 5 * CS | fmt.COPIED, 1 | (2 << 32), S),
        (EXTENDED, 0, 4 << 32, S),
        (EXTENDED, fmt.COMPRESSED | 99, 0, C),
    ],
)
def test_classify(layout: Layout, entry: int, bitmap: int, kind: ClusterKind) -> None:
    assert layout.classify(entry, bitmap) is kind


@settings(max_examples=200, deadline=None)
@given(
    extended=st.booleans(),
    index=st.integers(0, 4095),
    entry=st.integers(0, 2**64 - 1),
    bitmap=st.integers(0, 2**64 - 1),
)
def test_encode_decode_round_trip(extended: bool, index: int, entry: int, bitmap: int) -> None:
    layout = EXTENDED if extended else STANDARD
    table = bytearray(CS)
    index %= layout.l2_entries
    layout.encode(table, index, entry, bitmap)
    assert layout.decode(table, index) == (entry, bitmap if extended else 0)
    width = 16 if extended else 8
    assert not table[: index * width].strip(b"\0") and not table[(index + 1) * width :].strip(b"\0")


def test_locate() -> None:
    assert STANDARD.l2_entries == 8192 and EXTENDED.l2_entries == 4096
    assert STANDARD.locate(0) == (0, 0)
    assert STANDARD.locate(8192 * CS + 3 * CS + 17) == (1, 3)
    assert EXTENDED.locate(4096 * CS + CS - 1) == (1, 0)


# -- runs ----------------------------------------------------------------------------


def test_contiguous_data_is_one_run_however_many_clusters() -> None:
    table = {i: ((100 + i) * CS | fmt.COPIED, 0) for i in range(1000)}
    runs = STANDARD.runs(123, 1000 * CS - 123, entries_of(table, STANDARD))
    assert runs == [Run(D, 123, 1000 * CS - 123, 100 * CS + 123, fmt.COPIED | 100 * CS)]
    assert runs[0].end == 1000 * CS


def test_runs_split_where_reading_changes() -> None:
    table = {
        0: (10 * CS | fmt.COPIED, 0),
        1: (12 * CS | fmt.COPIED, 0),  # not host-contiguous with cluster 0
        2: (fmt.ZERO, 0),
        3: (0, 0),
        4: (fmt.COMPRESSED | 7 * CS, 0),
        5: (fmt.COMPRESSED | 7 * CS, 0),  # compressed clusters never merge
    }
    runs = STANDARD.runs(0, 7 * CS, entries_of(table, STANDARD))
    assert [(r.kind, r.guest, r.length, r.host) for r in runs] == [
        (D, 0, CS, 10 * CS),
        (D, CS, CS, 12 * CS),
        (Z, 2 * CS, CS, 0),
        (U, 3 * CS, CS, 0),
        (C, 4 * CS, CS, 0),
        (C, 5 * CS, CS, 0),
        (U, 6 * CS, CS, 0),
    ]
    assert runs[4].entry == fmt.COMPRESSED | 7 * CS


def test_subclusters_become_pieces_and_merge_with_neighbours() -> None:
    # cluster 0: zero; cluster 1: subclusters 0-1 zero, 2 data, rest unallocated; cluster 2: unallocated
    table = {0: (0, FULL << 32), 1: (9 * CS | fmt.COPIED, (1 << 2) | (3 << 32))}
    runs = EXTENDED.runs(0, 3 * CS, entries_of(table, EXTENDED))
    assert [(r.kind, r.guest, r.length, r.host) for r in runs] == [
        (Z, 0, CS + 2 * SUB, 0),
        (D, CS + 2 * SUB, SUB, 9 * CS + 2 * SUB),
        (U, CS + 3 * SUB, 2 * CS - 3 * SUB, 0),
    ]
    assert all(r.kind is not S for r in runs)


def test_misaligned_data_is_a_corruption_error() -> None:
    table = {0: (10 * CS + 512 | fmt.COPIED, 0)}
    with pytest.raises(DeviceError, match="test.qcow2 is corrupt: guest cluster at 0") as caught:
        STANDARD.runs(0, CS, entries_of(table, STANDARD))
    assert caught.value.errno == Errno.EIO


def _cluster_entries(layout: Layout) -> st.SearchStrategy[tuple[int, int]]:
    host = st.integers(1, 64).map(lambda n: n * CS)
    compressed = st.integers(1, 2**40).map(lambda x: (fmt.COMPRESSED | x, 0))
    standard = st.one_of(
        st.just((0, 0)),
        st.just((fmt.ZERO, 0)),
        host.map(lambda h: (h | fmt.COPIED, 0)),
        host.map(lambda h: (h | fmt.COPIED | fmt.ZERO, 0)),
        compressed,
    )
    if not layout.extended:
        return standard
    bits = st.tuples(st.integers(0, FULL), st.integers(0, FULL)).map(lambda ab: (ab[0] & ~ab[1]) | (ab[1] << 32))
    return st.one_of(
        st.just((0, 0)),
        st.tuples(host, bits).map(lambda hb: (hb[0] | fmt.COPIED, hb[1])),
        st.tuples(host, st.just(FULL)).map(lambda hb: (hb[0] | fmt.COPIED, hb[1])),
        st.just((0, FULL << 32)),
        compressed,
    )


@st.composite
def mapped_range(draw: st.DrawFn) -> tuple[Layout, dict[int, tuple[int, int]], int, int]:
    layout = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    clusters = draw(st.integers(1, 6))
    table = {i: draw(_cluster_entries(layout)) for i in range(clusters)}
    offset = draw(st.integers(0, clusters * CS - 1))
    length = draw(st.integers(1, clusters * CS - offset))
    return layout, table, offset, length


@settings(max_examples=300, deadline=None)
@given(mapped_range())
def test_runs_agree_with_reading_byte_by_byte(case: tuple[Layout, dict[int, tuple[int, int]], int, int]) -> None:
    layout, table, offset, length = case
    runs = layout.runs(offset, length, entries_of(table, layout))
    # the runs tile the range, in order, without gaps or empty runs
    assert runs[0].guest == offset and runs[-1].end == offset + length
    assert all(r.length > 0 for r in runs) and all(a.end == b.guest for a, b in zip(runs, runs[1:], strict=False))
    # every byte reads as the spec says (checked at run edges and subcluster edges inside each run)
    for run in runs:
        points = {run.guest, run.end - 1} | set(range(run.guest - run.guest % SUB + SUB, run.end, SUB))
        for guest in points:
            entry, bitmap = table[guest // CS]
            kind, host = reads_as(layout, entry, bitmap, guest % CS)
            assert run.kind is kind, (run, guest)
            if kind is D:
                assert run.host + (guest - run.guest) == host, (run, guest)
    # maximal: neighbours that read the same way (and are not compressed) would have been merged
    for a, b in zip(runs, runs[1:], strict=False):
        if a.kind is b.kind and a.kind in (U, Z):
            pytest.fail(f"{a} and {b} should be one run")
        if a.kind is b.kind is D:
            assert a.host + a.length != b.host, f"{a} and {b} should be one run"


# -- plan_zero -----------------------------------------------------------------------


@st.composite
def zero_case(draw: st.DrawFn) -> tuple[Layout, int, int, int, int, bool, bool]:
    layout = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    entry, bitmap = draw(_cluster_entries(layout))
    shape = draw(st.sampled_from(["whole", "subclusters", "bytes"]))
    if shape == "whole":
        start, length = 0, CS
    elif shape == "subclusters":
        first = draw(st.integers(0, fmt.SUBCLUSTERS - 1))
        start, length = first * SUB, draw(st.integers(1, fmt.SUBCLUSTERS - first)) * SUB
    else:
        start = draw(st.integers(0, CS - 1))
        length = draw(st.integers(1, CS - start))
    return layout, entry, bitmap, start, length, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(zero_case())
def test_plan_zero_reads_as_zeroes_and_never_shows_the_backing_file(
    case: tuple[Layout, int, int, int, int, bool, bool],
) -> None:
    layout, entry, bitmap, start, length, may_trim, backing_shows = case
    plan = layout.plan_zero(entry, bitmap, start=start, length=length, may_trim=may_trim, backing_shows=backing_shows)
    whole = length == CS
    old_kind = layout.classify(entry, bitmap)
    if plan is not None and plan.write_zeroes:  # the copy-on-write path: only for what the entry cannot express
        assert not whole or not layout.zero_flag
        assert not plan.free and not plan.free_compressed
        return
    new_entry, new_bitmap = (entry, bitmap) if plan is None else (plan.entry, plan.bitmap)
    for in_cluster in {start, start + length - 1, start + length // 2}:
        kind, _ = reads_as(layout, new_entry, new_bitmap, in_cluster)
        assert kind is Z or (kind is U and not backing_shows), (plan, in_cluster)
    for in_cluster in {0, start - 1, start + length, CS - 1} - set(range(start, start + length)):
        if 0 <= in_cluster < CS:  # the rest of the cluster reads as it did
            assert reads_as(layout, new_entry, new_bitmap, in_cluster) == reads_as(layout, entry, bitmap, in_cluster)
    if plan is None:
        return  # it read as zeroes already (checked above)
    owned = entry & fmt.OFFSET_MASK if old_kind is not C and entry & fmt.COPIED else 0
    if plan.free:  # only a discard of a whole cluster gives its host cluster back, and only its own
        assert may_trim and whole and plan.free == owned
        assert not new_entry & fmt.OFFSET_MASK
    elif owned and not (new_entry & fmt.OFFSET_MASK):
        pytest.fail(f"{plan} drops host cluster {owned} without freeing it")
    assert plan.free_compressed == (old_kind is C)


def test_plan_zero_of_an_unallocated_cluster_without_backing_is_nothing() -> None:
    for layout in LAYOUTS.values():
        assert layout.plan_zero(0, 0, start=0, length=CS, may_trim=False, backing_shows=False) is None


def test_plan_zero_over_backing_data_sets_the_zero_flag() -> None:
    plan = STANDARD.plan_zero(0, 0, start=0, length=CS, may_trim=True, backing_shows=True)
    assert plan is not None and (plan.entry, plan.free, plan.write_zeroes) == (fmt.ZERO, 0, False)
    plan = EXTENDED.plan_zero(0, 0, start=0, length=CS, may_trim=True, backing_shows=True)
    assert plan is not None and (plan.entry, plan.bitmap) == (0, FULL << 32)
    plan = V2.plan_zero(0, 0, start=0, length=CS, may_trim=True, backing_shows=True)
    assert plan is not None and plan.write_zeroes
