"""The backup client's parts alone: progress publishing, targets, endpoints, the nbdkit command, the state file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import click
import pytest

from sendense_nbd.backup import (
    BackupSettings,
    BackupSpec,
    DiskResult,
    HubApi,
    HubSettings,
    JobProgress,
    StateFile,
    SyncType,
    prepare,
)
from sendense_nbd.cli.backup import EXIT_CODES, EXIT_STATUS, _parse_targets, exit_status
from sendense_nbd.copy import Progress
from sendense_nbd.errors import (
    BackupError,
    CopyError,
    DiskSourceError,
    HubApiError,
    SnapshotNotRemoved,
    VSphereError,
)
from sendense_nbd.vmware.session import Endpoint, normalize_thumbprint, read_password
from sendense_nbd.vmware.vddk import VddkConfig, build_command, sweep_stale_directories


async def test_progress_is_rate_bounded_and_the_latest_state_wins() -> None:
    posted: list[dict[str, object]] = []

    async def sink(report: dict[str, object]) -> None:
        posted.append(report)

    progress = JobProgress("j", sink, interval=0.2)
    progress.start()
    progress.set_stage("transferring")
    for copied in range(0, 1001):
        progress.copy_event(2000, Progress(copied, 0, 0, 1000, 0.1, 10.0, 1.0, to_read=1000))
        if copied % 100 == 0:
            await asyncio.sleep(0.05)
    await progress.finish("completed")
    # 1001 updates in ~0.55 s: at most one report per 0.2 s, plus the final one.
    assert 2 <= len(posted) <= 5, len(posted)
    assert posted[-1]["status"] == "completed" and posted[-1]["bytes_transferred"] == 1000
    assert posted[-1]["percent"] == 100.0


async def test_the_final_report_survives_a_failing_sink() -> None:
    attempts: list[str] = []

    async def sink(report: dict[str, object]) -> None:
        attempts.append(str(report["status"]))
        if len(attempts) < 3:
            raise OSError("hub down")

    progress = JobProgress("j", sink, interval=0.01, final_retries=3)
    assert await progress.finish("failed", {"stage": "transferring", "message": "boom"})
    assert attempts == ["failed", "failed", "failed"]


async def test_the_final_report_gives_up_after_its_retries() -> None:
    async def sink(report: dict[str, object]) -> None:
        raise OSError("hub down")

    progress = JobProgress("j", sink, final_retries=1)
    assert not await progress.finish("completed")


def test_targets_parse_both_spellings_and_refuse_nonsense() -> None:
    assert _parse_targets("2000=nbd://h:1/a, 2001:nbd://h:2/b") == {2000: "nbd://h:1/a", 2001: "nbd://h:2/b"}
    assert _parse_targets(None) == {}
    for bad in ("2000", "disk=nbd://h/a", "2000=/dev/sda", "2000=nbd://a/b,2000=nbd://a/c"):
        with pytest.raises(click.BadParameter):
            _parse_targets(bad)


def test_a_plugin_that_is_not_shell_words_is_refused_before_anything_runs() -> None:
    """Not at every job (as a bare ValueError inside nbdkit's set-up): the flag itself is refused, exit 2."""
    from click.testing import CliRunner

    from sendense_nbd.cli.backup import cli

    args = [
        "migrate",
        "--vmware-endpoint",
        "vc",
        "--vmware-username",
        "u",
        "--vmware-path",
        "/dc/vm/x",
        "--job-id",
        "j",
    ]
    for bad, problem in (('vddk "x', "is not a list of shell words"), (" ", "is empty")):
        result = CliRunner().invoke(cli, [*args, "--vddk-plugin", bad])
        assert result.exit_code == 2 and problem in result.output, result.output


def test_exit_status_by_error_type() -> None:
    """A BackupError counts as its reason; every status is in the help's exit status list."""
    cases: list[tuple[BackupError | OSError | VSphereError | HubApiError | DiskSourceError, int]] = [
        (SnapshotNotRemoved("not removed", "finalizing", reason=VSphereError("task failed")), 5),
        (BackupError("hub", "initializing", reason=HubApiError("down")), 4),
        (BackupError("recording failed", "finalizing", reason=HubApiError("down", 500)), 4),
        (BackupError("no VM", "initializing", reason=VSphereError("no VM")), 3),
        (BackupError("copy", "transferring", reason=CopyError("read failed")), 1),
        (BackupError("no disks", "initializing"), 1),
        (HubApiError("down"), 4),
        (VSphereError("login refused"), 3),
        (DiskSourceError("nbdkit died"), 1),
        (OSError("no token file"), 1),
    ]
    assert [exit_status(error) for error, _ in cases] == [status for _, status in cases]
    documented = {int(line.split()[0]) for line in EXIT_CODES.splitlines()[2:] if line.strip()[:1].isdigit()}
    assert {status for _, status in EXIT_STATUS} <= documented


async def test_prepare_picks_the_store_and_keeps_secrets_out_of_reprs(tmp_path: Path) -> None:
    spec = BackupSpec(job_id="j", vm_path="/DC/vm/a", targets={2000: "nbd://h/x"})
    login = {"spec": spec, "endpoint": Endpoint("vc"), "username": "u", "password": "s3cret-pw"}
    standalone = prepare(BackupSettings(**login, state_file=str(tmp_path / "ids.json")))
    assert isinstance(standalone.store, StateFile) and standalone.store.path == str(tmp_path / "ids.json")
    hub = HubSettings("http://hub:8082", token="s3cret-token", retries=7)
    reporting = prepare(BackupSettings(**login, hub=hub, state_file=str(tmp_path / "unused.json")))
    assert isinstance(reporting.store, HubApi) and reporting.store.base == "http://hub:8082/api/v1"
    assert (reporting.store.token, reporting.store.retries) == ("s3cret-token", 7)
    assert reporting.progress is None  # until run() has resolved nbdkit-vddk's settings
    assert "s3cret" not in repr(reporting.settings) + repr(standalone)
    await reporting.close()
    with pytest.raises(ValueError, match="hub or in a state file"):
        BackupSettings(**login)


def test_endpoints_and_thumbprints() -> None:
    assert Endpoint.parse("vc.example") == Endpoint("vc.example", 443)
    assert Endpoint.parse("https://vc.example:8443/sdk") == Endpoint("vc.example", 8443)
    assert Endpoint.parse("[::1]:9443").port == 9443
    with pytest.raises(VSphereError):
        Endpoint.parse("vc:99999")
    assert normalize_thumbprint("ab" * 20) == ":".join(["AB"] * 20)
    with pytest.raises(VSphereError):
        normalize_thumbprint("ab:cd")


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    monkeypatch.setenv("VMWARE_PASSWORD", "from-env")
    assert read_password(str(secret)) == "from-file"
    assert read_password(None) == "from-env"
    monkeypatch.delenv("VMWARE_PASSWORD")
    with pytest.raises(VSphereError, match="VMWARE_PASSWORD"):
        read_password(None, prompt=False)


def test_nbdkit_command_for_a_real_vddk_setup() -> None:
    config = VddkConfig(
        server="vc.example",
        user="backup@vsphere.local",
        thumbprint="AA:BB",
        libdir="/opt/vmware-vix-disklib-distrib",
        transports=("nbdssl", "nbd"),
        compression="zlib",
        extra=(("config", "/etc/vddk.conf"),),
    )
    command = build_command(
        config,
        vm_moref="vm-42",
        disk_file="[ds1] vm/vm.vmdk",
        snapshot_moref="snapshot-7",
        socket_path="/run/x/disk.sock",
        password_fd=7,
        pid_file="/run/x/nbdkit.pid",
    )
    assert command == [
        "nbdkit", "--exit-with-parent", "--readonly", "--foreground", "--unix", "/run/x/disk.sock",
        "--pidfile", "/run/x/nbdkit.pid", "vddk", "server=vc.example", "user=backup@vsphere.local",
        "password=-7", "thumbprint=AA:BB", "vm=moref=vm-42", "snapshot=snapshot-7",
        "file=[ds1] vm/vm.vmdk", "libdir=/opt/vmware-vix-disklib-distrib", "transports=nbdssl:nbd",
        "compression=zlib", "config=/etc/vddk.conf",
    ]  # fmt: skip
    with pytest.raises(DiskSourceError, match="set by the job"):
        build_command(
            VddkConfig(server="s", user="u", thumbprint="t", extra=(("password", "oops"),)),
            vm_moref="vm-1",
            disk_file="f",
            snapshot_moref=None,
            socket_path="s",
            password_fd=7,
            pid_file="q",
        )
    with pytest.raises(DiskSourceError, match="above 2"):  # nbdkit refuses stdin/stdout/stderr
        build_command(
            config, vm_moref="v", disk_file="f", snapshot_moref=None, socket_path="s", password_fd=0, pid_file="q"
        )


def test_sweep_removes_only_stale_directories_of_killed_jobs(tmp_path: Path) -> None:
    """Older releases left the password in sendense-vddk-*/password when SIGKILLed."""
    old = time.time() - 3600

    def planted(name: str, pid: int | None, *, age: float = old) -> Path:
        directory = tmp_path / name
        directory.mkdir(mode=0o700)
        (directory / "password").write_text("secret")
        if pid is not None:
            (directory / "nbdkit.pid").write_text(f"{pid}\n")
        os.utime(directory, (age, age))
        return directory

    killed = planted("sendense-vddk-killed", None)
    gone = planted("sendense-vddk-gone", _exited_pid())
    running = planted("sendense-vddk-running", os.getpid())
    young = planted("sendense-vddk-young", None, age=time.time())
    other = planted("not-ours", None)
    removed = sweep_stale_directories(str(tmp_path))
    assert sorted(removed) == sorted([str(killed), str(gone)])
    assert not killed.exists() and not gone.exists()
    assert running.exists() and young.exists() and other.exists()


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_state_file_records_atomically_and_forgets_disks_without_cbt(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ids.json"
    store = StateFile(str(path))
    assert await store.previous("/DC/vm/a", 2000) is None

    def result(key: int, change_id: str | None) -> DiskResult:
        return DiskResult(key, f"uuid-{key}", 1 << 20, change_id, SyncType.FULL, 10, 0, "nbd://h/x")

    await store.complete("j1", "/DC/vm/a", [result(2000, "52 aa/3"), result(2001, "52 bb/1")])
    previous = await store.previous("/DC/vm/a", 2000)
    assert previous is not None and previous.change_id == "52 aa/3" and previous.disk_uuid == "uuid-2000"
    await store.complete("j2", "/DC/vm/a", [result(2001, None)])
    assert await store.previous("/DC/vm/a", 2001) is None
    assert [p.name for p in path.parent.iterdir()] == ["ids.json"]  # no temporary left behind
    assert json.loads(path.read_text())["vms"]["/DC/vm/a"]["2000"]["job_id"] == "j1"
    path.write_text("{not json")
    with pytest.raises(Exception, match="cannot read the state file"):
        await store.previous("/DC/vm/a", 2000)
