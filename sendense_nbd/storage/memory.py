"""A sparse in-memory block device: the default fake for tests and examples.

Data lives in fixed-size chunks; a chunk that was never written, or was
zeroed or trimmed, is absent and reads as zeroes, so block status reports it
as a hole.
"""

from __future__ import annotations

import threading

from sendense_nbd.protocol.constants import AllocationFlag
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, Capabilities, Support
from sendense_nbd.storage.checked import CheckedDevice

_CHUNK = 64 * 1024
_HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)


def memory_device(size: int, *, readonly: bool = False) -> CheckedDevice:
    """A ready-to-use in-memory device of ``size`` bytes (all zeroes)."""
    return CheckedDevice(MemoryDevice(size, readonly=readonly))


class MemoryDevice(Backend):
    """A backend held in RAM; open it with :func:`memory_device` (or wrap a subclass in ``CheckedDevice``).

    Nothing is volatile, so FUA and FLUSH have nothing to do; CACHE is emulated
    and there is no backing chain.
    """

    def __init__(self, size: int, *, readonly: bool = False) -> None:
        self._size = size
        self._chunks: dict[int, bytearray] = {}
        self._lock = threading.Lock()
        self._capabilities = Capabilities(
            writable=not readonly,
            zero=Support.NATIVE,
            trim=Support.NATIVE,
            fua=Support.NATIVE,
            extents=Support.NATIVE,
            cache=Support.EMULATE,
            read_cached=Support.NATIVE,
            fast_zero=True,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        with self._lock:
            for index, start, stop, pos in self._spans(offset, len(buffer)):
                chunk = self._chunks.get(index)
                part = buffer[pos : pos + stop - start]
                if chunk is None:
                    part[:] = bytes(len(part))
                else:
                    part[:] = chunk[start:stop]

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        self.read_into(offset=offset, buffer=buffer)
        return True

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        with self._lock:
            for index, start, stop, pos in self._spans(offset, len(view)):
                chunk = self._chunks.get(index)
                if chunk is None:
                    chunk = self._chunks[index] = bytearray(_CHUNK)
                chunk[start:stop] = view[pos : pos + stop - start]

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        with self._lock:
            for index, start, stop, _ in self._spans(offset, length):
                chunk = self._chunks.get(index)
                if chunk is None:
                    continue
                if start == 0 and stop == _CHUNK:
                    del self._chunks[index]
                else:
                    chunk[start:stop] = bytes(stop - start)

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset=offset, length=length, may_trim=True)

    def flush(self) -> None:
        """Nothing is volatile."""

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos = offset
        with self._lock:
            for index, start, stop, _ in self._spans(offset, length):
                status = 0 if index in self._chunks else _HOLE
                if out and out[-1].status == status:
                    out[-1] = Extent(out[-1].offset, out[-1].length + stop - start, status)
                else:
                    out.append(Extent(pos, stop - start, status))
                pos += stop - start
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
