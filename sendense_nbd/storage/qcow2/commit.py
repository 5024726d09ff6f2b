"""Merging an overlay into its backing file.

``commit(top)`` is ``qemu-img commit -d``: whatever ``top`` holds itself
(data, and zero clusters that hide the backing file) is written into its
backing image, which then reads exactly as ``top`` did. ``top`` is left as
it was.
"""

from __future__ import annotations

import os

from sendense_nbd.errors import ImageError
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import BlockDevice, is_zero
from sendense_nbd.storage.qcow2 import format as fmt

#: Bytes moved per read/write while committing.
CHUNK = 4 << 20


def backing_path(path: str) -> tuple[str, str | None] | None:
    """``(resolved path, format)`` of ``path``'s backing file, or None."""
    header = _read_header(path)
    if not header.backing_file:
        return None
    name = header.backing_file
    return (name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)), header.backing_format


def commit(top: str) -> int:
    """Write ``top``'s own clusters into its backing image and flush it; the bytes committed."""
    from sendense_nbd.storage.images import open_image
    from sendense_nbd.storage.modes import ImageFormat

    found = backing_path(top)
    if found is None:
        raise ImageError(f"{top} has no backing file to commit into")
    base_path, base_format = found
    overlay = open_image(top, ImageFormat.QCOW2, readonly=True)
    try:
        base = open_image(base_path, ImageFormat(base_format) if base_format else None)
        try:
            if base.size < overlay.size:
                raise ImageError(f"{base_path} ({base.size} bytes) is smaller than {top} ({overlay.size} bytes)")
            committed = 0
            buffer = memoryview(bytearray(CHUNK))
            for own in _own_ranges(overlay):
                for start in range(own.offset, own.end, CHUNK):
                    view = buffer[: min(CHUNK, own.end - start)]
                    overlay.read_into(offset=start, buffer=view)
                    if is_zero(view):
                        base.zero(offset=start, length=len(view))
                    else:
                        base.write(offset=start, data=view)
                    committed += len(view)
            base.flush()
        finally:
            base.close()
    finally:
        overlay.close()
    return committed


def _own_ranges(overlay: BlockDevice) -> list[Extent]:
    """The ranges ``overlay`` itself defines (allocation depth 1), merged."""
    ranges: list[Extent] = []
    offset = 0
    while offset < overlay.size:  # a device may describe less than asked: ask again from where it stopped
        for extent in overlay.allocation_depth(offset=offset, length=overlay.size - offset):
            offset = extent.end
            if extent.status != 1:
                continue
            if ranges and ranges[-1].end == extent.offset:
                ranges[-1] = Extent(ranges[-1].offset, ranges[-1].length + extent.length, 1)
            else:
                ranges.append(extent)
    return ranges


def _read_header(path: str) -> fmt.Header:
    try:
        with open(path, "rb") as f:
            return fmt.parse_header(f.read(1 << fmt.MAX_CLUSTER_BITS))
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
