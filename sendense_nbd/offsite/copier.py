"""One point copied into its chain, and chains deleted: the steps in the order that keeps the bucket sound.

A copy: the point's file checked (its backing file, as recorded and in its
qcow2 header, is the chain's newest copy, none for a full), then every
older object of the chain locked until the new date (a lock only grows),
then the image (multipart, resumable), the point's digests, and the
manifest, written last: a copy is complete when its manifest exists.

A chain is deleted top down (the newest copy first), each copy's manifest
first, by version: what Object Lock still protects is refused
(:class:`~sendense_nbd.errors.CopyLocked`) before anything of that copy or
below it is gone.
"""

from __future__ import annotations

import os
import struct
import threading

import attrs

from sendense_nbd.errors import ImageError, OffsiteError
from sendense_nbd.offsite.chains import lock_until
from sendense_nbd.offsite.manifest import Manifest, StoredObject, chain_folder
from sendense_nbd.offsite.s3 import Bucket
from sendense_nbd.offsite.upload import Journal, upload_file
from sendense_nbd.storage.qcow2.format import parse_header

#: Bytes read of a point's file for its header: a qcow2 header, its extensions and the backing file's
#: name lie within its first cluster (at most 2 MiB).
HEADER_BYTES = 2 << 20


@attrs.frozen
class PointFiles:
    """What a copy of one point is made from: the point, its qcow2 file (a full image, or an overlay
    whose backing file is ``<base-point-id>.qcow2``) and its digest sidecar."""

    vm_path: str
    disk_key: int
    point_id: str
    point_time: float
    size: int
    image: str
    backing: str | None
    digests: str | None


@attrs.frozen
class Written:
    """A finished copy: its manifest and the manifest object's version."""

    manifest: Manifest
    version: str


def copy_point(
    bucket: Bucket,
    files: PointFiles,
    chain: list[tuple[Manifest, str]],
    *,
    copy_id: str,
    now: float,
    journal: Journal,
    stop: threading.Event | None = None,
) -> Written:
    """Copy a point into the chain whose copies (manifest and its version, full first) are ``chain`` ([]: it
    starts a new chain, named after it); the whole chain is then locked until :func:`~.chains.lock_until`
    the copy's time ``now``."""
    target = bucket.target
    until = lock_until(now, target)
    manifests = [manifest for manifest, _ in chain]
    backing = manifests[-1].image.file_name if manifests else None
    check_backing(files, backing)
    chain_id = manifests[0].chain_id if manifests else files.point_id
    folder = chain_folder(target.prefix, files.vm_path, files.disk_key, chain_id)
    relock(bucket, chain, until)  # first: the chain must not lapse while the (long) upload runs
    image = upload_file(bucket, files.image, f"{folder}{files.point_id}.qcow2", until=until, journal=journal, stop=stop)
    digests = None
    if files.digests is not None:
        key = f"{folder}{files.point_id}.digests"
        digests = upload_file(bucket, files.digests, key, until=until, journal=journal, stop=stop)
    manifest = Manifest(
        copy_id=copy_id, vm_path=files.vm_path, disk_key=files.disk_key, point_id=files.point_id,
        point_time=files.point_time, size=files.size, chain_id=chain_id,
        chain=tuple(m.point_id for m in manifests) + (files.point_id,), image=image,
        backing=backing, digests=digests, created=now,
    )  # fmt: skip
    version = bucket.put(manifest.key, manifest.encode(), until=until)
    journal.made(manifest.key, version, until)
    bucket.lock(manifest.key, version, until)
    return Written(manifest, version)


def check_backing(files: PointFiles, backing: str | None) -> None:
    """Refuse to upload a point file whose backing file (as ``files`` says, and as its qcow2 header says)
    is not ``backing``, the chain's newest copy (None: a full starting a chain must have none)."""
    if files.backing != backing:
        raise OffsiteError(
            f"point {files.point_id}: its file builds on {files.backing or 'nothing'}, "
            f"but the chain's newest copy is {backing or 'none (a full)'}"
        )
    try:
        fd = os.open(files.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header = parse_header(os.pread(fd, HEADER_BYTES, 0))
        finally:
            os.close(fd)
    except (OSError, ImageError, struct.error) as exc:
        raise OffsiteError(f"point {files.point_id}: {files.image} is not a readable qcow2 image: {exc}") from exc
    if header.backing_file != backing:
        raise OffsiteError(
            f"point {files.point_id}: {files.image} names the backing file {header.backing_file or 'none'}, "
            f"not {backing or 'none (a full)'}"
        )


def relock(bucket: Bucket, chain: list[tuple[Manifest, str]], until: float) -> None:
    """Lock every object of a chain (manifests with their versions) until ``until`` at least."""
    for manifest, version in chain:
        for stored in _objects(manifest):
            bucket.lock(stored.key, stored.version, until)
        bucket.lock(manifest.key, version, until)


def delete_copies(bucket: Bucket, copies: list[tuple[Manifest, str]]) -> None:
    """Delete copies (manifest, manifest version), newest first: each manifest, then its digests and image."""
    for manifest, version in reversed(copies):
        bucket.delete(manifest.key, version)
        for stored in reversed(_objects(manifest)):
            bucket.delete(stored.key, stored.version)


def _objects(manifest: Manifest) -> list[StoredObject]:
    """A copy's data objects: its image and its digests."""
    return [manifest.image] + ([manifest.digests] if manifest.digests is not None else [])
