"""Where an image file's bytes are read from: a local file, or something that only reads by ranges.

The qcow2 engine reads its image through a :class:`HostFile`: the header,
the tables and the data clusters, each at an offset. A local file
(:class:`LocalFile`) is a descriptor and ``pread``; a remote one (an S3
object read with ranged GETs, :mod:`sendense_nbd.offsite.remote`) implements
the same four reads and is opened read-only. Writes (only ever to a local
file) go to the descriptor ``fd``; a file without one has ``fd`` -1.
"""

from __future__ import annotations

import abc
import os

from sendense_nbd.errors import ImageError


class HostFile(abc.ABC):
    """The bytes of one image file, read by offset; thread-safe (the server reads from its pool)."""

    #: What error messages call the file (a path, or a remote object's name).
    name: str
    #: The open descriptor writes and barriers go to; -1 for a file that is only read.
    fd: int = -1

    @abc.abstractmethod
    def size(self) -> int:
        """The file's length in bytes."""

    @abc.abstractmethod
    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""

    @abc.abstractmethod
    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; how many bytes were read (0 at the end of the file)."""

    @abc.abstractmethod
    def read_nowait(self, buffer: memoryview, offset: int) -> bool:
        """Fill ``buffer`` from ``offset`` only if that needs no waiting (in memory); whether it did."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file (repeatable)."""

    def sibling(self, name: str) -> HostFile | None:
        """The file a backing file name relative to this one names, opened the same way; None: the
        name is a local path (:class:`LocalFile` opens it as such)."""
        return None


class LocalFile(HostFile):
    """A local file by its descriptor: the reads are ``os.pread``/``os.preadv``."""

    def __init__(self, path: str, *, readonly: bool) -> None:
        self.name = path
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from exc

    def size(self) -> int:
        """``fstat``'s size."""
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """One ``pread``."""
        return os.pread(self.fd, length, offset)

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """One ``preadv`` into ``buffer``."""
        return os.preadv(self.fd, [buffer], offset)

    def read_nowait(self, buffer: memoryview, offset: int) -> bool:
        """A ``preadv`` with ``RWF_NOWAIT``: only what the page cache holds."""
        try:
            return os.preadv(self.fd, [buffer], offset, os.RWF_NOWAIT) == len(buffer)
        except OSError:
            return False  # not in the page cache (or no RWF_NOWAIT): read in a thread

    def close(self) -> None:
        """Close the descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
