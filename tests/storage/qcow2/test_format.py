"""The pure qcow2 codec pieces the engine leans on: compressed clusters and refcount entries."""

from __future__ import annotations

import os
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import ImageError
from sendense_nbd.storage.qcow2 import format as fmt

CS = 65536


def deflate(data: bytes) -> bytes:
    """Raw deflate with a 4 KiB window, as qemu writes compressed clusters."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -12)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("compression", [fmt.Compression.ZLIB, fmt.Compression.ZSTD])
def test_compressed_cluster_round_trip(compression: fmt.Compression) -> None:
    cluster = os.urandom(CS // 2) + bytes(CS // 2)
    packed = deflate(cluster) if compression == fmt.Compression.ZLIB else zstandard.compress(cluster)
    padding = b"\xaa" * 300  # the sectors holding compressed bytes end with whatever follows
    assert fmt.decompress_cluster(packed + padding, cluster_size=CS, compression=compression) == cluster


@pytest.mark.parametrize(
    ("data", "compression", "message"),
    [
        (b"\xff" * 100, fmt.Compression.ZLIB, "is damaged"),
        (b"\xff" * 100, fmt.Compression.ZSTD, "is damaged"),
        (deflate(bytes(1000)), fmt.Compression.ZLIB, "decompresses to 1000 bytes"),
    ],
)
def test_damaged_or_short_compressed_cluster_is_an_image_error(
    data: bytes, compression: fmt.Compression, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        fmt.decompress_cluster(data, cluster_size=CS, compression=compression)


@settings(max_examples=200, deadline=None)
@given(order=st.integers(0, 6), index=st.integers(0, 4095), data=st.data())
def test_refcount_entries_round_trip_without_touching_neighbours(order: int, index: int, data: st.DataObject) -> None:
    block = bytearray(os.urandom(4096))
    index %= 4096 * 8 >> order
    value = data.draw(st.integers(0, (1 << (1 << order)) - 1))
    neighbours = [fmt.read_refcount(block, i, order) for i in (index - 1, index + 1) if 0 <= i < 4096 * 8 >> order]
    fmt.write_refcount(block, index, order, value)
    assert fmt.read_refcount(block, index, order) == value
    assert [fmt.read_refcount(block, i, order) for i in (index - 1, index + 1) if 0 <= i < 4096 * 8 >> order] == (
        neighbours
    )
    with pytest.raises(ImageError, match="does not fit"):
        fmt.write_refcount(block, index, order, 1 << (1 << order))
