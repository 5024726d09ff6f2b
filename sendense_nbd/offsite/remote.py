"""A copy read straight from the bucket: the qcow2 engine over ranged GETs with a bounded cache.

:class:`S3File` is a :class:`~sendense_nbd.storage.hostfile.HostFile`: the
qcow2 device (:class:`~sendense_nbd.storage.qcow2.Qcow2Device`) reads its
header, tables and clusters through it. Reads are served from
:data:`BLOCK`-sized blocks, each fetched with one ranged GET of the object's
recorded version and kept in a :class:`BlockCache` shared by the chain's
files (least recently used first out, :data:`CACHE_BYTES` in all), so memory
stays bounded whatever the disk's size. Every GET's answer is checked
(:meth:`~sendense_nbd.offsite.s3.Bucket.read_range`: 206, the asked range of
the recorded size, exactly the block's bytes), so a block is the object's
bytes at its offset or nothing. A backing file name is looked up among the
chain's objects (the manifest's), never elsewhere. A failed GET (S3's error,
the network's, a wrong answer, too slow) is an ``OSError`` (EIO) to the
device, which answers the NBD client EIO; nothing of it is cached.
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from collections.abc import Mapping

from sendense_nbd.errors import ImageError, OffsiteError
from sendense_nbd.offsite.manifest import Manifest, StoredObject
from sendense_nbd.offsite.s3 import Bucket
from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.hostfile import HostFile

#: Bytes per ranged GET.
BLOCK = 1 << 20
#: The cache of one opened copy (its whole chain).
CACHE_BYTES = 64 << 20


class BlockCache:
    """Blocks of a chain's objects by ``(key, index)``, at most ``limit`` bytes, least recently used out."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: Ranged GETs made so far (what tests and stats look at).
        self.fetches = 0

    def get(self, key: str, index: int) -> bytes | None:
        """A cached block (now the most recently used), or None."""
        with self._lock:
            block = self._blocks.get((key, index))
            if block is not None:
                self._blocks.move_to_end((key, index))
            return block

    def put(self, key: str, index: int, block: bytes) -> None:
        """Keep a fetched block (at most :data:`BLOCK` bytes), dropping the least recently used beyond the limit."""
        if len(block) > BLOCK:
            raise ValueError(f"a cached block has at most {BLOCK} bytes, not {len(block)}")
        with self._lock:
            self.fetches += 1
            old = self._blocks.pop((key, index), None)
            self._bytes += len(block) - (len(old) if old is not None else 0)
            self._blocks[(key, index)] = block
            while self._bytes > self.limit and len(self._blocks) > 1:
                _, dropped = self._blocks.popitem(last=False)
                self._bytes -= len(dropped)

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._bytes


class S3File(HostFile):
    """One object version of a chain, read by ranges through ``cache``; ``objects``: the chain's files
    by name (``<point-id>.qcow2``), where backing file names are looked up."""

    def __init__(self, bucket: Bucket, objects: Mapping[str, StoredObject], name: str, cache: BlockCache) -> None:
        found = objects.get(name)
        if found is None:
            raise ImageError(f"{name} is not an object of this copy's chain ({', '.join(sorted(objects))})")
        self.bucket = bucket
        self.objects = objects
        self.object = found
        self.name = name
        self.cache = cache

    def _block(self, index: int) -> bytes:
        key = self.object.key
        block = self.cache.get(key, index)
        if block is None:
            try:
                block = self.bucket.read_range(key, self.object.version, index * BLOCK, BLOCK, size=self.object.size)
            except OffsiteError as exc:  # the block is not kept: the next read asks again
                raise OSError(errno.EIO, str(exc)) from exc
            self.cache.put(key, index, block)
        return block

    def size(self) -> int:
        """The object's recorded length."""
        return self.object.size

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from the blocks that cover it; short only at the object's end."""
        end = min(offset + len(buffer), self.object.size)
        pos = offset
        while pos < end:
            block = self._block(pos // BLOCK)
            start = pos % BLOCK
            n = min(len(block) - start, end - pos)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.object.key} is shorter than its recorded {self.object.size} bytes")
            buffer[pos - offset : pos - offset + n] = block[start : start + n]
            pos += n
        return max(0, end - offset)

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset``."""
        buffer = bytearray(max(0, min(length, self.object.size - offset)))
        self.readinto(memoryview(buffer), offset)
        return bytes(buffer)

    def read_nowait(self, buffer: memoryview, offset: int) -> bool:
        """Only when every block is cached (never a GET on the caller's thread)."""
        end = offset + len(buffer)
        if end > self.object.size or any(
            self.cache.get(self.object.key, i) is None for i in range(offset // BLOCK, (end - 1) // BLOCK + 1)
        ):
            return False
        return self.readinto(buffer, offset) == len(buffer)

    def sibling(self, name: str) -> HostFile:
        """The chain's object of that name (a backing file), sharing the cache."""
        return S3File(self.bucket, self.objects, name, self.cache)

    def close(self) -> None:
        """Nothing to release (the cache goes with the device)."""


def open_copy(bucket: Bucket, chain: list[Manifest], *, cache: BlockCache | None = None) -> CheckedDevice:
    """The copy of ``chain[-1]`` (``chain``: its manifests from the full up) as a read-only block device
    read straight from the bucket; :class:`OffsiteError` when it cannot be opened."""
    from sendense_nbd.storage.qcow2 import Qcow2Device

    objects = {m.image.file_name: m.image for m in chain}
    top = chain[-1].image.file_name
    try:
        file = S3File(bucket, objects, top, cache or BlockCache())
        return CheckedDevice(Qcow2Device(top, readonly=True, file=file))
    except (ImageError, OSError) as exc:
        raise OffsiteError(f"copy {chain[-1].copy_id} cannot be opened from the bucket: {exc}") from exc
