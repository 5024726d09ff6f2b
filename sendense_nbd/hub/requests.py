"""Hub API requests, parsed at the edge into frozen values before anything changes state.

Types are exact (``true`` is not an integer, ``"5"`` is not a number),
integers and strings are bounded, identifiers carry no control characters,
and operator requests (``POST /backups``, ``POST /restores``) refuse unknown
fields, so a typo is an error rather than a silent default. The node's
reports (progress, completion) ignore fields they do not know, so a newer
node still talks to this hub. Every refusal is a :class:`BadRequest` (400).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

import attrs

from sendense_nbd.errors import BadRequest
from sendense_nbd.fields import (
    MAX_DISK_KEY,
    MAX_DISKS,
    choice,
    integer,
    json_list,
    json_object,
    text,
    vm_path,
)
from sendense_nbd.storage.modes import ImageFormat

#: Largest disk the hub takes: VMware's largest virtual disk is 62 TB. A qcow2 point of this size
#: has a 1 MiB L1 table (qemu's limit, 2 PiB at 64 KiB clusters, would make it 32 MiB per export).
MAX_DISK_CAPACITY = 64 << 40
#: Byte counts and other numbers in node reports.
MAX_COUNT = (1 << 63) - 1
#: Free text (a failure's message) is cut to this many characters.
MAX_MESSAGE = 4096
#: A restore file name: one plain path component, not hidden (so never ``..`` nor a temporary name).
RESTORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MESSAGE_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


class Mode(enum.Enum):
    FULL = "full"
    INCREMENTAL = "incremental"
    AUTO = "auto"


class RestoreAction(enum.Enum):
    EXPORT = "export"
    CONVERT = "convert"


# -- field checks -----------------------------------------------------------------


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_COUNT:
        raise BadRequest(f"{name} must be a number from 0 to {MAX_COUNT}")
    return value


def _optional_text(value: object, name: str, *, limit: int = 256) -> str | None:
    """:func:`text`, or None for null and for the empty string."""
    return None if value is None or value == "" else text(value, name, limit=limit)


def _message(value: object, name: str = "error.message", limit: int = MAX_MESSAGE) -> str:
    """Free text from a node: any string, cut to ``limit``, controls but tab/newline replaced.

    A failure report must not be refused for its text, or its job would wait for its timeout.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return _MESSAGE_CONTROL.sub("\ufffd", value[:limit])


def _stage(value: object) -> str:
    return _message(value, "error.stage", 64) or "node"


def disk_key_query(value: str | None) -> int:
    if value is None or not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > MAX_DISK_KEY:
        raise BadRequest(f"disk_key must be an integer from 0 to {MAX_DISK_KEY}")
    return int(value)


def capacity(value: object, name: str) -> int:
    """A disk size in bytes: whole 512-byte sectors, from 512 B to :data:`MAX_DISK_CAPACITY`."""
    size = integer(value, name, 512, MAX_DISK_CAPACITY)
    if size % 512:
        raise BadRequest(f"{name} must be a multiple of 512 bytes (whole sectors)")
    return size


# -- requests ---------------------------------------------------------------------


@attrs.frozen
class DiskSpec:
    key: int
    capacity: int | None


def parse_disks(value: object, name: str = "disks") -> tuple[DiskSpec, ...]:
    """``[{"key": 2000, "capacity": 17179869184}, ...]`` (or bare keys); keys unique."""
    items = json_list(value, name, MAX_DISKS)
    if not items:
        raise BadRequest(f"{name} is a non-empty list of {{key, capacity}}")
    out: list[DiskSpec] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(item, dict):
            disk = json_object(item, where, frozenset({"key", "capacity"}))
            key = integer(disk.get("key"), f"{where}.key (a VMware device key)", 0, MAX_DISK_KEY)
            size = disk.get("capacity")
            out.append(DiskSpec(key, None if size is None else capacity(size, f"{where}.capacity")))
        else:
            out.append(DiskSpec(integer(item, f"{where} (a VMware device key)", 0, MAX_DISK_KEY), None))
    if len({d.key for d in out}) != len(out):
        raise BadRequest(f"a disk key is given twice in {name}")
    return tuple(out)


@attrs.frozen
class BackupRequest:
    """``POST /backups``: ``{"vm_path", "mode"?, "disks"?}``."""

    vm_path: str
    mode: Mode
    disks: tuple[DiskSpec, ...] | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> BackupRequest:
        json_object(body, "the body", frozenset({"vm_path", "mode", "disks"}))
        disks = body.get("disks")
        return cls(
            vm_path(body.get("vm_path")),
            choice(body.get("mode", "auto"), "mode", Mode),
            None if disks is None else parse_disks(disks),
        )


@attrs.frozen
class RestoreRequest:
    """``POST /restores``: ``{"point_id", "action"?, "format"?, "path"?}``; a convert names a file."""

    point_id: str
    action: RestoreAction
    fmt: ImageFormat
    name: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RestoreRequest:
        json_object(body, "the body", frozenset({"point_id", "action", "format", "path"}))
        point_id = text(body.get("point_id"), "point_id", limit=128)
        action = choice(body.get("action", "export"), "action", RestoreAction)
        if action is RestoreAction.EXPORT:
            if "format" in body or "path" in body:
                raise BadRequest("format and path belong to action convert")
            return cls(point_id, action, ImageFormat.QCOW2, None)
        fmt = choice(body.get("format", "raw"), "format", ImageFormat)
        name = body.get("path")
        if not isinstance(name, str) or not RESTORE_NAME.fullmatch(name):
            raise BadRequest(
                "path must be a plain file name (letters, digits, '.', '_', '-'; at most 128, not starting "
                "with '.'): the file is made in the hub's restore directory"
            )
        return cls(point_id, action, fmt, name)


@attrs.frozen
class ReportedDisk:
    disk_key: int
    change_id: str | None
    disk_uuid: str | None


@attrs.frozen
class Completion:
    """``POST /backups/{job}/complete`` (docs/HUB_API.md), fully checked."""

    status: str  # completed | failed
    vm_path: str | None
    disks: tuple[ReportedDisk, ...]
    stage: str
    message: str

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Completion:
        status = body.get("status")
        path = None if body.get("vm_path") is None else vm_path(body.get("vm_path"))
        if status == "failed":
            error = body.get("error")
            error = {} if error is None else json_object(error, "error")
            stage = _stage(error.get("stage", "node"))
            return cls("failed", path, (), stage, _message(error.get("message", "the node reported a failure")))
        if status != "completed":
            raise BadRequest("status is completed or failed")
        disks = tuple(
            _reported_disk(item, f"disks[{i}]")
            for i, item in enumerate(json_list(body.get("disks"), "disks", MAX_DISKS))
        )
        if len({d.disk_key for d in disks}) != len(disks):
            raise BadRequest("a disk_key is reported twice")
        return cls("completed", path, disks, "", "")


def _reported_disk(value: object, where: str) -> ReportedDisk:
    disk = json_object(value, where)
    for name in ("capacity", "bytes_transferred", "bytes_zeroed"):
        if disk.get(name) is not None:
            integer(disk[name], f"{where}.{name}", 0, MAX_COUNT)
    for name, limit in (("sync_type", 32), ("target", 2048)):
        _optional_text(disk.get(name), f"{where}.{name}", limit=limit)
    if disk.get("full_reason") is not None:
        _message(disk["full_reason"])
    return ReportedDisk(
        integer(disk.get("disk_key"), f"{where}.disk_key", 0, MAX_DISK_KEY),
        _optional_text(disk.get("change_id"), f"{where}.change_id"),
        _optional_text(disk.get("disk_uuid"), f"{where}.disk_uuid", limit=128),
    )


_PROGRESS_NUMBERS = ("bytes_transferred", "total_bytes", "percent", "throughput_bps", "eta_seconds", "elapsed_seconds")
_DISK_NUMBERS = (
    "total_bytes", "bytes_transferred", "bytes_zeroed", "bytes_skipped", "disk_size", "throughput_bps", "eta_seconds",
)  # fmt: skip
PROGRESS_STATUSES = ("running", "completed", "failed", "cancelled")


def parse_progress(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /backups/{job}/progress``: the known fields, checked; other fields are dropped."""
    out: dict[str, Any] = {}
    for name in ("job_id", "stage"):
        if body.get(name) is not None:
            out[name] = _optional_text(body[name], name, limit=128) or ""
    status = body.get("status")
    if status is not None:
        if status not in PROGRESS_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(PROGRESS_STATUSES)}")
        out["status"] = status
    out.update(_numbers(body, _PROGRESS_NUMBERS, ""))
    if body.get("disks") is not None:
        out["disks"] = [
            _progress_disk(item, f"disks[{i}]") for i, item in enumerate(json_list(body["disks"], "disks", MAX_DISKS))
        ]
    error = body.get("error")
    if error is not None:
        error = json_object(error, "error")
        out["error"] = {
            "stage": _stage(error.get("stage", "node")),
            "message": _message(error.get("message", "")),
        }
    return out


def _numbers(body: Mapping[str, Any], names: tuple[str, ...], where: str) -> dict[str, Any]:
    return {name: _number(body[name], where + name) for name in names if body.get(name) is not None}


def _progress_disk(value: object, where: str) -> dict[str, Any]:
    disk = json_object(value, where)
    out: dict[str, Any] = {"disk_key": integer(disk.get("disk_key"), f"{where}.disk_key", 0, MAX_DISK_KEY)}
    sync_type = disk.get("sync_type")
    if sync_type is not None:
        out["sync_type"] = "" if sync_type == "" else text(sync_type, f"{where}.sync_type", limit=32)
    out.update(_numbers(disk, _DISK_NUMBERS, where + "."))
    if disk.get("done") is not None:
        if not isinstance(disk["done"], bool):
            raise BadRequest(f"{where}.done must be true or false")
        out["done"] = disk["done"]
    return out
