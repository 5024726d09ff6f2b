"""The VMware backup client: one job copies a VM's disks from a snapshot into NBD targets.

:mod:`~sendense_nbd.backup.prepare` wires a job from typed settings (the one
wiring ``sendense-backup migrate`` and the node share);
:mod:`~sendense_nbd.backup.job` runs it over :mod:`sendense_nbd.vmware`
(vSphere and nbdkit-vddk) and :mod:`sendense_nbd.copy`; change IDs and
progress go to the hub API (:mod:`~sendense_nbd.backup.hubapi`) or, standalone,
to a local state file (:mod:`~sendense_nbd.backup.statefile`).
"""

from sendense_nbd.backup.hubapi import HubApi
from sendense_nbd.backup.job import BackupResult, BackupSpec, ChangeIdStore, DiskSource, run_backup
from sendense_nbd.backup.prepare import BackupJob, BackupSettings, HubSettings, VddkSettings, prepare
from sendense_nbd.backup.progress import STAGES, JobProgress
from sendense_nbd.backup.records import DiskResult, Mode, PreviousBackup, SyncType
from sendense_nbd.backup.statefile import StateFile

__all__ = [
    "STAGES",
    "BackupJob",
    "BackupResult",
    "BackupSettings",
    "BackupSpec",
    "ChangeIdStore",
    "DiskResult",
    "DiskSource",
    "HubApi",
    "HubSettings",
    "JobProgress",
    "Mode",
    "PreviousBackup",
    "StateFile",
    "SyncType",
    "VddkSettings",
    "prepare",
    "run_backup",
]
