"""Where each guest byte of an image lives, across its backing chain
(``sendense-nbd map``, mirroring ``qemu-img map``).

It walks checked devices only (:class:`~sendense_nbd.storage.base.ImageDevice`,
as ``open_image`` returns): each image's own layer (``layer_map``) and, where
that leaves a range to the image below, its ``backing`` device.
"""

from __future__ import annotations

import attrs

from sendense_nbd.storage.base import ImageDevice

_STEP = 1 << 30


@attrs.frozen(slots=True)
class MapEntry:
    """A run of guest bytes with one status; ``depth`` 0 is the top image."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str

    def to_json(self) -> dict[str, object]:
        """The entry as ``qemu-img map --output=json`` writes it."""
        out: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def map_image(device: ImageDevice) -> list[MapEntry]:
    """The whole guest range of ``device`` as merged :class:`MapEntry` runs."""
    entries: list[MapEntry] = []
    pos = 0
    while pos < device.size:
        n = min(_STEP, device.size - pos)
        for entry in _layer(device, pos, n, 0):
            _append(entries, entry)
        pos += n
    return entries


def _layer(device: ImageDevice, start: int, length: int, depth: int) -> list[MapEntry]:
    """``device``'s own placement of the range; the ranges it leaves to its backing file from below."""
    out: list[MapEntry] = []
    name = device.path or ""
    pos, end = start, start + length
    while pos < end:
        for place in device.layer_map(offset=pos, length=end - pos):
            n = min(place.end, end) - pos
            if n <= 0:
                break
            if place.present:
                out.append(MapEntry(pos, n, depth, True, place.zero, not place.zero, place.host, name))
            else:
                out.extend(_below(device, pos, n, depth))
            pos += n
    return out


def _below(device: ImageDevice, start: int, length: int, depth: int) -> list[MapEntry]:
    backing = device.backing
    if backing is None or start >= backing.size:
        return [MapEntry(start, length, depth, False, True, False, None, device.path or "")]
    inside = min(length, backing.size - start)
    out = _layer(backing, start, inside, depth + 1)
    if inside < length:
        out.append(MapEntry(start + inside, length - inside, depth + 1, False, True, False, None, backing.path or ""))
    return out


def _append(entries: list[MapEntry], entry: MapEntry) -> None:
    if entries:
        last = entries[-1]
        same = (last.depth, last.present, last.zero, last.data, last.filename) == (
            entry.depth,
            entry.present,
            entry.zero,
            entry.data,
            entry.filename,
        )
        contiguous = (last.offset is None and entry.offset is None) or (
            last.offset is not None and entry.offset == last.offset + last.length
        )
        if same and contiguous and last.start + last.length == entry.start:
            entries[-1] = attrs.evolve(last, length=last.length + entry.length)
            return
    entries.append(entry)
