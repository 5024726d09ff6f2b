"""Filters: devices that change a few members of the device they wrap.

As an nbdkit filter is a struct of the few callbacks it changes, a
:class:`Filter` subclass writes only the members it changes; everything else
reaches ``next`` unchanged. ``next`` is a complete, range-checked device (the
checking adapter, or another filter), so a filter never emulates anything.

A member the subclass leaves alone is ``next``'s own bound method on the
instance, so passing through costs no call; the delegating methods below are
what ``super()`` reaches from an override.
"""

from __future__ import annotations

from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import BlockDevice, Capabilities, require_opened

_MEMBERS = (
    "read_into",
    "read_cached",
    "write",
    "zero",
    "trim",
    "flush",
    "extents",
    "allocation_depth",
    "cache",
    "close",
)


class Filter:
    """A :class:`~sendense_nbd.storage.base.BlockDevice` passing every member to ``next``."""

    def __init__(self, next: BlockDevice) -> None:
        self.next = require_opened(next, type(self).__name__)
        for name in _MEMBERS:
            if getattr(type(self), name) is getattr(Filter, name):  # not overridden
                setattr(self, name, getattr(next, name))

    @property
    def size(self) -> int:
        return self.next.size

    @property
    def capabilities(self) -> Capabilities:
        return self.next.capabilities

    def read_into(self, *, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``."""
        self.next.read_into(offset=offset, buffer=buffer)

    def read_cached(self, *, offset: int, buffer: memoryview) -> bool:
        """Read only if it cannot block."""
        return self.next.read_cached(offset=offset, buffer=buffer)

    def write(self, *, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``."""
        self.next.write(offset=offset, data=data, fua=fua)

    def zero(self, *, offset: int, length: int, may_trim: bool = False, fua: bool = False, fast: bool = False) -> None:
        """Make a range read as zeroes."""
        self.next.zero(offset=offset, length=length, may_trim=may_trim, fua=fua, fast=fast)

    def trim(self, *, offset: int, length: int, fua: bool = False) -> None:
        """Release a range (advisory)."""
        self.next.trim(offset=offset, length=length, fua=fua)

    def flush(self) -> None:
        """Make every completed write durable."""
        self.next.flush()

    def extents(self, *, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents from ``offset``."""
        return self.next.extents(offset=offset, length=length)

    def allocation_depth(self, *, offset: int, length: int) -> list[Extent]:
        """Backing-chain depth extents from ``offset``."""
        return self.next.allocation_depth(offset=offset, length=length)

    def cache(self, *, offset: int, length: int) -> None:
        """Prefetch a range (advisory)."""
        self.next.cache(offset=offset, length=length)

    def close(self) -> None:
        """Close ``next``."""
        self.next.close()
