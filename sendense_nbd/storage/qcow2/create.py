"""Creating empty qcow2 images (``sendense-nbd create -f qcow2``).

Layout, as qemu-img lays it out: the header cluster, the refcount table,
the refcount blocks covering the metadata, then the L1 table. Everything
is written and synced in a fresh temporary file that is then linked into
place (:mod:`sendense_nbd.storage.files`), so a crash never leaves a
half-made image under the requested name and nothing is overwritten.
"""

from __future__ import annotations

import os
import struct

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.files import create_new_file
from sendense_nbd.storage.qcow2 import format as fmt
from sendense_nbd.storage.qcow2.info import MAX_L1_BYTES

DEFAULT_CLUSTER_SIZE = 65536


def create_qcow2(
    path: str,
    size: int,
    *,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    backing_file: str | None = None,
    backing_format: str | None = None,
    extended_l2: bool = False,
    compat: str = "1.1",
) -> None:
    """Create an empty qcow2 image of ``size`` bytes, naming ``backing_file`` as it is given.

    ``create_image`` checks the backing file and takes the size from it.
    """
    version = _check_options(cluster_size, extended_l2, compat)
    if os.path.lexists(path):
        raise ImageError(f"cannot create {path}: File exists")
    if size < 0:
        raise ImageError(f"size {size} is negative")
    size = -(-size // 512) * 512  # whole sectors, as qemu-img rounds
    bits = cluster_size.bit_length() - 1
    l1_size = fmt.l1_entries_for(size, bits, extended_l2)
    if l1_size * 8 > MAX_L1_BYTES:  # qemu's limit too; it also bounds our memory
        largest = (MAX_L1_BYTES // 8) * (cluster_size // (16 if extended_l2 else 8)) * cluster_size
        raise ImageError(
            f"size {size} is too large for qcow2 with {cluster_size}-byte clusters (at most {largest}); "
            "use larger clusters"
        )
    header = fmt.Header(
        version=version,
        cluster_bits=bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=0,  # placed by _layout
        refcount_table_offset=cluster_size,
        refcount_table_clusters=0,
        header_length=fmt.V2_HEADER_LENGTH if version == 2 else fmt.V3_HEADER_LENGTH + 8,
        incompatible=int(fmt.Incompatible.EXTENDED_L2) if extended_l2 else 0,
        backing_file=backing_file,
        backing_format=backing_format if backing_file else None,
        feature_names=fmt.encode_feature_names() if version == 3 else None,
    )
    image, file_size = _layout(header)

    def write(fd: int) -> None:
        """Fill the new file: its size, then the metadata up to the L1 table."""
        os.ftruncate(fd, file_size)  # the L1 table is all zeroes: ftruncate makes it
        view = memoryview(image)
        while view:
            view = view[os.write(fd, view) :]

    try:
        create_new_file(path, write)
    except OSError as exc:
        raise ImageError(f"cannot create {path}: {exc.strerror or exc}") from exc


def _check_options(cluster_size: int, extended_l2: bool, compat: str) -> int:
    """The qcow2 version ``compat`` asks for, once the options are known to fit together."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise ImageError(f"cluster size {cluster_size} must be a power of two between 512 B and 2 MiB")
    if compat not in ("0.10", "1.1"):
        raise ImageError(f"compat {compat!r} must be 0.10 or 1.1")
    version = 2 if compat == "0.10" else 3
    if extended_l2 and (version == 2 or cluster_size < 16384):
        raise ImageError("extended L2 entries need compat=1.1 and clusters of at least 16 KiB")
    return version


def _layout(header: fmt.Header) -> tuple[bytearray, int]:
    """Place the refcount table, its blocks and the L1 table after the header (updating
    ``header``); the image up to the L1 table, and the whole file's size."""
    cluster_size = header.cluster_size
    l1_clusters = -(-header.l1_size * 8 // cluster_size)
    per_block = cluster_size * 8 // 16
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        need_rb = -(-total // per_block)
        need_rt = -(-need_rb * 8 // cluster_size)
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    rt_offset = header.refcount_table_offset
    rb_offset = rt_offset + rt_clusters * cluster_size
    header.refcount_table_clusters = rt_clusters
    header.l1_table_offset = rb_offset + rb_count * cluster_size
    image = bytearray(header.l1_table_offset)
    encoded = fmt.encode_header(header)
    image[: len(encoded)] = encoded
    for i in range(rb_count):
        struct.pack_into(">Q", image, rt_offset + i * 8, rb_offset + i * cluster_size)
    blocks = memoryview(image)[rb_offset : rb_offset + rb_count * cluster_size]
    for cluster in range(total):
        struct.pack_into(">H", blocks, cluster * 2, 1)
    return image, header.l1_table_offset + l1_clusters * cluster_size
