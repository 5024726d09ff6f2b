"""Exports served by the hub's export worker processes: backups written over NBD (nbdcopy, libnbd) and restores
read back (nbdinfo, nbdcopy, qemu-img compare) with the exports in workers or (``workers=0``) in the hub's own
event loop; the exports' counters come from the workers; a worker killed with SIGKILL mid-backup fails only its
job (port released, point discarded, the next incremental byte-identical) while a job on the other worker
finishes; workers never outlive the hub, killed or stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import ExportWorkerError
from sendense_nbd.hub import workers
from sendense_nbd.hub.jobs import Job, JobState
from sendense_nbd.hub.openers import ImageOpener
from sendense_nbd.hub.repository import PointStatus
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec, ReportedDisk, RestoreAction, RestoreRequest
from sendense_nbd.hub.service import Hub, HubConfig
from sendense_nbd.hub.serving import ExportSpec
from sendense_nbd.hub.workers import WorkerPool, WorkerSetup
from sendense_nbd.storage.modes import ImageFormat
from tests.conftest import random_file, require, run, wait_gone
from tests.hub.conftest import Api, HubProcess, free_port_range, nbd_write
from tests.hub.worker_openers import SlowOpener, UnreadableOpener

pytestmark = pytest.mark.peer

VM, OTHER = "/DC0/vm/web01", "/DC0/vm/db01"
DISK = 2000
MIB = 1 << 20
SIZE = 8 * MIB
ROOT = str(Path(__file__).resolve().parents[2])  # the repository: workers import tests' openers from it


@pytest.fixture(params=[2, 0], ids=["workers", "in-process"])
async def hub(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Hub]:
    config = HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(6), workers=request.param)
    running = Hub(config)
    await running.start()
    try:
        yield running
    finally:
        running.close()
        await running.wait_closed()


async def _written(hub: Hub, vm_path: str, source: Path) -> Job:
    """A backup job of ``vm_path`` whose export got ``source`` whole (nbdcopy, flushed), not yet completed."""
    job = await hub.create_backup(BackupRequest(vm_path, Mode.AUTO, (DiskSpec(DISK, SIZE),)))
    await asyncio.to_thread(run, require("nbdcopy"), "--flush", str(source), job.detail.disks[0].uri)
    return job


async def _complete(hub: Hub, job: Job, change: str) -> Job:
    done = await hub.complete(job.id, Completion(job.vm_path, (ReportedDisk(DISK, change, None),)))
    await hub.settled()
    return done


def _same(image: str, source: Path) -> None:
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(source), image)


async def test_backup_and_restore_exports_in_workers_or_in_process(hub: Hub, tmp_path: Path) -> None:
    """A full and an incremental backup written by nbdcopy and a restore export read by nbdinfo and nbdcopy;
    ``GET /ports``'s counters while served; with workers, each export is in a worker process of the hub."""
    source = random_file(tmp_path / "disk.raw", SIZE)
    job = await _written(hub, VM, source)
    view = await hub.port_status()
    [export] = view.exports
    assert export.job_id == job.id and export.bytes_written == SIZE and export.clients_served >= 1
    if hub.config.workers:
        assert sum(worker.exports for worker in view.workers) == 1
        [pid] = [worker.pid for worker in view.workers if worker.exports]
        assert pid is not None and _parent_of(pid) == os.getpid()
    else:
        assert view.workers == ()
    await _complete(hub, job, "change-1")
    with source.open("r+b") as file:
        file.seek(3 * MIB)
        file.write(os.urandom(MIB))
    incremental = await _written(hub, VM, source)
    await _complete(hub, incremental, "change-2")
    newest = (await hub.points(VM))[-1]
    _same(newest.path, source)

    restore = await hub.restore(RestoreRequest(newest.id, RestoreAction.EXPORT, ImageFormat.RAW, None))
    info = json.loads((await asyncio.to_thread(run, require("nbdinfo"), "--json", restore.detail.uri)).stdout)
    assert info["exports"][0]["export-size"] == SIZE
    await asyncio.to_thread(run, require("nbdcopy"), restore.detail.uri, str(tmp_path / "read.raw"))
    assert (tmp_path / "read.raw").read_bytes() == source.read_bytes()
    assert (await hub.stop_restore(restore.id)).state is JobState.COMPLETED
    assert (await hub.port_status()).exports == ()


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING], ids=["verbose", "quiet"])
async def test_workers_log_at_the_hubs_level(
    level: int, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker logs what its exports' clients did at the hub's level (``-v``: info), to the hub's stderr."""
    caplog.set_level(level)
    running = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(2), workers=1))
    await running.start()
    try:
        job = await _written(running, VM, random_file(tmp_path / "disk.raw", SIZE))
        [worker] = (await running.port_status()).workers
        await running.cancel(job.id)
    finally:
        running.close()
        await running.wait_closed()
    said = f"export worker {worker.pid}: INFO client "
    assert (said in capfd.readouterr().err) is (level == logging.INFO)


def _parent_of(pid: int) -> int:
    """The parent process ID of ``pid`` (from /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[Hub]:
    running = Hub(HubConfig(repo=str(tmp_path / "repo"), nbd_ports=free_port_range(6), workers=2))
    await running.start()
    try:
        yield running
    finally:
        running.close()
        await running.wait_closed()


async def _ended(hub: Hub, job_id: str) -> Job:
    for _ in range(600):  # 30 s at most
        job = await hub.job(job_id)
        if job.state.terminal:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {job}")


async def test_a_worker_killed_mid_backup_fails_only_its_job(two_workers: Hub, tmp_path: Path) -> None:
    """SIGKILL the worker serving one backup after part of its data came: that job fails ``worker_crashed``
    naming the worker, its port is free and its point gone; the backup on the other worker completes; the
    killed worker is replaced, and the VM's next incremental is byte-identical to its disk."""
    hub = two_workers
    source, other = random_file(tmp_path / "vm.raw", SIZE), random_file(tmp_path / "other.raw", SIZE, seed=2)
    await _complete(hub, await _written(hub, VM, source), "change-1")
    with source.open("r+b") as file:
        file.seek(MIB)
        file.write(os.urandom(2 * MIB))
    doomed = await hub.create_backup(BackupRequest(VM, Mode.AUTO, (DiskSpec(DISK, SIZE),)))
    survivor = await hub.create_backup(BackupRequest(OTHER, Mode.AUTO, (DiskSpec(DISK, SIZE),)))
    [disk] = doomed.detail.disks
    await asyncio.to_thread(nbd_write, disk.uri, [(MIB, source.read_bytes()[MIB : 2 * MIB])])
    workers = (await hub.port_status()).workers
    assert [worker.exports for worker in workers] == [1, 1]  # one job on each
    [(index, pid)] = [(w.index, w.pid) for w in workers if w.pid is not None and _serves(w.pid, disk.port)]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    failed = await _ended(hub, doomed.id)
    assert failed.state is JobState.FAILED and failed.error is not None, failed
    assert failed.error.code == "worker_crashed"
    assert f"export worker {index} (pid {pid}) died: killed by signal 9 (SIGKILL)" in failed.error.message
    view = await hub.port_status()
    assert [lease.job_id for lease in view.pool.used] == [survivor.id]
    ours = [os.getpid(), *(w.pid for w in view.workers if w.pid is not None)]
    assert not any(_serves(p, disk.port) for p in ours), "the killed worker's port is still held"
    assert len(await hub.points(VM)) == 1
    images = await asyncio.to_thread(lambda: [p.name for p in Path(hub.config.repo, "vms").rglob("*.qcow2")])
    assert not any(disk.point_id in name for name in images)

    await asyncio.to_thread(run, require("nbdcopy"), "--flush", str(other), survivor.detail.disks[0].uri)
    assert (await _complete(hub, survivor, "other-1")).state is JobState.COMPLETED
    _same((await hub.points(OTHER))[-1].path, other)
    for _ in range(200):
        restarted = (await hub.port_status()).workers[index].pid
        if restarted is not None:
            break
        await asyncio.sleep(0.05)
    assert restarted not in (None, pid)

    again = await _written(hub, VM, source)
    assert (await _complete(hub, again, "change-2")).state is JobState.COMPLETED
    newest = (await hub.points(VM))[-1]
    assert newest.status is PointStatus.COMPLETED and newest.backing is not None  # an incremental
    _same(newest.path, source)


def _serves(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on ``port`` (its fds against /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            held.add(os.readlink(fd).removeprefix("socket:[").rstrip("]"))
    return bool(held & inodes)


def _backup_body(vm_path: str) -> dict[str, Any]:
    return {"vm_path": vm_path, "mode": "full", "disks": [{"key": DISK, "capacity": SIZE}]}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_workers_never_outlive_the_hub(hub_factory: Any, sig: int) -> None:
    """A hub process serving exports in two workers is killed (SIGKILL) or stopped (SIGTERM): its workers are
    gone too."""
    hub: HubProcess = hub_factory(None, "--workers", "2")
    api = Api(hub.url)
    ports = []
    for vm_path in (VM, OTHER):
        status, job = api.post("/backups", _backup_body(vm_path))
        assert status == 201, job
        ports.append(job["detail"]["disks"][0]["port"])
    status, view = api.get("/ports")
    pids = [worker["pid"] for worker in view["workers"]]
    assert status == 200 and len(pids) == 2 and None not in pids, view
    assert sorted(export["port"] for export in view["exports"]) == sorted(ports)
    hub.stop(sig)
    for pid in pids:  # with them their listening sockets (checking the ports by binding races other suites)
        assert wait_gone(pid, 10), f"export worker {pid} outlived the hub"


async def test_a_worker_that_stops_answering_is_killed(
    two_workers: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopped with SIGSTOP does not answer for its exports' counters (shown unresponsive), nor the
    ping that follows: it is killed, its job fails ``worker_crashed`` saying so, and the counters of the other
    worker's export still come."""
    monkeypatch.setattr(workers, "STATS_TIMEOUT", 1.0)
    monkeypatch.setattr(workers, "PING_TIMEOUT", 1.0)
    hub = two_workers
    stuck = await hub.create_backup(BackupRequest(VM, Mode.FULL, (DiskSpec(DISK, SIZE),)))
    other = await hub.create_backup(BackupRequest(OTHER, Mode.FULL, (DiskSpec(DISK, SIZE),)))
    [pid] = [w.pid for w in (await hub.port_status()).workers if w.pid and _serves(w.pid, stuck.detail.disks[0].port)]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        view = await hub.port_status()
        [export] = view.exports
        assert export.job_id == other.id
        assert [w.responsive for w in view.workers if w.pid == pid] in ([False], [])  # [] once killed
        failed = await _ended(hub, stuck.id)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert failed.error is not None and failed.error.code == "worker_crashed", failed
    assert f"(pid {pid}) did not answer a ping within 1 s: killed" in failed.error.message
    assert wait_gone(pid, 10)


def _spec(name: str, opener: Any) -> ExportSpec:
    return ExportSpec("job-" + name, DISK, name, name, False, False, opener)


def _bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
async def one_worker(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[WorkerPool, list[str]]]:
    """A pool of one worker that can import tests' openers; the crashes it reports."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    crashes: list[str] = []
    pool = WorkerPool(1, WorkerSetup(10, None), on_crash=lambda _, why: crashes.append(why))
    try:
        yield pool, crashes
    finally:
        await pool.close()


async def test_a_slow_start_fails_alone(
    one_worker: tuple[WorkerPool, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export whose image opens past the start timeout fails alone: the worker (its loop answers pings)
    keeps serving the other export, and nothing is reported crashed."""
    pool, crashes = one_worker
    monkeypatch.setattr(workers, "START_TIMEOUT", 1.0)
    image = str(random_file(tmp_path / "a.raw", MIB))
    _, port = await pool.start(_spec("a", ImageOpener(image, ImageFormat.RAW)), _bound())
    [pid] = [view.pid for view in pool.views()]
    with pytest.raises(ExportWorkerError, match="did not start export slow within 1 s"):
        await pool.start(_spec("slow", SlowOpener(image, 3.0)), _bound())
    assert [s.port for s in await pool.stats()] == [port]
    assert [(v.pid, v.exports, v.responsive) for v in pool.views()] == [(pid, 1, True)] and crashes == []
    await pool.stop(0, port)


async def test_an_unreadable_answer_ends_the_worker_reaped(
    one_worker: tuple[WorkerPool, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose answer the hub cannot read is killed and reaped before its crash is reported; the next
    export gets a new worker. The hub's working directory is not on the worker's sys.path."""
    pool, crashes = one_worker
    (tmp_path / "ctypes.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    image = str(random_file(tmp_path / "a.raw", MIB))
    await pool.start(_spec("a", ImageOpener(image, ImageFormat.RAW)), _bound())
    [pid] = [view.pid for view in pool.views()]
    gone_when_reported: list[bool] = []
    pool._on_crash = lambda _, why: (crashes.append(why), gone_when_reported.append(not Path(f"/proc/{pid}").exists()))
    with pytest.raises(ExportWorkerError, match="unreadable"):
        await pool.start(_spec("bad", UnreadableOpener()), _bound())
    assert len(crashes) == 1 and f"(pid {pid}) sent an unreadable message (UnpicklingError" in crashes[0]
    assert gone_when_reported == [True]
    _, port = await pool.start(_spec("b", ImageOpener(image, ImageFormat.RAW)), _bound())
    assert [view.pid for view in pool.views()] != [pid] and not (tmp_path / "ran").exists()
