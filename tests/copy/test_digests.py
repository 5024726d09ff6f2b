"""Chunk digests (copy/digests.py) against a plain hashlib computation over ``qemu-img convert -O raw``,
read from a local qcow2 chain and from qemu-nbd; zero chunks are never read, reads stay bounded; the
sidecar file round-trips and refuses every damaged form."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd.copy import open_source
from sendense_nbd.copy.digests import CHUNK_SIZE, DigestFile, chunk_digests, zero_digest
from sendense_nbd.copy.endpoints import Endpoint, LocalEndpoint
from sendense_nbd.errors import ImageError
from tests.conftest import require, run, sparse_file

pytestmark = pytest.mark.peer

MIB = 1 << 20
SIZE = 13 * MIB + 64 * 1024  # the last chunk is short
DATA = [(0, 4096), (5 * MIB, 300_000), (9 * MIB - 100, 200), (SIZE - 70_000, 70_000)]  # chunks 0, 1, 2, 3


def _expected(image: Path, tmp_path: Path) -> dict[int, bytes]:
    """sha256 of each 4 MiB piece of the image's raw view, as qemu-img sees it."""
    raw = tmp_path / "expected.raw"
    run(require("qemu-img"), "convert", "-O", "raw", str(image), str(raw))
    data = raw.read_bytes()
    return {i: hashlib.sha256(data[o : o + CHUNK_SIZE]).digest() for i, o in enumerate(range(0, len(data), CHUNK_SIZE))}


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A qcow2 base with data in chunks 0-3 and a hole over chunk 2's second half, and an overlay that
    changes chunk 1 and zeroes part of chunk 3 (a zero cluster over data below)."""
    raw = sparse_file(tmp_path / "base.raw", SIZE, DATA)
    base = tmp_path / "base.qcow2"
    run(require("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    top = tmp_path / "top.qcow2"
    run(require("qemu-img"), "create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(top))
    io = require("qemu-io")
    run(io, "-f", "qcow2", "-c", f"write -P 0x5a {5 * MIB + 65536} 65536", "-c", f"write -z {SIZE - 65536} 65536", top)
    return top


class Counting:
    """An endpoint that records the reads made through it (and how many run at once)."""

    def __init__(self, inner: Endpoint) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []
        self.running = self.most = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read_into(self, *, offset: int, buffer: memoryview) -> None:
        self.reads.append((offset, len(buffer)))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.001)  # let other chunks start, if they may
            await self.inner.read_into(offset=offset, buffer=buffer)
        finally:
            self.running -= 1


async def test_digests_equal_hashlib_over_the_raw_view(chain: Path, tmp_path: Path) -> None:
    expected = _expected(chain, tmp_path)
    assert len(expected) == 4 and expected[3] != hashlib.sha256(bytes(CHUNK_SIZE)).digest()
    source = await open_source(str(chain))
    try:
        assert await chunk_digests(source) == expected
        assert await chunk_digests(source, chunks=[3, 1, 3]) == {1: expected[1], 3: expected[3]}
        with pytest.raises(ValueError, match="outside the disk"):
            await chunk_digests(source, chunks=[4])
    finally:
        await source.close()


async def test_digests_over_nbd_equal_the_local_ones(chain: Path, tmp_path: Path, qemu_nbd: Callable[..., str]) -> None:
    source = await open_source(qemu_nbd(chain, "-r", fmt="qcow2"))
    try:
        assert await chunk_digests(source, requests=2) == _expected(chain, tmp_path)
    finally:
        await source.close()


async def test_zero_chunks_are_not_read_and_reads_are_bounded(tmp_path: Path) -> None:
    size = 10 * CHUNK_SIZE
    raw = sparse_file(tmp_path / "sparse.raw", size, [(2 * CHUNK_SIZE + 4096, 8192), (7 * CHUNK_SIZE, CHUNK_SIZE)])
    image = tmp_path / "sparse.qcow2"
    run(require("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    source = await open_source(str(image))
    assert isinstance(source, LocalEndpoint)
    counting = Counting(source)
    try:
        found = await chunk_digests(counting, requests=2)  # type: ignore[arg-type]
    finally:
        await source.close()
    assert found == _expected(image, tmp_path)
    assert {offset // CHUNK_SIZE for offset, _ in counting.reads} == {2, 7}  # the eight zero chunks: no read
    assert sum(length for offset, length in counting.reads if offset // CHUNK_SIZE == 2) < CHUNK_SIZE
    assert counting.most <= 2
    assert found[0] == zero_digest(CHUNK_SIZE) == hashlib.sha256(bytes(CHUNK_SIZE)).digest()


def test_sidecar_round_trip_and_damaged_forms(tmp_path: Path) -> None:
    digests = tuple(hashlib.sha256(bytes([i])).digest() for i in range(4))
    path = tmp_path / "p.digests"
    DigestFile(SIZE, CHUNK_SIZE, digests).write(str(path))
    assert DigestFile.read(str(path), size=SIZE) == DigestFile(SIZE, CHUNK_SIZE, digests)
    assert [p.name for p in tmp_path.iterdir()] == ["p.digests"]  # no temporary file left
    good = path.read_bytes()
    damaged = {
        "truncated": good[:-10],
        "header only": good[:20],
        "extended": good + b"\0",
        "flipped digest": good[:70] + bytes([good[70] ^ 1]) + good[71:],
        "magic": b"X" + good[1:],
        "empty": b"",
    }
    for what, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(ImageError):
            DigestFile.read(str(path))
            pytest.fail(what)
    path.write_bytes(good)
    with pytest.raises(ImageError, match="point has"):
        DigestFile.read(str(path), size=SIZE + 1)
    with pytest.raises(ImageError, match="cannot read"):
        DigestFile.read(str(tmp_path / "missing.digests"))
    with pytest.raises(ValueError, match="3 digests for 4 chunks"):
        DigestFile(SIZE, CHUNK_SIZE, digests[:3])
