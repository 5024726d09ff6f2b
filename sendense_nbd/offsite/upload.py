"""Resumable multipart uploads of a local file, one part buffer at a time.

A file is sent in parts of :func:`part_size` bytes (16 MiB, more for files
that would need over 9,000 parts; S3 allows 10,000), each with its
Content-MD5, which S3 checks; the ETag it answers must be that MD5 too. The
upload is recorded as it goes in a :class:`Journal` (the hub's store): the
upload ID and part size when it starts, each part's number, size and MD5
when S3 has it, the object version once S3 made it. A restarted upload of the same key resumes: a recorded part
that S3 still lists with the same size and ETag, and whose bytes in the file
still have that MD5, is not sent again; the others are. An upload S3 no
longer knows (aborted, expired by a lifecycle rule) or with another part
size starts over cleanly (the old one is aborted).

Memory: one part buffer per upload (sent as is; only a shorter last part is
copied); the MD5 of a part is computed once, the sha256 of the whole file on
the way (every part is read, sent or not) and goes into the manifest.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Protocol

import attrs

from sendense_nbd.errors import OffsiteError
from sendense_nbd.offsite.manifest import StoredObject
from sendense_nbd.offsite.s3 import Bucket, Part

MIB = 1 << 20
#: The smallest part (S3's minimum is 5 MiB for every part but the last).
MIN_PART = 16 * MIB
#: Parts per upload at most (S3's limit is 10,000; room for a file that grows a little).
MAX_PARTS = 9000


def part_size(size: int) -> int:
    """The part size for a file of ``size`` bytes: 16 MiB, or whole MiB enough for :data:`MAX_PARTS` parts."""
    return max(MIN_PART, -(-size // MAX_PARTS // MIB) * MIB)


@attrs.frozen
class Recorded:
    """An upload as the journal holds it: its S3 upload ID, part size and the parts S3 confirmed."""

    upload: str
    part_size: int
    parts: dict[int, tuple[int, str]]


class Journal(Protocol):
    """Where an upload's progress is recorded (blocking calls from the upload's thread)."""

    def recorded(self, key: str) -> Recorded | None:
        """The upload of ``key`` recorded so far, if any."""

    def begun(self, key: str, upload: str, part_size: int) -> None:
        """A new upload of ``key`` started (forgetting any older one)."""

    def part(self, key: str, number: int, size: int, md5: str) -> None:
        """S3 has part ``number`` of the upload of ``key``."""

    def finished(self, key: str) -> None:
        """The upload of ``key`` is complete (or abandoned): forget it."""

    def made(self, key: str, version: str, until: float) -> None:
        """S3 holds a new version of ``key`` (an object of the copy, locked until ``until``): recorded
        before anything else happens, so a copy that fails later leaves no object nobody knows of."""

    def version(self, key: str) -> str | None:
        """The version of ``key`` this copy made already (:meth:`made`), if any."""


def upload_file(
    bucket: Bucket, path: str, key: str, *, until: float, journal: Journal, stop: threading.Event | None = None
) -> StoredObject:
    """Upload the file at ``path`` as ``key`` (multipart, resumed from ``journal``), locked until ``until``.
    A version the journal says this copy made already (an earlier try that failed later) is taken as it
    is, not sent again.

    ``stop`` set: give up between parts (the upload stays resumable); :class:`OffsiteError` then.
    """
    made = journal.version(key)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if made is None:
            made, whole = _send(bucket, fd, size, key, until=until, journal=journal, stop=stop)
        else:
            whole = _sha256(fd, size)
    finally:
        os.close(fd)
    bucket.lock(key, made, until)
    return StoredObject(key, made, size, whole)


def _send(
    bucket: Bucket, fd: int, size: int, key: str, *, until: float, journal: Journal, stop: threading.Event | None
) -> tuple[str, str]:
    """The multipart upload of the file at ``fd`` (``size`` bytes): the version made and the file's sha256."""
    upload, chunk, held = _resume(bucket, key, size, until, journal)
    buffer = bytearray(chunk)
    whole = hashlib.sha256()
    parts: list[Part] = []
    for number, offset in enumerate(range(0, max(size, 1), chunk), start=1):
        if stop is not None and stop.is_set():
            raise OffsiteError(f"the upload of {key} was stopped (it resumes from part {number})")
        view = memoryview(buffer)[: _read(fd, buffer, offset, min(chunk, size - offset))]
        whole.update(view)
        digest = hashlib.md5(view).digest()
        md5 = digest.hex()
        if held.get(number) != (len(view), md5):
            data = buffer if len(view) == len(buffer) else bytes(view)  # a whole part goes as is, not copied
            etag = bucket.upload_part(key, upload, number, data, digest).strip('"')
            if etag != md5:
                raise OffsiteError(f"S3 answered part {number} of {key} with ETag {etag}, not its MD5 {md5}")
            journal.part(key, number, len(view), md5)
        parts.append(Part(number, len(view), md5))
    version = bucket.finish_upload(key, upload, parts)
    journal.made(key, version, until)
    journal.finished(key)
    return version, whole.hexdigest()


def _sha256(fd: int, size: int) -> str:
    """The sha256 of the file at ``fd`` (read a part at a time)."""
    whole = hashlib.sha256()
    buffer = bytearray(MIN_PART)
    for offset in range(0, size, MIN_PART):
        whole.update(memoryview(buffer)[: _read(fd, buffer, offset, min(MIN_PART, size - offset))])
    return whole.hexdigest()


def _resume(
    bucket: Bucket, key: str, size: int, until: float, journal: Journal
) -> tuple[str, int, dict[int, tuple[int, str]]]:
    """The upload to continue: ``(upload ID, part size, parts S3 holds as recorded)``; a new one when
    nothing usable is recorded."""
    chunk = part_size(size)
    recorded = journal.recorded(key)
    if recorded is not None:
        listed = bucket.parts(key, recorded.upload)
        if listed is not None and recorded.part_size == chunk:
            held = {p.number: (p.size, p.etag) for p in listed}
            return recorded.upload, chunk, {n: v for n, v in recorded.parts.items() if held.get(n) == v}
        if listed is not None:
            bucket.abort_upload(key, recorded.upload)
    upload = bucket.start_upload(key, until)
    journal.begun(key, upload, chunk)
    return upload, chunk, {}


def _read(fd: int, buffer: bytearray, offset: int, length: int) -> int:
    """Fill ``buffer[:length]`` from ``offset``; :class:`OffsiteError` if the file ends first."""
    view = memoryview(buffer)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:length]], offset + done)
        if n == 0:
            raise OffsiteError(f"the file being uploaded shrank: nothing at offset {offset + done}")
        done += n
    return length
