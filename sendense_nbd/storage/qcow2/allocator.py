"""Host clusters and their reference counts.

New clusters come from the end of the file and are never moved or reused
while the image is open. A cluster's refcount rises when it is allocated
(in memory at once, on disk at the next flush, before any table that points
at it). A freed cluster's refcount falls only in the last step of a flush
(:meth:`Allocator.release`), once no table on disk points at it any more.
When the refcount table runs out of entries it is copied to the end of the
file with room to spare and the old one is freed the same way.
"""

from __future__ import annotations

from sendense_nbd.storage.qcow2 import format as fmt
from sendense_nbd.storage.qcow2.metadata import MetadataCache


class Allocator:
    """Allocates host clusters of one image and keeps their refcounts."""

    def __init__(self, cache: MetadataCache, *, end: int) -> None:
        """Allocate after ``end`` (cluster-aligned), keeping refcounts in ``cache``."""
        self._cache = cache
        self._header = cache.header
        self._cs = cache.cluster_size
        self._cluster_bits = self._header.cluster_bits
        self._per_block = self._header.refcount_block_entries
        self._order = self._header.refcount_order
        #: Where the image's clusters end: the next allocation goes here.
        self.end = end
        self._pending: list[int] = []

    def allocate(self) -> int:
        """A new host cluster, counted once."""
        host = self.end
        self.end += self._cs
        self._add_refcount(host, 1)
        return host

    def free(self, host: int) -> None:
        """Drop a data cluster: its space goes now (it reads as zeroes, which discarding
        allows), its refcount falls at the next flush."""
        self._cache.punch(host)
        self._pending.append(host)

    def free_compressed(self, entry: int) -> None:
        """Drop the host clusters a compressed cluster's bytes touch, at the next flush."""
        offset, length = fmt.compressed_location(entry, self._cluster_bits)
        first = offset & ~(self._cs - 1)
        last = (offset + length - 1) & ~(self._cs - 1)
        self._pending.extend(range(first, last + 1, self._cs))

    def release(self) -> bool:
        """Apply the pending frees to the refcounts (the flush's last step); False if there were none."""
        if not self._pending:
            return False
        frees, self._pending = self._pending, []
        for host in frees:
            self._add_refcount(host, -1)
        return True

    def _add_refcount(self, host: int, delta: int) -> None:
        cache = self._cache
        table_index, block_index = divmod(host >> self._cluster_bits, self._per_block)
        if table_index >= len(cache.refcount_table):
            self._grow_refcount_table(table_index + 1)
        block_offset = cache.refcount_table[table_index] & fmt.OFFSET_MASK
        if not block_offset:
            block_offset = self.end
            self.end += self._cs
            cache.new_refcount_block(table_index, block_offset)
            self._add_refcount(block_offset, 1)
        block = cache.refcount_block(block_offset)
        order = self._order
        fmt.write_refcount(block, block_index, order, fmt.read_refcount(block, block_index, order) + delta)
        cache.refcount_block_changed(block_offset)

    def _grow_refcount_table(self, needed: int) -> None:
        """Move the refcount table to the end of the file, with room to spare."""
        old_offset = self._header.refcount_table_offset
        old_clusters = self._header.refcount_table_clusters
        entries = max(needed * 2, len(self._cache.refcount_table) + 1)
        clusters = -(-entries * 8 // self._cs)
        new_offset = self.end
        self.end += clusters * self._cs
        self._cache.move_refcount_table(new_offset, clusters)
        for i in range(clusters):
            self._add_refcount(new_offset + i * self._cs, 1)
        self._pending.extend(old_offset + i * self._cs for i in range(old_clusters))
