"""The block-device contract every storage backend implements.

Modelled on nbdkit's plugin contract: a device has a size and computes its
capabilities once; every operation takes an explicit offset (there is no
seek). Range checks happen once, in the protocol layer, before a device is
called, so implementations may assume ``0 <= offset <= offset + length <=
size``. Operations are synchronous and thread-safe; the server runs them in
worker threads.

Failures are raised as :class:`~sendense_nbd.errors.DeviceError` carrying the
NBD errno; :func:`device_error` translates an ``OSError`` at the boundary.
"""

from __future__ import annotations

import errno as os_errno
from typing import Protocol, runtime_checkable

import attrs

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import AllocationFlag, Errno


@attrs.frozen(slots=True)
class Capabilities:
    """What a device can do; fixed for the device's lifetime."""

    writable: bool
    can_flush: bool = True
    can_trim: bool = False
    #: WRITE_ZEROES is cheaper than writing zeroes (so FAST_ZERO may succeed).
    can_fast_zero: bool = False
    can_extents: bool = False
    can_cache: bool = False
    #: Flushing through one connection persists writes made through all.
    can_multi_conn: bool = True
    min_block: int = 1
    preferred_block: int = 4096


@attrs.frozen(slots=True)
class Extent:
    """A run of bytes with one ``base:allocation`` status."""

    length: int
    flags: AllocationFlag = AllocationFlag(0)

    @property
    def zero(self) -> bool:
        return bool(self.flags & AllocationFlag.ZERO)


@runtime_checkable
class BlockDevice(Protocol):
    """Read, write, zero, trim, flush and block status over a byte range."""

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""

    def read_cached(self, offset: int, buffer: memoryview) -> bool:
        """Like :meth:`read_into`, but only if it cannot block (data in RAM).

        False means ``buffer`` holds nothing useful: call :meth:`read_into`.
        The server calls this on its event loop, so it must never wait.
        """

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before returning."""

    def zero(self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes; ``fast`` fails with ENOTSUP unless cheap."""

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Hint that a range is unused; it may then read as anything (here: zeroes)."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation status from ``offset``, covering at least one byte."""

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, depth)`` runs from ``offset``: 0 unallocated in the whole
        backing chain, 1 in this image, 2 in its backing file, and so on."""

    def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (advisory)."""

    def close(self) -> None: ...


_OS_TO_NBD = {
    os_errno.EPERM: Errno.EPERM,
    os_errno.EACCES: Errno.EPERM,
    os_errno.EROFS: Errno.EPERM,
    os_errno.EIO: Errno.EIO,
    os_errno.ENOMEM: Errno.ENOMEM,
    os_errno.EINVAL: Errno.EINVAL,
    os_errno.ENOSPC: Errno.ENOSPC,
    os_errno.EDQUOT: Errno.ENOSPC,
    os_errno.EFBIG: Errno.ENOSPC,
    os_errno.EOVERFLOW: Errno.EOVERFLOW,
    os_errno.EOPNOTSUPP: Errno.ENOTSUP,
    os_errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def device_error(exc: OSError, action: str) -> DeviceError:
    """Translate an ``OSError`` into the NBD errno the spec asks for."""
    errno = _OS_TO_NBD.get(exc.errno or 0, Errno.EIO)
    return DeviceError(errno, f"{action}: {exc.strerror or exc}")


def zero_extents(length: int) -> list[Extent]:
    return [Extent(length, AllocationFlag.HOLE | AllocationFlag.ZERO)]


_ZEROES: dict[int, bytes] = {}


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte of ``data`` is zero (a full memcmp, never sampled)."""
    length = len(data)
    zeroes = _ZEROES.get(length)
    if zeroes is None:
        zeroes = bytes(length)
        if length <= 32 * 1024 * 1024 and len(_ZEROES) < 16:
            _ZEROES[length] = zeroes
    if isinstance(data, memoryview):
        return data.tobytes() == zeroes
    return data == zeroes
