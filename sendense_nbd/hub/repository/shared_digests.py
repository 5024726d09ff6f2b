"""A point's digest sidecar kept in RADOS objects, so that every hub of a cluster can read it.

A sidecar of ``size`` bytes is split into parts of at most :data:`PART` bytes (Ceph refuses objects over
``osd_max_object_size``, 128 MiB by default): ``NAME`` holds the first, ``NAME.1``, ``NAME.2``... the rest.
The first object's xattr :data:`STAMP` (``"<size> <token>"``) is written last and removed first, so only a
complete share has it; a reader checks it again after reading, so a share rewritten meanwhile is refused.
Every read and write moves at most :data:`PIECE` bytes at once.
"""

from __future__ import annotations

import importlib
import os
import uuid
from typing import IO, Any

from sendense_nbd.errors import RepositoryError

#: Largest sidecar shared or fetched (a 64 TiB disk's digests at 4 MiB chunks).
MAX_SIZE = 1 << 30
#: Most bytes in one RADOS object of a sidecar.
PART = 64 << 20
#: Most bytes read or written at once.
PIECE = 4 << 20
#: The first object's xattr: the sidecar's size and the share's token, set once every part is written.
STAMP = "sendense.digests"


def part_name(name: str, index: int) -> str:
    """The object holding part ``index`` of the sidecar ``name``."""
    return name if index == 0 else f"{name}.{index}"


def put(ioctx: Any, name: str, source: IO[bytes]) -> None:
    """Share the sidecar read from ``source`` as ``name``, replacing an earlier share of it."""
    rados = importlib.import_module("rados")
    size = os.fstat(source.fileno()).st_size
    if size > MAX_SIZE:
        raise RepositoryError(f"the sidecar holds {size} bytes, more than a hub shares ({MAX_SIZE})")
    try:
        ioctx.rm_xattr(name, STAMP)
    except (rados.ObjectNotFound, rados.NoData):
        pass
    parts = max(1, -(-size // PART))
    for index in range(parts):
        _put_part(ioctx, part_name(name, index), source, min(PART, size - index * PART))
    _remove_parts(ioctx, name, parts)  # an earlier, longer share's
    ioctx.set_xattr(name, STAMP, f"{size} {uuid.uuid4().hex}".encode())


def _put_part(ioctx: Any, name: str, source: IO[bytes], length: int) -> None:
    ioctx.write_full(name, b"")
    offset = 0
    while offset < length:
        piece = source.read(min(PIECE, length - offset))
        if not piece:
            raise RepositoryError("the sidecar shrank while it was shared")
        ioctx.write(name, piece, offset)
        offset += len(piece)


def get(ioctx: Any, name: str, target: IO[bytes]) -> bool:
    """Write the shared sidecar ``name`` to ``target``; False (nothing written) when it was never shared,
    or its share is not complete."""
    stamp = _stamp(ioctx, name)
    if stamp is None:
        return False
    size = _size_of(name, stamp)
    for index in range(max(1, -(-size // PART))):
        part = part_name(name, index)
        length = min(PART, size - index * PART)
        held, _ = ioctx.stat(part)
        if held != length:
            raise RepositoryError(f"object {part} holds {held} bytes, not {length}: its share changed; retry")
        offset = 0
        while offset < length:
            piece = ioctx.read(part, min(PIECE, length - offset), offset)
            if not piece:
                raise RepositoryError(f"object {part} ended at {offset} of its {length} bytes; retry")
            target.write(piece)
            offset += len(piece)
    if _stamp(ioctx, name) != stamp:
        raise RepositoryError(f"the digests in {name} were shared again while read; retry")
    return True


def _stamp(ioctx: Any, name: str) -> bytes | None:
    rados = importlib.import_module("rados")
    try:
        return bytes(ioctx.get_xattr(name, STAMP))
    except (rados.ObjectNotFound, rados.NoData):
        return None


def _size_of(name: str, stamp: bytes) -> int:
    """The size a stamp gives, refused unless it is one a hub writes."""
    try:
        size = int(stamp.split(b" ", 1)[0])
    except ValueError:
        size = -1
    if not 0 <= size <= MAX_SIZE:
        raise RepositoryError(
            f"object {name} claims {stamp[:40]!r} bytes of digests, not 0 to {MAX_SIZE}: "
            "it is not a sidecar a hub shared; remove it (rados rm)"
        )
    return size


def remove(ioctx: Any, name: str) -> None:
    """Remove every object of the sidecar ``name`` (nothing when there is none)."""
    _remove_parts(ioctx, name, 1)
    rados = importlib.import_module("rados")
    try:
        ioctx.remove_object(name)
    except rados.ObjectNotFound:
        pass


def _remove_parts(ioctx: Any, name: str, first: int) -> None:
    """Remove parts ``first``, ``first + 1``... up to the first one missing (parts are written in order)."""
    rados = importlib.import_module("rados")
    for index in range(max(first, 1), MAX_SIZE // PART + 2):
        try:
            ioctx.remove_object(part_name(name, index))
        except rados.ObjectNotFound:
            return
