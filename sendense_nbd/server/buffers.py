"""Request memory: a byte budget and a pool of reusable buffers.

Every buffer the server holds for a request (a WRITE payload from the moment
its header is parsed, a READ result until the transport has taken it) is
charged to a :class:`Budget`, per connection and server-wide. While it is
spent, WRITE headers wait before their payloads are allocated and READs
wait, so clients cannot make the server hold more than the budget plus
about one payload.

Buffers are reused through a :class:`BufferPool` rather than allocated per
request: fresh large allocations cost page faults (and on some VMs a trip to
the host), and reuse keeps the resident size flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_M_MMAP_THRESHOLD = -3


def return_large_frees_to_os(threshold: int = 1024 * 1024) -> None:
    """Make the C allocator map buffers of ``threshold`` bytes and more on
    their own, so that freeing one gives its memory back to the OS at once.

    Process-wide: called by the ``serve`` command, which owns its process.
    Without it glibc keeps freed multi-MiB buffers on its heap.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)


class BufferPool:
    """Idle buffers kept by exact size, up to ``idle_limit`` bytes in all."""

    def __init__(self, idle_limit: int) -> None:
        self.idle_limit = idle_limit
        self.idle = 0
        self._free: dict[int, list[bytearray]] = {}

    def acquire(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes with arbitrary contents."""
        free = self._free.get(size)
        if free:
            self.idle -= size
            return free.pop()
        return bytearray(size)

    def release(self, buffer: bytearray) -> None:
        """Keep ``buffer`` for reuse, unless that would exceed ``idle_limit``."""
        size = len(buffer)
        if self.idle + size <= self.idle_limit:
            self._free.setdefault(size, []).append(buffer)
            self.idle += size


class Budget:
    """Bounds the request bytes held, per connection and server-wide."""

    def __init__(self, total: int, per_connection: int) -> None:
        self.total = total
        self.per_connection = per_connection
        self.used = 0
        self._waiting: dict[Callable[[], None], None] = {}  # in order of arrival

    def admits(self, connection_used: int, cost: int) -> bool:
        """Whether ``cost`` more bytes fit, for a connection holding ``connection_used``."""
        return connection_used + cost <= self.per_connection and self.used + cost <= self.total

    def take(self, cost: int) -> None:
        """Charge ``cost`` bytes (callers check :meth:`admits` first, where it matters)."""
        self.used += cost

    def give(self, cost: int) -> None:
        """Give ``cost`` bytes back and wake every waiter."""
        self.used -= cost
        if cost:
            for wake in list(self._waiting):
                wake()

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever bytes are given back, until :meth:`cancel_wait`.

        Waiters are woken in the order they first waited, so the oldest one
        gets the room first and nobody starves.
        """
        self._waiting.setdefault(wake)

    def cancel_wait(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake`` (no error if it was not waiting)."""
        self._waiting.pop(wake, None)
