"""The block-device contract: backends, the checking adapter, filters.

Theory of operation (modelled on nbdkit's plugins and filters):

* A **backend** (:class:`Backend`: a raw file, a qcow2 image, RAM) has a size,
  reads, and says in its :class:`Capabilities` which optional operations it
  does itself (:class:`Support`): ``NATIVE`` ones it implements, the others
  it never sees. A new backend writes only what it natively does.
* The **checking adapter** (:class:`~sendense_nbd.storage.checked.CheckedDevice`)
  is the only way to use a backend: ``open_image`` returns one, and
  ``memory_device`` gives an in-memory one. It implements the whole
  :class:`BlockDevice` contract. It refuses what lies outside
  ``0 <= offset <= offset + length <= size`` (ENOSPC for writes and zeroes,
  EINVAL otherwise, as the protocol's ``check_request`` answers) and writes to
  a read-only device (EPERM), so a backend only sees in-range requests. It
  emulates what the backend lacks: ``EMULATE`` zeroes are written as zeroes
  (so FAST_ZERO fails with ENOTSUP), FUA becomes a flush after the operation,
  a cache request reads the range, extents say "all data" and the allocation
  depth is 1; without trim support a trim does nothing (it is advisory),
  without a cache or a flush they do nothing, and without ``read_cached`` it
  answers False. A map is asked for at least one byte; the backend's answer
  must start at the offset asked for and have no gap or empty extent, and
  must not pass the end (else EIO). An image's own layer
  (:class:`Placement`, for ``qemu-img map``) is the backend's, or its extents
  at the same offsets of its file; :attr:`Backend.path` and
  :attr:`Backend.backing` are the adapter's ``path`` and ``backing``. What to
  call is chosen once, at open, so a request costs a couple of integer
  comparisons more than the backend itself; the server's ``Export`` refuses a
  bare backend.
* A **filter** (:class:`~sendense_nbd.storage.filter.Filter`) wraps a device
  and passes every member through to ``next``; a filter only writes the
  members it changes (``PolicyDevice``: ``--discard``, ``--detect-zeroes``).
  It calls ``next`` only within the range it was asked for, and a member that
  answers without calling ``next`` checks the range itself
  (:func:`check_range`), so every device refuses the same requests.

Every operation takes keyword-only ``offset=``/``length=`` (there is no
seek), is synchronous and thread-safe; the server runs them in worker
threads. Allocation maps are lists of the one
:class:`~sendense_nbd.protocol.extents.Extent` type at absolute offsets.
Failures are raised as :class:`~sendense_nbd.errors.DeviceError` carrying the
NBD errno; :func:`device_error` translates an ``OSError`` at the boundary.
"""

from __future__ import annotations

import abc
import enum
import errno as os_errno
from typing import Protocol, runtime_checkable

import attrs

from sendense_nbd.errors import DeviceError
from sendense_nbd.protocol.constants import Errno
from sendense_nbd.protocol.extents import Extent


class Support(enum.Enum):
    """How an optional operation is provided (nbdkit's none / emulate / native)."""

    #: Not offered: the adapter answers it as a no-op (trim, flush, cache) or False (read_cached).
    NONE = "none"
    #: The adapter builds it from the backend's other operations.
    EMULATE = "emulate"
    #: The backend implements it.
    NATIVE = "native"


_NATIVE_OR_NONE = attrs.validators.in_((Support.NATIVE, Support.NONE))
_NATIVE_OR_EMULATED = attrs.validators.in_((Support.NATIVE, Support.EMULATE))


@attrs.frozen(slots=True)
class Capabilities:
    """What a device can do, and which parts its backend does natively; fixed for its lifetime."""

    writable: bool
    #: WRITE_ZEROES: the backend's own, or zeroes written by the adapter.
    zero: Support = attrs.field(default=Support.EMULATE, validator=_NATIVE_OR_EMULATED)
    #: TRIM: the backend's own, or nothing (it is advisory).
    trim: Support = attrs.field(default=Support.NONE, validator=_NATIVE_OR_NONE)
    #: FUA: the backend's own, or a flush after the operation.
    fua: Support = attrs.field(default=Support.EMULATE, validator=_NATIVE_OR_EMULATED)
    #: FLUSH: the backend's own, or nothing (no volatile cache to write back).
    flush: Support = attrs.field(default=Support.NATIVE, validator=_NATIVE_OR_NONE)
    #: ``base:allocation``: the backend's own, or everything is data.
    extents: Support = attrs.field(default=Support.EMULATE, validator=_NATIVE_OR_EMULATED)
    #: ``qemu:allocation-depth``: the backend's own, or everything is this image's (depth 1).
    allocation_depth: Support = attrs.field(default=Support.EMULATE, validator=_NATIVE_OR_EMULATED)
    #: CACHE: the backend's own, a read of the range, or nothing.
    cache: Support = Support.NONE
    #: Non-blocking reads of data already in RAM: the backend's own, or never.
    read_cached: Support = attrs.field(default=Support.NONE, validator=_NATIVE_OR_NONE)
    #: The image's own layer (``layer_map``): the backend's own, or its extents in place.
    layer_map: Support = attrs.field(default=Support.EMULATE, validator=_NATIVE_OR_EMULATED)
    #: The backend's native zero can be fast (so FAST_ZERO may succeed).
    fast_zero: bool = False
    #: Flushing through one connection persists writes made through all.
    can_multi_conn: bool = True
    #: Unallocated ranges read from a backing image.
    has_backing: bool = False
    #: The backend runs one change (write, zero, trim) at a time anyway, behind one lock:
    #: a server queues them on one thread instead of letting threads wait on that lock.
    serial_writes: bool = False
    min_block: int = 1
    preferred_block: int = 4096

    @property
    def can_flush(self) -> bool:
        return self.flush is Support.NATIVE

    @property
    def can_trim(self) -> bool:
        return self.trim is Support.NATIVE

    @property
    def can_fast_zero(self) -> bool:
        return self.fast_zero and self.zero is Support.NATIVE

    @property
    def can_extents(self) -> bool:
        """Extents describe real allocation (not the emulated "all data")."""
        return self.extents is Support.NATIVE

    @property
    def can_cache(self) -> bool:
        return self.cache is not Support.NONE


@attrs.frozen(slots=True)
class Placement:
    """Where ``length`` guest bytes from ``offset`` live in one image alone (a layer of ``qemu-img map``).

    ``present`` False: the image does not define them (its backing file, or
    zeroes, show through). ``zero``: they read as zeroes without stored data.
    ``host``: the offset of the first byte in the image's file; None when
    the bytes are not stored there as they read (zero clusters, compressed
    data, an image in RAM).
    """

    offset: int
    length: int
    present: bool = True
    zero: bool = False
    host: int | None = None

    @property
    def end(self) -> int:
        """The guest offset just past the range."""
        return self.offset + self.length


@runtime_checkable
class BlockDevice(Protocol):
    """The whole contract: read, write, zero, trim, flush, cache and block status over a byte range.

    Implemented by the checking adapter and by filters; callers may rely on
    every member, whatever the backend supports natively.
    """

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        """Like :meth:`read_into`, but only if it cannot block (data in RAM).

        False means ``buffer`` holds nothing useful: call :meth:`read_into`.
        The server calls this on its event loop, so it must never wait.
        """

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before returning."""

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes; ``fast`` fails with ENOTSUP unless cheap."""

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Hint that a range is unused; it may then read as anything (here: zeroes)."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents from ``offset``, covering at least one byte of the range."""

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        """Extents from ``offset`` whose status is the depth: 0 unallocated in the
        whole backing chain, 1 in this image, 2 in its backing file, and so on."""

    def cache(self, *, offset: int, length: int) -> None:
        """Prefetch a range (advisory)."""

    def close(self) -> None:
        """Release the device (flushing what a backend holds in memory)."""


class ImageDevice(BlockDevice, Protocol):
    """A device over one image of a chain: the checking adapter.

    Besides the contract it tells where each byte lives in the image itself
    and which image lies below it, for ``sendense-nbd map``.
    """

    @property
    def path(self) -> str | None:
        """The file holding the image's data; None for an image in RAM."""

    @property
    def backing(self) -> ImageDevice | None:
        """The image that unallocated ranges read from (``capabilities.has_backing``), or None."""

    def layer_map(self, *, offset: int, length: int) -> list[Placement]:
        """Where the range lives in this image alone, from ``offset`` (never empty)."""


class Backend(abc.ABC):
    """A storage implementation, used through the checking adapter.

    It implements :attr:`size`, :attr:`capabilities`, :meth:`read_into`,
    :meth:`close`, :meth:`write` when writable, and each optional member its
    capabilities declare ``NATIVE``; the adapter never calls the others. It
    only sees in-range requests, and ``fua=True`` only when FUA is native.
    """

    #: The file holding the data (for maps and messages); None for an image in RAM.
    path: str | None = None
    #: The image that unallocated ranges read from (``capabilities.has_backing``), or None.
    backing: ImageDevice | None = None

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The size in bytes, fixed while open."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend does, computed once."""

    @abc.abstractmethod
    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the backend holds; flush what it keeps in memory."""

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data`` (writable backends)."""
        raise NotImplementedError

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes (``zero`` NATIVE)."""
        raise NotImplementedError

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Release a range (``trim`` NATIVE)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make completed writes durable (``flush`` NATIVE)."""
        raise NotImplementedError

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents from ``offset`` (``extents`` NATIVE)."""
        raise NotImplementedError

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        """Backing-chain depth extents from ``offset`` (``allocation_depth`` NATIVE)."""
        raise NotImplementedError

    def cache(self, *, offset: int, length: int) -> None:
        """Prefetch a range (``cache`` NATIVE)."""
        raise NotImplementedError

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        """Read only if it cannot block (``read_cached`` NATIVE)."""
        raise NotImplementedError

    def layer_map(self, *, offset: int, length: int) -> list[Placement]:
        """This image's own placement of the range, from ``offset`` (``layer_map`` NATIVE)."""
        raise NotImplementedError


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


def range_error(size: int, offset: int, length: int, action: str, errno: Errno) -> DeviceError:
    """The error for a request outside a device of ``size`` bytes (``errno`` as ``check_request`` answers)."""
    return DeviceError(errno, f"{action} of {length} bytes at offset {offset} is outside the device ({size} bytes)")


def require_opened(device: BlockDevice, user: str) -> BlockDevice:
    """``device`` if it is opened: the checking adapter, or a filter over it. A bare backend skips the
    range checks and the emulation, so it is refused (``TypeError``: a programming error)."""
    if isinstance(device, Backend):
        raise TypeError(
            f"{user}: use the device opened (open_image, memory_device or CheckedDevice), "
            f"not the bare {type(device).__name__} backend"
        )
    return device


def check_range(size: int, *, offset: int, length: int, action: str, errno: Errno = Errno.EINVAL) -> None:
    """Refuse a request outside ``0 <= offset <= offset + length <= size``: the range check of
    the adapter (inlined in its read, write and zero) and of a filter member that answers
    without calling ``next``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise range_error(size, offset, length, action, errno)


def device_error(exc: OSError, action: str) -> DeviceError:
    """Translate an ``OSError`` into the NBD errno the spec asks for."""
    errno = _OS_TO_NBD.get(exc.errno or 0, Errno.EIO)
    return DeviceError(errno, f"{action}: {exc.strerror or exc}")


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
