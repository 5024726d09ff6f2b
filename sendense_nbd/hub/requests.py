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

from sendense_nbd.backup.records import FullReason, Mode
from sendense_nbd.errors import BadRequest
from sendense_nbd.fields import (
    MAX_DISK_KEY,
    MAX_DISKS,
    choice,
    identifier,
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


class RestoreAction(enum.Enum):
    """What ``POST /restores`` does with a point; also the mode of the restore job it makes."""

    EXPORT = "export"
    CONVERT = "convert"
    #: A new RBD image from the point's snapshot (an RBD repository only).
    CLONE = "clone"


# -- field checks -----------------------------------------------------------------


def reader(value: object) -> str | None:
    """Who may read an export that serves no node's job (a restore's, an offsite copy's): the name in the
    client certificate it admits, a node's name as ``tls init --node NAME`` issues it; None: not named."""
    if value is None:
        return None
    name = identifier(value)
    if name is None:
        raise BadRequest(
            "reader must be the name in a client certificate: 1-128 of letters, digits, '.', '_', ':', '-' "
            "(a node's registered name, as tls init --node NAME issued its certificate)"
        )
    return name


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


def _node_name(value: object) -> str:
    name = identifier(value) if isinstance(value, str) else None
    if name is None:
        raise BadRequest("node must be a node's name (letters, digits, '.', '_', '-')")
    return name


def _stage(value: object) -> str:
    return _message(value, "error.stage", 64) or "node"


def disk_key_query(value: str | None) -> int:
    """The ``disk_key`` of a query string: a VMware device key in decimal."""
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
    """A disk to back up: its VMware device key and, for a full point, its size in bytes."""

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
    """``POST /backups``: ``{"vm_path", "mode"?, "disks"?, "node"?}``.

    ``policy`` and ``full_reason`` are set only by the hub's scheduler (a policy's run, its chain cap).
    """

    vm_path: str
    mode: Mode
    disks: tuple[DiskSpec, ...] | None
    node: str | None = None
    policy: str | None = None
    full_reason: FullReason | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> BackupRequest:
        """Parse the body; unknown fields are refused."""
        json_object(body, "the body", frozenset({"vm_path", "mode", "disks", "node"}))
        disks = body.get("disks")
        node = body.get("node")
        return cls(
            vm_path(body.get("vm_path")),
            choice(body.get("mode", "auto"), "mode", Mode),
            None if disks is None else parse_disks(disks),
            None if node is None else _node_name(node),
        )


@attrs.frozen
class RestoreRequest:
    """``POST /restores``: ``{"point_id", "action"?, "format"?, "path"?, "reader"?, "image"?}``; a convert names
    a file, a clone an RBD image, an export may name its reader (:func:`reader`)."""

    point_id: str
    action: RestoreAction
    fmt: ImageFormat
    name: str | None
    reader: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RestoreRequest:
        """Parse the body; unknown fields, and a file or image name that is not one plain name, are refused."""
        json_object(body, "the body", frozenset({"point_id", "action", "format", "path", "reader", "image"}))
        point_id = text(body.get("point_id"), "point_id", limit=128)
        action = choice(body.get("action", "export"), "action", RestoreAction)
        if action is not RestoreAction.CONVERT and ("format" in body or "path" in body):
            raise BadRequest("format and path belong to action convert")
        if action is not RestoreAction.CLONE and "image" in body:
            raise BadRequest("image belongs to action clone")
        if action is RestoreAction.EXPORT:
            return cls(point_id, action, ImageFormat.QCOW2, None, reader(body.get("reader")))
        if "reader" in body:
            raise BadRequest("reader belongs to action export (it names who may read the export)")
        if action is RestoreAction.CLONE:
            image = body.get("image")
            if not isinstance(image, str) or not RESTORE_NAME.fullmatch(image):
                raise BadRequest("image must be a plain RBD image name (letters, digits, '.', '_', '-'; at most 128)")
            return cls(point_id, action, ImageFormat.RAW, image)
        fmt = choice(body.get("format", "raw"), "format", ImageFormat)
        name = body.get("path")
        if not isinstance(name, str) or not RESTORE_NAME.fullmatch(name):
            raise BadRequest(
                "path must be a plain file name (letters, digits, '.', '_', '-'; at most 128, not starting "
                "with '.'): the file is made in the hub's restore directory"
            )
        return cls(point_id, action, fmt, name)


@attrs.frozen
class Failure:
    """Why a job failed: where (``stage``), what happened (``message``) and a machine reason (``code``:
    ``node``, ``timeout``, ``cancelled``, ``restarted``, ``node_unavailable``, ``insufficient_space``...)."""

    stage: str
    message: str
    code: str | None = None

    @classmethod
    def from_json(cls, value: object, *, default_message: str, code: str | None = "node") -> Failure:
        """A node's ``error`` object (null: an empty one); the text is kept, never refused (see :func:`_message`).
        Its code is ``node`` (the node's own failure report) unless told otherwise."""
        error = {} if value is None else json_object(value, "error")
        return cls(_stage(error.get("stage", "node")), _message(error.get("message", default_message)), code)

    def to_json(self) -> dict[str, str | None]:
        """``{"stage", "code", "message"}``."""
        return {"stage": self.stage, "code": self.code, "message": self.message}


@attrs.frozen
class ReportedDisk:
    """One disk of a successful completion: what the next incremental of it starts from."""

    disk_key: int
    change_id: str | None
    disk_uuid: str | None
    #: Data bytes sent, and the bytes that changed (None: the node did not report it).
    bytes_transferred: int | None = None
    bytes_changed: int | None = None
    #: Why the node made a full copy (None: an incremental, or a code this hub does not know), in words.
    full_reason: FullReason | None = None
    full_reason_detail: str | None = None


@attrs.frozen
class Completion:
    """``POST /backups/{job}/complete`` (docs/HUB_API.md), fully checked."""

    vm_path: str | None
    disks: tuple[ReportedDisk, ...]
    #: Set when the node reports a failure (``disks`` is then empty).
    failure: Failure | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Completion:
        """Parse a node's completion report; fields this hub does not know are ignored."""
        status = body.get("status")
        path = None if body.get("vm_path") is None else vm_path(body.get("vm_path"))
        if status == "failed":
            return cls(path, (), Failure.from_json(body.get("error"), default_message="the node reported a failure"))
        if status != "completed":
            raise BadRequest("status is completed or failed")
        disks = tuple(
            _reported_disk(item, f"disks[{i}]")
            for i, item in enumerate(json_list(body.get("disks"), "disks", MAX_DISKS))
        )
        if len({d.disk_key for d in disks}) != len(disks):
            raise BadRequest("a disk_key is reported twice")
        return cls(path, disks)


def _reported_disk(value: object, where: str) -> ReportedDisk:
    disk = json_object(value, where)
    counts = {
        name: integer(disk[name], f"{where}.{name}", 0, MAX_COUNT)
        for name in ("capacity", "bytes_transferred", "bytes_zeroed", "bytes_changed")
        if disk.get(name) is not None
    }
    for name, limit in (("sync_type", 32), ("target", 2048)):
        _optional_text(disk.get(name), f"{where}.{name}", limit=limit)
    reason, detail = _full_reason(disk.get("full_reason"), disk.get("full_reason_detail"), where)
    return ReportedDisk(
        integer(disk.get("disk_key"), f"{where}.disk_key", 0, MAX_DISK_KEY),
        _optional_text(disk.get("change_id"), f"{where}.change_id"),
        _optional_text(disk.get("disk_uuid"), f"{where}.disk_uuid", limit=128),
        counts.get("bytes_transferred"),
        counts.get("bytes_changed"),
        reason,
        detail,
    )


def _full_reason(code: object, detail: object, where: str) -> tuple[FullReason | None, str | None]:
    """A disk's ``full_reason`` code and its ``full_reason_detail``; never refused for their text.

    A code this hub does not know (a newer node's) is kept as null, the code going into the detail;
    an older node sends its reason as text in ``full_reason``: that becomes the detail too.
    """
    text_detail = None if detail is None else _message(detail, f"{where}.full_reason_detail", 1024)
    if code is None:
        return None, text_detail
    words = _message(code, f"{where}.full_reason", 1024)
    try:
        return FullReason(words), text_detail
    except ValueError:
        return None, text_detail or words


_PROGRESS_NUMBERS = (
    "bytes_transferred", "bytes_changed", "total_bytes", "percent", "throughput_bps", "eta_seconds", "elapsed_seconds",
)  # fmt: skip
_DISK_NUMBERS = (
    "total_bytes", "bytes_transferred", "bytes_zeroed", "bytes_skipped", "disk_size", "throughput_bps", "eta_seconds",
    "bytes_changed",
)  # fmt: skip
PROGRESS_STATUSES = ("running", "completed", "failed", "cancelled")
#: A progress report lists at most this many stages of its node's history.
MAX_REPORTED_STAGES = 64


def _numbers(body: Mapping[str, Any], names: tuple[str, ...], where: str) -> dict[str, Any]:
    """The ``names`` given in ``body`` (not null), each a checked number."""
    return {name: _number(body[name], where + name) for name in names if body.get(name) is not None}


@attrs.frozen(kw_only=True)
class DiskProgress:
    """One disk of a progress report; a None field was not reported (and is not shown)."""

    disk_key: int
    sync_type: str | None = None
    total_bytes: float | None = None
    bytes_transferred: float | None = None
    bytes_zeroed: float | None = None
    bytes_skipped: float | None = None
    disk_size: float | None = None
    throughput_bps: float | None = None
    eta_seconds: float | None = None
    done: bool | None = None
    bytes_changed: float | None = None

    @classmethod
    def from_json(cls, value: object, where: str) -> DiskProgress:
        """Parse ``disks[i]`` of a report: the known fields, checked; others dropped."""
        disk = json_object(value, where)
        key = integer(disk.get("disk_key"), f"{where}.disk_key", 0, MAX_DISK_KEY)
        sync_type = disk.get("sync_type")
        if sync_type is not None:
            sync_type = "" if sync_type == "" else text(sync_type, f"{where}.sync_type", limit=32)
        numbers = _numbers(disk, _DISK_NUMBERS, where + ".")
        done = disk.get("done")
        if done is not None and not isinstance(done, bool):
            raise BadRequest(f"{where}.done must be true or false")
        return cls(disk_key=key, sync_type=sync_type, done=done, **numbers)


@attrs.frozen
class NodeStage:
    """One stage in a node's history: its name and when it started, in seconds after the job started."""

    name: str
    elapsed: float


def _node_stages(value: object) -> tuple[NodeStage, ...]:
    """A report's ``stages``: ``[{"name", "elapsed"}]``, at most :data:`MAX_REPORTED_STAGES`, checked."""
    items = json_list(value, "stages", MAX_REPORTED_STAGES)
    out = []
    for i, item in enumerate(items):
        stage = json_object(item, f"stages[{i}]")
        name = _message(stage.get("name"), f"stages[{i}].name", 64) or "node"
        out.append(NodeStage(name, _number(stage.get("elapsed"), f"stages[{i}].elapsed")))
    return tuple(out)


@attrs.frozen(kw_only=True)
class Progress:
    """``POST /backups/{job}/progress`` (docs/HUB_API.md §2); a None field was not reported."""

    job_id: str | None = None
    stage: str | None = None
    status: str | None = None
    bytes_transferred: float | None = None
    total_bytes: float | None = None
    percent: float | None = None
    throughput_bps: float | None = None
    eta_seconds: float | None = None
    elapsed_seconds: float | None = None
    bytes_changed: float | None = None
    disks: tuple[DiskProgress, ...] | None = None
    error: Failure | None = None
    #: The node's stages so far, each with its start (seconds after the job started).
    stages: tuple[NodeStage, ...] | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Progress:
        """Parse a report: the known fields, checked; other fields are dropped."""
        names: dict[str, Any] = {
            name: _optional_text(body[name], name, limit=128) or "" for name in ("job_id", "stage")
            if body.get(name) is not None
        }  # fmt: skip
        status = body.get("status")
        if status is not None and status not in PROGRESS_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(PROGRESS_STATUSES)}")
        numbers = _numbers(body, _PROGRESS_NUMBERS, "")
        disks = None
        if body.get("disks") is not None:
            items = json_list(body["disks"], "disks", MAX_DISKS)
            disks = tuple(DiskProgress.from_json(item, f"disks[{i}]") for i, item in enumerate(items))
        error = body.get("error")
        failure = None if error is None else Failure.from_json(error, default_message="", code=None)
        stages = None if body.get("stages") is None else _node_stages(body["stages"])
        return cls(status=status, disks=disks, error=failure, stages=stages, **names, **numbers)

    @property
    def running(self) -> bool:
        """The node says the job still runs."""
        return self.status == "running"

    def to_json(self) -> dict[str, Any]:
        """The report as JSON, without the fields that were not reported."""
        out = attrs.asdict(self, filter=lambda _, value: value is not None)
        for name in ("disks", "stages"):
            if name in out:
                out[name] = list(out[name])
        return out
