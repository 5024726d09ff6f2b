"""What a backup reads before it starts and records when it ends: change IDs per disk."""

from __future__ import annotations

import enum

import attrs


class Mode(enum.Enum):
    """What a job is asked to do. ``auto``: incremental where a valid previous change ID exists, else full."""

    FULL = "full"
    INCREMENTAL = "incremental"
    AUTO = "auto"


class FullReason(enum.Enum):
    """Why a disk (or a job) got a full copy; the value is the code the APIs show."""

    #: Mode full was asked for (by an operator, or a policy's mode).
    REQUESTED = "requested"
    #: No point of this disk exists yet (no previous change ID).
    FIRST_BACKUP = "first_backup"
    #: The change ID was refused, CBT was just enabled, or the disk's identity or size changed.
    CBT_RESET = "cbt_reset"
    #: The policy's ``full_every`` was reached.
    CHAIN_CAP = "chain_cap"
    #: The disk had points, but none is usable as a base (deleted, or without a change ID).
    BASE_MISSING = "base_missing"
    #: The latest point is damaged (a verify job found it).
    VERIFY_FAILED = "verify_failed"


class SyncType(enum.Enum):
    """What a disk's copy was."""

    FULL = "full"
    INCREMENTAL = "incremental"


@attrs.frozen
class PreviousBackup:
    """The last completed backup of one disk: where the next incremental starts."""

    change_id: str
    disk_uuid: str | None = None
    capacity: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PreviousBackup:
        """From the hub's or the state file's record; ValueError without a change ID."""
        change_id = data.get("change_id")
        if not isinstance(change_id, str) or not change_id:
            raise ValueError(f"no change_id in {data!r}")
        uuid = data.get("disk_uuid")
        capacity = data.get("capacity")
        return cls(change_id, uuid if isinstance(uuid, str) else None, capacity if isinstance(capacity, int) else None)


@attrs.frozen
class DiskResult:
    """One disk's part of a finished, flushed backup."""

    disk_key: int
    disk_uuid: str | None
    capacity: int
    #: The snapshot's change ID: the next incremental starts here (None: CBT is off).
    change_id: str | None
    sync_type: SyncType
    #: Data bytes the copy sent to the target.
    bytes_transferred: int
    bytes_zeroed: int
    target: str
    #: Why this disk got a full copy (None for an incremental), and the same in words.
    full_reason: FullReason | None = None
    full_reason_detail: str | None = None
    #: Bytes that changed: the union of the CBT areas for an incremental; for a full, the data bytes read.
    #: ``bytes_transferred`` exceeds it only by what merging areas (``merge_gap``) and block rounding added.
    bytes_changed: int = 0

    def to_json(self) -> dict[str, object]:
        """As the hub API's ``complete`` call takes it."""
        return {
            "disk_key": self.disk_key,
            "disk_uuid": self.disk_uuid,
            "capacity": self.capacity,
            "change_id": self.change_id,
            "sync_type": self.sync_type.value,
            "bytes_transferred": self.bytes_transferred,
            "bytes_zeroed": self.bytes_zeroed,
            "bytes_changed": self.bytes_changed,
            "target": self.target,
            "full_reason": None if self.full_reason is None else self.full_reason.value,
            "full_reason_detail": self.full_reason_detail,
        }
