"""Change the disks of the simulated VMs the way a guest would, and keep the CBT record vcsim reads.

Pure stdlib. State directory layout (created by ``vcsim -state DIR``)::

    DIR/vcsim.json                      the JSON line vcsim printed at startup
    DIR/disks/<vm-moref>/<key>.raw      live data of each disk (sparse, capacity bytes)
    DIR/changes/<vm-moref>/<key>.jsonl  change log: one {"offset": O, "length": L} per write/zero
    DIR/changes/<vm-moref>/<key>.cbtid  the disk's current CBT id ("52 xx .. xx-xx .. xx")
    DIR/snapshots/<snap-moref>/<key>.raw  frozen copy of each disk at snapshot creation
    DIR/snapshots/<snap-moref>/meta.json  snapshot record (vm, per-disk changeId, sequence)
    DIR/faults/<MethodName>             fault injection: the next call(s) of that vSphere method fail

``vm`` arguments accept a VM moref (``vm-57``), name (``DC0_H0_VM0``) or inventory path
(``/DC0/vm/DC0_H0_VM0``).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

__all__ = [
    "changes",
    "cbt_id",
    "clear_fault",
    "disk_path",
    "inject_fault",
    "manifest",
    "read",
    "reset_cbt",
    "snapshot_meta",
    "snapshot_path",
    "vm_moref",
    "write",
    "zero",
]


def manifest(state_dir: str | os.PathLike[str]) -> dict:
    """The JSON document vcsim printed at startup (also saved as DIR/vcsim.json)."""
    return json.loads((Path(state_dir) / "vcsim.json").read_text())


def vm_moref(state_dir: str | os.PathLike[str], vm: str) -> str:
    if vm.startswith("vm-"):
        return vm
    for v in manifest(state_dir)["vms"]:
        if vm in (v["name"], v["path"], v["moref"]):
            return v["moref"]
    raise KeyError(f"unknown VM {vm!r}")


def disk_path(state_dir: str | os.PathLike[str], vm: str, disk_key: int) -> Path:
    p = Path(state_dir) / "disks" / vm_moref(state_dir, vm) / f"{int(disk_key)}.raw"
    if not p.exists():
        raise KeyError(f"no disk {disk_key} on VM {vm!r} ({p})")
    return p


def _log_path(state_dir: str | os.PathLike[str], vm: str, disk_key: int) -> Path:
    return Path(state_dir) / "changes" / vm_moref(state_dir, vm) / f"{int(disk_key)}.jsonl"


def _record(state_dir: str | os.PathLike[str], vm: str, disk_key: int, offset: int, length: int) -> None:
    p = _log_path(state_dir, vm, disk_key)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"offset": offset, "length": length}) + "\n"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _check_range(path: Path, offset: int, length: int) -> None:
    size = path.stat().st_size
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} outside disk of {size} bytes")


def write(state_dir: str | os.PathLike[str], vm: str, disk_key: int, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` into the live disk and record the change."""
    p = disk_path(state_dir, vm, disk_key)
    _check_range(p, offset, len(data))
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _record(state_dir, vm, disk_key, offset, len(data))


def zero(state_dir: str | os.PathLike[str], vm: str, disk_key: int, offset: int, length: int) -> None:
    """Zero ``length`` bytes at ``offset`` (punching a hole where the file system can) and record it."""
    p = disk_path(state_dir, vm, disk_key)
    _check_range(p, offset, length)
    with open(p, "r+b") as f:
        punched = False
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
            # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
            punched = length == 0 or libc.fallocate(f.fileno(), 0x01 | 0x02, offset, length) == 0
        except (OSError, AttributeError):
            punched = False
        if not punched:
            f.seek(offset)
            remaining = length
            chunk = b"\0" * min(remaining, 1 << 20)
            while remaining:
                n = min(remaining, len(chunk))
                f.write(chunk[:n])
                remaining -= n
        f.flush()
        os.fsync(f.fileno())
    _record(state_dir, vm, disk_key, offset, length)


def read(
    state_dir: str | os.PathLike[str], vm: str, disk_key: int, offset: int = 0, length: int | None = None
) -> bytes:
    """Read the live disk."""
    p = disk_path(state_dir, vm, disk_key)
    with open(p, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def changes(state_dir: str | os.PathLike[str], vm: str, disk_key: int) -> list[dict]:
    """All change records of a disk, oldest first."""
    p = _log_path(state_dir, vm, disk_key)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def cbt_id(state_dir: str | os.PathLike[str], vm: str, disk_key: int) -> str:
    """The disk's current CBT id (the part of a change ID before ``/``)."""
    p = Path(state_dir) / "changes" / vm_moref(state_dir, vm) / f"{int(disk_key)}.cbtid"
    return p.read_text().strip()


def new_cbt_id() -> str:
    b = bytearray(secrets.token_bytes(16))
    b[0] = 0x52
    h = [f"{x:02x}" for x in b]
    return " ".join(h[:8]) + "-" + " ".join(h[8:])


def reset_cbt(state_dir: str | os.PathLike[str], vm: str, disk_key: int) -> str:
    """Simulate a CBT reset of one disk: its CBT id changes, so every earlier change ID becomes invalid.

    Snapshots taken after the reset get change IDs with the new id. Returns the new id.
    """
    disk_path(state_dir, vm, disk_key)  # validates the disk
    p = Path(state_dir) / "changes" / vm_moref(state_dir, vm) / f"{int(disk_key)}.cbtid"
    new = new_cbt_id()
    tmp = p.with_suffix(".tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, p)
    return new


def snapshot_path(state_dir: str | os.PathLike[str], snapshot: str, disk_key: int) -> Path:
    """The frozen copy of a disk taken at snapshot creation (gone once the snapshot is removed)."""
    return Path(state_dir) / "snapshots" / snapshot / f"{int(disk_key)}.raw"


def snapshot_meta(state_dir: str | os.PathLike[str], snapshot: str) -> dict:
    return json.loads((Path(state_dir) / "snapshots" / snapshot / "meta.json").read_text())


def inject_fault(state_dir: str | os.PathLike[str], method: str, times: int | None = None, fault: str = "") -> Path:
    """Make vcsim fail the next ``times`` calls of ``method`` (every call when None) until ``clear_fault``.

    ``method`` is the vSphere method name (``RemoveSnapshot_Task``, ``CreateSnapshot_Task``,
    ``ReconfigVM_Task``, ``QueryChangedDiskAreas``, ...). A task method's task ends in state error
    without doing anything; other methods answer with a SOAP fault. ``fault`` picks the fault:
    ``FileFault`` (the default), ``TaskInProgress``, ``InvalidState`` or ``SystemError``.
    """
    if times is not None and times < 1:
        raise ValueError(f"times must be >= 1, not {times}")
    p = Path(state_dir) / "faults" / method
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{method}.tmp")
    tmp.write_text(f"{'always' if times is None else times} {fault}".strip() + "\n")
    os.replace(tmp, p)
    return p


def clear_fault(state_dir: str | os.PathLike[str], method: str) -> None:
    """Stop injecting faults into ``method`` (no error when none was set or all were used)."""
    (Path(state_dir) / "faults" / method).unlink(missing_ok=True)
