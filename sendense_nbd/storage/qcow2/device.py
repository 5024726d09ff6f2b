"""A qcow2 image as a block device: reads through backing chains, crash-safe writes.

Theory of operation (docs/interop/qcow2.txt in qemu):

* **Mapping.** The L1 table lives in memory; L2 tables and refcount blocks
  are loaded on demand into bounded caches. A guest cluster is unallocated
  (read the backing file, or zeroes), a zero cluster (reads as zeroes, never
  the backing file), a standard cluster at a host offset, or compressed.
  Extended L2 entries add a 32-bit allocation and a 32-bit zero bitmap per
  cluster.
* **Writes** allocate host clusters at the end of the file. A partial write
  to a cluster that is not a plain allocated one first materialises the
  cluster's current content (backing data, zeroes, decompressed data,
  subclusters), so a cluster is always written whole: copy-on-write.
  Clusters are never moved or reused; they are freed when a compressed
  cluster is rewritten or a whole cluster is discarded (its space punched at
  once). Zeroing sets the v3 zero flag, so an overlay never re-exposes its
  backing file.
* **Crash safety.** Metadata changes stay in the caches until :meth:`flush`,
  which writes them in dependency order with a barrier after each step:
  data, then refcount blocks and table (and the header when the table
  moved), then L2 tables, then the L1 table, and only then the decrements of
  freed clusters. Whatever a crash interrupts, the image on disk is
  consistent; at worst clusters leak. FUA is a flush after the write. A cache
  that fills with dirty tables triggers the same flush.
* **Concurrency.** One lock guards metadata and writes; reads take it only to
  resolve the mapping and read data outside it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict

from sendense_nbd.errors import DeviceError, ImageError
from sendense_nbd.protocol.constants import AllocationFlag, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, BlockDevice, Capabilities, Support, device_error
from sendense_nbd.storage.qcow2 import format as fmt
from sendense_nbd.storage.raw import RawDevice
from sendense_nbd.storage.raw import punch_hole as _punch_hole

log = logging.getLogger(__name__)

_MAX_CHAIN = 16
_L2_CACHE_BYTES = 8 * 1024 * 1024
_REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024
_FULL = (1 << 32) - 1

# Cluster kinds
_UNALLOCATED, _ZERO, _DATA, _COMPRESSED, _SUBCLUSTERS = range(5)


def _pread(fd: int, length: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ImageError(f"{what} at offset {offset} lies past the end of the file")
    return data


class _NotCached(Exception):
    """An L2 table needed for a non-blocking read is not in memory."""


class Qcow2Device(Backend):
    """A backend over a qcow2 image (open it with ``open_image``); CACHE is emulated."""

    def __init__(
        self, path: str, *, readonly: bool = False, open_backing: bool = True, _chain: tuple[str, ...] = ()
    ) -> None:
        """Open ``path``; without ``open_backing`` unallocated clusters read as zeroes."""
        self.path = path
        self.readonly = readonly
        real = os.path.realpath(path)
        if real in _chain or len(_chain) >= _MAX_CHAIN:
            raise ImageError(f"backing chain of {path} loops or is deeper than {_MAX_CHAIN}")
        try:
            self._fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from exc
        self.backing: BlockDevice | None = None
        try:
            self._open(real, _chain, open_backing)
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------

    def _open(self, real: str, chain: tuple[str, ...], open_backing: bool) -> None:
        file_size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
        header = fmt.parse_header(head)
        if header.incompatible & fmt.Incompatible.DIRTY and not self.readonly:
            # Lazy refcounts left inconsistent by a crash: rebuild them, as qemu does on open.
            from sendense_nbd.storage.qcow2.check import repair_refcounts

            log.warning("%s has the dirty bit set; rebuilding its refcounts", self.path)
            repair_refcounts(self.path)
            file_size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 1 << fmt.MAX_CLUSTER_BITS, 0)
            header = fmt.parse_header(head)
        if len(head) < min(header.cluster_size, file_size):
            raise ImageError(f"{self.path}: header cluster is truncated")
        self.header = header
        self._cluster_bits = header.cluster_bits
        self._cs = header.cluster_size
        self._refuse(header)
        self._extended = header.extended_l2
        self._l2_entries = header.l2_entries
        if header.l1_size < fmt.l1_entries_for(header.size, header.cluster_bits, self._extended):
            raise ImageError(f"{self.path}: L1 table is too small for the virtual size")
        self._l1 = list(self._read_table(header.l1_table_offset, header.l1_size, "L1 table", file_size))
        rt_entries = header.refcount_table_clusters * self._cs // 8
        self._rtable = list(self._read_table(header.refcount_table_offset, rt_entries, "refcount table", file_size))
        self._end = -(-file_size // self._cs) * self._cs
        self._lock = threading.RLock()
        self._l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty_l2: set[int] = set()
        self._dirty_rb: set[int] = set()
        self._l1_dirty = False
        self._rtable_dirty = False
        self._header_dirty = False
        self._pending_free: list[int] = []
        self._metadata_key = -1
        self._metadata_set: set[int] = set()
        self._data_dirty = False
        if header.backing_file and open_backing:
            self.backing = _open_backing(self.path, header, chain + (real,))
        if not self.readonly and header.autoclear:
            header.autoclear = 0  # we do not maintain bitmaps: mark them inconsistent
            self._header_dirty = True
            self.flush()
        self._capabilities = Capabilities(
            writable=not self.readonly,
            zero=Support.NATIVE,
            trim=Support.NATIVE,
            fua=Support.NATIVE,
            extents=Support.NATIVE,
            allocation_depth=Support.NATIVE,
            cache=Support.EMULATE,
            read_cached=Support.NATIVE,
            fast_zero=header.version >= 3,
            has_backing=self.backing is not None,
            preferred_block=max(4096, self._cs),  # whole clusters avoid copy-on-write
        )

    def _refuse(self, header: fmt.Header) -> None:
        unknown = header.unknown_incompatible()
        if unknown:
            raise ImageError(f"{self.path}: unknown incompatible qcow2 features {unknown:#x}; refusing to open")
        if header.crypt_method:
            raise ImageError(f"{self.path}: encrypted qcow2 images are not supported")
        if header.incompatible & fmt.Incompatible.EXTERNAL_DATA:
            raise ImageError(f"{self.path}: qcow2 images with an external data file are not supported")
        if self.readonly:
            return
        if header.incompatible & fmt.Incompatible.CORRUPT:
            raise ImageError(f"{self.path}: the image is marked corrupt; repair it with 'qemu-img check -r all'")
        if header.nb_snapshots:
            raise ImageError(f"{self.path}: writing to images with internal snapshots is not supported")

    def _read_table(self, offset: int, entries: int, what: str, file_size: int) -> tuple[int, ...]:
        if offset % self._cs or offset + entries * 8 > file_size:
            raise ImageError(f"{self.path}: {what} at {offset} is misaligned or past the end of the file")
        if entries > 64 * 1024 * 1024:
            raise ImageError(f"{self.path}: {what} is implausibly large ({entries} entries)")
        data = _pread(self._fd, entries * 8, offset, what)
        return struct.unpack(f">{entries}Q", data)

    # -- contract ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        try:
            for kind, guest, length, host, entry in self._runs(offset, len(buffer)):
                part = buffer[guest - offset : guest - offset + length]
                self._read_run(kind, guest, part, host, entry)
        except OSError as exc:
            raise device_error(exc, f"read {len(buffer)} bytes at {offset}") from exc

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        if not self._lock.acquire(blocking=False):
            return False  # a writer holds the metadata: do not wait on the event loop
        try:
            runs = self._runs(offset, len(buffer), cached_only=True)
        except _NotCached:
            return False
        finally:
            self._lock.release()
        for kind, guest, length, host, _ in runs:
            part = buffer[guest - offset : guest - offset + length]
            if kind == _ZERO or (kind == _UNALLOCATED and self.backing is None):
                part[:] = bytes(length)
            elif kind != _DATA:
                return False
            else:
                try:
                    if os.preadv(self._fd, [part], host, os.RWF_NOWAIT) != length:
                        return False
                except OSError:
                    return False  # not in the page cache (or no RWF_NOWAIT): read in a thread
        return True

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        try:
            with self._lock:
                pos = 0
                run_host = run_start = run_end = -1  # one pwrite for host-contiguous clusters
                while pos < len(view):
                    guest = offset + pos
                    n = min(self._cs - guest % self._cs, len(view) - pos)
                    placed = self._write_cluster(guest, view[pos : pos + n])
                    if placed is not None:
                        host, content = placed
                        if run_host >= 0 and content is None and host == run_host + (run_end - run_start):
                            run_end = pos + n
                        else:
                            if run_host >= 0:
                                self._pwrite(run_host, view[run_start:run_end])
                                run_host = -1
                            if content is None:
                                run_host, run_start, run_end = host, pos, pos + n
                            else:
                                self._pwrite(host, content)
                    pos += n
                if run_host >= 0:
                    self._pwrite(run_host, view[run_start:run_end])
                self._trim_caches()
                if fua:
                    self._flush_locked()
        except OSError as exc:
            raise device_error(exc, f"write {len(view)} bytes at {offset}") from exc

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        self._check_writable()
        if fast and self.header.version < 3:
            raise DeviceError(Errno.ENOTSUP, "qcow2 v2 images have no zero clusters")
        try:
            with self._lock:
                end = offset + length
                pos = offset
                while pos < end:
                    n = min(self._cs - pos % self._cs, end - pos)
                    self._zero_cluster(pos, n, may_trim)
                    pos += n
                self._trim_caches()
                if fua:
                    self._flush_locked()
        except OSError as exc:
            raise device_error(exc, f"zero {length} bytes at {offset}") from exc

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset=offset, length=length, may_trim=True, fua=fua)

    def flush(self) -> None:
        if self.readonly:
            return
        try:
            with self._lock:
                self._flush_locked()
        except OSError as exc:
            raise device_error(exc, "flush") from exc

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for _, guest, n, (_, flags) in self._status(offset, length):
            if out and out[-1].status == flags:
                out[-1] = Extent(out[-1].offset, out[-1].length + n, flags)
            else:
                out.append(Extent(guest, n, flags))
        return out

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        """Extents whose status is the depth: 0 unallocated in the whole chain, 1 this image, 2 its backing file..."""
        out: list[Extent] = []
        for _, guest, n, (depth, _) in self._status(offset, length):
            if out and out[-1].status == depth:
                out[-1] = Extent(out[-1].offset, out[-1].length + n, depth)
            else:
                out.append(Extent(guest, n, depth))
        return out

    def layer_map(self, offset: int, length: int) -> list[tuple[int, str, int | None]]:
        """This image's own mapping as ``(length, kind, host offset)`` runs;
        kind is ``data``, ``zero``, ``compressed`` or ``unallocated``."""
        names = {_DATA: "data", _ZERO: "zero", _COMPRESSED: "compressed", _UNALLOCATED: "unallocated"}
        out: list[tuple[int, str, int | None]] = []
        for kind, _, n, host, _ in self._runs(offset, length):
            name = names.get(kind, "data")
            out.append((n, name, host if kind == _DATA else None))
        return out

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            try:
                if not self.readonly and hasattr(self, "_lock"):
                    self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    # -- mapping -----------------------------------------------------------------

    def _entry(self, guest: int, cached_only: bool = False) -> tuple[int, int]:
        """``(L2 entry, subcluster bitmap)`` of the guest cluster at ``guest``."""
        cluster = guest >> self._cluster_bits
        l1_index, l2_index = divmod(cluster, self._l2_entries)
        l2_offset = self._l1[l1_index] & fmt.OFFSET_MASK
        if not l2_offset:
            return 0, 0
        if cached_only and l2_offset not in self._l2_cache:
            raise _NotCached
        table = self._l2(l2_offset)
        if self._extended:
            entry, bitmap = struct.unpack_from(">QQ", table, l2_index * 16)
            return entry, bitmap
        (entry,) = struct.unpack_from(">Q", table, l2_index * 8)
        return entry, 0

    def _classify(self, entry: int, bitmap: int) -> int:
        if entry & fmt.COMPRESSED:
            return _COMPRESSED
        if self._extended:
            alloc, zero = bitmap & _FULL, bitmap >> 32
            if alloc == _FULL:
                return _DATA
            if zero == _FULL:
                return _ZERO
            if not alloc and not zero:
                return _UNALLOCATED
            return _SUBCLUSTERS
        if self.header.version >= 3 and entry & fmt.ZERO:
            return _ZERO
        return _DATA if entry & fmt.OFFSET_MASK else _UNALLOCATED

    def _runs(self, offset: int, length: int, cached_only: bool = False) -> list[tuple[int, int, int, int, int]]:
        """``(kind, guest offset, length, host offset, entry)`` runs, merged when contiguous."""
        runs: list[tuple[int, int, int, int, int]] = []
        end = offset + length
        pos = offset
        with self._lock:
            while pos < end:
                in_cluster = pos % self._cs
                n = min(self._cs - in_cluster, end - pos)
                entry, bitmap = self._entry(pos, cached_only)
                kind = self._classify(entry, bitmap)
                if kind in (_DATA, _SUBCLUSTERS) and (entry & fmt.OFFSET_MASK) % self._cs:
                    raise DeviceError(
                        Errno.EIO, f"{self.path} is corrupt: guest cluster at {pos} maps to a misaligned host offset"
                    )
                if kind == _SUBCLUSTERS:
                    for piece in self._subcluster_pieces(pos, n, entry & fmt.OFFSET_MASK, bitmap):
                        _merge_run(runs, piece)
                    pos += n
                    continue
                host = (entry & fmt.OFFSET_MASK) + in_cluster if kind == _DATA else 0
                _merge_run(runs, (kind, pos, n, host, entry))
                pos += n
        return runs

    def _subcluster_pieces(
        self, guest: int, length: int, host: int, bitmap: int
    ) -> list[tuple[int, int, int, int, int]]:
        """Runs of one cluster with mixed subclusters: data, zero or unallocated each."""
        sub = self._cs // fmt.SUBCLUSTERS
        pieces = []
        pos, end = guest, guest + length
        while pos < end:
            in_cluster = pos % self._cs
            index = in_cluster // sub
            n = min(sub - in_cluster % sub, end - pos)
            if bitmap >> index & 1:
                pieces.append((_DATA, pos, n, host + in_cluster, 0))
            elif bitmap >> (32 + index) & 1:
                pieces.append((_ZERO, pos, n, 0, 0))
            else:
                pieces.append((_UNALLOCATED, pos, n, 0, 0))
            pos += n
        return pieces

    def _read_run(self, kind: int, guest: int, part: memoryview, host: int, entry: int) -> None:
        if kind == _DATA:
            if host + len(part) > self._end:
                raise DeviceError(
                    Errno.EIO, f"{self.path} is corrupt: data for guest {guest} lies past the end of the file"
                )
            done = 0
            while done < len(part):
                n = os.preadv(self._fd, [part[done:]], host + done)
                if n == 0:
                    raise DeviceError(Errno.EIO, f"data cluster at {host + done} lies past the end of the file")
                done += n
        elif kind == _ZERO:
            part[:] = bytes(len(part))
        elif kind == _UNALLOCATED:
            self._read_backing(guest, part)
        else:
            cluster = self._decompress(entry)
            start = guest % self._cs
            part[:] = cluster[start : start + len(part)]

    def _read_backing(self, guest: int, part: memoryview) -> None:
        backing = self.backing
        if backing is None or guest >= backing.size:
            part[:] = bytes(len(part))
            return
        inside = min(len(part), backing.size - guest)
        backing.read_into(offset=guest, buffer=part[:inside])
        if inside < len(part):
            part[inside:] = bytes(len(part) - inside)

    def _decompress(self, entry: int) -> bytes:
        offset, length = fmt.compressed_location(entry, self._cluster_bits)
        raw = os.pread(self._fd, length, offset)
        try:
            if self.header.compression_type == fmt.Compression.ZSTD:
                import zstandard

                out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
            else:
                out = zlib.decompressobj(-12).decompress(raw, self._cs)
        except Exception as exc:
            raise DeviceError(Errno.EIO, f"compressed cluster at {offset} is damaged: {exc}") from exc
        if len(out) < self._cs:
            raise DeviceError(Errno.EIO, f"compressed cluster at {offset} decompresses to {len(out)} bytes")
        return out[: self._cs]

    def _status(self, offset: int, length: int) -> list[tuple[int, int, int, tuple[int, int]]]:
        """``(kind, guest, length, (depth, allocation flags))`` over the chain."""
        out: list[tuple[int, int, int, tuple[int, int]]] = []
        hole_zero = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
        for kind, guest, n, _, _ in self._runs(offset, length):
            if kind in (_DATA, _COMPRESSED):
                out.append((kind, guest, n, (1, 0)))
            elif kind == _ZERO:
                out.append((kind, guest, n, (1, hole_zero)))
            else:
                out.extend(self._backing_status(guest, n))
        return out

    def _backing_status(self, guest: int, length: int) -> list[tuple[int, int, int, tuple[int, int]]]:
        hole_zero = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
        backing = self.backing
        if backing is None or guest >= backing.size:
            return [(_UNALLOCATED, guest, length, (0, hole_zero))]
        inside = min(length, backing.size - guest)
        out: list[tuple[int, int, int, tuple[int, int]]] = []
        if isinstance(backing, Qcow2Device):
            for kind, g, n, (depth, flags) in backing._status(guest, inside):
                out.append((kind, g, n, (depth + 1 if depth else 0, flags)))
        else:
            pos = guest
            caps = backing.capabilities
            for extent in backing.extents(offset=guest, length=inside) if caps.can_extents else [Extent(guest, inside)]:
                n = min(extent.length, guest + inside - pos)
                out.append((_DATA, pos, n, (2, extent.status)))
                pos += n
                if pos >= guest + inside:
                    break
        if inside < length:
            out.append((_UNALLOCATED, guest + inside, length - inside, (0, hole_zero)))
        return out

    # -- writing -------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise DeviceError(Errno.EPERM, f"{self.path} is open read-only")

    def _write_cluster(self, guest: int, data: memoryview) -> tuple[int, memoryview | None] | None:
        """Map ``data`` (inside one guest cluster) to the host (lock held).

        Returns where to write: ``(host, None)`` means write ``data`` itself
        there (the caller batches contiguous ones), ``(host, content)`` a
        whole materialised cluster. The L2 entry is updated already; it only
        reaches the disk at the next flush, after the data.
        """
        entry, bitmap = self._entry(guest)
        kind = self._classify(entry, bitmap)
        start = guest % self._cs
        if kind == _DATA and entry & fmt.COPIED:
            self._check_data_cluster(entry & fmt.OFFSET_MASK, guest)
            return (entry & fmt.OFFSET_MASK) + start, None
        if kind == _DATA:
            raise DeviceError(Errno.EIO, f"guest cluster at {guest} is shared (snapshots); writing is not supported")
        base = guest - start
        content: memoryview | None = None
        if len(data) != self._cs:
            merged = bytearray(self._cs)
            self._read_cluster_content(base, memoryview(merged))
            merged[start : start + len(data)] = data
            content = memoryview(merged)
        host = entry & fmt.OFFSET_MASK
        reuse = kind != _COMPRESSED and host and entry & fmt.COPIED  # a preallocated cluster
        if reuse:
            self._check_data_cluster(host, guest)
        else:
            host = self._allocate()
        if kind == _COMPRESSED:
            self._free_compressed(entry)
        self._set_entry(base, host | fmt.COPIED, _FULL if self._extended else 0)
        return host, content

    def _write_zeroes(self, guest: int, length: int) -> None:
        zeroes = memoryview(bytes(length))
        placed = self._write_cluster(guest, zeroes)
        if placed is not None:
            host, content = placed
            self._pwrite(host, zeroes if content is None else content)

    def _check_data_cluster(self, host: int, guest: int) -> None:
        """Refuse to write through an L2 entry that a damaged image points anywhere unsafe."""
        if host % self._cs or host + self._cs > self._end or self._is_metadata(host):
            raise DeviceError(
                Errno.EIO,
                f"{self.path} is corrupt: guest cluster at {guest} maps to host offset {host}, "
                "which is misaligned, past the end of the file or image metadata; check it with 'qemu-img check'",
            )

    def _is_metadata(self, host: int) -> bool:
        header = self.header
        if host < self._cs:
            return True
        l1_end = header.l1_table_offset + header.l1_size * 8
        if header.l1_table_offset <= host < l1_end:
            return True
        rt = header.refcount_table_offset
        if rt <= host < rt + header.refcount_table_clusters * self._cs:
            return True
        return host in self._metadata_clusters()

    def _metadata_clusters(self) -> set[int]:
        """L2 tables and refcount blocks; new ones only come with a new end of file."""
        key = self._end
        if self._metadata_key != key:
            self._metadata_set = {e & fmt.OFFSET_MASK for e in self._l1 if e & fmt.OFFSET_MASK} | {
                e & fmt.OFFSET_MASK for e in self._rtable if e & fmt.OFFSET_MASK
            }
            self._metadata_key = key
        return self._metadata_set

    def _read_cluster_content(self, base: int, out: memoryview) -> None:
        for kind, guest, n, host, entry in self._runs(base, len(out)):
            self._read_run(kind, guest, out[guest - base : guest - base + n], host, entry)

    def _zero_cluster(self, guest: int, length: int, may_trim: bool) -> None:
        """Make ``length`` bytes in one guest cluster read as zeroes (lock held).

        With ``may_trim`` a whole cluster's host cluster is freed (and its
        space punched out of the file), as qemu does on discard.
        """
        entry, bitmap = self._entry(guest)
        kind = self._classify(entry, bitmap)
        owned = entry & fmt.OFFSET_MASK if kind != _COMPRESSED and entry & fmt.COPIED else 0
        no_backing_here = self.backing is None or guest >= self.backing.size
        if kind == _ZERO or (kind == _UNALLOCATED and no_backing_here):
            if may_trim and owned and length == self._cs:
                self._free_cluster(owned)
                if self._extended:
                    self._set_entry(guest, 0, _FULL << 32)
                else:  # still a zero cluster: a backing file must not show through
                    self._set_entry(guest, fmt.ZERO if self.header.version >= 3 else 0, 0)
            return
        if length == self._cs and self.header.version < 3 and may_trim and no_backing_here and kind == _DATA and owned:
            self._free_cluster(owned)  # v2 has no zero flag, but unallocated reads as zeroes here
            self._set_entry(guest, 0, 0)
            return
        if length < self._cs or self.header.version < 3:
            if self._extended and kind != _COMPRESSED and self._zero_subclusters(guest, length, entry, bitmap):
                return
            self._write_zeroes(guest, length)  # no zero flag for part of a cluster
            return
        host = owned
        if kind == _COMPRESSED:
            self._free_compressed(entry)
        if may_trim and host:
            self._free_cluster(host)
            host = 0
        if self._extended:
            self._set_entry(guest, (host | fmt.COPIED) if host else 0, _FULL << 32)
        else:
            self._set_entry(guest, ((host | fmt.COPIED) if host else 0) | fmt.ZERO, 0)

    def _zero_subclusters(self, guest: int, length: int, entry: int, bitmap: int) -> bool:
        """Zero whole subclusters by bitmap; False if the range is not subcluster-aligned."""
        sub = self._cs // fmt.SUBCLUSTERS
        start = guest % self._cs
        if start % sub or length % sub:
            return False
        first, count = start // sub, length // sub
        mask = ((1 << count) - 1) << first
        alloc = (bitmap & _FULL) & ~mask
        zero = ((bitmap >> 32) | mask) & _FULL
        host = entry & fmt.OFFSET_MASK
        self._set_entry(guest - start, (host | fmt.COPIED) if host else 0, alloc | (zero << 32))
        return True

    def _set_entry(self, guest: int, entry: int, bitmap: int) -> None:
        cluster = guest >> self._cluster_bits
        l1_index, l2_index = divmod(cluster, self._l2_entries)
        l2_offset = self._l1[l1_index] & fmt.OFFSET_MASK
        if not l2_offset:
            l2_offset = self._allocate()
            self._cache_put(self._l2_cache, l2_offset, bytearray(self._cs), self._dirty_l2, _L2_CACHE_BYTES)
            self._l1[l1_index] = l2_offset | fmt.COPIED
            self._l1_dirty = True
        elif not self._l1[l1_index] & fmt.COPIED:
            raise DeviceError(Errno.EIO, f"L2 table at {l2_offset} is shared (snapshots); writing is not supported")
        table = self._l2(l2_offset)
        if self._extended:
            struct.pack_into(">QQ", table, l2_index * 16, entry, bitmap)
        else:
            struct.pack_into(">Q", table, l2_index * 8, entry)
        self._dirty_l2.add(l2_offset)

    def _pwrite(self, host: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], host + done)
        self._data_dirty = True

    def _free_cluster(self, host: int) -> None:
        """Drop a data cluster: its space is punched now (it reads as zeroes,
        which is what discarding allows), its refcount falls at the next flush,
        once no L2 entry on disk points at it any more."""
        try:
            _punch_hole(self._fd, host, self._cs)
        except OSError:
            pass  # the file system keeps the space; the refcount still falls
        self._pending_free.append(host)

    def _free_compressed(self, entry: int) -> None:
        offset, length = fmt.compressed_location(entry, self._cluster_bits)
        first = offset & ~(self._cs - 1)
        last = (offset + length - 1) & ~(self._cs - 1)
        self._pending_free.extend(range(first, last + 1, self._cs))

    # -- allocation and refcounts --------------------------------------------------

    def _allocate(self) -> int:
        host = self._end
        self._end += self._cs
        self._add_refcount(host, 1)
        return host

    def _add_refcount(self, host: int, delta: int) -> None:
        per_block = self.header.refcount_block_entries
        table_index, block_index = divmod(host >> self._cluster_bits, per_block)
        if table_index >= len(self._rtable):
            self._grow_refcount_table(table_index + 1)
        block_offset = self._rtable[table_index] & fmt.OFFSET_MASK
        if not block_offset:
            block_offset = self._end
            self._end += self._cs
            self._rtable[table_index] = block_offset
            self._rtable_dirty = True
            self._cache_put(self._rb_cache, block_offset, bytearray(self._cs), self._dirty_rb, _REFCOUNT_CACHE_BYTES)
            self._add_refcount(block_offset, 1)
        block = self._refcount_block(block_offset)
        value = fmt.read_refcount(block, block_index, self.header.refcount_order) + delta
        fmt.write_refcount(block, block_index, self.header.refcount_order, value)
        self._dirty_rb.add(block_offset)

    def _grow_refcount_table(self, needed: int) -> None:
        """Move the refcount table to the end of the file, with room to spare."""
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        entries = max(needed * 2, len(self._rtable) + 1)
        clusters = -(-entries * 8 // self._cs)
        new_offset = self._end
        self._end += clusters * self._cs
        self._rtable.extend([0] * (clusters * self._cs // 8 - len(self._rtable)))
        self.header.refcount_table_offset = new_offset
        self.header.refcount_table_clusters = clusters
        self._rtable_dirty = self._header_dirty = True
        for i in range(clusters):
            self._add_refcount(new_offset + i * self._cs, 1)
        self._pending_free.extend(old_offset + i * self._cs for i in range(old_clusters))

    def _refcount_block(self, offset: int) -> bytearray:
        block = self._rb_cache.get(offset)
        if block is None:
            block = bytearray(_pread(self._fd, self._cs, offset, "refcount block"))
            self._cache_put(self._rb_cache, offset, block, self._dirty_rb, _REFCOUNT_CACHE_BYTES)
        else:
            self._rb_cache.move_to_end(offset)
        return block

    def _l2(self, offset: int) -> bytearray:
        table = self._l2_cache.get(offset)
        if table is None:
            if offset % self._cs or offset + self._cs > max(self._end, 0):
                raise DeviceError(Errno.EIO, f"{self.path}: L2 table offset {offset} is invalid")
            table = bytearray(_pread(self._fd, self._cs, offset, "L2 table"))
            self._cache_put(self._l2_cache, offset, table, self._dirty_l2, _L2_CACHE_BYTES)
        else:
            self._l2_cache.move_to_end(offset)
        return table

    def _cache_put(
        self, cache: OrderedDict[int, bytearray], key: int, value: bytearray, dirty: set[int], limit: int
    ) -> None:
        """Insert, dropping clean tables beyond ``limit``; dirty ones wait for :meth:`_trim_caches`."""
        cache[key] = value
        excess = len(cache) - max(limit // self._cs, 2)
        if excess > 0:
            for old in [k for k in cache if k not in dirty and k != key][:excess]:
                del cache[old]

    def _trim_caches(self) -> None:
        """Once an operation's data is written: flush if dirty tables overfill a cache, then shrink it."""
        over_l2 = len(self._l2_cache) * self._cs > _L2_CACHE_BYTES and self._dirty_l2
        over_rb = len(self._rb_cache) * self._cs > _REFCOUNT_CACHE_BYTES and self._dirty_rb
        if not (over_l2 or over_rb):
            return
        self._flush_locked()
        for cache, limit in ((self._l2_cache, _L2_CACHE_BYTES), (self._rb_cache, _REFCOUNT_CACHE_BYTES)):
            while len(cache) > max(limit // self._cs, 2):
                cache.popitem(last=False)

    # -- flush -------------------------------------------------------------------------

    def _flush_locked(self) -> None:
        fd = self._fd
        if self._data_dirty:
            os.fdatasync(fd)
            self._data_dirty = False
        wrote = self._write_dirty(self._rb_cache, self._dirty_rb)
        if self._rtable_dirty:
            self._write_table(self.header.refcount_table_offset, self._rtable)
            self._rtable_dirty = False
            wrote = True
        if wrote:
            os.fdatasync(fd)
        if self._header_dirty:
            self._write_header()
            os.fdatasync(fd)
            self._header_dirty = False
        if self._write_dirty(self._l2_cache, self._dirty_l2):
            os.fdatasync(fd)
        if self._l1_dirty:
            self._write_table(self.header.l1_table_offset, self._l1)
            os.fdatasync(fd)
            self._l1_dirty = False
        if self._pending_free:
            frees, self._pending_free = self._pending_free, []
            for host in frees:
                self._add_refcount(host, -1)
            self._write_dirty(self._rb_cache, self._dirty_rb)
            os.fdatasync(fd)

    def _write_dirty(self, cache: OrderedDict[int, bytearray], dirty: set[int]) -> bool:
        if not dirty:
            return False
        for offset in sorted(dirty):
            self._pwrite(offset, memoryview(cache[offset]))
        dirty.clear()
        return True

    def _write_table(self, offset: int, entries: list[int]) -> None:
        self._pwrite(offset, memoryview(struct.pack(f">{len(entries)}Q", *entries)))

    def _write_header(self) -> None:
        encoded = fmt.encode_header(self.header)
        self._pwrite(0, memoryview(encoded))


def _open_backing(path: str, header: fmt.Header, chain: tuple[str, ...]) -> BlockDevice:
    name = header.backing_file or ""
    if name.startswith("json:"):
        raise ImageError(f"{path}: json: backing file names are not supported")
    backing = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
    if not os.path.exists(backing):
        raise ImageError(f"{path}: backing file {name} not found (looked for {backing})")
    backing_format = header.backing_format
    if backing_format is None:
        with open(backing, "rb") as f:
            backing_format = "qcow2" if f.read(4) == fmt.MAGIC else "raw"
    if backing_format == "qcow2":
        return Qcow2Device(backing, readonly=True, _chain=chain)
    if backing_format == "raw":
        return RawDevice(backing, readonly=True)
    raise ImageError(f"{path}: backing format {backing_format!r} is not supported")


def _merge_run(runs: list[tuple[int, int, int, int, int]], run: tuple[int, int, int, int, int]) -> None:
    """Append ``run``, extending the last one when it continues it."""
    kind, guest, n, host, _ = run
    if runs:
        pk, pg, pn, ph, _ = runs[-1]
        if pk == kind and pg + pn == guest and (kind in (_UNALLOCATED, _ZERO) or (kind == _DATA and ph + pn == host)):
            runs[-1] = (pk, pg, pn + n, ph, 0)
            return
    runs.append(run)
