"""The hub in-process: its background work (lease renewal, job timeouts) runs, and shutdown cancels
and awaits all of it; the per-job locks of finished jobs are not kept; a second hub on the same
repository is a Conflict."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import Conflict
from sendense_nbd.hub.jobs import JobState
from sendense_nbd.hub.requests import BackupRequest, DiskSpec
from sendense_nbd.hub.service import Hub, HubConfig
from tests.hub.conftest import free_port_range

MIB = 1 << 20
VM = "/DC/vm/web01"


async def test_background_work_runs_and_shutdown_cancels_and_awaits_it(tmp_path: Path) -> None:
    config = HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4), lease_ttl=0.6, job_timeout=2.0)
    hub = Hub(config)
    await hub.start()
    with pytest.raises(Conflict, match="another hub is running") as busy:
        Hub(config)
    assert busy.value.code == "busy"
    job = await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(2000, MIB),)))
    [lease] = (await hub.port_status()).pool.used
    await asyncio.sleep(config.lease_ttl * 1.5)  # past its first expiry: renewed, or it would be gone
    [renewed] = (await hub.port_status()).pool.used
    assert renewed.port == lease.port and renewed.expires > lease.expires

    for _ in range(400):  # 20 s at most: the job timeout (2 s) is seen within 0.5 s more
        if (await hub.job(job.id)).state is JobState.FAILED:
            break
        await asyncio.sleep(0.05)
    failed = await hub.job(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None and failed.error.stage == "timeout"
    assert (await hub.port_status()).pool.used == ()
    hub.close()
    await hub.wait_closed()
    assert asyncio.all_tasks() == {asyncio.current_task()}, "a background task outlived the hub"
    await hub.wait_closed()  # twice is harmless
    await Hub(config).wait_closed()  # the repository is free again


async def test_the_locks_of_finished_jobs_are_not_kept(tmp_path: Path) -> None:
    hub = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(4)))
    await hub.start()
    try:
        for _ in range(20):
            job = await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(2000, MIB),)))
            cancels = await asyncio.gather(hub.cancel(job.id), hub.cancel(job.id), return_exceptions=True)
            assert sorted(type(c).__name__ for c in cancels) == ["Job", "JobStateError"], cancels
        assert len(hub._locks) == 0, "per-job locks are kept after their jobs ended"
    finally:
        hub.close()
        await hub.wait_closed()
