"""Standalone change-ID store: a local JSON file, replaced atomically.

Used when no hub API is configured. Layout::

    {"version": 1, "vms": {"/DC/vm/name": {"2000": {"change_id": ..., "disk_uuid": ...,
                                                   "capacity": ..., "job_id": ..., "time": ...}}}}
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Sequence

from sendense_nbd.backup.records import DiskResult, PreviousBackup
from sendense_nbd.errors import BackupError


class StateFile:
    """Change IDs per VM and disk key in ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, dict[str, object]]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BackupError(f"cannot read the state file {self.path}: {exc}", "initializing", reason=exc) from exc
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("vms"), dict):
            raise BackupError(f"{self.path} is not a sendense state file (version 1)", "initializing")
        vms: dict[str, dict[str, dict[str, object]]] = data["vms"]
        return vms

    async def previous(self, vm_path: str, disk_key: int) -> PreviousBackup | None:
        """The disk's last recorded change ID; None when the file has none."""
        entry = (await asyncio.to_thread(self._load)).get(vm_path, {}).get(str(disk_key))
        if not entry or not entry.get("change_id"):
            return None
        return PreviousBackup.from_json(entry)

    async def complete(self, job_id: str, vm_path: str, disks: Sequence[DiskResult]) -> None:
        """Record the disks' new change IDs (the file is replaced atomically)."""
        await asyncio.to_thread(self._record, job_id, vm_path, disks)

    def _record(self, job_id: str, vm_path: str, disks: Sequence[DiskResult]) -> None:
        vms = self._load()
        entries = vms.setdefault(vm_path, {})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for disk in disks:
            if disk.change_id is None:
                entries.pop(str(disk.disk_key), None)
                continue
            entries[str(disk.disk_key)] = {
                "change_id": disk.change_id,
                "disk_uuid": disk.disk_uuid,
                "capacity": disk.capacity,
                "job_id": job_id,
                "time": now,
            }
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".state-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "vms": vms}, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def failed(self, job_id: str, vm_path: str, stage: str, message: str) -> None:
        """Nothing to record: a failed job leaves the previous change IDs as they were."""

    async def progress(self, job_id: str, report: dict[str, object]) -> None:
        """Standalone runs report progress on the terminal only."""

    async def close(self) -> None:
        """Nothing to close: every call opens and closes the file."""
