"""A sparse in-memory block device: the default fake for tests and examples.

Data lives in fixed-size chunks; a chunk that was never written, or was
zeroed or trimmed, is absent and reads as zeroes, so block status reports it
as a hole.
"""

from __future__ import annotations

import threading

from sendense_nbd.protocol.constants import AllocationFlag
from sendense_nbd.storage.base import Capabilities, Extent

_CHUNK = 64 * 1024


class MemoryDevice:
    """A :class:`~sendense_nbd.storage.base.BlockDevice` held in RAM."""

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        self._size = size
        self._chunks: dict[int, bytearray] = {}
        self._lock = threading.Lock()
        self._capabilities = Capabilities(
            writable=not readonly, can_trim=True, can_fast_zero=True, can_extents=True, can_cache=True
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read_into(self, offset: int, buffer: memoryview) -> None:
        with self._lock:
            for index, start, stop, pos in self._spans(offset, len(buffer)):
                chunk = self._chunks.get(index)
                part = buffer[pos : pos + stop - start]
                if chunk is None:
                    part[:] = bytes(len(part))
                else:
                    part[:] = chunk[start:stop]

    def read_cached(self, offset: int, buffer: memoryview) -> bool:
        self.read_into(offset, buffer)
        return True

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data)
        with self._lock:
            for index, start, stop, pos in self._spans(offset, len(view)):
                chunk = self._chunks.get(index)
                if chunk is None:
                    chunk = self._chunks[index] = bytearray(_CHUNK)
                chunk[start:stop] = view[pos : pos + stop - start]

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        with self._lock:
            for index, start, stop, _ in self._spans(offset, length):
                chunk = self._chunks.get(index)
                if chunk is None:
                    continue
                if start == 0 and stop == _CHUNK:
                    del self._chunks[index]
                else:
                    chunk[start:stop] = bytes(stop - start)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self.zero(offset, length, may_trim=True)

    def flush(self) -> None:
        pass

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 1)]  # no backing chain: everything is this image's

    def cache(self, offset: int, length: int) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        with self._lock:
            for index, start, stop, _ in self._spans(offset, length):
                flags = AllocationFlag(0) if index in self._chunks else AllocationFlag.HOLE | AllocationFlag.ZERO
                if out and out[-1].flags == flags:
                    out[-1] = Extent(out[-1].length + stop - start, flags)
                else:
                    out.append(Extent(stop - start, flags))
        return out

    def close(self) -> None:
        self._chunks.clear()

    @staticmethod
    def _spans(offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """``(chunk index, start, stop, position in request)`` per chunk."""
        spans = []
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, _CHUNK)
            stop = min(_CHUNK, start + length - pos)
            spans.append((index, start, stop, pos))
            pos += stop - start
        return spans
