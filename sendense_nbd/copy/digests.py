"""Per-chunk digests of a disk's whole virtual view, and the sidecar file that holds them.

A disk is cut into fixed chunks of :data:`CHUNK_SIZE` bytes (the last one may
be shorter); chunk ``i`` covers ``[i * chunk_size, min((i + 1) * chunk_size, size))``
and its digest is the :data:`ALGORITHM` digest of those bytes as the disk reads
them. sha256 was measured faster than BLAKE2b here (``benchmarks/bench_digest.py``).

:func:`chunk_digests` reads through a copy :class:`~sendense_nbd.copy.Endpoint`,
driven by its allocation map: a chunk that is all hole or zero extents gets
the digest of zeroes without a read, and inside a chunk only the data extents
are read. At most ``requests`` chunks are in memory (and in flight) at once,
and hashing runs in a thread so the event loop stays free.

:class:`DigestFile` is the sidecar format (all integers big-endian)::

    magic "SNDDIGST" | version u32 | algorithm 16 bytes (NUL padded) | digest size u32
    | chunk size u64 | disk size u64 | count u64 | count digests | sha256 of all before

It is written whole or not at all (a temporary file, fsync, rename, directory
fsync), and read back checked: a truncated or altered file is an
:class:`~sendense_nbd.errors.ImageError`, never a wrong digest.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import struct
from collections.abc import Iterable, Iterator

import attrs

from sendense_nbd.copy.endpoints import Endpoint
from sendense_nbd.errors import EndpointError, ImageError, first_error
from sendense_nbd.storage.files import remove_quietly, sync_directory, temporary_name

#: Bytes per chunk (a multiple of every block size the endpoints use).
CHUNK_SIZE = 4 << 20
#: The digest: hashlib's name.
ALGORITHM = "sha256"
#: Chunks read and hashed at once (each holds one chunk of memory).
DEFAULT_REQUESTS = 4
#: Smallest and largest chunk size a sidecar may declare.
MIN_CHUNK, MAX_CHUNK = 64 << 10, 1 << 30

MAGIC = b"SNDDIGST"
VERSION = 1
_HEADER = struct.Struct(">8sI16sIQQQ")
_TRAILER = hashlib.sha256().digest_size


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """How many chunks a disk of ``size`` bytes has."""
    return -(-size // chunk_size)


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes (a chunk of holes or zero extents)."""
    return hashlib.new(ALGORITHM, bytes(length)).digest()


def _digest(buffer: bytearray) -> bytes:
    return hashlib.new(ALGORITHM, buffer).digest()


async def chunk_digests(
    source: Endpoint,
    *,
    chunks: Iterable[int] | None = None,
    chunk_size: int = CHUNK_SIZE,
    requests: int = DEFAULT_REQUESTS,
) -> dict[int, bytes]:
    """The digest of each chunk index in ``chunks`` (default: every chunk of ``source``).

    An index outside the disk is a :class:`ValueError`. Reads failing are the
    endpoint's :class:`~sendense_nbd.errors.EndpointError`.
    """
    if chunk_size <= 0 or chunk_size % max(1, source.min_block):
        raise ValueError(f"chunk size {chunk_size} is not a multiple of the block size {source.min_block}")
    count = chunk_count(source.size, chunk_size)
    indices = range(count) if chunks is None else sorted(set(chunks))
    if indices and not 0 <= indices[0] <= indices[-1] < count:
        raise ValueError(f"chunks {indices[0]}..{indices[-1]} reach outside the disk ({count} chunks)")
    wanted: Iterator[int] = iter(indices)
    out: dict[int, bytes] = {}

    async def worker() -> None:
        for index in wanted:  # shared: each worker takes the next index
            out[index] = await _chunk(source, index * chunk_size, min(chunk_size, source.size - index * chunk_size))

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, requests)):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return out


async def _chunk(source: Endpoint, start: int, length: int) -> bytes:
    """One chunk's digest: its data extents read into a zeroed buffer, hashed in a thread."""
    end = start + length
    data: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        before = pos
        for extent in await source.extents(offset=pos, length=end - pos):
            stop = min(extent.end, end)
            if not extent.zero and stop > extent.offset:
                data.append((max(extent.offset, pos), stop))
            pos = max(pos, stop)
            if pos >= end:
                break
        if pos <= before:
            raise EndpointError(f"{source.name}: no allocation information at offset {pos}", transient=False)
    if not data:
        return zero_digest(length)
    buffer = bytearray(length)
    view = memoryview(buffer)
    block = max(1, source.min_block)
    for first, stop in data:
        first = first - (first - start) % block  # aligned out to the block size, within the chunk
        stop = min(end, stop + (-(stop - start)) % block)
        for offset in range(first, stop, source.max_request):
            piece = min(source.max_request, stop - offset)
            await source.read_into(offset=offset, buffer=view[offset - start : offset - start + piece])
    return await asyncio.to_thread(_digest, buffer)


@attrs.frozen
class DigestFile:
    """A disk's chunk digests as its sidecar holds them: ``digests[i]`` is chunk ``i``'s."""

    size: int
    chunk_size: int
    digests: tuple[bytes, ...]
    algorithm: str = ALGORITHM

    def __attrs_post_init__(self) -> None:
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK or self.size < 0:
            raise ValueError(f"chunk size {self.chunk_size} or disk size {self.size} is out of range")
        if len(self.digests) != chunk_count(self.size, self.chunk_size):
            raise ValueError(f"{len(self.digests)} digests for {chunk_count(self.size, self.chunk_size)} chunks")
        width = hashlib.new(self.algorithm).digest_size
        if any(len(d) != width for d in self.digests):
            raise ValueError(f"every {self.algorithm} digest has {width} bytes")

    def encode(self) -> bytes:
        """The file's bytes."""
        width = hashlib.new(self.algorithm).digest_size
        head = _HEADER.pack(
            MAGIC, VERSION, self.algorithm.encode(), width, self.chunk_size, self.size, len(self.digests)
        )
        body = head + b"".join(self.digests)
        return body + hashlib.sha256(body).digest()

    def write(self, path: str) -> None:
        """Write the sidecar at ``path`` atomically (replacing an older one), durable when this returns."""
        temporary = temporary_name(path)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(self.encode())
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
            sync_directory(os.path.dirname(path) or ".")
        finally:
            remove_quietly(temporary)

    @classmethod
    def read(cls, path: str, *, size: int | None = None) -> DigestFile:
        """Read and check a sidecar (and its disk size, when given); :class:`ImageError` if it is not whole."""
        try:
            with open(path, "rb") as file:
                head = file.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    raise ImageError(f"{path}: truncated digest file ({len(head)} bytes of header)")
                magic, version, algorithm, width, chunk_size, disk_size, count = _HEADER.unpack(head)
                name = algorithm.rstrip(b"\0").decode("ascii", "replace")
                if magic != MAGIC or version != VERSION:
                    raise ImageError(f"{path}: not a digest file (magic {magic!r}, version {version})")
                if name != ALGORITHM or width != hashlib.new(ALGORITHM).digest_size:
                    raise ImageError(f"{path}: digests are {name!r} of {width} bytes, expected {ALGORITHM}")
                if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or count != chunk_count(disk_size, chunk_size):
                    raise ImageError(f"{path}: {count} digests of {chunk_size}-byte chunks for {disk_size} bytes")
                if size is not None and disk_size != size:
                    raise ImageError(f"{path}: digests of a {disk_size}-byte disk, the point has {size} bytes")
                expected = _HEADER.size + count * width + _TRAILER
                if os.fstat(file.fileno()).st_size != expected:
                    raise ImageError(f"{path}: truncated or extended digest file (expected {expected} bytes)")
                body = file.read(count * width)
                trailer = file.read(_TRAILER)
        except OSError as exc:
            raise ImageError(f"cannot read digest file {path}: {exc.strerror or exc}") from exc
        if len(body) != count * width or hashlib.sha256(head + body).digest() != trailer:
            raise ImageError(f"{path}: the digest file is damaged (its checksum does not match)")
        digests = tuple(body[i : i + width] for i in range(0, len(body), width))
        return cls(disk_size, chunk_size, digests)
