"""Where the guest bytes of one qcow2 image live: pure code over L2 entries.

Nothing here touches a file. A guest cluster's L2 entry (and, with extended
L2, its 64-bit subcluster bitmap: allocation bits low, zero bits high) has a
:class:`ClusterKind`; :meth:`Layout.runs` turns the entries of a guest range
into :class:`Run` objects, one per stretch that reads the same way (host-
contiguous data, zeroes, unallocated), so a large run costs one object however
many clusters it covers. :meth:`Layout.plan_zero` decides how zeroing part of
a cluster changes its entry; the device carries the decisions out.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

import attrs

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage.qcow2 import format as fmt

#: All 32 subclusters of an extended L2 bitmap half.
FULL = (1 << 32) - 1

_ENTRY = struct.Struct(">Q")
_EXTENDED_ENTRY = struct.Struct(">QQ")


class ClusterKind(enum.IntEnum):
    """How a guest cluster reads, from its L2 entry."""

    UNALLOCATED = 0  #: the backing file, or zeroes without one
    ZERO = 1  #: zeroes, never the backing file
    DATA = 2  #: the host cluster the entry points at
    COMPRESSED = 3  #: compressed bytes somewhere in the file
    SUBCLUSTERS = 4  #: extended L2: each subcluster data, zero or unallocated


_UNALLOCATED, _ZERO, _DATA, _COMPRESSED, _SUBCLUSTERS = ClusterKind


@attrs.frozen(slots=True)
class Run:
    """``length`` guest bytes from ``guest`` that read one way.

    ``host`` is where a DATA run's first byte lies in the file; ``entry`` is
    a COMPRESSED cluster's L2 entry (where its compressed bytes are).
    """

    kind: ClusterKind
    guest: int
    length: int
    host: int = 0
    entry: int = 0

    @property
    def end(self) -> int:
        """The guest offset just past the run."""
        return self.guest + self.length


@attrs.define(slots=True)  # not frozen: one is made per zeroed cluster, and frozen init costs twice as much
class ZeroPlan:
    """How to make part of one guest cluster read as zeroes (a value: never changed once made).

    Free ``free`` (a host cluster, 0 for none) and the compressed bytes of
    the old entry when ``free_compressed``, then store ``entry`` with
    ``bitmap``; or, with ``write_zeroes``, write zero bytes through the
    ordinary copy-on-write path instead.
    """

    entry: int = 0
    bitmap: int = 0
    free: int = 0
    free_compressed: bool = False
    write_zeroes: bool = False


def _owned(host: int) -> int:
    """The entry of a standard cluster this image alone owns at ``host`` (0: none)."""
    return host | fmt.COPIED if host else 0


class _Builder:
    """Collects runs, extending the last one while clusters continue it."""

    __slots__ = ("runs", "kind", "guest", "length", "host", "entry")

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.kind: ClusterKind | None = None
        self.guest = self.length = self.host = self.entry = 0

    def add(self, kind: ClusterKind, guest: int, length: int, host: int, entry: int) -> None:
        """Add ``length`` bytes from ``guest``, merged into the last run if they continue it."""
        if (
            kind == self.kind
            and guest == self.guest + self.length
            and (kind <= _ZERO or (kind == _DATA and host == self.host + self.length))
        ):
            self.length += length
            return
        if self.kind is not None:
            self.runs.append(Run(self.kind, self.guest, self.length, self.host, self.entry))
        self.kind, self.guest, self.length, self.host, self.entry = kind, guest, length, host, entry

    def finish(self) -> list[Run]:
        """The runs collected."""
        if self.kind is not None:
            self.runs.append(Run(self.kind, self.guest, self.length, self.host, self.entry))
            self.kind = None
        return self.runs


@attrs.frozen(slots=True)
class Layout:
    """The mapping geometry of one image: cluster size, L2 entry format, zero flag.

    ``name`` only labels error messages.
    """

    cluster_bits: int
    extended: bool = False
    #: v3 images have the zero flag (bit 0 of a standard entry); v2 do not.
    zero_flag: bool = True
    name: str = "image"
    cluster_size: int = attrs.field(init=False)
    l2_entries: int = attrs.field(init=False)

    @cluster_size.default
    def _cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @l2_entries.default
    def _l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended else 8)

    @classmethod
    def of(cls, header: fmt.Header, name: str) -> Layout:
        """The layout ``header`` describes."""
        return cls(header.cluster_bits, header.extended_l2, header.version >= 3, name)

    def locate(self, guest: int) -> tuple[int, int]:
        """``(L1 index, L2 index)`` of the guest cluster holding byte ``guest``."""
        return divmod(guest >> self.cluster_bits, self.l2_entries)

    def decode(self, table: bytes | bytearray, index: int) -> tuple[int, int]:
        """``(entry, subcluster bitmap)`` at ``index`` of an L2 table (bitmap 0 without extended L2)."""
        if self.extended:
            entry, bitmap = _EXTENDED_ENTRY.unpack_from(table, index * 16)
            return entry, bitmap
        return _ENTRY.unpack_from(table, index * 8)[0], 0

    def encode(self, table: bytearray, index: int, entry: int, bitmap: int) -> None:
        """Store ``entry`` (and ``bitmap`` with extended L2) at ``index`` of an L2 table."""
        if self.extended:
            _EXTENDED_ENTRY.pack_into(table, index * 16, entry, bitmap)
        else:
            _ENTRY.pack_into(table, index * 8, entry)

    def classify(self, entry: int, bitmap: int) -> ClusterKind:
        """The kind of a cluster with this L2 entry and bitmap."""
        if entry & fmt.COMPRESSED:
            return _COMPRESSED
        if self.extended:
            alloc, zero = bitmap & FULL, bitmap >> 32
            if alloc == FULL:
                return _DATA
            if zero == FULL:
                return _ZERO
            if not alloc and not zero:
                return _UNALLOCATED
            return _SUBCLUSTERS
        if self.zero_flag and entry & fmt.ZERO:
            return _ZERO
        return _DATA if entry & fmt.OFFSET_MASK else _UNALLOCATED

    def runs(self, offset: int, length: int, entry_at: Callable[[int], tuple[int, int]]) -> list[Run]:
        """The runs of ``[offset, offset + length)``; ``entry_at(guest)`` gives a cluster's entry and bitmap.

        Never yields SUBCLUSTERS: such a cluster is split into its pieces.
        """
        cs = self.cluster_size
        builder = _Builder()
        add = builder.add
        pos, end = offset, offset + length
        while pos < end:
            in_cluster = pos % cs
            n = min(cs - in_cluster, end - pos)
            entry, bitmap = entry_at(pos)
            kind = self.classify(entry, bitmap)
            if kind == _DATA or kind == _SUBCLUSTERS:
                host = entry & fmt.OFFSET_MASK
                if host % cs:
                    raise DeviceError(
                        Errno.EIO, f"{self.name} is corrupt: guest cluster at {pos} maps to a misaligned host offset"
                    )
                if kind == _SUBCLUSTERS:
                    self._add_subclusters(add, pos, n, host, bitmap)
                else:
                    add(kind, pos, n, host + in_cluster, entry)
            else:
                add(kind, pos, n, 0, entry)
            pos += n
        return builder.finish()

    def _add_subclusters(
        self, add: Callable[[ClusterKind, int, int, int, int], None], guest: int, length: int, host: int, bitmap: int
    ) -> None:
        """The pieces of one cluster with mixed subclusters."""
        cs = self.cluster_size
        sub = cs // fmt.SUBCLUSTERS
        pos, end = guest, guest + length
        while pos < end:
            in_cluster = pos % cs
            index = in_cluster // sub
            n = min(sub - in_cluster % sub, end - pos)
            if bitmap >> index & 1:
                add(_DATA, pos, n, host + in_cluster, 0)
            elif bitmap >> (32 + index) & 1:
                add(_ZERO, pos, n, 0, 0)
            else:
                add(_UNALLOCATED, pos, n, 0, 0)
            pos += n

    def data_bitmap(self) -> int:
        """The bitmap of a cluster whose subclusters all hold data (0 without extended L2)."""
        return FULL if self.extended else 0

    def plan_zero(
        self, entry: int, bitmap: int, *, start: int, length: int, may_trim: bool, backing_shows: bool
    ) -> ZeroPlan | None:
        """How to zero ``length`` bytes from ``start`` inside a cluster with this entry and bitmap;
        None when they read as zeroes already.

        ``backing_shows`` says an unallocated cluster here would read the
        backing file. ``may_trim`` lets a whole cluster's host cluster go, as
        qemu does on discard. A v3 image keeps the zero flag, so a backing
        file never shows through a zeroed cluster.
        """
        kind = self.classify(entry, bitmap)
        owned = entry & fmt.OFFSET_MASK if kind != _COMPRESSED and entry & fmt.COPIED else 0
        whole = length == self.cluster_size
        if kind == _ZERO or (kind == _UNALLOCATED and not backing_shows):
            if not (may_trim and owned and whole):
                return None
            if self.extended:
                return ZeroPlan(0, FULL << 32, free=owned)
            return ZeroPlan(fmt.ZERO if self.zero_flag else 0, free=owned)  # a backing file must not show
        if whole and not self.zero_flag and may_trim and not backing_shows and kind == _DATA and owned:
            return ZeroPlan(0, free=owned)  # v2 has no zero flag, but unallocated reads as zeroes here
        if not whole or not self.zero_flag:
            if self.extended and kind != _COMPRESSED:
                bits = self.zero_subclusters(entry, bitmap, start=start, length=length)
                if bits is not None:
                    return ZeroPlan(bits[0], bits[1])
            return ZeroPlan(write_zeroes=True)  # no zero flag for part of a cluster
        # a whole zero cluster, keeping its host cluster preallocated unless discarding
        free, keep = (owned, 0) if may_trim else (0, owned)
        if self.extended:
            return ZeroPlan(_owned(keep), FULL << 32, free, kind == _COMPRESSED)
        return ZeroPlan(_owned(keep) | fmt.ZERO, 0, free, kind == _COMPRESSED)

    def zero_subclusters(self, entry: int, bitmap: int, *, start: int, length: int) -> tuple[int, int] | None:
        """The entry and bitmap with the subclusters of ``[start, start + length)`` zeroed;
        None when the range does not cover whole subclusters."""
        sub = self.cluster_size // fmt.SUBCLUSTERS
        if start % sub or length % sub:
            return None
        mask = ((1 << (length // sub)) - 1) << (start // sub)
        alloc = bitmap & FULL & ~mask
        zero = ((bitmap >> 32) | mask) & FULL
        return _owned(entry & fmt.OFFSET_MASK), alloc | (zero << 32)
