"""Round trips per job, progress that never blocks the copy, and the bytes an incremental sends.

Jobs run in-process (``run_backup``) against two vcsim VMs, one with 1 disk and one with 3, with real
nbdkit (the vddk stand-in) and our NBD server over qcow2 points. Every vSphere SOAP request is counted
at pyvmomi's ``SoapStubAdapter.InvokeMethod``; the change-ID store counts the hub's calls; the progress
sink is a hub that never answers a running report. The tests run in order (full, incremental with the
default gap 0, incremental with a 1 MiB gap) and each compares the two VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import SoapAdapter

from sendense_nbd.backup import BackupResult, BackupSpec, DiskResult, DiskSource, JobProgress, run_backup
from sendense_nbd.backup.prepare import BackupSettings, prepare
from sendense_nbd.backup.records import PreviousBackup, SyncType
from sendense_nbd.backup.statefile import StateFile
from sendense_nbd.errors import BackupError
from sendense_nbd.vmware.session import Endpoint, connect
from sendense_nbd.vmware.vddk import vddk_config
from tests.backup.lab import MIB, Lab, compare, serve_images
from tests.conftest import require, run
from tests.peers import processes
from tests.vmware.vsphere import STANDIN_PLUGIN, running_vcsim, vmdisk

pytestmark = pytest.mark.peer
prepare_module = importlib.import_module("sendense_nbd.backup.prepare")  # the package's `prepare` is the function

KIB = 1 << 10
SIZES = (1, 3)  # disks per VM
PAGE = 4 * MIB  # vcsim's QueryChangedDiskAreas page: 2 pages per 8 MiB disk
#: What one job changes on every disk before it runs: two areas 448 KiB apart inside data, one far off.
CHANGES = ((0, 64 * KIB), (512 * KIB, 64 * KIB), (6 * MIB, 4 * KIB))
CHANGED = sum(length for _, length in CHANGES)


class CountingStore:
    """The state file as change-ID store, counting calls; ``previous`` answers after 0.2 s, like a far hub."""

    def __init__(self, path: Path) -> None:
        self.inner = StateFile(str(path))
        self.calls: Counter[str] = Counter()
        self.asking = 0
        self.most_asking = 0

    async def previous(self, vm_path: str, disk_key: int) -> PreviousBackup | None:
        self.calls["previous"] += 1
        self.asking += 1
        self.most_asking = max(self.most_asking, self.asking)
        try:
            await asyncio.sleep(0.2)
            return await self.inner.previous(vm_path, disk_key)
        finally:
            self.asking -= 1

    async def complete(self, job_id: str, vm_path: str, disks: Sequence[DiskResult]) -> None:
        self.calls["complete"] += 1
        await self.inner.complete(job_id, vm_path, disks)

    async def failed(self, job_id: str, vm_path: str, stage: str, message: str) -> None:
        self.calls["failed"] += 1

    async def progress(self, job_id: str, report: dict[str, object]) -> None:
        raise AssertionError("progress goes to the JobProgress sink")


class StalledHub:
    """A progress sink whose running reports never get an answer; it takes the final report."""

    def __init__(self) -> None:
        self.hanging = 0
        self.final: dict[str, Any] | None = None
        self._never = asyncio.Event()

    async def __call__(self, report: dict[str, Any]) -> None:
        if report["status"] == "running":
            self.hanging += 1
            await self._never.wait()
        self.final = report


@contextlib.contextmanager
def soap_requests() -> Iterator[Counter[str]]:
    """Every SOAP request pyvmomi sends meanwhile, by method (``Fetch``: a property read)."""
    calls: Counter[str] = Counter()
    original = SoapAdapter.SoapStubAdapter.InvokeMethod

    def counting(self: Any, mo: Any, info: Any, args: Any, outerStub: Any = None) -> Any:  # noqa: N803
        calls[info.wsdlName] += 1
        return original(self, mo, info, args, outerStub)

    SoapAdapter.SoapStubAdapter.InvokeMethod = counting
    try:
        yield calls
    finally:
        SoapAdapter.SoapStubAdapter.InvokeMethod = original


class Job:
    """One job's result and what it cost."""

    def __init__(self, result: BackupResult, soap: Counter[str], store: CountingStore, hub: StalledHub) -> None:
        self.result, self.soap, self.store, self.hub = result, soap, store, hub

    def steady(self) -> Counter[str]:
        """The SOAP requests that do not depend on timing or on the disks' pages."""
        return Counter({k: n for k, n in self.soap.items() if k not in ("WaitForUpdatesEx", "QueryChangedDiskAreas")})


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Lab]]:
    require("nbdkit")
    with contextlib.ExitStack() as stack:
        labs = {}
        for size in SIZES:
            root = tmp_path_factory.mktemp(f"trips{size}")
            state = root / "vcsim"
            state.mkdir()
            args = ("-vm-disks", str(size), "-disk-size-mb", "8", "-cbt-page-bytes", str(PAGE))
            labs[size] = Lab(root, stack.enter_context(running_vcsim(state, *args)))
        yield labs


def _keys(lab: Lab) -> list[int]:
    return [disk["key"] for disk in lab.vm["disks"]]


async def _job(lab: Lab, name: str, backing: dict[int, Path] | None, **spec: Any) -> tuple[Job, dict[int, Path]]:
    """A job of ``lab``'s VM into fresh qcow2 points (overlays on ``backing``); the job and the points."""
    images = {}
    for key in _keys(lab):
        image = lab.root / f"{name}-{key}.qcow2"
        chain = ["-b", str(backing[key]), "-F", "qcow2"] if backing else []
        run("qemu-img", "create", "-q", "-f", "qcow2", *chain, str(image), str(8 * MIB))
        images[key] = image
    server = serve_images(*images.values())
    try:
        endpoint = Endpoint.parse(f"127.0.0.1:{lab.info['port']}", thumbprint=lab.info["thumbprintSha256"])
        source = DiskSource(await vddk_config(endpoint, "user", plugin=f"python {STANDIN_PLUGIN}"), "pass")
        targets: dict[int | None, str] = {key: server.uri_for(image.stem) for key, image in images.items()}
        store, hub = CountingStore(lab.state_file), StalledHub()
        vsphere = await connect(endpoint, "user", "pass")
        try:
            with soap_requests() as soap:
                result = await asyncio.wait_for(
                    run_backup(
                        BackupSpec(job_id=name, vm_path=lab.vm_path, targets=targets, connections=2, **spec),
                        source=source,
                        vsphere=vsphere,
                        store=store,
                        progress=JobProgress(name, hub, interval=0.05),
                    ),
                    120,
                )
        finally:
            await vsphere.close()
    finally:
        server.stop()
    return Job(result, soap, store, hub), images


def _change(lab: Lab, name: str) -> dict[int, Path]:
    """Write :data:`CHANGES` on every disk; the disks as the next snapshot will hold them."""
    for key in _keys(lab):
        for offset, length in CHANGES:
            vmdisk.write(lab.state, lab.vm["moref"], key, offset, os.urandom(length))
    return {key: lab.keep_copy(key, name) for key in _keys(lab)}


def _check_hub_calls(job: Job, disks: int) -> None:
    assert job.store.calls == Counter({"previous": disks, "complete": 1})
    assert job.store.most_asking == disks, "the previous change IDs were not asked for all at once"
    # The hub never answered a running report, and the job went on: the final report arrived.
    assert job.hub.hanging == 1 and job.hub.final is not None and job.hub.final["status"] == "completed"


class Chain:
    points: dict[int, dict[int, Path]] = {}
    full: dict[int, Job] = {}


#: vSphere requests of a full job that also switches CBT on, whatever the number of disks: the VM's
#: lookup (2), CBT on (ReconfigVM_Task) and its cycle snapshot taken and removed, the job's snapshot
#: taken, its disks read (1) and removed; each task: the call and CreateFilter (plus WaitForUpdatesEx).
FIRST_FULL = Counter(
    {
        "FindByInventoryPath": 1,
        "RetrievePropertiesEx": 2,
        "ReconfigVM_Task": 1,
        "CreateSnapshot_Task": 2,
        "RemoveSnapshot_Task": 2,
        "CreateFilter": 5,
    }
)
#: An incremental: the lookup (2), the snapshot taken, its disks read (1), removed; plus the pages.
INCREMENTAL = Counter(
    {
        "FindByInventoryPath": 1,
        "RetrievePropertiesEx": 2,
        "CreateSnapshot_Task": 1,
        "RemoveSnapshot_Task": 1,
        "CreateFilter": 2,
    }
)


async def test_full_job_round_trips_do_not_grow_with_disks(labs: dict[int, Lab]) -> None:
    for size, lab in labs.items():
        for key in _keys(lab):
            vmdisk.write(lab.state, lab.vm["moref"], key, 0, os.urandom(2 * MIB))  # the changes land inside data
        expected = {key: lab.keep_copy(key, "full") for key in _keys(lab)}
        job, points = await _job(lab, "full", None)
        assert [d.sync_type for d in job.result.disks] == [SyncType.FULL] * size
        assert job.steady() == FIRST_FULL, (size, job.soap)
        assert job.soap["WaitForUpdatesEx"] <= 3 * job.soap["CreateFilter"], job.soap
        assert "Fetch" not in job.soap  # no property read one attribute at a time
        _check_hub_calls(job, size)
        for disk in job.result.disks:  # a full's changed bytes are the data it read
            assert disk.bytes_changed == disk.bytes_transferred == 2 * MIB
        for key in _keys(lab):
            compare(points[key], expected[key])
        Chain.points[size], Chain.full[size] = points, job


async def test_incremental_sends_only_changed_bytes_in_constant_round_trips(labs: dict[int, Lab]) -> None:
    assert Chain.points, "needs the full backup"
    for size, lab in labs.items():
        expected = _change(lab, "inc")
        job, points = await _job(lab, "inc", Chain.points[size])
        assert [d.sync_type for d in job.result.disks] == [SyncType.INCREMENTAL] * size
        assert job.steady() == INCREMENTAL, (size, job.soap)
        assert job.soap["QueryChangedDiskAreas"] == size * (8 * MIB // PAGE)  # inherently per disk and page
        assert job.soap["WaitForUpdatesEx"] <= 3 * job.soap["CreateFilter"], job.soap
        _check_hub_calls(job, size)
        for disk in job.result.disks:  # merge gap 0 (the default): exactly the CBT areas crossed
            assert disk.bytes_changed == CHANGED and disk.bytes_transferred == CHANGED, disk
        final = job.hub.final
        assert final is not None and final["bytes_changed"] == size * CHANGED
        assert [d["bytes_changed"] for d in final["disks"]] == [CHANGED] * size
        for key in _keys(lab):
            compare(points[key], expected[key])
        Chain.points[size] = points


async def test_a_merge_gap_sends_the_unchanged_bytes_between_areas(labs: dict[int, Lab]) -> None:
    assert Chain.points, "needs the earlier backups"
    for size, lab in labs.items():
        expected = _change(lab, "gap")
        job, points = await _job(lab, "gap", Chain.points[size], merge_gap=MIB)
        # The first two areas merge over 448 KiB of unchanged data (data: the full wrote it); the far one not.
        for disk in job.result.disks:
            assert disk.bytes_changed == CHANGED and disk.bytes_transferred == CHANGED + 448 * KIB, disk
        for key in _keys(lab):
            compare(points[key], expected[key])


def _nbdkit_children() -> list[int]:
    """Our nbdkit child processes (the vddk stand-ins)."""
    found = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(entry, encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(entry.replace("stat", "comm"), encoding="ascii", errors="replace") as f:
                name = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and name.startswith("nbdkit"):
            found.append(int(entry.split("/")[2]))
    return found


async def test_a_target_refused_while_the_source_opened_stops_the_source(
    labs: dict[int, Lab], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Source and target open at once. The target (nbdkit eval) refuses its export after 1.5 s, when every
    # disk's source (nbdkit with the vddk stand-in) is up: those are closed and stopped, their directories
    # removed, the snapshot is removed, nothing is recorded.
    lab = labs[3]
    before, private = lab.recorded(), tempfile.mkdtemp(prefix="trips", dir="/tmp")  # short: socket paths
    monkeypatch.setattr(tempfile, "tempdir", private)  # where the job's nbdkit directories go
    endpoint = Endpoint.parse(f"127.0.0.1:{lab.info['port']}", thumbprint=lab.info["thumbprintSha256"])
    source = DiskSource(await vddk_config(endpoint, "user", plugin=f"python {STANDIN_PLUGIN}"), "pass")
    store, hub = CountingStore(lab.state_file), StalledHub()
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(len(_nbdkit_children()))
            await asyncio.sleep(0.05)

    with processes("trip") as procs:
        uri = procs.nbdkit("eval", "open=sleep 1.5; exit 1", "get_size=echo 8388608", "pread=exit 1")
        baseline = len(_nbdkit_children())
        spec = BackupSpec(job_id="refused", vm_path=lab.vm_path, targets=dict.fromkeys(_keys(lab), uri))
        vsphere = await connect(endpoint, "user", "pass")
        watching = asyncio.ensure_future(watch())
        try:
            with pytest.raises(BackupError) as failure:
                job = run_backup(spec, source=source, vsphere=vsphere, store=store, progress=JobProgress("x", hub))
                await asyncio.wait_for(job, 60)
        finally:
            watching.cancel()
            await vsphere.close()
        assert len(_nbdkit_children()) == baseline, "a source nbdkit was left running"
    assert failure.value.stage == "setting up NBD", failure.value
    assert max(seen) == baseline + 3, seen  # every disk's source was up while its target negotiated
    assert store.calls["failed"] == 1 and store.calls["complete"] == 0 and lab.recorded() == before
    assert lab.snapshots() == []
    assert os.listdir(private) == []
    os.rmdir(private)


async def _until(check: Any, what: str) -> None:
    """Wait (at most 15 s) until ``check()``."""
    deadline = asyncio.get_running_loop().time() + 15
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_job_cancelled_after_its_login_logs_out(
    labs: dict[int, Lab], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The job logs in while it reads nbdkit-vddk's settings (here a thumbprint read that never ends);
    # cancelled once the login is done, it must log that session out.
    lab = labs[1]
    logged_in, never = asyncio.Event(), asyncio.Event()

    async def logging_in(*args: Any, **kwargs: Any) -> Any:
        session = await connect(*args, **kwargs)
        logged_in.set()
        return session

    async def stalled_settings(*args: Any, **kwargs: Any) -> Any:
        await never.wait()

    monkeypatch.setattr(prepare_module, "connect", logging_in)
    monkeypatch.setattr(prepare_module, "vddk_config", stalled_settings)
    endpoint = Endpoint.parse(f"127.0.0.1:{lab.info['port']}", thumbprint=lab.info["thumbprintSha256"])
    spec = BackupSpec(job_id="cancelled", vm_path=lab.vm_path, targets={None: "nbd://127.0.0.1/x"})
    settings = BackupSettings(
        spec=spec, endpoint=endpoint, username="user", password="pass", state_file=str(tmp_path / "ids.json")
    )
    job = prepare(settings)
    with soap_requests() as soap:
        running = asyncio.ensure_future(job.run())
        await asyncio.wait_for(logged_in.wait(), 15)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await _until(lambda: soap["Logout"] == 1, f"the session was not logged out: {soap}")
    await job.close()
    assert soap["Login"] == 1


async def test_a_login_cancelled_while_it_runs_is_logged_out_when_it_ends(labs: dict[int, Lab]) -> None:
    # The login runs in a worker thread, which a cancellation cannot stop: the session it opens anyway
    # is logged out. The Login request is held until the caller has been cancelled.
    lab = labs[1]
    endpoint = Endpoint.parse(f"127.0.0.1:{lab.info['port']}", thumbprint=lab.info["thumbprintSha256"])
    sending, release = threading.Event(), threading.Event()
    with soap_requests() as soap:
        counting = SoapAdapter.SoapStubAdapter.InvokeMethod

        def held(self: Any, mo: Any, info: Any, args: Any, outerStub: Any = None) -> Any:  # noqa: N803
            if info.wsdlName == "Login":
                sending.set()
                release.wait(15)
            return counting(self, mo, info, args, outerStub)

        SoapAdapter.SoapStubAdapter.InvokeMethod = held
        try:
            logging_in = asyncio.ensure_future(connect(endpoint, "user", "pass"))
            await _until(sending.is_set, "no login was sent")
            logging_in.cancel()
            with pytest.raises(asyncio.CancelledError):
                await logging_in
            release.set()
            await _until(lambda: soap["Logout"] == 1, f"the session was not logged out: {soap}")
        finally:
            release.set()
            SoapAdapter.SoapStubAdapter.InvokeMethod = counting
    assert soap["Login"] == 1


async def test_the_only_disk_target_asks_for_one_previous_change_id(labs: dict[int, Lab], tmp_path: Path) -> None:
    # A None target (the VM's only disk) next to a keyed one: the only disk's previous change ID is asked
    # for once, after the VM's lookup, and no early lookup is left running. The target does not exist,
    # so the job stops at "setting up NBD".
    lab = labs[1]
    endpoint = Endpoint.parse(f"127.0.0.1:{lab.info['port']}", thumbprint=lab.info["thumbprintSha256"])
    source = DiskSource(await vddk_config(endpoint, "user", plugin=f"python {STANDIN_PLUGIN}"), "pass")
    missing = f"nbd+unix:///x?socket={tmp_path}/none"
    spec = BackupSpec(job_id="only", vm_path=lab.vm_path, targets={None: missing, _keys(lab)[0]: missing}, retries=0)
    store = CountingStore(lab.state_file)
    vsphere = await connect(endpoint, "user", "pass")
    try:
        with pytest.raises(BackupError) as failure:
            job = run_backup(spec, source=source, vsphere=vsphere, store=store, progress=JobProgress("only", None))
            await asyncio.wait_for(job, 60)
    finally:
        await vsphere.close()
    assert failure.value.stage == "setting up NBD", failure.value
    assert store.calls["previous"] == 1
    assert not [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "_previous"]
    assert lab.snapshots() == []
