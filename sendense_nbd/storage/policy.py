"""A filter applying qemu-nbd's ``--discard`` and ``--detect-zeroes`` policies."""

from __future__ import annotations

import attrs

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.storage.base import BlockDevice, Capabilities, Support, check_range, is_zero
from sendense_nbd.storage.filter import Filter
from sendense_nbd.storage.modes import DetectZeroes, Discard


class PolicyDevice(Filter):
    """Turns all-zero writes into zero requests (``detect_zeroes``) and trims into no-ops (``discard=ignore``)."""

    def __init__(self, device: BlockDevice, *, discard: Discard, detect_zeroes: DetectZeroes) -> None:
        super().__init__(device)
        self._unmap = discard is Discard.UNMAP
        self._detect = detect_zeroes
        caps = device.capabilities
        self._capabilities = caps if self._unmap else attrs.evolve(caps, trim=Support.NONE)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``, or zero its range if it is all zeroes and detection is on."""
        if self._detect is not DetectZeroes.OFF and is_zero(data):
            may_trim = self._detect is DetectZeroes.UNMAP and self._unmap
            self.next.zero(offset=offset, length=len(data), may_trim=may_trim, fua=fua)
        else:
            self.next.write(offset=offset, data=data, fua=fua)

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Zero a range, freeing space only with ``discard=unmap``."""
        self.next.zero(offset=offset, length=length, may_trim=may_trim and self._unmap, fua=fua, fast=fast)

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Trim with ``discard=unmap``; otherwise check the range and only honour FUA."""
        if self._unmap:
            self.next.trim(offset=offset, length=length, fua=fua)
            return
        if not self._capabilities.writable:
            raise DeviceError(Errno.EPERM, f"cannot change offset {offset}: the device is read-only")
        check_range(self.size, offset=offset, length=length, action="trim")
        if fua:
            self.next.flush()
