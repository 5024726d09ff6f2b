"""Restore points as the hub's store holds them, whatever store keeps their data."""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any

import attrs

from sendense_nbd.backup.records import SyncType


class PointStatus(enum.Enum):
    """Where a point is in its life; the values are what the store holds."""

    #: Its job is writing it.
    PENDING = "pending"
    #: A restore point, and a backing file for the next incremental.
    COMPLETED = "completed"
    #: Retention is dropping it into the point above (:meth:`Repository.recover` finishes that).
    MERGING = "merging"


class VerifyState(enum.Enum):
    """What the last verify found of a point; the values are what the store holds."""

    UNVERIFIED = "unverified"
    VERIFIED = "verified"
    DAMAGED = "damaged"


@attrs.frozen
class Point:
    """A restore point: one disk's image at one backup, a full or an incremental on ``backing``.

    ``path`` names its data in its store: a qcow2 file (the local store) or an RBD snapshot
    (``rbd:POOL/IMAGE@POINT-ID``, without the cluster's keys)."""

    id: str
    vm_path: str
    disk_key: int
    job_id: str
    kind: SyncType
    path: str
    backing: str | None
    size: int
    change_id: str | None
    disk_uuid: str | None
    status: PointStatus
    created: float
    completed: float | None
    #: What the job that made the point reported (docs/HUB_API.md); None: not reported.
    bytes_changed: int | None = None
    bytes_transferred: int | None = None
    #: The last verify's finding, when (epoch seconds), the first bad byte offset and why.
    verify_state: VerifyState = VerifyState.UNVERIFIED
    verified_at: float | None = None
    bad_offset: int | None = None
    verify_error: str | None = None
    #: The digest sidecar's file name; None until it is computed.
    digests: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Point:
        """A point from its row in the store."""
        state = VerifyState(row.get("verify_state") or VerifyState.UNVERIFIED.value)
        row = {name: value for name, value in row.items() if name != "seq"}  # the order of insertion
        return cls(
            **{**row, "kind": SyncType(row["kind"]), "status": PointStatus(row["status"]), "verify_state": state}
        )

    def to_json(self) -> dict[str, object]:
        """The point as the API shows it (and the store holds it): the enums as their values."""
        return {
            **attrs.asdict(self),
            "kind": self.kind.value,
            "status": self.status.value,
            "verify_state": self.verify_state.value,
        }


def vm_slug(vm_path: str) -> str:
    """A folder (or image) name for a VM: readable, and unique through a short hash."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", vm_path.strip("/"))[:80] or "vm"
    return f"{readable}-{hashlib.sha256(vm_path.encode()).hexdigest()[:8]}"
