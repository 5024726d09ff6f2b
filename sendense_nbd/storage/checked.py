"""The checking adapter: the one way to use a backend (see :mod:`sendense_nbd.storage.base`).

Each member checks the range with a few integer comparisons and calls a
method chosen once, when the device is opened: the backend's own, an
emulation, or a refusal for a read-only device. The dispatch itself builds
nothing per call (no closure, no keyword dict); only the emulations of
zeroing and caching need a buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, ImageDevice, Placement, Support, check_range, range_error

#: Most bytes one emulated zero or cache step moves.
EMULATION_CHUNK = 1 << 20

_Operation = Callable[..., None]
_Described = TypeVar("_Described", Extent, Placement)
#: Optional backend members, each named as its support level in Capabilities.
_OPTIONAL = ("zero", "trim", "flush", "extents", "allocation_depth", "cache", "read_cached", "layer_map")


class CheckedDevice:
    """An :class:`~sendense_nbd.storage.base.ImageDevice` (the whole
    :class:`~sendense_nbd.storage.base.BlockDevice` contract and more) over ``backend``:
    range checks and emulation."""

    __slots__ = (
        "_backend",
        "_cache",
        "_depth",
        "_extents",
        "_flush",
        "_read_cached",
        "_read_into",
        "_trim",
        "_write",
        "_zero",
        "capabilities",
        "size",
    )
    _write: _Operation
    _zero: _Operation
    _trim: _Operation

    def __init__(self, backend: Backend) -> None:
        _check_declared(backend)
        self._backend = backend
        self.size = backend.size
        caps = self.capabilities = backend.capabilities
        self._read_into = backend.read_into
        self._flush = backend.flush if caps.flush is Support.NATIVE else _nothing
        self._read_cached = backend.read_cached if caps.read_cached is Support.NATIVE else _not_cached
        self._extents = backend.extents if caps.extents is Support.NATIVE else _all_data
        self._depth = backend.allocation_depth if caps.allocation_depth is Support.NATIVE else _depth_one
        self._cache = {Support.NATIVE: backend.cache, Support.EMULATE: self._read_to_cache}.get(caps.cache, _nowhere)
        if caps.writable:
            self._choose_changes(backend)
        else:
            self._write = self._zero = self._trim = self._refuse

    def _choose_changes(self, backend: Backend) -> None:
        """The backend's write, zero and trim, or their emulations (FUA as a flush after the operation)."""
        caps = backend.capabilities
        fua = caps.fua is Support.NATIVE
        self._write = backend.write if fua else self._write_then_flush
        if caps.zero is not Support.NATIVE:
            self._zero = self._zero_by_writing
        else:
            self._zero = backend.zero if fua else self._zero_then_flush
        if caps.trim is not Support.NATIVE:
            self._trim = self._no_trim
        else:
            self._trim = backend.trim if fua else self._trim_then_flush

    @property
    def path(self) -> str | None:
        """The file holding the image's data; None for an image in RAM."""
        return self._backend.path

    @property
    def backing(self) -> ImageDevice | None:
        """The image that unallocated ranges read from (``capabilities.has_backing``), or None."""
        return self._backend.backing

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""
        if not 0 <= offset <= self.size - len(buffer):
            raise range_error(self.size, offset, len(buffer), "read", Errno.EINVAL)
        self._read_into(offset=offset, buffer=buffer)

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        """Read only if it cannot block; False means: call :meth:`read_into`."""
        if not 0 <= offset <= self.size - len(buffer):
            raise range_error(self.size, offset, len(buffer), "read", Errno.EINVAL)
        return self._read_cached(offset=offset, buffer=buffer)

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before returning."""
        if not 0 <= offset <= self.size - len(data):
            raise range_error(self.size, offset, len(data), "write", Errno.ENOSPC)
        self._write(offset=offset, data=data, fua=fua)

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes; ``fast`` fails with ENOTSUP unless the backend zeroes natively."""
        if offset < 0 or length < 0 or offset + length > self.size:  # check_range, inlined on the data path
            raise range_error(self.size, offset, length, "zero", Errno.ENOSPC)
        self._zero(offset=offset, length=length, may_trim=may_trim, fua=fua, fast=fast)

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Release a range if the backend can (advisory); with ``fua`` flush either way."""
        check_range(self.size, offset=offset, length=length, action="trim")
        self._trim(offset=offset, length=length, fua=fua)

    def flush(self) -> None:
        """Make every completed write durable."""
        self._flush()

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents from ``offset`` (never empty)."""
        return self._map("block status", self._extents, offset, length)

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        """Backing-chain depth extents from ``offset`` (never empty)."""
        return self._map("allocation depth", self._depth, offset, length)

    def cache(self, *, offset: int, length: int) -> None:
        """Prefetch a range (advisory)."""
        check_range(self.size, offset=offset, length=length, action="cache")
        self._cache(offset=offset, length=length)

    def layer_map(self, *, offset: int, length: int) -> list[Placement]:
        """Where the range lives in this image alone (``qemu-img map``), from ``offset`` (never empty).

        Without the backend's own, its extents at the same offsets of :attr:`path`.
        """
        if self.capabilities.layer_map is Support.NATIVE:
            return self._map("layer map", self._backend.layer_map, offset, length)
        host = self._backend.path is not None
        return [
            Placement(e.offset, e.length, zero=e.zero, host=e.offset if host else None)
            for e in self._map("layer map", self._extents, offset, length)
        ]

    def close(self) -> None:
        """Close the backend."""
        self._backend.close()

    # -- checks and emulation ------------------------------------------------------

    def _map(self, what: str, describe: Callable[..., list[_Described]], offset: int, length: int) -> list[_Described]:
        """The map of a non-empty range, checked to run on from ``offset`` (else EIO): a block
        status reply encodes only lengths, so a gap or a wrong start would go unnoticed."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise range_error(self.size, offset, length, what, Errno.EINVAL)
        described = describe(offset=offset, length=length)
        if not described:
            raise DeviceError(Errno.EIO, f"{what} at offset {offset}: the storage described nothing")
        pos = offset
        for piece in described:
            if piece.offset != pos or piece.length <= 0:
                raise DeviceError(
                    Errno.EIO,
                    f"{what} at offset {offset}: the storage described {piece.length} bytes at {piece.offset}, "
                    f"not from {pos}",
                )
            pos += piece.length
        if pos > self.size:
            raise DeviceError(Errno.EIO, f"{what} at offset {offset}: the storage described bytes past the end")
        return described

    def _refuse(self, *, offset: int, **_: object) -> None:
        raise DeviceError(Errno.EPERM, f"cannot change offset {offset}: the device is read-only")

    def _write_then_flush(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._backend.write(offset=offset, data=data)
        if fua:
            self._flush()

    def _zero_then_flush(
        self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False
    ) -> None:
        self._backend.zero(offset=offset, length=length, may_trim=may_trim, fast=fast)
        if fua:
            self._flush()

    def _trim_then_flush(self, *, offset: int, length: int, fua: bool = False) -> None:
        self._backend.trim(offset=offset, length=length)
        if fua:
            self._flush()

    def _no_trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Trimming is advisory: without support only FUA has an effect (a flush)."""
        if fua:
            self._flush()

    def _zero_by_writing(
        self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False
    ) -> None:
        if fast:
            raise DeviceError(Errno.ENOTSUP, "zeroing would be slow: the backend writes the zeroes")
        zeroes = memoryview(bytes(min(length, EMULATION_CHUNK)))
        for start in range(offset, offset + length, EMULATION_CHUNK):
            self._backend.write(offset=start, data=zeroes[: min(EMULATION_CHUNK, offset + length - start)])
        if fua:
            self._flush()

    def _read_to_cache(self, *, offset: int, length: int) -> None:
        buffer = memoryview(bytearray(min(length, EMULATION_CHUNK)))
        for start in range(offset, offset + length, EMULATION_CHUNK):
            self._read_into(offset=start, buffer=buffer[: min(EMULATION_CHUNK, offset + length - start)])


def _check_declared(backend: Backend) -> None:
    """Refuse a backend that declares a member native (or itself writable) without implementing it."""
    caps = backend.capabilities
    declared = [name for name in _OPTIONAL if getattr(caps, name) is Support.NATIVE]
    if caps.writable:
        declared.append("write")
    missing = [name for name in declared if getattr(type(backend), name) is getattr(Backend, name)]
    if missing:
        raise TypeError(f"{type(backend).__name__} declares {', '.join(missing)} but does not implement it")


def _nothing() -> None:
    """A flush with nothing to write back."""


def _not_cached(*, offset: int, buffer: memoryview) -> bool:
    return False


def _all_data(*, offset: int, length: int) -> list[Extent]:
    return [Extent(offset, length, 0)]


def _nowhere(*, offset: int, length: int) -> None:
    """A cache request the backend has no use for."""


def _depth_one(*, offset: int, length: int) -> list[Extent]:
    return [Extent(offset, length, 1)]  # no backing chain: everything is this image's
