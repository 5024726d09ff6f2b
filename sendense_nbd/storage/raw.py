"""Raw images: a regular file (or block device) addressed byte for byte.

* Reads and writes are ``os.preadv``/``os.pwrite`` at explicit offsets.
* Zeroes use ``fallocate(PUNCH_HOLE)`` when trimming is allowed, else
  ``fallocate(ZERO_RANGE)``, else plain writes of zeroes (and FAST_ZERO then
  fails with ENOTSUP, as the spec asks).
* Block status comes from ``SEEK_DATA``/``SEEK_HOLE``.
* FLUSH and FUA are ``fdatasync``. With ``cache="writeback"`` every
  :data:`WRITEBACK_EVERY` bytes of writes start the file's write-out
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait for it),
  so the disk works while data still arrives and a FLUSH finds little left
  to write. ``cache="writethrough"`` opens with
  ``O_DSYNC``. ``cache="none"`` opens a second descriptor with ``O_DIRECT``
  for aligned requests, through page-aligned bounce buffers; unaligned
  requests use the buffered descriptor, which FLUSH covers as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as os_errno
import mmap
import os
import stat
import threading

from sendense_nbd.errors import DeviceError, ImageError
from sendense_nbd.protocol.constants import AllocationFlag, Errno
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import Backend, Capabilities, Support, device_error
from sendense_nbd.storage.files import create_new_file
from sendense_nbd.storage.modes import CacheMode

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_DIRECT_ALIGN = 4096
_ZERO_CHUNK = 1024 * 1024
_MAX_EXTENTS = 1024
_UNSUPPORTED = (os_errno.EOPNOTSUPP, os_errno.EINVAL)
_HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)
#: Bytes written between two starts of the file's write-out (cache=writeback).
WRITEBACK_EVERY = 16 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a file range; it then reads as zeroes."""
    _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def start_write_out(fd: int) -> bool:
    """Start writing the file's dirty pages to disk, without waiting; False where the kernel does not offer it."""
    return _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0  # type: ignore[no-any-return]


def create_raw(path: str, size: int) -> None:
    """Create a sparse raw image of ``size`` bytes (fails if it exists; never follows a symlink)."""
    if not 0 <= size < 1 << 63:
        raise ImageError(f"size {size} is not a file size")
    try:
        create_new_file(path, lambda fd: os.ftruncate(fd, size))
    except OSError as exc:
        raise ImageError(f"cannot create {path}: {exc.strerror or exc}") from exc


class RawDevice(Backend):
    """A backend over a raw file or block device (open it with ``open_image``).

    A block device has no holes to punch or find: trim is not offered and
    extents are emulated ("all data"); the allocation depth is always 1.
    """

    path: str

    def __init__(self, path: str, *, readonly: bool = False, cache: CacheMode = CacheMode.WRITEBACK) -> None:
        self.path = path
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if cache is CacheMode.WRITETHROUGH:
            flags |= os.O_DSYNC
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from exc
        self._direct_fd = -1
        try:
            st = os.fstat(self._fd)
            self._is_block = stat.S_ISBLK(st.st_mode)
            self._size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
            if cache is CacheMode.NONE:
                try:
                    self._direct_fd = os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
                except OSError as exc:
                    raise ImageError(
                        f"cache=none needs O_DIRECT, which {path} does not support: {exc.strerror}"
                    ) from exc
        except BaseException:
            self.close()
            raise
        self._bounce = threading.local()
        self._write_lock = threading.Lock()
        # Bytes until the next write-out start; None: never (cache modes that write through or around).
        self._writeback_due: int | None = WRITEBACK_EVERY if cache is CacheMode.WRITEBACK else None
        self._nowait = True
        self._punch = not self._is_block
        self._zero_range = True
        self._capabilities = Capabilities(
            writable=not readonly,
            zero=Support.NATIVE,
            trim=Support.NONE if self._is_block else Support.NATIVE,
            fua=Support.NATIVE,
            extents=Support.EMULATE if self._is_block else Support.NATIVE,
            cache=Support.NATIVE,
            read_cached=Support.NATIVE,
            fast_zero=True,
            serial_writes=self._direct_fd < 0,  # buffered writes take _write_lock; O_DIRECT ones run in parallel
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # -- data ----------------------------------------------------------------

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        try:
            if self._aligned(offset, len(buffer)):
                bounce = self._bounce_buffer(len(buffer))
                self._preadv_full(self._direct_fd, bounce, offset)
                buffer[:] = bounce
            else:
                self._preadv_full(self._fd, buffer, offset)
        except OSError as exc:
            raise device_error(exc, f"read {len(buffer)} bytes at {offset}") from exc

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        if self._direct_fd >= 0 or not self._nowait or not buffer:
            return False
        try:
            return os.preadv(self._fd, [buffer], offset, os.RWF_NOWAIT) == len(buffer)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._nowait = False  # no RWF_NOWAIT on this file system
                return False
            raise device_error(exc, f"read {len(buffer)} bytes at {offset}") from exc

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        try:
            if self._aligned(offset, len(view)):
                bounce = self._bounce_buffer(len(view))
                bounce[:] = view
                self._pwrite_full(self._direct_fd, bounce, offset)
            else:
                # One buffered writer at a time: concurrent writers to one
                # file only spin on its inode lock in the kernel.
                with self._write_lock:
                    self._pwrite_full(self._fd, view, offset)
                    if self._writeback_due is not None:
                        self._writeback_due -= len(view)
                        if self._writeback_due <= 0:
                            self._start_writeback()
            if fua:
                self._sync()
        except OSError as exc:
            raise device_error(exc, f"write {len(view)} bytes at {offset}") from exc

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        try:
            if not self._zero_fast(offset, length, may_trim):
                if fast:
                    raise DeviceError(Errno.ENOTSUP, "this file system cannot zero quickly")
                self._write_zeroes(offset, length)
            if fua:
                self._sync()
        except OSError as exc:
            raise device_error(exc, f"zero {length} bytes at {offset}") from exc

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        if not self._punch:
            return
        try:
            _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if fua:
                self._sync()
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._punch = False
                return
            raise device_error(exc, f"trim {length} bytes at {offset}") from exc

    def flush(self) -> None:
        try:
            self._sync()
        except OSError as exc:
            raise device_error(exc, "flush") from exc

    def cache(self, *, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        end = offset + length
        out: list[Extent] = []
        pos = offset
        try:
            while pos < end and len(out) < _MAX_EXTENTS:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
                if hole > pos:  # data up to the hole: one lseek for the common case
                    stop = min(hole, end)
                    out.append(Extent(pos, stop - pos))
                    pos = stop
                    continue
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != os_errno.ENXIO:  # no data after pos
                        raise
                    data = self._size
                stop = min(data, end)
                out.append(Extent(pos, stop - pos, _HOLE))
                pos = stop
        except OSError as exc:
            raise device_error(exc, f"block status at {offset}") from exc
        return out

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    # -- helpers -------------------------------------------------------------

    def _sync(self) -> None:
        os.fdatasync(self._fd)

    def _start_writeback(self) -> None:
        """Start writing the file's dirty pages to disk without waiting (lock held)."""
        # Where it is not offered, the kernel's own write-out and FLUSH remain.
        self._writeback_due = WRITEBACK_EVERY if start_write_out(self._fd) else None

    def _aligned(self, offset: int, length: int) -> bool:
        return self._direct_fd >= 0 and length > 0 and not (offset | length) % _DIRECT_ALIGN

    def _bounce_buffer(self, length: int) -> memoryview:
        buf: mmap.mmap | None = getattr(self._bounce, "buf", None)
        if buf is None or len(buf) < length:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, length)
            self._bounce.buf = buf
        return memoryview(buf)[:length]

    def _zero_fast(self, offset: int, length: int, may_trim: bool) -> bool:
        if self._is_block:
            return False
        if may_trim and self._punch:
            try:
                _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._punch = False
        if self._zero_range:
            try:
                _fallocate(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._zero_range = False
        return False

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self._pwrite_full(self._fd, memoryview(zeroes)[:n], offset)
            offset += n

    @staticmethod
    def _preadv_full(fd: int, buffer: memoryview, offset: int) -> None:
        done = 0
        total = len(buffer)
        while done < total:
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n == 0:  # past the end of a file that shrank: reads as zeroes
                buffer[done:] = bytes(total - done)
                return
            done += n

    @staticmethod
    def _pwrite_full(fd: int, data: memoryview, offset: int) -> None:
        done = 0
        total = len(data)
        while done < total:
            done += os.pwrite(fd, data[done:], offset + done)
