"""A filter applying qemu-nbd's ``--discard`` and ``--detect-zeroes`` policies.

Like an nbdkit filter it wraps the next device and passes everything it does
not change straight through.
"""

from __future__ import annotations

import attrs

from sendense_nbd.storage.base import BlockDevice, Capabilities, Extent, is_zero
from sendense_nbd.storage.modes import DetectZeroes, Discard


class PolicyDevice:
    """Wraps a device, applying the discard and detect-zeroes policies."""

    def __init__(self, device: BlockDevice, *, discard: Discard, detect_zeroes: DetectZeroes) -> None:
        self._next = device
        self._discard = discard
        self._detect = detect_zeroes
        self._capabilities = attrs.evolve(
            device.capabilities, can_trim=device.capabilities.can_trim and discard is Discard.UNMAP
        )

    @property
    def size(self) -> int:
        return self._next.size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read_into(self, offset: int, buffer: memoryview) -> None:
        self._next.read_into(offset, buffer)

    def read_cached(self, offset: int, buffer: memoryview) -> bool:
        return self._next.read_cached(offset, buffer)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if self._detect is not DetectZeroes.OFF and is_zero(data):
            may_trim = self._detect is DetectZeroes.UNMAP and self._discard is Discard.UNMAP
            self._next.zero(offset, len(data), may_trim=may_trim, fua=fua)
        else:
            self._next.write(offset, data, fua=fua)

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        may_trim = may_trim and self._discard is Discard.UNMAP
        self._next.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self._discard is Discard.UNMAP:
            self._next.trim(offset, length, fua=fua)
        elif fua:
            self._next.flush()

    def flush(self) -> None:
        self._next.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self._next.extents(offset, length)

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._next.allocation_depth(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self._next.cache(offset, length)

    def close(self) -> None:
        self._next.close()
