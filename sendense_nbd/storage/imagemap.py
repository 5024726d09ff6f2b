"""Where each guest byte of an image lives, across its backing chain
(``sendense-nbd map``, mirroring ``qemu-img map``)."""

from __future__ import annotations

import attrs

from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.base import BlockDevice
from sendense_nbd.storage.checked import CheckedDevice
from sendense_nbd.storage.qcow2 import Qcow2Device
from sendense_nbd.storage.raw import RawDevice

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


def map_image(device: CheckedDevice, filename: str) -> list[MapEntry]:
    """The whole guest range of ``device`` as merged :class:`MapEntry` runs."""
    entries: list[MapEntry] = []
    pos = 0
    while pos < device.size:
        n = min(_STEP, device.size - pos)
        for entry in _layer(device.backend, filename, pos, n, 0):
            _append(entries, entry)
        pos += n
    return entries


def _layer(device: BlockDevice, filename: str, start: int, length: int, depth: int) -> list[MapEntry]:
    if isinstance(device, Qcow2Device):
        out: list[MapEntry] = []
        pos = start
        for n, kind, host in device.layer_map(start, length):
            if kind == "unallocated":
                out.extend(_below(device, pos, n, depth))
            else:
                out.append(MapEntry(pos, n, depth, True, kind == "zero", kind != "zero", host, filename))
            pos += n
        return out
    if isinstance(device, RawDevice):
        described = device.extents(offset=start, length=length) if device.capabilities.can_extents else []
        return [
            MapEntry(e.offset, e.length, depth, True, e.zero, not e.zero, e.offset, device.path)
            for e in described or [Extent(start, length)]
        ]
    return [MapEntry(start, length, depth, True, False, True, None, filename)]


def _below(device: Qcow2Device, start: int, length: int, depth: int) -> list[MapEntry]:
    backing = device.backing.backend if device.backing is not None else None
    if backing is None or start >= backing.size:
        return [MapEntry(start, length, depth, False, True, False, None, device.path)]
    inside = min(length, backing.size - start)
    name = backing.path if isinstance(backing, Qcow2Device | RawDevice) else "?"
    out = _layer(backing, name, start, inside, depth + 1)
    if inside < length:
        out.append(MapEntry(start + inside, length - inside, depth + 1, False, True, False, None, name))
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
