"""A policy's offsite copy target: an S3 bucket with Object Lock, and how its copies are locked.

Parsed strictly like every policy field (:meth:`CopyTarget.from_json`); the
secret is never part of the policy, only the path of a file holding it, which
the hub reads (and refuses unless only its owner may read it) when the policy
is stored and before each copy (:mod:`sendense_nbd.offsite.s3`).

A copy chain is a full copy and the incrementals on it. Every object of a
chain is locked until ``retain + margin`` seconds after the chain's newest
copy was made, extended as copies join it; after ``seal_every`` points the chain is
sealed and the next copy starts a new chain with a full (docs/STORAGE.md).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from typing import Any

import attrs

from sendense_nbd import fields
from sendense_nbd.errors import BadRequest

COPY_FIELDS = frozenset(
    "endpoint bucket region access_key secret_file prefix lock_mode retain margin seal_every".split()
)
#: S3's bucket names (DNS-compatible: lower case, digits, dots and hyphens, 3 to 63).
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
REGION = re.compile(r"[a-z0-9-]{1,64}")
ACCESS_KEY = re.compile(r"[\x21-\x7e]{1,128}")
#: A key prefix: path-like, no leading slash, ends with one; no ``.`` or ``..`` folder (see :func:`_prefix`).
PREFIX = re.compile(r"(?:[A-Za-z0-9._-]+/){1,8}")
#: A host name of an endpoint: DNS labels.
HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
MAX_RETAIN = 100 * 366 * 86400.0
MAX_MARGIN = 366 * 86400.0
#: Points per chain at most: the qcow2 engine opens backing chains of at most 16 files
#: (:data:`sendense_nbd.storage.qcow2.device.MAX_CHAIN`), and a copy is served and verified through it.
MAX_SEAL_EVERY = 16
#: Points per chain when neither the target nor the policy's full_every says.
DEFAULT_SEAL_EVERY = 7
DEFAULT_PREFIX = "sendense/"


class LockMode(enum.Enum):
    """S3 Object Lock retention modes: GOVERNANCE can be lifted by a user allowed to bypass it,
    COMPLIANCE by nobody until it expires."""

    GOVERNANCE = "GOVERNANCE"
    COMPLIANCE = "COMPLIANCE"


def _seconds(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number of seconds from {low:g} to {high:g}")
    return float(value)


def _endpoint(value: object, name: str) -> str:
    """An S3 endpoint: ``http(s)://host[:port][/]``, the host a DNS name or an IP address that is not
    link-local (169.254.0.0/16 holds cloud metadata services), unspecified or multicast; port 1-65535."""
    what = f"{name} must be an http:// or https:// URL with a host (and a port from 1 to 65535), nothing else"
    if not isinstance(value, str) or len(value) > 300:
        raise BadRequest(what)
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
    except ValueError:
        raise BadRequest(what) from None
    if url.scheme not in {"http", "https"} or url.path not in {"", "/"} or url.query or url.fragment:
        raise BadRequest(what)
    host = url.hostname or ""
    if url.username is not None or port == 0 or not host or url.netloc.endswith(":"):
        raise BadRequest(what)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.startswith("[") or not HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
            raise BadRequest(what) from None
        return value.rstrip("/")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local or address.is_unspecified or address.is_multicast:
        raise BadRequest(f"{name}: {address} is a link-local, unspecified or multicast address, not an S3 service")
    return value.rstrip("/")


def _prefix(value: object, name: str) -> str:
    """A key prefix like ``backups/`` (:data:`PREFIX`), without ``.`` or ``..`` folders."""
    found = _match(value, name, PREFIX, "like backups/ (folders of A-Z a-z 0-9 . _ -, each ending in /)")
    if any(part in {".", ".."} for part in found.split("/")):
        raise BadRequest(f"{name} must not have . or .. folders")
    return found


def _seal_every(value: object, name: str) -> int:
    """Points per chain: 1 to :data:`MAX_SEAL_EVERY`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEAL_EVERY:
        raise BadRequest(
            f"{name} must be an integer from 1 to {MAX_SEAL_EVERY} (a copy is read through its chain's "
            f"backing files, at most {MAX_SEAL_EVERY})"
        )
    return value


def _match(value: object, name: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BadRequest(f"{name} must be {what}")
    return value


@attrs.frozen
class CopyTarget:
    """Where a policy's points are copied and how they are locked (module docstring).

    ``retain``: seconds a point's copy stays locked and kept after the newest
    copy of its chain was made; ``margin``: added to every lock (covers the time until
    the next point extends it, and clock skew); ``seal_every``: points per
    chain (None: the policy's ``full_every`` + 1, else :data:`DEFAULT_SEAL_EVERY`).
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_file: str
    retain: float
    region: str = "us-east-1"
    prefix: str = DEFAULT_PREFIX
    lock_mode: LockMode = LockMode.GOVERNANCE
    margin: float = 86400.0
    seal_every: int | None = None

    @classmethod
    def from_json(cls, body: object, name: str = "copy") -> CopyTarget:
        """From ``{"endpoint", "bucket", "access_key", "secret_file", "retain", ...}``; BadRequest naming the field."""
        data = fields.json_object(body, name, COPY_FIELDS)
        missing = sorted({"endpoint", "bucket", "access_key", "secret_file", "retain"} - data.keys())
        if missing:
            raise BadRequest(f"{name} needs {', '.join(missing)}")
        secret_file = fields.text(data["secret_file"], f"{name}.secret_file", limit=4096)
        if not secret_file.startswith("/"):
            raise BadRequest(f"{name}.secret_file must be an absolute path (a file on the hub, mode 0600)")

        def given(key: str, default: Any, parse: Any) -> Any:
            return default if data.get(key) is None else parse(data[key])

        return cls(
            endpoint=_endpoint(data["endpoint"], f"{name}.endpoint"),
            bucket=_match(data["bucket"], f"{name}.bucket", BUCKET, "an S3 bucket name (3-63 of a-z 0-9 . -)"),
            access_key=_match(data["access_key"], f"{name}.access_key", ACCESS_KEY, "1-128 visible ASCII characters"),
            secret_file=secret_file,
            retain=_seconds(data["retain"], f"{name}.retain", 1, MAX_RETAIN),
            region=given("region", "us-east-1", lambda v: _match(v, f"{name}.region", REGION, "a region (a-z 0-9 -)")),
            prefix=given("prefix", DEFAULT_PREFIX, lambda v: _prefix(v, f"{name}.prefix")),
            lock_mode=given(
                "lock_mode", LockMode.GOVERNANCE, lambda v: fields.choice(v, f"{name}.lock_mode", LockMode)
            ),
            margin=given("margin", 86400.0, lambda v: _seconds(v, f"{name}.margin", 0, MAX_MARGIN)),
            seal_every=given("seal_every", None, lambda v: _seal_every(v, f"{name}.seal_every")),
        )

    def to_json(self) -> dict[str, object]:
        """Every field, as :meth:`from_json` reads it (``seal_every`` null when the policy decides)."""
        return {**attrs.asdict(self), "lock_mode": self.lock_mode.value}

    def chain_length(self, full_every: int | None) -> int:
        """Points per chain: ``seal_every``, else the policy's chain cap (``full_every`` incrementals
        after a full), else :data:`DEFAULT_SEAL_EVERY`; never more than :data:`MAX_SEAL_EVERY`."""
        if self.seal_every is not None:
            return min(self.seal_every, MAX_SEAL_EVERY)
        return min(full_every + 1, MAX_SEAL_EVERY) if full_every is not None else DEFAULT_SEAL_EVERY

    def place(self) -> tuple[str, str, str, str, LockMode]:
        """Where and how its copies are written: endpoint, region, bucket, prefix and lock mode. A chain
        continues only in the same place (a copy joining it relocks the chain's objects there)."""
        return (self.endpoint, self.region, self.bucket, self.prefix, self.lock_mode)
