"""One S3 bucket with Object Lock, through boto3: the calls offsite copies make, their errors as sentences.

boto3 is blocking and its clients are thread-safe once made: one
:class:`Bucket` (its clients made from a session of its own, never boto3's
default one, and never reading ``AWS_*`` settings) is shared by the threads
that upload, serve and delete. Every S3 or network error, while sending a
request or while reading its answer's body, becomes an
:class:`~sendense_nbd.errors.OffsiteError` naming the call, the object and
S3's code; a delete that Object Lock refuses is a
:class:`~sendense_nbd.errors.CopyLocked`.

Time: every socket wait is bounded (connect and read timeouts), every call
has a bounded number of attempts, and every read of a body is bounded in
time by a watchdog that shuts the connection down when the read takes longer
than its budget (:class:`Body`): a peer that sends one byte a minute cannot
hold a thread. Reads (ranged GETs, retention, the bucket check) use the quick
client (:data:`QUICK`), uploads and deletes the patient one (:data:`PATIENT`).

Size: every body is read up to its expected length plus one byte: a body
longer than asked (or than the object's recorded size) is refused, never
buffered or written on.

Checksums: every part and object is sent with its ``Content-MD5``, which S3
checks (``BadDigest`` otherwise). botocore's own default checksums (CRC32 in
aws-chunked trailers, since botocore 1.36) are turned off: Ceph RGW before
Reef and other S3 stores refuse them.

Retention is always set with ``PutObjectRetention`` on the object's version
after it was written (and checked by reading it back, mode and date): RGW 16
ignores the Object Lock headers of a multipart upload.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from http.client import HTTPException
from typing import Any, TypeVar

import attrs

from sendense_nbd.errors import CopyLocked, OffsiteError
from sendense_nbd.policy.offsite import CopyTarget, LockMode

T = TypeVar("T")

#: The secret file: at most this many bytes.
MAX_SECRET = 4096
#: The modes a secret file may have: its owner's alone.
SECRET_MODES = frozenset({0o600, 0o400})
#: Connections per bucket client (uploads, ranged reads and deletes in threads share them).
POOL = 16
#: A listing of an upload's parts: S3's part limit, and pages at most.
MAX_PARTS = 10_000
MAX_PAGES = 20
#: Bytes read from a body at once, each read bounded by the watchdog.
PIECE = 1 << 20


@attrs.frozen
class Timing:
    """How long a client waits: to connect, for each socket read, attempts per call (retries included),
    and for each :data:`PIECE` of a body (the watchdog's budget)."""

    connect: float
    read: float
    attempts: int
    piece: float


#: Ranged GETs, retention reads and the bucket check: an NBD client or an API caller waits on them.
QUICK = Timing(connect=5, read=30, attempts=2, piece=30)
#: Uploads, listings and deletes from background work: a part takes a while to be answered.
PATIENT = Timing(connect=10, read=120, attempts=5, piece=120)

#: What a request or a body read may raise besides botocore's and urllib3's own errors.
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (HTTPException, OSError)


def read_secret(path: str, directory: str | None = None) -> str:
    """The secret key in ``path``: a regular file of the hub's user that only it may read (mode 0600
    or 0400), as ssh asks of a private key, directly in ``directory`` (the hub's secrets directory)
    when given; :class:`OffsiteError` otherwise. Never follows a symbolic link, never waits on a FIFO."""
    name, folder = path, None
    if directory is not None:
        name = os.path.basename(path)
        if os.path.normpath(os.path.dirname(path)) != os.path.normpath(directory) or name in {"", ".", ".."}:
            raise OffsiteError(f"S3 secret file {path} is not in the hub's secrets directory {directory}")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        if directory is not None:
            folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fd = os.open(name, flags, dir_fd=folder)
    except OSError as exc:
        raise OffsiteError(f"S3 secret file {path}: {exc.strerror or exc}") from exc
    finally:
        if folder is not None:
            os.close(folder)
    try:
        _check_secret_file(os.fstat(fd), path)
        data = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    secret = data.decode("utf-8", "replace").strip()
    if not secret or len(data) > MAX_SECRET or any(not 0x21 <= ord(c) <= 0x7E for c in secret):
        raise OffsiteError(f"S3 secret file {path} must hold one secret key (visible ASCII, at most {MAX_SECRET})")
    return secret


def _check_secret_file(info: os.stat_result, path: str) -> None:
    """Refuse a secret file that is not a regular file of ours, mode 0600 or 0400."""
    if not stat.S_ISREG(info.st_mode):
        raise OffsiteError(f"S3 secret file {path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise OffsiteError(
            f"S3 secret file {path} belongs to user {info.st_uid}, not to the hub's user {os.geteuid()}: "
            f"make it the hub user's (chown)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode not in SECRET_MODES:
        raise OffsiteError(
            f"S3 secret file {path} has mode {mode:04o}: it must be the hub user's alone, 0600 or 0400 "
            f"(chmod 600 {path})"
        )


def content_md5(digest: bytes) -> str:
    """The ``Content-MD5`` header of an MD5 ``digest`` (base64 of its bytes)."""
    return base64.b64encode(digest).decode()


def utc(epoch: float) -> datetime.datetime:
    """An epoch time as the timezone-aware datetime S3's retention takes."""
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)


@attrs.frozen
class Retention:
    """An object version's Object Lock retention: its mode and until when (epoch seconds)."""

    mode: LockMode
    until: float

    def holds(self, mode: LockMode, until: float) -> bool:
        """Whether it is at least as strong as ``mode`` (COMPLIANCE is stronger) until ``until``."""
        return self.until >= until - 1 and self.mode in {mode, LockMode.COMPLIANCE}


@attrs.frozen
class Part:
    """One uploaded part as S3 lists it: its number, size and ETag (an MD5 hex for unencrypted parts)."""

    number: int
    size: int
    etag: str


def _socket_of(stream: Any) -> socket.socket | None:
    """The socket a botocore body reads from (urllib3 1.x and 2.x keep it in these places), if found."""
    raw = getattr(stream, "_raw_stream", None)
    found = getattr(getattr(raw, "_connection", None), "sock", None)
    if not isinstance(found, socket.socket):
        found = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
    return found if isinstance(found, socket.socket) else None


class Body:
    """An object's body being read: at most ``limit`` bytes (more is refused), each :meth:`read` bounded
    in time by a watchdog that shuts the connection down after ``budget`` seconds, every error an
    :class:`OffsiteError` naming ``where``."""

    def __init__(self, stream: Any, where: str, *, limit: int, budget: float) -> None:
        self._stream = stream
        self.where = where
        self.limit = limit
        self.budget = budget
        #: Bytes read so far.
        self.done = 0

    def read(self, size: int = PIECE) -> bytes:
        """Up to ``size`` bytes (b"" at the end)."""
        errors: tuple[type[BaseException], ...] = (*_NETWORK_ERRORS, ValueError, *_botocore_errors())
        fired = threading.Event()
        watchdog = threading.Timer(self.budget, self._cut, (fired,))
        watchdog.daemon = True
        watchdog.start()
        try:
            chunk = bytes(self._stream.read(min(size, self.limit + 1 - self.done)))
        except errors as exc:  # ValueError: a read after the watchdog's cut
            if fired.is_set():
                raise OffsiteError(f"reading {self.where} took over {self.budget:g} s for {size} bytes") from exc
            raise OffsiteError(f"reading {self.where} failed: {exc}") from exc
        finally:
            watchdog.cancel()
        if fired.is_set():
            raise OffsiteError(f"reading {self.where} took over {self.budget:g} s for {size} bytes")
        self.done += len(chunk)
        if self.done > self.limit:
            raise OffsiteError(f"S3 answered more than the {self.limit} bytes of {self.where}")
        return chunk

    def read_all(self) -> bytes:
        """Everything up to the end (at most ``limit`` bytes)."""
        chunks = []
        while chunk := self.read():
            chunks.append(chunk)
        return b"".join(chunks)

    def _cut(self, fired: threading.Event) -> None:
        """The watchdog: a read took too long; shut the connection down so the blocked read returns."""
        fired.set()
        found = _socket_of(self._stream)
        if found is not None:
            try:
                socket.socket.shutdown(found, socket.SHUT_RDWR)  # the plain call, also under TLS
            except OSError:
                pass  # closed already

    def close(self) -> None:
        """Release the connection (a body not read to its end is not reused)."""
        try:
            self._stream.close()
        except _NETWORK_ERRORS + _botocore_errors():
            pass  # nothing left to release


def _botocore_errors() -> tuple[type[BaseException], ...]:
    """botocore's and urllib3's exception bases (imported late: boto3 loads slowly)."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (BotoCoreError, HTTPError)


class Bucket:
    """A copy target's bucket (``connect``); blocking calls, safe to share between threads.
    ``client`` waits as ``patient`` says (:data:`PATIENT`), ``quick`` as ``fast`` says (:data:`QUICK`)."""

    def __init__(
        self, target: CopyTarget, client: Any, quick: Any, *, patient: Timing = PATIENT, fast: Timing = QUICK
    ) -> None:
        self.target = target
        self.name = target.bucket
        self.client = client
        self.quick = quick
        self.patient = patient
        self.fast = fast

    @classmethod
    def connect(
        cls, target: CopyTarget, *, secrets: str | None = None, patient: Timing = PATIENT, fast: Timing = QUICK
    ) -> Bucket:
        """Clients for ``target`` with the secret read from its file (:func:`read_secret`, in the
        ``secrets`` directory when given), from a session of their own."""
        secret = read_secret(target.secret_file, secrets)
        import boto3.session

        session = boto3.session.Session(
            aws_access_key_id=target.access_key, aws_secret_access_key=secret, region_name=target.region
        )
        try:
            clients = _client(session, target, patient), _client(session, target, fast)
        except ValueError as exc:
            raise OffsiteError(f"S3 endpoint {target.endpoint} cannot be used: {exc}") from exc
        return cls(target, *clients, patient=patient, fast=fast)

    def _where(self, key: str | None) -> str:
        return f"{self.name}/{key}" if key else f"bucket {self.name}"

    def _call(self, what: str, key: str | None, call: Callable[..., T], **kwargs: Any) -> T:
        """``call(Bucket=..., **kwargs)`` with S3's and the network's errors as an :class:`OffsiteError`."""
        from botocore.exceptions import ClientError

        where = self._where(key)
        try:
            return call(Bucket=self.name, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), error.get("Message") or ""
            text = f"S3 {what} of {where} at {self.target.endpoint} failed: {code} {message}".rstrip()
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"} or (code == "403" and key is None):
                text += f" (check the access key {self.target.access_key} and the secret in {self.target.secret_file})"
            raise OffsiteError(text[:2000], code) from exc
        except _NETWORK_ERRORS + _botocore_errors() as exc:
            raise OffsiteError(f"S3 {what} of {where} at {self.target.endpoint} failed: {exc}"[:2000]) from exc

    def _body(self, answer: dict[str, Any], key: str, limit: int, budget: float) -> Body:
        """The body of a GET's answer, bounded (:class:`Body`)."""
        return Body(answer["Body"], f"{self.name}/{key}", limit=limit, budget=budget)

    # -- the bucket ------------------------------------------------------------------

    def check_lock(self) -> None:
        """Refuse a bucket without Object Lock (or unreachable, or refusing our credentials), in a sentence."""
        try:
            found = self._call("reading the Object Lock configuration", None, self.quick.get_object_lock_configuration)
        except OffsiteError as exc:
            if exc.code == "ObjectLockConfigurationNotFoundError":
                raise OffsiteError(
                    f"bucket {self.name} at {self.target.endpoint} has no Object Lock: copies must be immutable; "
                    f"create a bucket with Object Lock enabled (docs/STORAGE.md)"
                ) from exc
            raise
        if found.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise OffsiteError(f"bucket {self.name} at {self.target.endpoint} has Object Lock turned off")

    # -- objects ---------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, until: float) -> str:
        """Write a small object (with its MD5), asking for its lock until ``until``; its version ID (the
        caller records it, then :meth:`lock` sets the lock and checks it)."""
        answer = self._call(
            "writing", key, self.client.put_object, Key=key, Body=data,
            ContentMD5=content_md5(hashlib.md5(data).digest()), ObjectLockMode=self.target.lock_mode.value,
            ObjectLockRetainUntilDate=utc(until),
        )  # fmt: skip
        return _version(answer, key)

    def read_range(self, key: str, version: str, offset: int, length: int, *, size: int) -> bytes:
        """Exactly ``min(length, size - offset)`` bytes at ``offset`` of an object version of ``size`` bytes
        (one ranged GET, its answer checked: 206, the asked Content-Range, that many bytes)."""
        want = min(length, size - offset)
        if want <= 0:
            raise OffsiteError(f"reading {self._where(key)}: offset {offset} is beyond its {size} bytes")
        answer = self._call(
            "reading",
            key,
            self.quick.get_object,
            Key=key,
            VersionId=version,
            Range=f"bytes={offset}-{offset + want - 1}",
        )
        body = self._body(answer, key, want, self.fast.piece)
        try:
            status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
            expected = f"bytes {offset}-{offset + want - 1}/{size}"
            if status != 206 or answer.get("ContentRange") != expected:
                raise OffsiteError(
                    f"S3 answered a ranged GET of {self._where(key)} with {status} "
                    f"{str(answer.get('ContentRange'))[:80]!r}, not 206 {expected!r}"
                )
            data = body.read_all()
        finally:
            body.close()
        if len(data) != want:
            raise OffsiteError(f"S3 answered {len(data)} bytes of {self._where(key)} at {offset}, not {want}")
        return data

    def open_body(self, key: str, version: str, *, size: int) -> Body:
        """An object version's body of ``size`` bytes as a bounded stream (:class:`Body`), for downloads."""
        answer = self._call("reading", key, self.client.get_object, Key=key, VersionId=version)
        return self._body(answer, key, size, self.patient.piece)

    # -- Object Lock -----------------------------------------------------------------

    def retention(self, key: str, version: str) -> Retention | None:
        """An object version's retention (None: it has none)."""
        try:
            answer = self._call(
                "reading the retention", key, self.quick.get_object_retention, Key=key, VersionId=version
            )
        except OffsiteError as exc:
            if exc.code in {"NoSuchObjectLockConfiguration", "ObjectLockConfigurationNotFoundError"}:
                return None
            raise
        try:
            found = answer["Retention"]
            return Retention(LockMode(found["Mode"]), found["RetainUntilDate"].timestamp())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OffsiteError(f"S3 answered no usable retention for {self._where(key)}: {exc!r}") from exc

    def lock(self, key: str, version: str, until: float) -> None:
        """Lock an object version in the target's mode (or COMPLIANCE) until ``until`` at least (never
        shortened, never weakened: S3 refuses both without a governance bypass, which is never asked),
        and check that S3 holds it so. Two calls when S3 takes it (set, read back)."""
        mode = self.target.lock_mode
        refused = self._set_retention(key, version, mode, until)
        held = self.retention(key, version)
        if refused is not None and held is not None and held.mode is LockMode.COMPLIANCE and held.until < until:
            refused = self._set_retention(key, version, LockMode.COMPLIANCE, until)  # stronger, only longer
            held = self.retention(key, version)
        if held is None or not held.holds(mode, until):
            if refused is not None:
                raise OffsiteError(_lock_refused(self._where(key), version, held, mode, refused), refused.code)
            got = "none" if held is None else f"{held.mode.value} until {utc(held.until):%FT%TZ}"
            raise OffsiteError(
                f"S3 did not lock {self._where(key)} (version {version}) {mode.value} until {utc(until):%FT%TZ}: "
                f"it holds {got}"
            )

    def _set_retention(self, key: str, version: str, mode: LockMode, until: float) -> OffsiteError | None:
        """Ask for a retention; S3's refusal (AccessDenied: a longer or stronger lock is in the way) returned."""
        try:
            self._call(
                "locking", key, self.client.put_object_retention, Key=key, VersionId=version,
                Retention={"Mode": mode.value, "RetainUntilDate": utc(until)},
            )  # fmt: skip
        except OffsiteError as exc:
            if exc.code != "AccessDenied":
                raise
            return exc
        return None

    def delete(self, key: str, version: str) -> None:
        """Delete one object version for good (not a delete marker); :class:`CopyLocked` when Object Lock
        refuses it (a retention still in the future), :class:`OffsiteError` when S3 refuses for another
        reason (the key's permissions, a legal hold)."""
        try:
            self._call("deleting", key, self.client.delete_object, Key=key, VersionId=version)
        except OffsiteError as exc:
            if exc.code != "AccessDenied":
                raise
            held = self.retention(key, version)
            if held is not None and held.until > time.time():
                raise CopyLocked(
                    f"{self._where(key)} is locked until {utc(held.until):%FT%TZ} ({held.mode.value}): "
                    f"S3 refused to delete it ({exc})"
                ) from exc
            past = "" if held is None else f" (its lock ended {utc(held.until):%FT%TZ})"
            raise OffsiteError(
                f"S3 refused to delete {self._where(key)} (version {version}) though no lock holds it{past}: "
                f"the access key {self.target.access_key} needs s3:DeleteObjectVersion, or a legal hold is set",
                exc.code,
            ) from exc

    # -- multipart uploads -------------------------------------------------------------

    def start_upload(self, key: str, until: float) -> str:
        """A new multipart upload of ``key`` (asking for its lock already, where S3 honours that); its ID."""
        answer = self._call(
            "starting the upload", key, self.client.create_multipart_upload, Key=key,
            ObjectLockMode=self.target.lock_mode.value, ObjectLockRetainUntilDate=utc(until),
        )  # fmt: skip
        upload = answer.get("UploadId")
        if not isinstance(upload, str) or not upload:
            raise OffsiteError(f"S3 started an upload of {self._where(key)} without an upload ID")
        return upload

    def upload_part(self, key: str, upload: str, number: int, data: bytes | bytearray, md5: bytes) -> str:
        """Send one part (``data``, sent as is: no copy) with its Content-MD5 (``md5``, its digest); its ETag."""
        answer = self._call(
            f"uploading part {number}", key, self.client.upload_part, Key=key, UploadId=upload,
            PartNumber=number, Body=data, ContentMD5=content_md5(md5),
        )  # fmt: skip
        return str(answer.get("ETag", ""))

    def parts(self, key: str, upload: str) -> list[Part] | None:
        """The parts S3 holds of an upload, by number (at most :data:`MAX_PARTS`, in at most :data:`MAX_PAGES`
        pages whose markers grow); None when the upload is gone (aborted or expired)."""
        found: dict[int, Part] = {}
        marker = 0
        for _ in range(MAX_PAGES):
            try:
                answer = self._call(
                    "listing the parts", key, self.client.list_parts, Key=key, UploadId=upload, PartNumberMarker=marker
                )
            except OffsiteError as exc:
                if exc.code == "NoSuchUpload":
                    return None
                raise
            for part in _listed_parts(answer, self._where(key)):
                found[part.number] = part
            if len(found) > MAX_PARTS:
                raise OffsiteError(f"S3 listed more than {MAX_PARTS} parts of the upload of {self._where(key)}")
            if not answer.get("IsTruncated"):
                return [found[n] for n in sorted(found)]
            following = answer.get("NextPartNumberMarker")
            if isinstance(following, str) and following.isdigit():
                following = int(following)
            if not isinstance(following, int) or following <= marker:
                raise OffsiteError(
                    f"S3 listed the parts of {self._where(key)} truncated at marker {str(following)[:20]!r} "
                    f"after {marker}: a listing must move on"
                )
            marker = following
        raise OffsiteError(f"S3 listed the parts of {self._where(key)} in more than {MAX_PAGES} pages")

    def finish_upload(self, key: str, upload: str, parts: list[Part]) -> str:
        """Complete an upload from its parts; the object's version ID."""
        answer = self._call(
            "completing the upload", key, self.client.complete_multipart_upload, Key=key, UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": f'"{p.etag}"'} for p in parts]},
        )  # fmt: skip
        return _version(answer, key)

    def abort_upload(self, key: str, upload: str) -> None:
        """Abort an upload (its parts are dropped); one already gone is no error."""
        try:
            self._call("aborting the upload", key, self.client.abort_multipart_upload, Key=key, UploadId=upload)
        except OffsiteError as exc:
            if exc.code != "NoSuchUpload":
                raise


def _client(session: Any, target: CopyTarget, timing: Timing) -> Any:
    """A client of ``session`` for ``target`` waiting as ``timing`` says (path-style, no default checksums)."""
    from botocore.config import Config

    config = Config(
        region_name=target.region,
        s3={"addressing_style": "path"},
        retries={"max_attempts": timing.attempts, "mode": "standard"},
        connect_timeout=timing.connect,
        read_timeout=timing.read,
        max_pool_connections=POOL,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=target.endpoint, config=config)


def _listed_parts(answer: dict[str, Any], where: str) -> list[Part]:
    """The parts of one ListParts page; :class:`OffsiteError` for a page that is not one."""
    try:
        return [Part(int(p["PartNumber"]), int(p["Size"]), str(p["ETag"]).strip('"')) for p in answer.get("Parts", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise OffsiteError(f"S3 listed the parts of {where} without a part number, size or ETag: {exc!r}") from exc


def _lock_refused(where: str, version: str, held: Retention | None, mode: LockMode, exc: OffsiteError) -> str:
    """Why locking failed, with what to do when an existing weaker lock is in the way."""
    if held is not None and held.mode is not mode and held.mode is LockMode.GOVERNANCE:
        return (
            f"{where} (version {version}) is locked GOVERNANCE until {utc(held.until):%FT%TZ} and S3 refused to "
            f"make it {mode.value} ({exc}); the bucket's default retention is probably GOVERNANCE: make it "
            f"{mode.value} or remove it"
        )
    return str(exc)


def _version(answer: dict[str, Any], key: str) -> str:
    version = answer.get("VersionId")
    if not version or version == "null":
        raise OffsiteError(f"S3 gave {key} no version ID: the bucket has no versioning (Object Lock needs it)")
    return str(version)
