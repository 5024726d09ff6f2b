"""The checking adapter: the one way to use a backend (see :mod:`sendense_nbd.storage.base`).

Each member checks the range with a few integer comparisons and calls a
method chosen once, when the device is opened: the backend's own, an
emulation, or a refusal for a read-only device. Nothing is allocated per call.
"""

from __future__ import annotations

from collections.abc import Callable

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, Support

#: Most bytes one emulated zero or cache step moves.
EMULATION_CHUNK = 1 << 20

_Operation = Callable[..., None]
#: Optional backend members, each named as its support level in Capabilities.
_OPTIONAL = ("zero", "trim", "flush", "extents", "allocation_depth", "cache", "read_cached")


class CheckedDevice:
    """A :class:`~sendense_nbd.storage.base.BlockDevice` over ``backend``: range checks and emulation."""

    __slots__ = (
        "_cache",
        "_depth",
        "_extents",
        "_flush",
        "_read_cached",
        "_read_into",
        "_trim",
        "_write",
        "_zero",
        "backend",
        "capabilities",
        "size",
    )
    _write: _Operation
    _zero: _Operation
    _trim: _Operation

    def __init__(self, backend: Backend) -> None:
        _check_declared(backend)
        self.backend = backend
        self.size = backend.size
        caps = self.capabilities = backend.capabilities
        self._read_into = backend.read_into
        self._flush = backend.flush if caps.flush is Support.NATIVE else _nothing
        self._read_cached = backend.read_cached if caps.read_cached is Support.NATIVE else _not_cached
        self._extents = backend.extents if caps.extents is Support.NATIVE else _all_data
        self._depth = backend.allocation_depth if caps.allocation_depth is Support.NATIVE else _depth_one
        self._cache = {Support.NATIVE: backend.cache, Support.EMULATE: self._read_to_cache}.get(caps.cache, _nowhere)
        if not caps.writable:
            self._write = self._zero = self._trim = self._refuse
            return
        write, zero, trim = backend.write, backend.zero, backend.trim
        if caps.fua is not Support.NATIVE:
            write, zero, trim = self._then_flush(write), self._then_flush(zero), self._then_flush(trim)
        if caps.zero is not Support.NATIVE:
            zero = self._then_flush(self._zero_by_writing)
        if caps.trim is not Support.NATIVE:
            trim = self._then_flush(_no_trim)
        self._write, self._zero, self._trim = write, zero, trim

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""
        if not 0 <= offset <= self.size - len(buffer):
            raise self._outside("read", offset, len(buffer), Errno.EINVAL)
        self._read_into(offset=offset, buffer=buffer)

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        """Read only if it cannot block; False means: call :meth:`read_into`."""
        if not 0 <= offset <= self.size - len(buffer):
            raise self._outside("read", offset, len(buffer), Errno.EINVAL)
        return self._read_cached(offset=offset, buffer=buffer)

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before returning."""
        if not 0 <= offset <= self.size - len(data):
            raise self._outside("write", offset, len(data), Errno.ENOSPC)
        self._write(offset=offset, data=data, fua=fua)

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes; ``fast`` fails with ENOTSUP unless the backend zeroes natively."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._outside("zero", offset, length, Errno.ENOSPC)
        self._zero(offset=offset, length=length, may_trim=may_trim, fua=fua, fast=fast)

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Release a range if the backend can (advisory); with ``fua`` flush either way."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._outside("trim", offset, length, Errno.EINVAL)
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
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._outside("cache", offset, length, Errno.EINVAL)
        self._cache(offset=offset, length=length)

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()

    # -- checks and emulation ------------------------------------------------------

    def _map(self, what: str, describe: Callable[..., list[Extent]], offset: int, length: int) -> list[Extent]:
        """A non-empty range's map; an empty answer from the backend is EIO."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise self._outside(what, offset, length, Errno.EINVAL)
        extents = describe(offset=offset, length=length)
        if not extents:
            raise DeviceError(Errno.EIO, f"{what} at offset {offset}: the storage described nothing")
        return extents

    def _outside(self, action: str, offset: int, length: int, errno: Errno) -> DeviceError:
        return DeviceError(
            errno, f"{action} of {length} bytes at offset {offset} is outside the device ({self.size} bytes)"
        )

    def _refuse(self, *, offset: int, **_: object) -> None:
        raise DeviceError(Errno.EPERM, f"cannot change offset {offset}: the device is read-only")

    def _then_flush(self, operation: _Operation) -> _Operation:
        """``operation`` without FUA, followed by a flush when FUA was asked for."""

        def run(*, fua: bool = False, **request: object) -> None:
            operation(fua=False, **request)
            if fua:
                self._flush()

        return run

    def _zero_by_writing(
        self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False
    ) -> None:
        if fast:
            raise DeviceError(Errno.ENOTSUP, "zeroing would be slow: the backend writes the zeroes")
        zeroes = memoryview(bytes(min(length, EMULATION_CHUNK)))
        for start in range(offset, offset + length, EMULATION_CHUNK):
            self.backend.write(offset=start, data=zeroes[: min(EMULATION_CHUNK, offset + length - start)])

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


def _no_trim(*, offset: int, length: int, fua: bool = False) -> None:
    """Trimming is advisory: without support there is nothing to do."""


def _nowhere(*, offset: int, length: int) -> None:
    """A cache request the backend has no use for."""


def _depth_one(*, offset: int, length: int) -> list[Extent]:
    return [Extent(offset, length, 1)]  # no backing chain: everything is this image's
