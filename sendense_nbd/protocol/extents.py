"""The one extent type: a run of bytes with one meta context's status.

NBD's block status describes a range as ``(length, status)`` descriptors, one
list per meta context. An :class:`Extent` is such a descriptor placed at its
offset, so it means the same thing wherever it travels: from a device to the
server's reply, from the client's parser to the copy planner.

``status`` is the context's 32-bit value: :class:`AllocationFlag` bits for
``base:allocation``, the backing-chain depth for ``qemu:allocation-depth``.
Only the reply parser keeps a chunk's descriptors in their wire form
(:class:`~sendense_nbd.protocol.replies.ExtentList`, 8 bytes each, so a huge
reply costs no objects); the client turns them into extents at once.
"""

from __future__ import annotations

import attrs

from sendense_nbd.protocol.constants import AllocationFlag


@attrs.frozen(slots=True)
class Extent:
    """``length`` bytes from ``offset`` sharing one status."""

    offset: int
    length: int
    status: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def hole(self) -> bool:
        """Unallocated (``base:allocation``)."""
        return bool(self.status & AllocationFlag.HOLE)

    @property
    def zero(self) -> bool:
        """Reads as zeroes (``base:allocation``)."""
        return bool(self.status & AllocationFlag.ZERO)
