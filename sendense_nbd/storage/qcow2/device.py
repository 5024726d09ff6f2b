"""A qcow2 image as a block device: reads through backing chains, crash-safe writes.

Theory of operation (docs/interop/qcow2.txt in qemu). The device is a facade
over three parts:

* **Mapping** (:mod:`.mapping`, pure). A guest cluster is unallocated (read
  the backing file, or zeroes), a zero cluster (reads as zeroes, never the
  backing file), a standard cluster at a host offset, or compressed; extended
  L2 entries add a 32-bit allocation and a 32-bit zero bitmap per cluster. A
  request becomes a few runs, each read or written in one go.
* **Metadata** (:mod:`.metadata`). The L1 table lives in memory; L2 tables
  and refcount blocks are loaded on demand into bounded caches, and a changed
  table stays there until a flush writes it in dependency order with a
  barrier after each step: data, then refcount blocks and table (and the
  header when the table moved), then L2 tables, then the L1 table, and only
  then the decrements of freed clusters. Whatever a crash interrupts, the
  image on disk is consistent; at worst clusters leak. FUA is a flush after
  the write. A cache that fills with dirty tables triggers the same flush.
* **Allocation** (:mod:`.allocator`). Host clusters are allocated at the end
  of the file and never moved or reused; they are freed when a compressed
  cluster is rewritten or a whole cluster is discarded (its space punched at
  once, its refcount dropped at the end of the next flush).

**Writes** are copy-on-write: a partial write to a cluster that is not a plain
allocated one first materialises the cluster's current content (backing data,
zeroes, decompressed data, subclusters), so a cluster is always written
whole. Zeroing sets the v3 zero flag, so an overlay never re-exposes its
backing file. The backing file is read only through the public contract
(``read_into``, ``extents``, ``allocation_depth``), whatever its format.

**Concurrency.** One lock guards metadata and writes; reads take it only to
resolve the mapping and read data outside it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from sendense_nbd.errors import DeviceError, ImageError
from sendense_nbd.protocol.constants import AllocationFlag, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, BlockDevice, Capabilities, Placement, Support, device_error
from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.hostfile import HostFile, LocalFile
from sendense_nbd.storage.qcow2 import format as fmt
from sendense_nbd.storage.qcow2.allocator import Allocator
from sendense_nbd.storage.qcow2.mapping import ClusterKind, Layout, Run
from sendense_nbd.storage.qcow2.metadata import MetadataCache
from sendense_nbd.storage.raw import RawDevice

log = logging.getLogger(__name__)

#: Files in a backing chain at most (offsite copy chains are capped to it: policy.offsite.MAX_SEAL_EVERY).
MAX_CHAIN = 16
_HOLE_ZERO = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
_UNALLOCATED, _ZERO, _DATA, _COMPRESSED = (
    ClusterKind.UNALLOCATED,
    ClusterKind.ZERO,
    ClusterKind.DATA,
    ClusterKind.COMPRESSED,
)


class _NotCached(Exception):
    """An L2 table a non-blocking read needs is not in memory."""


class Qcow2Device(Backend):
    """A backend over a qcow2 image (open it with ``open_image``); CACHE is emulated.

    How it works is the module docstring. ``backing`` is the backing image,
    opened through the checking adapter, or None. The adapter refuses changes
    to a read-only image, so the writing members never see one.
    """

    path: str

    def __init__(
        self,
        path: str,
        *,
        readonly: bool = False,
        open_backing: bool = True,
        file: HostFile | None = None,
        _chain: tuple[str, ...] = (),
    ) -> None:
        """Open ``path``; without ``open_backing`` unallocated clusters read as zeroes. ``file``: read
        the image from it (read-only; a remote object, whose backing files are its siblings) rather
        than from the local file ``path``."""
        if file is not None and not readonly:
            raise ImageError(f"{path}: an image read through {type(file).__name__} can only be opened read-only")
        self.path = path
        self.readonly = readonly
        real = os.path.realpath(path) if file is None else file.name
        if real in _chain or len(_chain) >= MAX_CHAIN:
            if file is not None:
                file.close()
            raise ImageError(f"backing chain of {path} loops or is deeper than {MAX_CHAIN}")
        self._file = file if file is not None else LocalFile(path, readonly=readonly)
        self._closed = False
        self.backing = None
        try:
            self._open(real, _chain, open_backing)
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------

    def _open(self, real: str, chain: tuple[str, ...], open_backing: bool) -> None:
        header, file_size = self._load_header()
        self.header = header
        self._cs = header.cluster_size
        self._refuse(header)
        if header.l1_size < fmt.l1_entries_for(header.size, header.cluster_bits, header.extended_l2):
            raise ImageError(f"{self.path}: L1 table is too small for the virtual size")
        self._layout = Layout.of(header, self.path)
        self._data_bitmap = self._layout.data_bitmap()
        self._cache = MetadataCache.load(self._file, header, file_size=file_size, name=self.path)
        self._alloc = Allocator(self._cache, end=-(-file_size // self._cs) * self._cs)
        self._lock = threading.RLock()
        if header.backing_file and open_backing:
            self.backing = _open_backing(self.path, header, chain + (real,), self._file)
        if not self.readonly and header.autoclear:
            header.autoclear = 0  # we do not maintain bitmaps: mark them inconsistent
            self._cache.header_changed()
            self.flush()
        self._capabilities = Capabilities(
            writable=not self.readonly,
            zero=Support.NATIVE,
            trim=Support.NATIVE,
            fua=Support.NATIVE,
            extents=Support.NATIVE,
            allocation_depth=Support.NATIVE,
            layer_map=Support.NATIVE,
            cache=Support.EMULATE,
            read_cached=Support.NATIVE,
            fast_zero=header.version >= 3,
            has_backing=self.backing is not None,
            serial_writes=True,  # one lock guards metadata and writes
            preferred_block=max(4096, self._cs),  # whole clusters avoid copy-on-write
        )

    def _load_header(self) -> tuple[fmt.Header, int]:
        """The header and the file's size, after rebuilding refcounts a crash left dirty."""
        file_size = self._file.size()
        head = self._file.pread(1 << fmt.MAX_CLUSTER_BITS, 0)
        header = fmt.parse_header(head)
        if header.incompatible & fmt.Incompatible.DIRTY and not self.readonly:
            # Lazy refcounts left inconsistent by a crash: rebuild them, as qemu does on open.
            from sendense_nbd.storage.qcow2.check import repair_refcounts

            log.warning("%s has the dirty bit set; rebuilding its refcounts", self.path)
            repair_refcounts(self.path)
            file_size = self._file.size()
            head = self._file.pread(1 << fmt.MAX_CLUSTER_BITS, 0)
            header = fmt.parse_header(head)
        if len(head) < min(header.cluster_size, file_size):
            raise ImageError(f"{self.path}: header cluster is truncated")
        return header, file_size

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

    # -- contract ----------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return self.header.size

    @property
    def capabilities(self) -> Capabilities:
        """Everything but CACHE is native; FAST_ZERO needs v3 zero clusters."""
        return self._capabilities

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``: data, zeroes, decompressed clusters, the backing chain."""
        try:
            for run in self._runs(offset, len(buffer)):
                self._read_run(run, buffer[run.guest - offset : run.end - offset])
        except OSError as exc:
            raise device_error(exc, f"read {len(buffer)} bytes at {offset}") from exc

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        """Read without blocking: only mapped tables and data in the page cache (RWF_NOWAIT)."""
        if not self._lock.acquire(blocking=False):
            return False  # a writer holds the metadata: do not wait on the event loop
        try:
            runs = self._layout.runs(offset, len(buffer), self._cached_entry)
        except _NotCached:
            return False
        finally:
            self._lock.release()
        for run in runs:
            part = buffer[run.guest - offset : run.end - offset]
            if run.kind == _ZERO or (run.kind == _UNALLOCATED and self.backing is None):
                part[:] = bytes(run.length)
            elif run.kind != _DATA:
                return False
            elif not self._file.read_nowait(part, run.host):
                return False  # not in the page cache (or memory): read in a thread
        return True

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data`` (copy-on-write for partial clusters); with ``fua`` flush before returning."""
        view = memoryview(data).cast("B")
        try:
            with self._lock:
                self._write_locked(offset, view)
                self._after_update(fua)
        except OSError as exc:
            raise device_error(exc, f"write {len(view)} bytes at {offset}") from exc

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes, by zero flags where a whole cluster (or subcluster) allows."""
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
                self._after_update(fua)
        except OSError as exc:
            raise device_error(exc, f"zero {length} bytes at {offset}") from exc

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range: whole clusters give their space back; it then reads as zeroes."""
        self.zero(offset=offset, length=length, may_trim=True, fua=fua)

    def flush(self) -> None:
        """Write data and metadata in the crash-safe order (module docstring); nothing when read-only."""
        if self.readonly:
            return
        try:
            with self._lock:
                self._flush_locked()
        except OSError as exc:
            raise device_error(exc, "flush") from exc

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents of the range, through the backing chain."""
        return self._allocation(offset, length)

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        """Extents whose status is the depth: 0 unallocated in the whole chain, 1 this image, 2 its backing file..."""
        return self._depths(offset, length)

    def layer_map(self, *, offset: int, length: int) -> list[Placement]:
        """This image's own clusters: data at its host offset, zero clusters, compressed data
        (no host offset), and what it leaves to its backing file (not present)."""
        return [_placement(run) for run in self._runs(offset, length)]

    def close(self) -> None:
        """Flush (when writable), close the file and the backing chain."""
        if not getattr(self, "_closed", True):
            self._closed = True
            try:
                if not self.readonly and hasattr(self, "_lock"):
                    self.flush()
            finally:
                self._file.close()
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    # -- mapping -----------------------------------------------------------------

    def _entry(self, guest: int) -> tuple[int, int]:
        """``(L2 entry, subcluster bitmap)`` of the guest cluster at ``guest``."""
        l1_index, l2_index = self._layout.locate(guest)
        l2_offset = self._cache.l1[l1_index] & fmt.OFFSET_MASK
        if not l2_offset:
            return 0, 0
        return self._layout.decode(self._cache.l2(l2_offset, self._alloc.end), l2_index)

    def _cached_entry(self, guest: int) -> tuple[int, int]:
        """Like :meth:`_entry`, but :class:`_NotCached` rather than reading a table."""
        l1_index, l2_index = self._layout.locate(guest)
        l2_offset = self._cache.l1[l1_index] & fmt.OFFSET_MASK
        if not l2_offset:
            return 0, 0
        table = self._cache.cached_l2(l2_offset)
        if table is None:
            raise _NotCached
        return self._layout.decode(table, l2_index)

    def _runs(self, offset: int, length: int) -> list[Run]:
        with self._lock:
            return self._layout.runs(offset, length, self._entry)

    # -- reading -----------------------------------------------------------------

    def _read_run(self, run: Run, part: memoryview) -> None:
        kind = run.kind
        if kind == _DATA:
            host = run.host
            if host + len(part) > self._alloc.end:
                raise DeviceError(
                    Errno.EIO, f"{self.path} is corrupt: data for guest {run.guest} lies past the end of the file"
                )
            done = 0
            while done < len(part):
                n = self._file.readinto(part[done:], host + done)
                if n == 0:
                    raise DeviceError(Errno.EIO, f"data cluster at {host + done} lies past the end of the file")
                done += n
        elif kind == _ZERO:
            part[:] = bytes(len(part))
        elif kind == _UNALLOCATED:
            self._read_backing(run.guest, part)
        else:
            start = run.guest % self._cs
            part[:] = self._decompress(run.entry)[start : start + len(part)]

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
        offset, length = fmt.compressed_location(entry, self.header.cluster_bits)
        try:
            return fmt.decompress_cluster(
                self._file.pread(length, offset), cluster_size=self._cs, compression=self.header.compression_type
            )
        except ImageError as exc:
            raise DeviceError(Errno.EIO, f"compressed cluster at {offset} {exc}") from exc

    # -- block status through the chain -----------------------------------------------

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` flags over the chain."""

        def below(backing: BlockDevice, start: int, n: int) -> list[Extent]:
            return _covering(start, n, backing.extents)

        return self._chain_status(offset, length, own=_own_flags, below=below, beyond=_HOLE_ZERO)

    def _depths(self, offset: int, length: int) -> list[Extent]:
        """``qemu:allocation-depth`` over the chain: 0 nowhere, 1 this image, 2 its backing file..."""

        def below(backing: BlockDevice, start: int, n: int) -> list[Extent]:
            found = _covering(start, n, backing.allocation_depth)
            return [Extent(e.offset, e.length, e.status + 1 if e.status else 0) for e in found]

        return self._chain_status(offset, length, own=lambda run: 1, below=below, beyond=0)

    def _chain_status(
        self,
        offset: int,
        length: int,
        *,
        own: Callable[[Run], int],
        below: Callable[[BlockDevice, int, int], list[Extent]],
        beyond: int,
    ) -> list[Extent]:
        """Merged status of a range: ``own(run)`` where this image defines it, ``below``
        where the backing file shows through, ``beyond`` where nothing does."""
        out: list[Extent] = []
        for run in self._runs(offset, length):
            if run.kind != _UNALLOCATED:
                _append(out, Extent(run.guest, run.length, own(run)))
                continue
            backing = self.backing
            inside = max(0, min(run.length, backing.size - run.guest)) if backing is not None else 0
            if backing is not None and inside:
                for status in below(backing, run.guest, inside):
                    _append(out, status)
            if inside < run.length:
                _append(out, Extent(run.guest + inside, run.length - inside, beyond))
        return out

    # -- writing -------------------------------------------------------------------

    def _write_locked(self, offset: int, view: memoryview) -> None:
        """Place and write ``view``, one pwrite for each host-contiguous stretch (lock held)."""
        cs = self._cs
        write_data = self._cache.write_data
        pos = 0
        run_host = run_start = run_end = -1
        while pos < len(view):
            guest = offset + pos
            n = min(cs - guest % cs, len(view) - pos)
            host, content = self._write_cluster(guest, view[pos : pos + n])
            if run_host >= 0 and content is None and host == run_host + (run_end - run_start):
                run_end = pos + n
            else:
                if run_host >= 0:
                    write_data(run_host, view[run_start:run_end])
                    run_host = -1
                if content is None:
                    run_host, run_start, run_end = host, pos, pos + n
                else:
                    write_data(host, content)
            pos += n
        if run_host >= 0:
            write_data(run_host, view[run_start:run_end])

    def _write_cluster(self, guest: int, data: memoryview) -> tuple[int, memoryview | None]:
        """Map ``data`` (inside one guest cluster) to the host (lock held).

        Returns where to write: ``(host, None)`` means write ``data`` itself
        there (the caller batches contiguous ones), ``(host, content)`` a
        whole materialised cluster. The L2 entry is updated already; it only
        reaches the disk at the next flush, after the data.
        """
        entry, bitmap = self._entry(guest)
        kind = self._layout.classify(entry, bitmap)
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
            for run in self._runs(base, self._cs):
                self._read_run(run, memoryview(merged)[run.guest - base : run.end - base])
            merged[start : start + len(data)] = data
            content = memoryview(merged)
        host = entry & fmt.OFFSET_MASK
        if kind != _COMPRESSED and host and entry & fmt.COPIED:  # a preallocated cluster
            self._check_data_cluster(host, guest)
        else:
            host = self._alloc.allocate()
        if kind == _COMPRESSED:
            self._alloc.free_compressed(entry)
        self._set_entry(base, host | fmt.COPIED, self._data_bitmap)
        return host, content

    def _check_data_cluster(self, host: int, guest: int) -> None:
        """Refuse to write through an L2 entry that a damaged image points anywhere unsafe."""
        end = self._alloc.end
        if host % self._cs or host + self._cs > end or self._cache.is_metadata(host, end):
            raise DeviceError(
                Errno.EIO,
                f"{self.path} is corrupt: guest cluster at {guest} maps to host offset {host}, "
                "which is misaligned, past the end of the file or image metadata; check it with 'qemu-img check'",
            )

    def _zero_cluster(self, guest: int, length: int, may_trim: bool) -> None:
        """Make ``length`` bytes in one guest cluster read as zeroes (lock held)."""
        entry, bitmap = self._entry(guest)
        backing_shows = self.backing is not None and guest < self.backing.size
        plan = self._layout.plan_zero(
            entry, bitmap, start=guest % self._cs, length=length, may_trim=may_trim, backing_shows=backing_shows
        )
        if plan is None:
            return
        if plan.write_zeroes:
            zeroes = memoryview(bytes(length))
            host, content = self._write_cluster(guest, zeroes)
            self._cache.write_data(host, zeroes if content is None else content)
            return
        if plan.free_compressed:
            self._alloc.free_compressed(entry)
        if plan.free:
            self._alloc.free(plan.free)
        self._set_entry(guest, plan.entry, plan.bitmap)

    def _set_entry(self, guest: int, entry: int, bitmap: int) -> None:
        l1_index, l2_index = self._layout.locate(guest)
        cache = self._cache
        l2_offset = cache.l1[l1_index] & fmt.OFFSET_MASK
        if not l2_offset:
            l2_offset = self._alloc.allocate()
            table = cache.new_l2(l2_offset)
            cache.set_l1(l1_index, l2_offset | fmt.COPIED)
        elif not cache.l1[l1_index] & fmt.COPIED:
            raise DeviceError(Errno.EIO, f"L2 table at {l2_offset} is shared (snapshots); writing is not supported")
        else:
            table = cache.l2(l2_offset, self._alloc.end)
        self._layout.encode(table, l2_index, entry, bitmap)
        cache.l2_changed(l2_offset)

    # -- flush -------------------------------------------------------------------------

    def _after_update(self, fua: bool) -> None:
        """Once an operation's data is written: flush if dirty tables overfill a cache, or for FUA."""
        if self._cache.overfull():
            self._flush_locked()
            self._cache.shrink()
        if fua:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._cache.flush(self._alloc.release)


def _open_backing(path: str, header: fmt.Header, chain: tuple[str, ...], file: HostFile) -> CheckedDevice:
    name = header.backing_file or ""
    if name.startswith("json:"):
        raise ImageError(f"{path}: json: backing file names are not supported")
    remote = file.sibling(name)
    if remote is not None:
        if header.backing_format not in (None, "qcow2"):
            remote.close()
            raise ImageError(f"{path}: backing format {header.backing_format!r} of a remote image is not qcow2")
        return CheckedDevice(Qcow2Device(remote.name, readonly=True, file=remote, _chain=chain))
    backing = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
    if not os.path.exists(backing):
        raise ImageError(f"{path}: backing file {name} not found (looked for {backing})")
    backing_format = header.backing_format
    if backing_format is None:
        with open(backing, "rb") as f:
            backing_format = "qcow2" if f.read(4) == fmt.MAGIC else "raw"
    if backing_format == "qcow2":
        return CheckedDevice(Qcow2Device(backing, readonly=True, _chain=chain))
    if backing_format == "raw":
        return CheckedDevice(RawDevice(backing, readonly=True))
    raise ImageError(f"{path}: backing format {backing_format!r} is not supported")


def _placement(run: Run) -> Placement:
    kind = run.kind
    if kind == _UNALLOCATED:
        return Placement(run.guest, run.length, present=False)
    if kind == _ZERO:
        return Placement(run.guest, run.length, zero=True)
    return Placement(run.guest, run.length, host=run.host if kind == _DATA else None)


def _own_flags(run: Run) -> int:
    return _HOLE_ZERO if run.kind == _ZERO else 0


def _covering(offset: int, length: int, fetch: Callable[..., list[Extent]]) -> list[Extent]:
    """Ask ``fetch(offset=, length=)`` until the whole range is described (a device may
    answer for less, or more), clipping the answer to the range."""
    out: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        start = pos
        for extent in fetch(offset=pos, length=end - pos):
            n = min(extent.end, end) - pos
            if n <= 0:
                break
            out.append(Extent(pos, n, extent.status))
            pos += n
        if pos == start:
            raise DeviceError(Errno.EIO, f"the backing file described nothing at offset {pos}")
    return out


def _append(out: list[Extent], status: Extent) -> None:
    """Append ``status``, extending the last one when it has the same value."""
    if out and out[-1].status == status.status:
        out[-1] = Extent(out[-1].offset, out[-1].length + status.length, status.status)
    else:
        out.append(status)
