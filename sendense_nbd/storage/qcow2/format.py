"""The qcow2 on-disk format, as pure code over bytes (docs/interop/qcow2.txt).

Nothing here touches a file: the header is parsed from and encoded to bytes,
L1/L2/refcount entries are decoded and encoded as integers, and compressed
clusters are inflated from their bytes. The device
(:mod:`sendense_nbd.storage.qcow2.device`) does the I/O.
"""

from __future__ import annotations

import enum
import struct
import zlib

import attrs

from sendense_nbd.errors import ImageError

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # 2 MiB, qemu's limit
MAX_BACKING_NAME = 1023

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3_TAIL = struct.Struct(">QQQII")
_EXTENSION = struct.Struct(">II")

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1  # v3 standard descriptor bit 0
SUBCLUSTERS = 32


class Incompatible(enum.IntFlag):
    """Incompatible feature bits: a reader that does not know one must refuse the image."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    EXTERNAL_DATA = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


class Compatible(enum.IntFlag):
    """Compatible feature bits: safe to ignore."""

    LAZY_REFCOUNTS = 1 << 0


class Compression(enum.IntEnum):
    """The compression type of compressed clusters (header byte 104)."""

    ZLIB = 0
    ZSTD = 1


class Extension(enum.IntEnum):
    """Header extension types."""

    END = 0
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_NAMES = 0x6803F857
    BITMAPS = 0x23852875
    ENCRYPTION = 0x0537BE77
    DATA_FILE = 0x44415441


_KNOWN_INCOMPATIBLE = int(
    Incompatible.DIRTY
    | Incompatible.CORRUPT
    | Incompatible.EXTERNAL_DATA
    | Incompatible.COMPRESSION_TYPE
    | Incompatible.EXTENDED_L2
)


@attrs.define(slots=True)
class Header:
    """A qcow2 header and its extensions; mutable so the device can update it."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    crypt_method: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = Compression.ZLIB
    #: Bytes of v3 header fields beyond the ones we know, kept as they are.
    extra_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    #: Header extensions we do not interpret, as (type, data), kept in order.
    unknown_extensions: list[tuple[int, bytes]] = attrs.Factory(list)
    feature_names: bytes | None = None

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """L2 entries carry a subcluster bitmap."""
        return bool(self.incompatible & Incompatible.EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 8, or 16 with extended L2."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        """Bits per refcount."""
        return 1 << self.refcount_order

    @property
    def refcount_block_entries(self) -> int:
        """Refcounts per refcount block."""
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def subcluster_size(self) -> int:
        """Bytes per subcluster (a cluster without extended L2)."""
        return self.cluster_size // SUBCLUSTERS if self.extended_l2 else self.cluster_size

    def unknown_incompatible(self) -> int:
        """The incompatible feature bits we do not know (0: none)."""
        return self.incompatible & ~_KNOWN_INCOMPATIBLE


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """L1 entries needed to map ``size`` virtual bytes."""
    l2_entries = (1 << cluster_bits) // (16 if extended_l2 else 8)
    span = l2_entries << cluster_bits
    return max(1, -(-size // span))


def parse_header(data: bytes) -> Header:
    """Parse a header (and its extensions) from the first cluster of an image."""
    header = _parse_v2_fields(data)
    if header.version == 3:
        _parse_v3_fields(header, data)
    _parse_extensions(header, data)
    if header.backing_file_offset:
        offset, size = header.backing_file_offset, header.backing_file_size
        if size > MAX_BACKING_NAME or offset + size > len(data):
            raise ImageError("backing file name is outside the first cluster or too long")
        header.backing_file = data[offset : offset + size].decode("utf-8", "replace")
    return header


def _parse_v2_fields(data: bytes) -> Header:
    """The fields every version has (a v2 header's all)."""
    if len(data) < V2_HEADER_LENGTH or data[:4] != MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    (
        _,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(data)
    if version not in (2, 3):
        raise ImageError(f"qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size 2^{cluster_bits} is outside 512 B..2 MiB")
    return Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=refcount_offset,
        refcount_table_clusters=refcount_clusters,
        crypt_method=crypt_method,
        backing_file_offset=backing_offset,
        backing_file_size=backing_size,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        header_length=V2_HEADER_LENGTH,
    )


def _parse_v3_fields(header: Header, data: bytes) -> None:
    """Feature bits, refcount order, header length and compression type of a v3 header."""
    if len(data) < V3_HEADER_LENGTH:
        raise ImageError("qcow2 v3 header is truncated")
    incompatible, compatible, autoclear, refcount_order, header_length = _HEADER_V3_TAIL.unpack_from(
        data, V2_HEADER_LENGTH
    )
    if header_length < V3_HEADER_LENGTH or header_length % 8 or header_length > len(data):
        raise ImageError(f"qcow2 header length {header_length} is invalid")
    if refcount_order > 6:
        raise ImageError(f"refcount order {refcount_order} is invalid (at most 6)")
    header.incompatible, header.compatible, header.autoclear = incompatible, compatible, autoclear
    header.refcount_order, header.header_length = refcount_order, header_length
    if header_length > V3_HEADER_LENGTH:
        header.compression_type = data[V3_HEADER_LENGTH]
        header.extra_fields = bytes(data[V3_HEADER_LENGTH + 1 : header_length])
    if header.incompatible & Incompatible.COMPRESSION_TYPE and header.compression_type == 0:
        raise ImageError("compression type bit set with zlib compression type")
    if header.compression_type not in (Compression.ZLIB, Compression.ZSTD):
        raise ImageError(f"unknown compression type {header.compression_type}")


def _parse_extensions(header: Header, data: bytes) -> None:
    pos = header.header_length
    end = (
        header.cluster_size if not header.backing_file_offset else min(header.cluster_size, header.backing_file_offset)
    )
    end = min(end, len(data))
    while pos + _EXTENSION.size <= end:
        ext_type, length = _EXTENSION.unpack_from(data, pos)
        pos += _EXTENSION.size
        if ext_type == Extension.END:
            return
        if pos + length > end:
            raise ImageError(f"header extension {ext_type:#x} runs past the header cluster")
        payload = bytes(data[pos : pos + length])
        pos += (length + 7) & ~7
        if ext_type == Extension.BACKING_FORMAT:
            header.backing_format = payload.decode("utf-8", "replace")
        elif ext_type == Extension.FEATURE_NAMES:
            header.feature_names = payload
        else:
            header.unknown_extensions.append((ext_type, payload))
    raise ImageError("header extensions are not terminated")


def encode_header(header: Header) -> bytes:
    """The header cluster's meaningful prefix: header, extensions, backing name."""
    out = bytearray(
        _HEADER_V2.pack(
            MAGIC,
            header.version,
            0,
            0,
            header.cluster_bits,
            header.size,
            header.crypt_method,
            header.l1_size,
            header.l1_table_offset,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            header.nb_snapshots,
            header.snapshots_offset,
        )
    )
    if header.version == 3:
        out += _HEADER_V3_TAIL.pack(
            header.incompatible, header.compatible, header.autoclear, header.refcount_order, header.header_length
        )
        if header.header_length > V3_HEADER_LENGTH:
            tail = bytes([header.compression_type]) + header.extra_fields
            out += tail.ljust(header.header_length - V3_HEADER_LENGTH, b"\0")
    extensions: list[tuple[int, bytes]] = []
    if header.backing_format:
        extensions.append((Extension.BACKING_FORMAT, header.backing_format.encode()))
    if header.feature_names is not None:
        extensions.append((Extension.FEATURE_NAMES, header.feature_names))
    extensions.extend(header.unknown_extensions)
    for ext_type, payload in extensions:
        out += _EXTENSION.pack(ext_type, len(payload)) + payload
        out += bytes(-len(payload) % 8)
    out += _EXTENSION.pack(Extension.END, 0)
    if header.backing_file:
        name = header.backing_file.encode()
        if len(name) > MAX_BACKING_NAME:
            raise ImageError("backing file name is longer than 1023 bytes")
        header.backing_file_offset, header.backing_file_size = len(out), len(name)
        struct.pack_into(">QI", out, 8, len(out), len(name))
        out += name
    else:
        header.backing_file_offset = header.backing_file_size = 0
    if len(out) > header.cluster_size:
        raise ImageError("header, extensions and backing name do not fit in one cluster")
    return bytes(out)


FEATURE_NAMES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


def encode_feature_names() -> bytes:
    """The feature name table extension qemu-img writes into v3 images."""
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES)


# -- entries ---------------------------------------------------------------------


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """``(host offset, byte length)`` of a compressed cluster's data."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


def decompress_cluster(data: bytes, *, cluster_size: int, compression: int) -> bytes:
    """One cluster from its compressed bytes; :class:`ImageError` ("is damaged: ...",
    "decompresses to N bytes") when they do not make a whole cluster."""
    try:
        if compression == Compression.ZSTD:
            import zstandard

            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        else:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except Exception as exc:
        raise ImageError(f"is damaged: {exc}") from exc
    if len(out) < cluster_size:
        raise ImageError(f"decompresses to {len(out)} bytes")
    return out[:cluster_size]


def read_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Entry ``index`` of a refcount block with ``2**order``-bit entries."""
    bits = 1 << order
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width : (index + 1) * width], "big")
    per_byte = 8 // bits
    byte = block[index // per_byte]
    return (byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)


def write_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    """Set entry ``index`` of a refcount block; :class:`ImageError` if ``value`` does not fit."""
    bits = 1 << order
    if value < 0 or value >= 1 << bits:
        raise ImageError(f"refcount {value} does not fit in {bits} bits")
    if bits >= 8:
        width = bits // 8
        block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    block[index // per_byte] = (block[index // per_byte] & ~mask) | (value << shift)
