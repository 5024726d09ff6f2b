"""A qcow2 consistency checker and refcount rebuilder, judged against ``qemu-img check``.

Theory of operation
-------------------
The checker never trusts the refcounts. It walks every structure that can
own a host cluster and counts, in a sparse ``{cluster: references}`` map, how
often each cluster is referenced: the header cluster, the active L1 table,
every L2 table and data cluster it reaches (preallocated zero clusters too;
a compressed cluster counts every host cluster its bytes touch), each
snapshot's L1 table and what it reaches, the snapshot table, the refcount
table, the encryption header, the bitmap directory, tables and data, and
finally each refcount block. It then reads the stored refcount of every
cluster of the file and compares: stored < expected is a corruption (data
could be overwritten), stored > expected is a leak (space wasted). A last
pass checks the COPIED flag (bit 63) of active L1/L2 entries against
"stored refcount == 1".

The walk mirrors qemu 7.2 so that the counts agree with ``qemu-img check``:
bytes past the end of the file read as zeros, a reference to a region ending
a cluster or more past EOF is a corruption and is not counted, unaligned
tables are reported and still read, reference counts saturate at the
refcount width (an overflow is a corruption). Every read is bounded and
every loop runs over a table whose size was bounded when the header was
loaded, so garbage can only produce counts or an :class:`ImageError`.

:func:`repair_refcounts` reuses the walk without the old refcount structures,
writes a fresh refcount table and blocks after the end of the file, syncs,
then switches the header to them (clearing the dirty bit) in one small
write, syncs again, and only then fixes COPIED flags. A crash before the
switch leaves the old image plus unreferenced bytes at its end.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.qcow2.format import (
    COPIED,
    OFFSET_MASK,
    ZERO,
    Extension,
    Header,
    Incompatible,
    compressed_location,
    write_refcount,
)
from sendense_nbd.storage.qcow2.info import (
    MAX_L1_BYTES,
    REFT_OFFSET_MASK,
    ImageFile,
    StoredRefcounts,
    bitmap_directory,
    extension,
    load_header,
    read_bitmaps,
    read_snapshots,
)
from sendense_nbd.storage.qcow2.mapping import ClusterKind, Layout

REFT_RESERVED = 0x1FF
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
BITMAP_ENTRY_RESERVED = 0xFF000000000001FE
ALL_ALLOC = 0xFFFFFFFF
MAX_MESSAGES = 2000
MAX_CLUSTERS = 2**31 - 1

_T = TypeVar("_T")


class Holding(enum.Enum):
    """What host space an L2 entry holds, which is what the checker counts.

    How the cluster reads is a :class:`~.mapping.ClusterKind`; which host
    clusters its entry owns does not depend on the subcluster bitmap.
    """

    NOTHING = enum.auto()  #: unallocated, or zeroes without a host cluster
    CLUSTER = enum.auto()  #: one host cluster: data, or zeroes preallocated
    COMPRESSED = enum.auto()  #: the host clusters its compressed bytes touch


@attrs.frozen
class CheckResult:
    """What ``qemu-img check`` reports; ``errors`` holds its stderr lines."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    errors: list[str] = attrs.field(factory=list)
    format: str = "qcow2"

    def to_json(self) -> dict[str, Any]:
        """The dictionary of ``qemu-img check --output=json`` (zero counters are omitted)."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors}
        for key in ("image-end-offset", "corruptions", "leaks", "total-clusters", "allocated-clusters"):
            out[key] = getattr(self, key.replace("-", "_"))
        out["fragmented-clusters"], out["compressed-clusters"] = self.fragmented_clusters, self.compressed_clusters
        return {key: value for key, value in out.items() if value or key == "check-errors"}


def exit_code(result: CheckResult) -> int:
    """``qemu-img check``'s exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only."""
    if result.check_errors:
        return 1
    if result.corruptions:
        return 2
    return 3 if result.leaks else 0


def format_human(result: CheckResult) -> str:
    """The stdout of plain ``qemu-img check`` (the per-cluster messages are ``result.errors``)."""
    lines: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if result.corruptions:
            lines += ["", f"{result.corruptions} errors were found on the image."]
            lines.append("Data may be corrupted, or further writes to the image may corrupt it.")
        if result.leaks:
            lines += ["", f"{result.leaks} leaked clusters were found on the image."]
            lines.append("This means waste of disk space, but no harm to data.")
        if result.check_errors:
            lines += ["", f"{result.check_errors} internal errors have occurred during the check."]
    if result.total_clusters and result.allocated_clusters:
        alloc = result.allocated_clusters
        lines.append(
            f"{alloc}/{result.total_clusters} = {alloc * 100.0 / result.total_clusters:0.2f}% allocated, "
            f"{result.fragmented_clusters * 100.0 / alloc:0.2f}% fragmented, "
            f"{result.compressed_clusters * 100.0 / alloc:0.2f}% compressed clusters"
        )
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines) + "\n"


class _Walk:
    """One pass over an image: expected refcounts, stored refcounts, and the report."""

    def __init__(self, f: ImageFile, header: Header, with_refcounts: bool = True) -> None:
        self.f, self.h = f, header
        self.cs, self.bits = header.cluster_size, header.cluster_bits
        self.with_refcounts = with_refcounts
        self.data_file = bool(header.incompatible & Incompatible.EXTERNAL_DATA)
        self.layout = Layout.of(header, "image")
        self.refmax = (1 << header.refcount_bits) - 1
        self.entries = header.refcount_block_entries
        self.expected: dict[int, int] = {}
        # qemu sees the file's length in whole 512-byte sectors.
        self.length = -(-f.size // 512) * 512
        self.nb = -(-self.length // self.cs)
        if self.nb > MAX_CLUSTERS:
            raise ImageError(f"image file is too large to check ({self.nb} clusters)")
        self.refcounts = StoredRefcounts(f, header)
        self.reftable = self.refcounts.table
        self.messages: list[str] = []
        self.corruptions = self.leaks = self.check_errors = self.structural = 0
        self.allocated = self.fragmented = self.compressed = 0
        self.highest = 0

    def note(self, message: str) -> None:
        """Keep ``message`` for the report (at most MAX_MESSAGES)."""
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)
        elif len(self.messages) == MAX_MESSAGES:
            self.messages.append("(further messages suppressed)")

    def corrupt(self, message: str, structural: bool = True) -> None:
        """A corruption; ``structural`` ones are beyond what a refcount rebuild fixes."""
        self.corruptions += 1
        self.structural += structural
        self.note(message)

    def inc(self, offset: int, size: int, structural: bool = True) -> None:
        """Count one reference to every cluster of ``[offset, offset + size)``."""
        if size <= 0:
            return
        if offset + size - self.length >= self.cs:
            self.corrupt(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                f"offset {offset:#x} size {size:#x}",
                structural,
            )
            return
        for k in range(offset >> self.bits, ((offset + size - 1) >> self.bits) + 1):
            n = self.expected.get(k, 0)
            if n >= self.refmax:
                self.corrupt(f"ERROR: overflow cluster offset={k << self.bits:#x}")
                continue
            self.expected[k] = n + 1
            if k >= self.nb:
                self.nb = k + 1

    def calculate(self) -> None:
        """Count the references of every structure that owns host clusters."""
        h = self.h
        self.inc(0, self.cs)
        self.check_l1(h.l1_table_offset, h.l1_size, active=True)
        table = read_snapshots(self.f, h)
        snapshots = table.snapshots
        if self.data_file and snapshots:
            self.corrupt(f"ERROR {len(snapshots)} snapshots in image with data file")
        for sn in snapshots:
            where = f"ERROR snapshot {sn.id} ({sn.name})"
            if h.version >= 3 and sn.extra_data_size < 16:
                self.corrupt(f"{where}: snapshot table entry is incomplete")
            if sn.l1_table_offset % self.cs:
                self.corrupt(f"{where} l1_offset={sn.l1_table_offset:#x}: L1 table is not cluster aligned")
            elif sn.l1_size * 8 > MAX_L1_BYTES:
                self.corrupt(f"{where} l1_size={sn.l1_size:#x}: L1 table is too large")
            else:
                self.check_l1(sn.l1_table_offset, sn.l1_size, active=False)
        self.inc(h.snapshots_offset, table.size)
        if self.with_refcounts:
            self.inc(h.refcount_table_offset, len(self.reftable) * 8, structural=False)
        crypto = extension(h, Extension.ENCRYPTION)
        if crypto is not None and len(crypto) >= 16:
            self.inc(*struct.unpack(">QQ", crypto[:16]))
        self.check_bitmaps()
        if self.with_refcounts:
            self.check_refblocks()

    def holding(self, entry: int) -> Holding:
        """What host space the L2 entry ``entry`` holds (its bitmap, if any, plays no part)."""
        kind = self.layout.classify(entry, 0)
        if kind == ClusterKind.COMPRESSED:
            return Holding.COMPRESSED
        if entry & OFFSET_MASK:
            return Holding.CLUSTER
        # Offset 0 is a host cluster only in an external data file, whose clusters all
        # have refcount 1: COPIED marks it, unless the zero flag makes it plain zeroes.
        if self.data_file and entry & COPIED and kind != ClusterKind.ZERO:
            return Holding.CLUSTER
        return Holding.NOTHING

    def read_l2(self, offset: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The entries (and with extended L2 the bitmaps) of the L2 table at ``offset``."""
        words = self.f.read_u64s(offset, self.cs // 8)
        return (words[0::2], words[1::2]) if self.h.extended_l2 else (words, None)

    def check_l1(self, offset: int, size: int, active: bool) -> None:
        """Count an L1 table, its L2 tables and what they reach."""
        if not size:
            return
        self.inc(offset, size * 8)
        for entry in self.f.read_u64s(offset, size):
            if not entry:
                continue
            if entry & L1E_RESERVED:
                self.corrupt(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_offset = entry & OFFSET_MASK
            self.inc(l2_offset, self.cs)
            if l2_offset % self.cs:
                self.corrupt(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            self.check_l2(l2_offset, active)

    def check_l2(self, l2_offset: int, active: bool) -> None:
        """Count the clusters one L2 table reaches; ``active`` ones also feed the statistics."""
        if l2_offset >= self.f.size:
            return  # reads as zeros: nothing allocated
        entries, bitmaps = self.read_l2(l2_offset)
        next_contiguous = 0
        for i, entry in enumerate(entries):
            bitmap = bitmaps[i] if bitmaps is not None else 0
            if not entry and not bitmap:
                continue
            held = self.holding(entry)
            if held is not Holding.COMPRESSED and entry & L2E_STD_RESERVED:
                self.corrupt(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            if held is Holding.COMPRESSED:
                self.count_compressed(i, entry, bitmap, active)
            elif held is Holding.CLUSTER:
                offset = entry & OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    self.corrupt(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                    )
                if offset % self.cs:
                    data = bitmap & ALL_ALLOC if bitmaps is not None else not entry & ZERO
                    what = "Data cluster" if data else "Preallocated cluster"
                    self.corrupt(f"ERROR offset={offset:x}: {what} is not properly aligned; L2 entry corrupted.")
                if active:
                    self.allocated += 1
                    if next_contiguous and offset != next_contiguous:
                        self.fragmented += 1
                    next_contiguous = offset + self.cs
                if not self.data_file:
                    self.inc(offset, self.cs)
            elif bitmap & ALL_ALLOC:  # unallocated: extended L2 (the only bitmaps) has no plain zero entries
                self.corrupt("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap")

    def count_compressed(self, index: int, entry: int, bitmap: int, active: bool) -> None:
        """Count the host clusters a compressed cluster's bytes touch."""
        if entry & COPIED:
            coffset = compressed_location(entry, self.bits)[0]
            self.corrupt(f"ERROR: coffset={coffset:#x}: copied flag must never be set for compressed clusters")
            entry &= ~COPIED
        if self.data_file:
            self.corrupt(f"ERROR compressed cluster {index} with data file, entry={entry:#x}")
            return
        if bitmap:
            self.corrupt(
                f"ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={entry:#x}"
            )
            return
        self.inc(*compressed_location(entry, self.bits))
        if active:
            self.allocated += 1
            self.compressed += 1
            self.fragmented += 1

    def check_bitmaps(self) -> None:
        """Count the bitmap directory, tables and data."""
        try:
            directory = bitmap_directory(self.h)
            if directory is None:
                return
            self.inc(directory.offset, directory.size)
            bitmaps = read_bitmaps(self.f, self.h, directory)
        except ImageError as exc:
            self.check_errors += 1
            self.corrupt(f"ERROR bitmaps cannot be checked: {exc}")
            return
        for bm in bitmaps:
            self.inc(bm.table_offset, bm.table_size * 8)
            for entry in self.f.read_u64s(bm.table_offset, bm.table_size):
                offset = entry & OFFSET_MASK
                if entry & BITMAP_ENTRY_RESERVED or (offset and (entry & 1 or offset % self.cs)):
                    self.corrupt(f"ERROR bitmap {bm.name!r} has an invalid table entry {entry:#x}")
                elif offset:
                    self.inc(offset, self.cs)

    def check_refblocks(self) -> None:
        """Count the refcount blocks (each must be referenced once)."""
        for i, entry in enumerate(self.reftable):
            offset = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED:
                self.corrupt(f"ERROR refcount table entry {i} has reserved bits set", False)
            elif offset % self.cs:
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted", False)
            elif offset >> self.bits >= self.nb:
                self.corrupt(f"ERROR refcount block {i} is outside image", False)
            elif offset:
                self.inc(offset, self.cs, structural=False)
                count = self.expected.get(offset >> self.bits, 0)
                if count != 1:
                    self.corrupt(f"ERROR refcount block {i} refcount={count}", False)

    def compare(self) -> None:
        """Compare stored refcounts with the counted references: corruptions and leaks."""
        stored: dict[int, int] = {}
        unreadable: list[range] = []
        for t in range(min(len(self.reftable), -(-self.nb // self.entries))):
            base = t * self.entries
            found = self.refcounts.nonzero(t, self.nb)
            if found is None:
                span = range(base, min(base + self.entries, self.nb))
                unreadable.append(span)
                self.check_errors += len(span)
                self.note(f"Can't get refcount for clusters {span.start}..{span.stop - 1}: unreadable refcount block")
            else:
                stored.update(found)
        skip = {k for span in unreadable for k in span if k in self.expected}
        for k in sorted(set(stored) | (set(self.expected) - skip)):
            have, want = stored.get(k, 0), self.expected.get(k, 0)
            self.highest = k  # ascending
            if have != want:
                if have < want:
                    self.corruptions += 1
                    self.note(f"ERROR cluster {k} refcount={have} reference={want}")
                else:
                    self.leaks += 1
                    self.note(f"Leaked cluster {k} refcount={have} reference={want}")

    def check_copied(self) -> None:
        """Check the COPIED flag of active L1/L2 entries against "refcount == 1"."""
        for i, entry in enumerate(self.f.read_u64s(self.h.l1_table_offset, self.h.l1_size)):
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.refcounts.get(l2_offset >> self.bits)
            if refcount is not None and (refcount == 1) != bool(entry & COPIED):
                self.corrupt(
                    f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} refcount={refcount}", False
                )
            if l2_offset >= self.f.size:
                continue
            for l2_entry in self.read_l2(l2_offset)[0]:
                if l2_entry and self.holding(l2_entry) is Holding.CLUSTER:
                    refcount = 1 if self.data_file else self.refcounts.get((l2_entry & OFFSET_MASK) >> self.bits)
                    if refcount is not None and (refcount == 1) != bool(l2_entry & COPIED):
                        self.corrupt(
                            f"ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}", False
                        )

    def result(self, filename: str) -> CheckResult:
        """The report of this walk."""
        virtual = -(-self.h.size // 512) * 512
        return CheckResult(
            filename, self.corruptions, self.leaks, self.check_errors, self.allocated, -(-virtual // self.cs),
            self.fragmented, self.compressed, (self.highest + 1) * self.cs, list(self.messages),
        )  # fmt: skip


def _with_file(path: str, flags: int, action: Callable[[int], _T]) -> _T:
    """Run ``action`` on an open descriptor; ``OSError`` becomes :class:`ImageError`."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            return action(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from exc


def _check(fd: int, path: str) -> CheckResult:
    f = ImageFile(fd)
    walk = _Walk(f, load_header(f))
    walk.calculate()
    walk.compare()
    walk.check_copied()
    return walk.result(path)


def check_image(path: str) -> CheckResult:
    """Check the qcow2 image at ``path`` like ``qemu-img check``; reads only."""
    return _with_file(path, os.O_RDONLY, lambda fd: _check(fd, path))


# -- repair ----------------------------------------------------------------------------


def _layout(start: int, entries: int, cs: int) -> tuple[int, int]:
    """Refcount blocks and table clusters covering clusters ``[0, start + themselves)``."""
    blocks = tables = 1
    while blocks < -(-(start + blocks + tables) // entries) or tables < -(-(blocks * 8) // cs):
        blocks = max(blocks, -(-(start + blocks + tables) // entries))
        tables = -(-(blocks * 8) // cs)
    return blocks, tables


def repair_refcounts(path: str) -> CheckResult:
    """Rebuild the refcount structures from the references, clear DIRTY, return a fresh check."""
    _with_file(path, os.O_RDWR, _rebuild)
    return check_image(path)


def _rebuild(fd: int) -> None:
    f = ImageFile(fd)
    h = load_header(f)
    walk = _Walk(f, h, with_refcounts=False)
    walk.calculate()
    if walk.structural or walk.check_errors:
        first = next((m for m in walk.messages if m.startswith("ERROR")), "")
        raise ImageError(f"cannot repair: {walk.structural} corruption(s) beyond refcounts ({first})")
    cs, entries, order = h.cluster_size, h.refcount_block_entries, h.refcount_order
    start = max(-(-f.size // cs), max(walk.expected, default=0) + 1)
    nblocks, ntables = _layout(start, entries, cs)
    if ntables * cs > 8 << 20:
        raise ImageError("the rebuilt refcount table would exceed qemu's 8 MiB limit")
    counts = dict(walk.expected)
    counts.update({k: 1 for k in range(start, start + nblocks + ntables)})
    blocks = [bytearray(cs) for _ in range(nblocks)]
    for k, value in counts.items():
        write_refcount(blocks[k // entries], k % entries, order, value)
    table = struct.pack(f">{nblocks}Q", *((start + t) * cs for t in range(nblocks))).ljust(ntables * cs, b"\0")
    _pwrite(fd, b"".join(blocks) + table, start * cs)
    os.fsync(fd)
    # The switch: refcount table pointer and size (bytes 48-59), dirty bit (72-79), one write.
    head = bytearray(f.read(0, 80 if h.version >= 3 else 60))
    struct.pack_into(">QI", head, 48, (start + nblocks) * cs, ntables)
    if h.version >= 3:
        struct.pack_into(">Q", head, 72, h.incompatible & ~Incompatible.DIRTY)
    _pwrite(fd, bytes(head[48:]), 48)
    os.fsync(fd)
    f.size = os.fstat(fd).st_size
    _fix_copied(fd, f, h, counts)


def _fix_copied(fd: int, f: ImageFile, h: Header, counts: dict[int, int]) -> None:
    """Make bit 63 of active L1/L2 entries say "refcount == 1" again."""
    walk = _Walk(f, h, with_refcounts=False)
    cs, step = h.cluster_size, 2 if h.extended_l2 else 1
    l1 = list(f.read_u64s(h.l1_table_offset, h.l1_size))
    seen: set[int] = set()
    for i, entry in enumerate(l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset:
            continue
        copied = COPIED if counts.get(l2_offset // cs, 0) == 1 else 0
        l1[i] = (entry & ~COPIED) | copied
        if l2_offset in seen or l2_offset % cs or l2_offset + cs > f.size:
            continue
        seen.add(l2_offset)
        words = list(f.read_u64s(l2_offset, cs // 8))
        for j in range(0, len(words), step):
            e = words[j]
            if e and walk.holding(e) is Holding.CLUSTER:
                one = walk.data_file or counts.get((e & OFFSET_MASK) // cs, 0) == 1
                words[j] = (e & ~COPIED) | (COPIED if one else 0)
        if words != list(f.read_u64s(l2_offset, cs // 8)):
            _pwrite(fd, struct.pack(f">{len(words)}Q", *words), l2_offset)
    if l1 and l1 != list(f.read_u64s(h.l1_table_offset, h.l1_size)):
        _pwrite(fd, struct.pack(f">{len(l1)}Q", *l1), h.l1_table_offset)
    os.fsync(fd)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
