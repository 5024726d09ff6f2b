"""One S3 bucket with Object Lock, through boto3: the calls offsite copies make, their errors as sentences.

boto3 is blocking and its clients are thread-safe: one :class:`Bucket` is
shared by the threads that upload, serve and delete. Every S3 error becomes
an :class:`~sendense_nbd.errors.OffsiteError` naming the call, the object and
S3's code; a delete that Object Lock refuses is a
:class:`~sendense_nbd.errors.CopyLocked`.

Checksums: every part and object is sent with its ``Content-MD5``, which S3
checks (``BadDigest`` otherwise). botocore's own default checksums (CRC32 in
aws-chunked trailers, since botocore 1.36) are turned off: Ceph RGW before
Reef and other S3 stores refuse them.

Retention is always set with ``PutObjectRetention`` on the object's version
after it was written (and checked by reading it back): RGW 16 ignores the
Object Lock headers of a multipart upload.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from sendense_nbd.errors import CopyLocked, OffsiteError
from sendense_nbd.policy.offsite import CopyTarget, LockMode

T = TypeVar("T")

#: The secret file: at most this many bytes.
MAX_SECRET = 4096
#: Connections per bucket client (uploads, ranged reads and deletes in threads share them).
POOL = 16

_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied"}


def read_secret(path: str) -> str:
    """The secret key in ``path``: a regular file only its owner may read or write (mode 0600 or
    0400), as ssh asks of a private key; :class:`OffsiteError` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OffsiteError(f"S3 secret file {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OffsiteError(f"S3 secret file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise OffsiteError(
                f"S3 secret file {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may read it; "
                f"make it the hub user's alone (chmod 600 {path})"
            )
        data = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    secret = data.decode("utf-8", "replace").strip()
    if not secret or len(data) > MAX_SECRET or any(not 0x21 <= ord(c) <= 0x7E for c in secret):
        raise OffsiteError(f"S3 secret file {path} must hold one secret key (visible ASCII, at most {MAX_SECRET})")
    return secret


def content_md5(data: bytes | memoryview) -> str:
    """The ``Content-MD5`` header of ``data`` (base64 of the digest)."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def utc(epoch: float) -> datetime.datetime:
    """An epoch time as the timezone-aware datetime S3's retention takes."""
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)


@attrs.frozen
class Retention:
    """An object version's Object Lock retention: its mode and until when (epoch seconds)."""

    mode: LockMode
    until: float


@attrs.frozen
class Part:
    """One uploaded part as S3 lists it: its number, size and ETag (an MD5 hex for unencrypted parts)."""

    number: int
    size: int
    etag: str


class Bucket:
    """A copy target's bucket (``connect``); blocking calls, safe to share between threads."""

    def __init__(self, target: CopyTarget, client: Any) -> None:
        self.target = target
        self.name = target.bucket
        self.client = client

    @classmethod
    def connect(cls, target: CopyTarget) -> Bucket:
        """A client for ``target`` with the secret read from its file (:func:`read_secret`)."""
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=target.region,
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=POOL,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = boto3.client(
            "s3",
            endpoint_url=target.endpoint,
            aws_access_key_id=target.access_key,
            aws_secret_access_key=read_secret(target.secret_file),
            config=config,
        )
        return cls(target, client)

    def _call(self, what: str, key: str | None, call: Callable[..., T], **kwargs: Any) -> T:
        """``call(Bucket=..., **kwargs)`` with S3's and the network's errors as an :class:`OffsiteError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"{self.name}/{key}" if key else f"bucket {self.name}"
        try:
            return call(Bucket=self.name, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), error.get("Message") or ""
            text = f"S3 {what} of {where} at {self.target.endpoint} failed: {code} {message}".rstrip()
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"} or (code == "403" and key is None):
                text += f" (check the access key {self.target.access_key} and the secret in {self.target.secret_file})"
            raise OffsiteError(text, code) from exc
        except BotoCoreError as exc:
            raise OffsiteError(f"S3 {what} of {where} at {self.target.endpoint} failed: {exc}") from exc

    # -- the bucket ------------------------------------------------------------------

    def check_lock(self) -> None:
        """Refuse a bucket without Object Lock (or unreachable, or refusing our credentials), in a sentence."""
        try:
            found = self._call("reading the Object Lock configuration", None, self.client.get_object_lock_configuration)
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
        """Write a small object (with its MD5) locked until ``until``; its version ID."""
        answer = self._call(
            "writing", key, self.client.put_object, Key=key, Body=data, ContentMD5=content_md5(data),
            ObjectLockMode=self.target.lock_mode.value, ObjectLockRetainUntilDate=utc(until),
        )  # fmt: skip
        version = _version(answer, key)
        self.lock(key, version, until)
        return version

    def get(self, key: str, version: str | None = None, *, limit: int = 64 << 20) -> bytes:
        """A small object's bytes (at most ``limit``)."""
        extra = {"VersionId": version} if version else {}
        answer = self._call("reading", key, self.client.get_object, Key=key, **extra)
        if int(answer.get("ContentLength", 0)) > limit:
            answer["Body"].close()
            raise OffsiteError(f"S3 object {self.name}/{key} is larger than {limit} bytes")
        return bytes(answer["Body"].read())

    def read_range(self, key: str, version: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of an object version (one ranged GET; fewer at its end)."""
        answer = self._call(
            "reading", key, self.client.get_object, Key=key, VersionId=version,
            Range=f"bytes={offset}-{offset + length - 1}",
        )  # fmt: skip
        return bytes(answer["Body"].read())

    def stream(self, key: str, version: str) -> Any:
        """An object version's body as a stream (``read(n)``, ``close()``), for downloads."""
        return self._call("reading", key, self.client.get_object, Key=key, VersionId=version)["Body"]

    def size(self, key: str, version: str) -> int:
        """An object version's length."""
        return int(self._call("reading", key, self.client.head_object, Key=key, VersionId=version)["ContentLength"])

    def manifests(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` that end in ``.json`` (the copies' manifests), sorted."""
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            answer = self._call("listing", prefix, self.client.list_objects_v2, Prefix=prefix, **token)
            keys += [item["Key"] for item in answer.get("Contents", []) if item["Key"].endswith(".json")]
            if not answer.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": answer["NextContinuationToken"]}

    # -- Object Lock -----------------------------------------------------------------

    def retention(self, key: str, version: str) -> Retention | None:
        """An object version's retention (None: it has none)."""
        try:
            answer = self._call(
                "reading the retention", key, self.client.get_object_retention, Key=key, VersionId=version
            )
        except OffsiteError as exc:
            if exc.code in {"NoSuchObjectLockConfiguration", "ObjectLockConfigurationNotFoundError"}:
                return None
            raise
        found = answer["Retention"]
        return Retention(LockMode(found["Mode"]), found["RetainUntilDate"].timestamp())

    def lock(self, key: str, version: str, until: float) -> None:
        """Lock an object version in the target's mode until ``until`` at least (never shortened),
        and check that S3 holds it so."""
        held = self.retention(key, version)
        if held is None or held.until < until - 1:
            self._call(
                "locking", key, self.client.put_object_retention, Key=key, VersionId=version,
                Retention={"Mode": self.target.lock_mode.value, "RetainUntilDate": utc(until)},
            )  # fmt: skip
            held = self.retention(key, version)
        if held is None or held.until < until - 1:
            raise OffsiteError(f"S3 did not lock {self.name}/{key} (version {version}) until {utc(until):%FT%TZ}")

    def delete(self, key: str, version: str) -> None:
        """Delete one object version for good (not a delete marker); :class:`CopyLocked` when Object Lock
        refuses it."""
        try:
            self._call("deleting", key, self.client.delete_object, Key=key, VersionId=version)
        except OffsiteError as exc:
            if exc.code == "AccessDenied":
                held = self.retention(key, version)
                until = f" until {utc(held.until):%FT%TZ} ({held.mode.value})" if held is not None else ""
                raise CopyLocked(f"{self.name}/{key} is locked{until}: S3 refused to delete it ({exc})") from exc
            raise

    # -- multipart uploads -------------------------------------------------------------

    def start_upload(self, key: str, until: float) -> str:
        """A new multipart upload of ``key`` (asking for its lock already, where S3 honours that); its ID."""
        answer = self._call(
            "starting the upload", key, self.client.create_multipart_upload, Key=key,
            ObjectLockMode=self.target.lock_mode.value, ObjectLockRetainUntilDate=utc(until),
        )  # fmt: skip
        return str(answer["UploadId"])

    def upload_part(self, key: str, upload: str, number: int, data: memoryview) -> str:
        """Send one part with its Content-MD5; its ETag."""
        answer = self._call(
            f"uploading part {number}", key, self.client.upload_part, Key=key, UploadId=upload,
            PartNumber=number, Body=bytes(data), ContentMD5=content_md5(data),
        )  # fmt: skip
        return str(answer["ETag"])

    def parts(self, key: str, upload: str) -> list[Part] | None:
        """The parts S3 holds of an upload, by number; None when the upload is gone (aborted or expired)."""
        found: list[Part] = []
        marker = 0
        while True:
            try:
                answer = self._call(
                    "listing the parts", key, self.client.list_parts, Key=key, UploadId=upload, PartNumberMarker=marker
                )
            except OffsiteError as exc:
                if exc.code == "NoSuchUpload":
                    return None
                raise
            found += [Part(p["PartNumber"], p["Size"], p["ETag"].strip('"')) for p in answer.get("Parts", [])]
            if not answer.get("IsTruncated"):
                return sorted(found, key=lambda p: p.number)
            marker = int(answer["NextPartNumberMarker"])

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


def _version(answer: dict[str, Any], key: str) -> str:
    version = answer.get("VersionId")
    if not version or version == "null":
        raise OffsiteError(f"S3 gave {key} no version ID: the bucket has no versioning (Object Lock needs it)")
    return str(version)
