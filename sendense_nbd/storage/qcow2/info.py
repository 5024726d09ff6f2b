"""``qemu-img info`` for qcow2 and raw files, and the read-only metadata walk the checker shares.

Theory of operation
-------------------
An :class:`ImageFile` is a read-only view of an image through ``os.pread``.
Like qemu's block layer it reads bytes past the end of the file as zeros, so
a truncated image is *described* (and later reported by the checker) rather
than crashing the reader; every read is bounded by a limit taken from qemu
(32 MiB L1 table, 8 MiB refcount table, 64 MiB snapshot table and bitmap
directory), so a hostile header cannot make us allocate without bound.

:func:`load_header` parses the first cluster with
:func:`~sendense_nbd.storage.qcow2.format.parse_header` and then applies the
checks qemu makes when it opens an image (aligned tables, sane sizes, no
unknown incompatible feature). An image that fails them is one qemu refuses
to open, and it raises :class:`~sendense_nbd.errors.ImageError`.
:func:`read_snapshots` and :func:`read_bitmaps` decode the snapshot table and
the bitmap directory, and :class:`StoredRefcounts` looks refcounts up through
the refcount table; the checker (:mod:`.check`) reuses all three.

:func:`image_info` builds the same dictionary as ``qemu-img info
--output=json`` (qemu 7.2 key names and omission rules) and
:func:`format_info_human` renders it like the plain ``qemu-img info`` text.
"""

from __future__ import annotations

import math
import os
import struct
import time
from typing import Any

import attrs

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.qcow2.format import (
    MAGIC,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    Compatible,
    Compression,
    Extension,
    Header,
    Incompatible,
    parse_header,
    read_refcount,
)

MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_SNAPSHOT_EXTRA = 1024
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 << 20
MAX_BITMAP_TABLE = 0x8000000
MAX_BITMAP_BYTES = 0x20000000
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
MAX_LENGTH = 2**63 - 2**30  # qemu refuses requests reaching beyond this
AUTOCLEAR_BITMAPS = 1
AUTOCLEAR_DATA_FILE_RAW = 2

_SNAPSHOT = struct.Struct(">QIHHIIQII")
_BITMAP = struct.Struct(">QIIBBHI")
_BITMAP_EXT = struct.Struct(">IIQQ")


class ImageFile:
    """Read-only, bounded, zero-padded ``pread`` over an open descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; bytes past the end of the file read as zeroes."""
        if length <= 0:
            return b""
        if offset >= self.size:
            return bytes(length)
        want = min(length, self.size - offset)
        parts: list[bytes] = []
        while want > 0:
            chunk = os.pread(self.fd, want, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            want -= len(chunk)
        return b"".join(parts).ljust(length, b"\0")

    def read_u64s(self, offset: int, count: int) -> tuple[int, ...]:
        """``count`` big-endian 64-bit words at ``offset``."""
        return struct.unpack(f">{count}Q", self.read(offset, count * 8))


def load_header(f: ImageFile) -> Header:
    """Parse and validate the header the way qemu does on open."""
    if f.size < V2_HEADER_LENGTH:
        raise ImageError(f"qcow2 header is truncated: the file is only {f.size} bytes")
    head = f.read(0, V3_HEADER_LENGTH)
    if head[:4] != MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    version = int.from_bytes(head[4:8], "big")
    if version == 3 and f.size < V3_HEADER_LENGTH:
        raise ImageError(f"qcow2 v3 header is truncated: the file is only {f.size} bytes")
    cluster_bits = int.from_bytes(head[20:24], "big")
    first = f.read(0, 1 << min(max(cluster_bits, 9), 21))
    header = parse_header(first)
    cs = header.cluster_size
    _check_extension_lengths(header, first)
    if header.unknown_incompatible():
        raise ImageError(f"unsupported qcow2 incompatible feature bits {header.unknown_incompatible():#x}")
    if header.extended_l2 and header.cluster_bits < 14:
        raise ImageError("extended L2 entries need clusters of at least 16 KiB")
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"active L1 table too large ({header.l1_size} entries)")
    if header.l1_table_offset % cs:
        raise ImageError(f"active L1 table offset {header.l1_table_offset:#x} is not cluster aligned")
    span = header.l2_entries * cs
    if header.l1_size < -(-header.size // span):
        raise ImageError(f"L1 table is too small ({header.l1_size} entries) for {header.size} bytes")
    if header.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageError(f"reference count table too large ({header.refcount_table_clusters} clusters)")
    if header.refcount_table_offset % cs:
        raise ImageError(f"reference count table offset {header.refcount_table_offset:#x} is not cluster aligned")
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(f"too many snapshots ({header.nb_snapshots})")
    if header.snapshots_offset % cs:
        raise ImageError(f"snapshot table offset {header.snapshots_offset:#x} is not cluster aligned")
    return header


def _check_extension_lengths(header: Header, first: bytes) -> None:
    """qemu checks every extension length, the terminating one's too, against the area's end."""
    end = header.backing_file_offset or header.cluster_size
    pos = header.header_length
    while pos < end:
        kind, length = struct.unpack_from(">II", first, pos) if pos + 8 <= len(first) else (0, 0)
        pos += 8
        if pos > end or length > end - pos:
            raise ImageError("qcow2 header extension too large")
        if kind == Extension.END:
            return
        pos += (length + 7) & ~7


class StoredRefcounts:
    """The refcounts an image stores, read block by block the way qemu looks them up."""

    def __init__(self, f: ImageFile, header: Header) -> None:
        self.f, self.order, self.cs = f, header.refcount_order, header.cluster_size
        self.entries = header.refcount_block_entries
        self.table = f.read_u64s(header.refcount_table_offset, header.refcount_table_clusters * self.cs // 8)
        self.blocks: dict[int, bytes] = {}

    def block(self, index: int) -> bytes | None:
        """Refcount block ``index`` (b"" when unallocated), None when qemu could not read it."""
        offset = self.table[index] & REFT_OFFSET_MASK if index < len(self.table) else 0
        if not offset:
            return b""
        if offset % self.cs or offset + self.cs > MAX_LENGTH:
            return None
        if offset not in self.blocks:
            self.blocks[offset] = self.f.read(offset, self.cs)
        return self.blocks[offset]

    def get(self, cluster: int) -> int | None:
        """The stored refcount of ``cluster``; None when its block is unreadable."""
        block = self.block(cluster // self.entries)
        if not block:
            return None if block is None else 0
        return read_refcount(block, cluster % self.entries, self.order)

    def nonzero(self, index: int, limit: int) -> dict[int, int] | None:
        """``{cluster: refcount}`` of block ``index``'s nonzero entries below ``limit``."""
        block, base = self.block(index), index * self.entries
        if block is None or not block.strip(b"\0"):
            return None if block is None else {}
        if self.order >= 3:
            values = struct.unpack(f">{self.entries}{'BHIQ'[self.order - 3]}", block)
            return {base + j: v for j, v in enumerate(values) if v and base + j < limit}
        per_byte = 8 >> self.order
        found = (
            (base + b * per_byte + k, read_refcount(block, b * per_byte + k, self.order))
            for b, byte in enumerate(block)
            if byte
            for k in range(per_byte)
        )
        return {cluster: v for cluster, v in found if v and cluster < limit}


def extension(header: Header, kind: int) -> bytes | None:
    """The payload of the header extension of type ``kind``, if present."""
    for ext_type, payload in header.unknown_extensions:
        if ext_type == kind:
            return payload
    return None


@attrs.frozen
class Snapshot:
    """One entry of the snapshot table."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int
    icount: int | None


@attrs.frozen
class SnapshotTable:
    """The decoded snapshot table and the bytes it spans in the file."""

    snapshots: list[Snapshot]
    size: int


def read_snapshots(f: ImageFile, header: Header) -> SnapshotTable:
    """The snapshot table at ``header.snapshots_offset``."""
    snapshots: list[Snapshot] = []
    pos = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm32, extra_len = _SNAPSHOT.unpack(
            f.read(pos, _SNAPSHOT.size)
        )
        if extra_len > MAX_SNAPSHOT_EXTRA:
            raise ImageError(f"too much extra metadata ({extra_len} bytes) in a snapshot table entry")
        pos += _SNAPSHOT.size
        extra = f.read(pos, extra_len).ljust(24, b"\0")
        pos += extra_len
        ident = f.read(pos, id_len).decode("utf-8", "replace")
        pos += id_len
        name = f.read(pos, name_len).decode("utf-8", "replace")
        pos += name_len
        pos += -(pos - header.snapshots_offset) % 8
        if pos - header.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES:
            raise ImageError("snapshot table is too big")
        vm_large, _disk_size, icount = struct.unpack(">QQQ", extra[:24])
        snapshots.append(
            Snapshot(
                l1_table_offset=l1_off,
                l1_size=l1_size,
                id=ident,
                name=name,
                date_sec=dsec,
                date_nsec=dnsec,
                vm_clock_nsec=clock,
                vm_state_size=vm_large if extra_len >= 8 else vm32,
                extra_data_size=extra_len,
                icount=icount if extra_len >= 24 and icount != (1 << 64) - 1 else None,
            )
        )
    return SnapshotTable(snapshots, pos - header.snapshots_offset)


@attrs.frozen
class Bitmap:
    """One entry of the bitmap directory."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int


@attrs.frozen
class BitmapDirectory:
    """Where the bitmap directory is (the bitmaps header extension)."""

    offset: int
    size: int
    count: int


def bitmap_directory(header: Header) -> BitmapDirectory | None:
    """The bitmaps extension, when present and marked consistent (autoclear bit 0)."""
    payload = extension(header, Extension.BITMAPS)
    if payload is None or not header.autoclear & AUTOCLEAR_BITMAPS:
        return None
    if len(payload) != _BITMAP_EXT.size:
        raise ImageError("bitmaps extension has an invalid length")
    count, reserved, size, offset = _BITMAP_EXT.unpack(payload)
    if reserved or not 1 <= count <= MAX_BITMAPS or size > MAX_BITMAP_DIRECTORY or offset % header.cluster_size:
        raise ImageError("bitmaps extension is invalid")
    return BitmapDirectory(offset=offset, size=size, count=count)


def read_bitmaps(f: ImageFile, header: Header, directory: BitmapDirectory) -> list[Bitmap]:
    """Decode the bitmap directory; :class:`ImageError` when it is malformed."""
    data = f.read(directory.offset, directory.size)
    bitmaps: list[Bitmap] = []
    pos = 0
    while pos < len(data):
        if pos + _BITMAP.size > len(data):
            raise ImageError("bitmap directory entry runs past the directory")
        table_offset, table_size, flags, kind, gran, name_len, extra_len = _BITMAP.unpack_from(data, pos)
        end = pos + _BITMAP.size + extra_len + name_len
        if end > len(data):
            raise ImageError("bitmap directory entry runs past the directory")
        name = data[end - name_len : end].decode("utf-8", "replace")
        bad_size = not 0 < table_size <= MAX_BITMAP_TABLE or table_size * header.cluster_size > MAX_BITMAP_BYTES
        if not table_offset or table_offset % header.cluster_size or bad_size:
            raise ImageError(f"bitmap {name!r} has an invalid bitmap table")
        if kind != 1 or flags & ~7 or not 9 <= gran <= 31 or not 0 < name_len <= 1023:
            raise ImageError(f"bitmap {name!r} has an invalid directory entry")
        bitmaps.append(Bitmap(name, table_offset, table_size, flags, gran))
        pos = end + (-end % 8)
    if len(bitmaps) != directory.count:
        raise ImageError(f"bitmap directory holds {len(bitmaps)} bitmaps, the header says {directory.count}")
    return bitmaps


# -- qemu-img info ----------------------------------------------------------------------


def _is_qcow2(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


def _full_backing(path: str, backing: str) -> str:
    """qemu's ``path_combine``: a relative backing name is relative to the image's directory."""
    if backing.startswith("/") or ":" in backing.split("/", 1)[0]:
        return backing
    cut = path.rfind("/") + 1
    return path[:cut] + backing


def image_info(path: str, fmt: str | None = None) -> dict[str, Any]:
    """The dictionary ``qemu-img info --output=json`` prints for a qcow2 or raw file."""
    try:
        if fmt is None:
            fmt = "qcow2" if _is_qcow2(path) else "raw"
        if fmt not in ("qcow2", "raw"):
            raise ImageError(f"unsupported image format {fmt!r} (qcow2 or raw)")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            info: dict[str, Any] = {"filename": path, "format": fmt, "actual-size": st.st_blocks * 512}
            if fmt == "raw":
                info.update({"virtual-size": st.st_size, "dirty-flag": False})
                return info
            f = ImageFile(fd)
            header = load_header(f)
            _qcow2_info(f, header, path, info)
            return info
        finally:
            os.close(fd)
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from exc


def _qcow2_info(f: ImageFile, header: Header, path: str, info: dict[str, Any]) -> None:
    info["virtual-size"] = header.size
    info["cluster-size"] = header.cluster_size
    info["dirty-flag"] = bool(header.version >= 3 and header.incompatible & Incompatible.DIRTY)
    if header.crypt_method:
        info["encrypted"] = True
    if header.backing_file is not None:
        info["backing-filename"] = header.backing_file
        info["full-backing-filename"] = _full_backing(path, header.backing_file)
        if header.backing_format:
            info["backing-filename-format"] = header.backing_format
    if header.nb_snapshots:
        info["snapshots"] = [_snapshot_info(sn) for sn in read_snapshots(f, header).snapshots]
    data: dict[str, Any] = {
        "compat": "1.1" if header.version >= 3 else "0.10",
        "compression-type": Compression(header.compression_type).name.lower(),
    }
    if header.version >= 3:
        data["lazy-refcounts"] = bool(header.compatible & Compatible.LAZY_REFCOUNTS)
        directory = bitmap_directory(header)
        if directory is not None:
            data["bitmaps"] = [_bitmap_info(bm) for bm in read_bitmaps(f, header, directory)]
    data["refcount-bits"] = header.refcount_bits
    if header.version >= 3:
        data["corrupt"] = bool(header.incompatible & Incompatible.CORRUPT)
        data["extended-l2"] = header.extended_l2
        if header.incompatible & Incompatible.EXTERNAL_DATA:
            name = extension(header, Extension.DATA_FILE)
            if name is not None:
                data["data-file"] = name.decode("utf-8", "replace")
            data["data-file-raw"] = bool(header.autoclear & AUTOCLEAR_DATA_FILE_RAW)
    info["format-specific"] = {"type": "qcow2", "data": data}


def _snapshot_info(sn: Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": sn.id,
        "name": sn.name,
        "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 10**9,
        "vm-clock-nsec": sn.vm_clock_nsec % 10**9,
    }
    if sn.icount is not None:
        out["icount"] = sn.icount
    return out


def _bitmap_info(bm: Bitmap) -> dict[str, Any]:
    flags = [name for bit, name in ((1, "in-use"), (2, "auto")) if bm.flags & bit]
    return {"flags": flags, "name": bm.name, "granularity": 1 << bm.granularity_bits}


# -- human output ------------------------------------------------------------------------


def size_to_str(value: int) -> str:
    """qemu's ``size_to_str``: three significant digits and a binary unit."""
    exponent = math.frexp(value / (1000 / 1024))[1]
    index = min((exponent - 1) // 10, 6) if exponent >= 1 else 0
    unit = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[index]
    return f"{value / (1 << (index * 10)):0.3g} {unit}B"


_SPECIFIC_ORDER = (
    "compat",
    "compression-type",
    "lazy-refcounts",
    "bitmaps",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "data-file",
    "data-file-raw",
)


def _dump(value: Any, indent: int, lines: list[str], key: str) -> None:
    pad = "    " * indent
    if isinstance(value, dict):
        lines.append(f"{pad}{key}:")
        for k, v in value.items():
            _dump(v, indent + 1, lines, k.replace("-", " "))
    elif isinstance(value, list):
        lines.append(f"{pad}{key}:")
        for i, v in enumerate(value):
            _dump(v, indent + 1, lines, f"[{i}]")
    elif isinstance(value, bool):
        lines.append(f"{pad}{key}: {'true' if value else 'false'}")
    else:
        lines.append(f"{pad}{key}: {value}")


def _snapshot_line(sn: dict[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    msec = sn["vm-clock-nsec"] // 10**6
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{msec:03d}"
    icount = str(sn["icount"]) if "icount" in sn else ""
    return f"{sn['id']:<9} {sn['name']:<16} {size_to_str(sn['vm-state-size']):>8}{date:>20}{clock:>13}{icount:>11}"


def format_info_human(info: dict[str, Any]) -> str:
    """The text ``qemu-img info`` prints for ``info`` (as made by :func:`image_info`)."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size'])}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
        lines.extend(_snapshot_line(sn) for sn in info["snapshots"])
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        data = specific["data"]
        ordered = [k for k in _SPECIFIC_ORDER if k in data] + [k for k in data if k not in _SPECIFIC_ORDER]
        for key in ordered:
            _dump(data[key], 1, lines, key.replace("-", " "))
    return "\n".join(lines) + "\n"
