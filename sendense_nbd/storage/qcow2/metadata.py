"""The metadata of an open qcow2 image in memory, and the one order it reaches the disk in.

The L1 table and the refcount table are lists; L2 tables and refcount blocks
are loaded on demand into two bounded LRU caches. A changed table is marked
dirty and stays in memory until :meth:`MetadataCache.flush`, which writes
with a barrier (``fdatasync``) after each step:

1. the data written since the last flush;
2. refcount blocks and the refcount table, then the header if the table moved;
3. L2 tables;
4. the L1 table;
5. the frees: refcount decrements of clusters no table on disk points at any
   more (the allocator's ``release``), and their refcount blocks.

So a table on disk only ever points at data and tables that are on disk and
counted: whatever a crash interrupts, the image is consistent, and at worst
clusters leak. Clean tables beyond a cache's budget are dropped; dirty ones
wait for the flush that :meth:`overfull` asks for.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable

from sendense_nbd.errors import DeviceError, ImageError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage.hostfile import HostFile
from sendense_nbd.storage.qcow2 import format as fmt
from sendense_nbd.storage.raw import WRITEBACK_EVERY, punch_hole, start_write_out

#: Memory for L2 tables (dirty ones may exceed it until the next flush).
L2_CACHE_BYTES = 8 * 1024 * 1024
#: Memory for refcount blocks (likewise).
REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024


def _pread_exact(file: HostFile, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset``; :class:`ImageError` if the file ends first."""
    data = file.pread(length, offset)
    if len(data) != length:
        raise ImageError(f"{what} at offset {offset} lies past the end of the file")
    return data


def _read_table(file: HostFile, offset: int, entries: int, what: str, file_size: int, cluster_size: int) -> list[int]:
    if offset % cluster_size or offset + entries * 8 > file_size:
        raise ImageError(f"{what} at {offset} is misaligned or past the end of the file")
    if entries > 64 * 1024 * 1024:
        raise ImageError(f"{what} is implausibly large ({entries} entries)")
    return list(struct.unpack(f">{entries}Q", _pread_exact(file, entries * 8, offset, what)))


class _Tables:
    """One bounded LRU cache of cluster-sized tables and the set of its dirty ones."""

    __slots__ = ("tables", "dirty", "limit")

    def __init__(self, budget: int, cluster_size: int) -> None:
        self.tables: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.limit = max(budget // cluster_size, 2)

    def put(self, offset: int, table: bytearray) -> None:
        """Insert, dropping clean tables beyond the budget (dirty ones wait for a flush)."""
        tables = self.tables
        tables[offset] = table
        excess = len(tables) - self.limit
        if excess > 0:
            for old in [k for k in tables if k not in self.dirty and k != offset][:excess]:
                del tables[old]

    def overfull(self) -> bool:
        """More tables than the budget, some of them dirty: a flush is due."""
        return len(self.tables) > self.limit and bool(self.dirty)

    def shrink(self) -> None:
        """Drop the least recently used tables down to the budget (after a flush: all clean)."""
        while len(self.tables) > self.limit:
            self.tables.popitem(last=False)


class MetadataCache:
    """The tables of one image and every write to its file (module docstring)."""

    def __init__(
        self, file: HostFile, header: fmt.Header, *, l1: list[int], refcount_table: list[int], name: str
    ) -> None:
        """Cache over the open ``file`` (tables are read through it, written to its descriptor);
        ``l1`` and ``refcount_table`` are the tables as loaded; ``name`` labels error messages."""
        self.file = file
        self.fd = file.fd
        self.name = name
        self.header = header
        self.cluster_size = header.cluster_size
        self.l1 = l1
        self.refcount_table = refcount_table
        self._l2 = _Tables(L2_CACHE_BYTES, self.cluster_size)
        self._blocks = _Tables(REFCOUNT_CACHE_BYTES, self.cluster_size)
        self._l2_tables, self._block_tables = self._l2.tables, self._blocks.tables  # the hot lookups
        self._l1_dirty = self._refcount_table_dirty = self._header_dirty = self._data_dirty = False
        self._write_out_due: int | None = WRITEBACK_EVERY  # data bytes until the file's write-out starts
        self._metadata_key = -1
        self._metadata: set[int] = set()

    @classmethod
    def load(cls, file: HostFile, header: fmt.Header, *, file_size: int, name: str) -> MetadataCache:
        """Read the L1 and refcount tables ``header`` points at; :class:`ImageError` if they are unusable."""
        cs = header.cluster_size
        l1 = _read_table(file, header.l1_table_offset, header.l1_size, f"{name}: L1 table", file_size, cs)
        entries = header.refcount_table_clusters * cs // 8
        table = _read_table(file, header.refcount_table_offset, entries, f"{name}: refcount table", file_size, cs)
        return cls(file, header, l1=l1, refcount_table=table, name=name)

    # -- tables ----------------------------------------------------------------------

    def l2(self, offset: int, end: int) -> bytearray:
        """The L2 table at ``offset``, loaded if needed; ``end`` is where the image's clusters end."""
        table = self._l2_tables.get(offset)
        if table is None:
            if offset % self.cluster_size or offset + self.cluster_size > max(end, 0):
                raise DeviceError(Errno.EIO, f"{self.name}: L2 table offset {offset} is invalid")
            table = bytearray(_pread_exact(self.file, self.cluster_size, offset, "L2 table"))
            self._l2.put(offset, table)
        else:
            self._l2_tables.move_to_end(offset)
        return table

    def cached_l2(self, offset: int) -> bytearray | None:
        """The L2 table at ``offset`` if it is in memory (no I/O), else None."""
        return self._l2_tables.get(offset)

    def new_l2(self, offset: int) -> bytearray:
        """A fresh, empty (dirty) L2 table at ``offset``."""
        table = bytearray(self.cluster_size)
        self._l2.put(offset, table)
        self._l2.dirty.add(offset)
        return table

    def l2_changed(self, offset: int) -> None:
        """The L2 table at ``offset`` was changed in memory."""
        self._l2.dirty.add(offset)

    def set_l1(self, index: int, entry: int) -> None:
        """Change entry ``index`` of the L1 table."""
        self.l1[index] = entry
        self._l1_dirty = True

    def refcount_block(self, offset: int) -> bytearray:
        """The refcount block at ``offset``, loaded if needed."""
        block = self._block_tables.get(offset)
        if block is None:
            block = bytearray(_pread_exact(self.file, self.cluster_size, offset, "refcount block"))
            self._blocks.put(offset, block)
        else:
            self._block_tables.move_to_end(offset)
        return block

    def new_refcount_block(self, index: int, offset: int) -> None:
        """A fresh, empty (dirty) refcount block at ``offset``, entry ``index`` of the refcount table."""
        self.refcount_table[index] = offset
        self._refcount_table_dirty = True
        self._blocks.put(offset, bytearray(self.cluster_size))
        self._blocks.dirty.add(offset)

    def refcount_block_changed(self, offset: int) -> None:
        """The refcount block at ``offset`` was changed in memory."""
        self._blocks.dirty.add(offset)

    def move_refcount_table(self, offset: int, clusters: int) -> None:
        """The refcount table now lives at ``offset`` in ``clusters`` clusters (grown with empty entries)."""
        self.refcount_table.extend([0] * (clusters * self.cluster_size // 8 - len(self.refcount_table)))
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._refcount_table_dirty = self._header_dirty = True

    def header_changed(self) -> None:
        """The header was changed in memory."""
        self._header_dirty = True

    def is_metadata(self, host: int, end: int) -> bool:
        """True if ``host`` is a cluster of the header, a table or a refcount block."""
        header = self.header
        cs = self.cluster_size
        if host < cs:
            return True
        if header.l1_table_offset <= host < header.l1_table_offset + header.l1_size * 8:
            return True
        rt = header.refcount_table_offset
        if rt <= host < rt + header.refcount_table_clusters * cs:
            return True
        if self._metadata_key != end:  # new tables only come with a new end of file
            self._metadata = {e & fmt.OFFSET_MASK for e in self.l1 if e & fmt.OFFSET_MASK}
            self._metadata |= {e & fmt.OFFSET_MASK for e in self.refcount_table if e & fmt.OFFSET_MASK}
            self._metadata_key = end
        return host in self._metadata

    # -- the file --------------------------------------------------------------------

    def write_data(self, host: int, data: memoryview) -> None:
        """Write guest data at ``host``; the next flush makes it durable before any table.

        Every ``WRITEBACK_EVERY`` bytes start the file's write-out (not waited for): only data
        is dirty between flushes, so this changes no ordering, and the flush finds less to do."""
        self._pwrite(host, data)
        self._data_dirty = True
        if self._write_out_due is not None:  # let the disk work while data arrives (raw's WRITEBACK_EVERY)
            self._write_out_due -= len(data)
            if self._write_out_due <= 0:
                self._write_out_due = WRITEBACK_EVERY if start_write_out(self.fd) else None

    def punch(self, host: int) -> None:
        """Give a dropped cluster's space back to the file system, if it can."""
        try:
            punch_hole(self.fd, host, self.cluster_size)
        except OSError:
            pass  # the file system keeps the space; the refcount still falls

    def overfull(self) -> bool:
        """Dirty tables overfill a cache: flush, then :meth:`shrink`."""
        return self._l2.overfull() or self._blocks.overfull()

    def shrink(self) -> None:
        """Drop clean tables beyond the budgets."""
        self._l2.shrink()
        self._blocks.shrink()

    def flush(self, release: Callable[[], bool]) -> None:
        """Write everything dirty in the crash-safe order; ``release()`` applies the frees
        to the refcount blocks and says whether there were any."""
        fd = self.fd
        if self._data_dirty:
            os.fdatasync(fd)
            self._data_dirty = False
        wrote = self._write_dirty(self._blocks)
        if self._refcount_table_dirty:
            self._write_table(self.header.refcount_table_offset, self.refcount_table)
            self._refcount_table_dirty = False
            wrote = True
        if wrote:
            os.fdatasync(fd)
        if self._header_dirty:
            self._pwrite(0, memoryview(fmt.encode_header(self.header)))
            os.fdatasync(fd)
            self._header_dirty = False
        if self._write_dirty(self._l2):
            os.fdatasync(fd)
        if self._l1_dirty:
            self._write_table(self.header.l1_table_offset, self.l1)
            os.fdatasync(fd)
            self._l1_dirty = False
        if release():
            self._write_dirty(self._blocks)
            os.fdatasync(fd)

    def _write_dirty(self, cache: _Tables) -> bool:
        if not cache.dirty:
            return False
        for offset in sorted(cache.dirty):
            self._pwrite(offset, memoryview(cache.tables[offset]))
        cache.dirty.clear()
        return True

    def _write_table(self, offset: int, entries: list[int]) -> None:
        self._pwrite(offset, memoryview(struct.pack(f">{len(entries)}Q", *entries)))

    def _pwrite(self, host: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], host + done)
