"""Reading copies back: a chain downloaded to files, and the digests check.

:func:`download` streams each object of a chain (full first) into a new file
of the same name in a directory, checking its length and sha256 against the
manifest before the file is linked into place, so a directory holds only
whole, checked files: the top one opens with ``qemu-img`` as is, its backing
files beside it. :func:`verify` recomputes the chunk digests of a copy's
whole view (a downloaded file, or the copy served from the bucket) and
compares them with the digests recorded at backup time, uploaded with it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from sendense_nbd.copy.digests import DigestFile, chunk_digests
from sendense_nbd.copy.endpoints import LocalEndpoint
from sendense_nbd.errors import CopyDamaged, ImageError, OffsiteError
from sendense_nbd.offsite.manifest import Manifest, StoredObject
from sendense_nbd.offsite.s3 import Body, Bucket
from sendense_nbd.storage.base import BlockDevice
from sendense_nbd.storage.files import link_new, remove_quietly, temporary_name

#: Bytes per read of a download's stream (its memory).
STREAM_CHUNK = 4 << 20
#: Chunks hashed at once by a verify (each one chunk of memory).
VERIFY_REQUESTS = 4


def download_object(bucket: Bucket, stored: StoredObject, path: str) -> None:
    """One object version into a new file at ``path`` (never replacing one), checked against its
    recorded length and sha256 first: a body longer than recorded is cut off at once, never written on."""
    temporary = temporary_name(path)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            digest = _write_body(bucket.open_body(stored.key, stored.version, size=stored.size), fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        size = os.stat(temporary).st_size
        if size != stored.size or digest != stored.sha256:
            raise CopyDamaged(
                f"{bucket.name}/{stored.key}: downloaded {size} bytes with sha256 {digest}, "
                f"the manifest says {stored.size} bytes with sha256 {stored.sha256}"
            )
        link_new(temporary, path)
    except OSError as exc:
        raise OffsiteError(f"downloading {stored.key} to {path}: {exc.strerror or exc}") from exc
    finally:
        remove_quietly(temporary)


def _write_body(body: Body, fd: int) -> str:
    """Write a body (bounded: :class:`~sendense_nbd.offsite.s3.Body`) to ``fd``; its sha256."""
    digest = hashlib.sha256()
    try:
        while chunk := body.read(STREAM_CHUNK):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        body.close()
    return digest.hexdigest()


def download(bucket: Bucket, chain: list[Manifest], directory: str) -> str:
    """Download a copy's chain (its manifests from the full up) into ``directory``, each image as its
    ``<point-id>.qcow2`` with its digests beside it; the top image's path."""
    for manifest in chain:
        download_object(bucket, manifest.image, os.path.join(directory, manifest.image.file_name))
    top = chain[-1]
    if top.digests is not None:
        download_object(bucket, top.digests, os.path.join(directory, top.digests.file_name))
    return os.path.join(directory, top.image.file_name)


def recorded_digests(bucket: Bucket, manifest: Manifest, scratch: str) -> DigestFile:
    """The chunk digests recorded at backup time and uploaded with the copy (checked against the manifest),
    downloaded into a temporary folder under ``scratch`` (the hub's own directory) and removed."""
    if manifest.digests is None:
        raise OffsiteError(f"copy {manifest.copy_id} has no digests to verify against")
    os.makedirs(scratch, mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="digests-", dir=scratch) as folder:
        path = os.path.join(folder, manifest.digests.file_name)
        download_object(bucket, manifest.digests, path)
        try:
            return DigestFile.read(path, size=manifest.size)
        except ImageError as exc:
            raise CopyDamaged(f"copy {manifest.copy_id}: {exc}") from exc


async def verify(device: BlockDevice, recorded: DigestFile, name: str) -> None:
    """Recompute every chunk digest of ``device`` (a copy's whole view; closed at the end) and compare;
    :class:`OffsiteError` naming the first chunk that differs."""
    async with LocalEndpoint(device, name) as endpoint:
        if device.size != recorded.size:
            raise CopyDamaged(f"{name} has {device.size} bytes, its digests describe {recorded.size}")
        found = await chunk_digests(endpoint, chunk_size=recorded.chunk_size, requests=VERIFY_REQUESTS)
    for index, digest in enumerate(recorded.digests):
        if found[index] != digest:
            offset = index * recorded.chunk_size
            raise CopyDamaged(f"{name}: the chunk at offset {offset} differs from the digest recorded at backup time")
