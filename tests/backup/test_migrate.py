"""`sendense-backup migrate` end to end: vcsim (our build), real nbdkit with the vddk stand-in,
our NBD server over qcow2 targets, judged by qemu-img check/compare.

One module-wide simulator; the tests run in order and build on each other: a full backup, an
incremental into overlays, failure paths that must record nothing and leave no snapshot, then a
CBT reset.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backup.lab import (
    KEYS,
    MIB,
    VM_PATH,
    Lab,
    Result,
    compare,
    env,
    job_in_background,
    serve_images,
)
from tests.conftest import require, run
from tests.peers import slow_nbdkit
from tests.vmware.vsphere import running_vcsim, vmdisk

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require("nbdkit")
    root = tmp_path_factory.mktemp("backup")
    state = root / "vcsim"
    state.mkdir()
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "8", "-cbt-page-bytes", str(1 * MIB)) as info:
        yield Lab(root, info)


class Chain:
    """The restore points made so far, shared by the ordered tests."""

    full: dict[int, Path] = {}
    full_data: dict[int, Path] = {}
    latest: dict[int, Path] = {}


def test_full_backup_of_a_two_disk_vm(lab: Lab) -> None:
    for key in KEYS:
        for offset in (0, 3 * MIB + 4096, 7 * MIB):
            vmdisk.write(lab.state, lab.vm["moref"], key, offset, os.urandom(300_000))
    expected = {key: lab.keep_copy(key, "point1") for key in KEYS}
    images, result = lab.backup("full", None)
    assert result.code == 0, result
    assert any("CBT was off" in note for note in result.notes), result
    final = result.reports[-1]
    assert final["status"] == "completed" and final["stage"] == "finalizing", final
    assert {d["disk_key"] for d in final["disks"]} == set(KEYS)
    assert all(d["sync_type"] == "full" for d in final["disks"])
    # Holes were not read: only the written data moved (plus the first-block rounding).
    assert 900_000 <= final["bytes_transferred"] <= 2 * 3 * 400_000
    for key in KEYS:
        compare(images[key], expected[key])
    recorded = lab.recorded()
    assert set(recorded) == {str(k) for k in KEYS}
    for key in KEYS:
        disk = next(d for d in lab.vm["disks"] if d["key"] == key)
        assert recorded[str(key)]["disk_uuid"] == disk["uuid"]
        assert recorded[str(key)]["change_id"].startswith(vmdisk.cbt_id(lab.state, lab.vm["moref"], key) + "/")
    assert lab.snapshots() == []
    Chain.full, Chain.full_data, Chain.latest = images, expected, images


def test_incremental_backup_into_overlays(lab: Lab) -> None:
    assert Chain.latest, "needs the full backup"
    moref = lab.vm["moref"]
    vmdisk.write(lab.state, moref, 2000, 1 * MIB, os.urandom(65536))
    vmdisk.zero(lab.state, moref, 2000, 3 * MIB, 1 * MIB)  # was data: must read zero, not the old data
    vmdisk.write(lab.state, moref, 2001, 7 * MIB + 512, b"\x01" * 5000)
    vmdisk.write(lab.state, moref, 2001, 7 * MIB + 8192, b"\0" * 100_000)  # data overwritten with zeroes
    expected = {key: lab.keep_copy(key, "point2") for key in KEYS}
    images, result = lab.backup("inc1", Chain.latest)
    assert result.code == 0, result
    final = result.reports[-1]
    assert all(d["sync_type"] == "incremental" for d in final["disks"]), final
    # Only the changed areas were read, not the whole disks (merge gap 0: rounded to 4 KiB blocks only).
    assert sum(d["total_bytes"] for d in final["disks"]) <= 65536 + MIB + 5000 + 100_000 + 2 * 4096
    assert [d["bytes_changed"] for d in final["disks"]] == [65536 + MIB, 5000 + 100_000], final
    assert final["bytes_changed"] == 65536 + MIB + 5000 + 100_000
    for key in KEYS:
        compare(images[key], expected[key])
        compare(Chain.full[key], Chain.full_data[key])  # the base point is untouched
    assert lab.snapshots() == []
    Chain.latest = images


def _failure_expectations(lab: Lab, before: dict[str, Any], result: Result, code: int) -> None:
    assert result.code == code, result
    assert lab.recorded() == before, "a failed job recorded change IDs"
    assert lab.snapshots() == [], "the job's snapshot was left behind"
    final = result.reports[-1]
    assert final["status"] in ("failed", "cancelled"), final
    assert final["error"] and final["error"]["message"], final


def test_target_refusing_writes_records_nothing(lab: Lab) -> None:
    before = lab.recorded()
    vmdisk.write(lab.state, lab.vm["moref"], 2000, 2 * MIB, os.urandom(10000))
    images, result = lab.backup("refused", Chain.latest, readonly=True)
    _failure_expectations(lab, before, result, 1)
    assert "transferring" in result.notes[-1] or "setting up" in result.notes[-1], result


def test_api_down_records_nothing_and_takes_no_snapshot(lab: Lab) -> None:
    before = lab.recorded()
    images, result = lab.backup("apidown", Chain.latest, "--api-url", "http://127.0.0.1:9/", "--api-retries", "0")
    assert result.code == 4, result
    assert lab.recorded() == before
    assert lab.snapshots() == []
    assert "did not answer" in result.notes[-1], result


def test_source_dying_mid_copy_records_nothing(lab: Lab, tmp_path: Path) -> None:
    before = lab.recorded()
    moref = lab.vm["moref"]
    for key in KEYS:
        vmdisk.write(lab.state, moref, key, 0, os.urandom(4 * MIB))
    # A slow source (nbdkit's delay filter) that the test kills once the copy runs.
    with job_in_background(lab, "srcdies", Chain.latest, "--nbdkit", str(slow_nbdkit(tmp_path))) as proc:
        argvs = _kill_source_when_transferring(proc)
        stdout, stderr = proc.communicate(timeout=120)
    assert argvs, "the copy never started"
    for argv in argvs:  # the password reaches nbdkit through an inherited pipe, never argv or a file
        passwords = [part for part in argv if part.startswith("password=")]
        assert len(passwords) == 1 and re.fullmatch(r"password=-([3-9]|[1-9][0-9]+)", passwords[0]), argv
        assert {"--exit-with-parent", "--readonly"} <= set(argv), argv
        assert f"vm=moref={lab.vm['moref']}" in argv and any(p.startswith("snapshot=snapshot-") for p in argv)
    result = Result(proc.returncode, stdout, stderr)
    _failure_expectations(lab, before, result, 1)
    assert result.reports[-1]["error"]["stage"] == "transferring", result.reports[-1]


def _kill_source_when_transferring(proc: subprocess.Popen[str]) -> list[list[str]]:
    """SIGKILL the job's nbdkit processes once they serve; their command lines."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        children = subprocess.run(
            ["pgrep", "-f", "-P", str(proc.pid), "vddk_standin"], capture_output=True, text=True
        ).stdout.split()
        if len(children) == len(KEYS):
            time.sleep(0.5)  # reads are in flight: each takes 3 s
            argvs = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children]
            for pid in children:
                os.kill(int(pid), signal.SIGKILL)
            return [[part.decode() for part in argv if part] for argv in argvs]
        time.sleep(0.05)
    return []


def test_sigterm_mid_copy_removes_the_snapshot(lab: Lab, tmp_path: Path) -> None:
    before = lab.recorded()
    with job_in_background(lab, "sigterm", Chain.latest, "--nbdkit", str(slow_nbdkit(tmp_path))) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not lab.snapshots():
            time.sleep(0.1)
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    result = Result(proc.returncode, stdout, stderr)
    _failure_expectations(lab, before, result, 143)
    assert "interrupted" in Result(0, stdout, "").notes[-1]
    final = result.reports[-1]  # cancelled while transferring: the report says so, not "finalizing"
    assert final["stage"] == final["error"]["stage"] == "transferring", final


def test_sigkilled_job_leaves_no_password_on_disk(lab: Lab, tmp_path: Path) -> None:
    """kill -9 of migrate mid-copy: nbdkit exits with its parent and no file holds the password."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    before = lab.recorded()
    os.environ["TMPDIR"] = str(temp)
    try:
        with job_in_background(lab, "sigkill", Chain.latest, "--nbdkit", str(slow_nbdkit(tmp_path))) as proc:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not list(temp.glob("sendense-vddk-*/nbdkit.pid")):
                time.sleep(0.05)
            pid_files = list(temp.glob("sendense-vddk-*/nbdkit.pid"))
            assert pid_files, "nbdkit never started"
            time.sleep(0.5)  # both disks' sources are up, reads in flight
            nbdkits = [int(path.read_text()) for path in temp.glob("sendense-vddk-*/nbdkit.pid")]
            proc.kill()
            proc.communicate(timeout=60)
    finally:
        del os.environ["TMPDIR"]
    secret = lab.password_file.read_text().strip().encode()
    files = [path for path in temp.rglob("*") if path.is_file()]
    assert not [path for path in files if secret in path.read_bytes()], files
    assert lab.recorded() == before
    deadline = time.monotonic() + 30  # nbdkit's --exit-with-parent
    while time.monotonic() < deadline and any(map(_running, nbdkits)):
        time.sleep(0.1)
    assert not [pid for pid in nbdkits if _running(pid)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_next_run_after_failures_is_a_correct_incremental(lab: Lab) -> None:
    expected = {key: lab.keep_copy(key, "point3") for key in KEYS}
    images, result = lab.backup("inc2", Chain.latest, "--quiesce", "--verify")
    assert result.code == 0, result
    assert all(d["sync_type"] == "incremental" for d in result.reports[-1]["disks"])
    for key in KEYS:
        compare(images[key], expected[key])
    Chain.latest = images


def test_merge_gap_flag_sends_the_data_between_close_areas(lab: Lab) -> None:
    moref = lab.vm["moref"]
    for offset in (16384, 81920):  # inside the random data the full backup wrote at 0
        vmdisk.write(lab.state, moref, 2000, offset, os.urandom(4096))
    expected = {key: lab.keep_copy(key, "point-gap") for key in KEYS}
    images, result = lab.backup("gap", Chain.latest, "--merge-gap", str(MIB))
    assert result.code == 0, result
    disks = {d["disk_key"]: d for d in result.reports[-1]["disks"]}
    assert disks[2000]["bytes_changed"] == 8192 and disks[2001]["bytes_changed"] == 0, disks
    assert disks[2000]["bytes_transferred"] == 8192 + 61440  # the 60 KiB of unchanged data between them
    for key in KEYS:
        compare(images[key], expected[key])
    Chain.latest = images


def test_cbt_reset_falls_back_to_a_full_copy(lab: Lab) -> None:
    moref = lab.vm["moref"]
    vmdisk.reset_cbt(lab.state, moref, 2001)
    vmdisk.write(lab.state, moref, 2001, 5 * MIB, os.urandom(70000))
    expected = {key: lab.keep_copy(key, "point4") for key in KEYS}
    images, result = lab.backup("inc3", Chain.latest)
    assert result.code == 0, result
    kinds = {d["disk_key"]: d["sync_type"] for d in result.reports[-1]["disks"]}
    assert kinds == {2000: "incremental", 2001: "full"}, result
    assert any("CBT was reset" in note and "2001" in note for note in result.notes), result
    for key in KEYS:
        compare(images[key], expected[key])
    new_id = lab.recorded()["2001"]["change_id"]
    assert new_id.startswith(vmdisk.cbt_id(lab.state, moref, 2001) + "/")
    Chain.latest = images


def test_snapshot_removal_failure_records_nothing_and_the_next_run_cleans_up(lab: Lab) -> None:
    before = lab.recorded()
    vmdisk.write(lab.state, lab.vm["moref"], 2000, 6 * MIB, os.urandom(50000))
    expected = {key: lab.keep_copy(key, "point5") for key in KEYS}
    vmdisk.inject_fault(lab.state, "RemoveSnapshot_Task", times=1)
    _, result = lab.backup("rmfail", Chain.latest, job="rmfail")
    assert result.code == 5, result
    assert lab.recorded() == before
    assert lab.snapshots() == ["sbak-rmfail"]
    assert "the next run removes it" in result.notes[-1], result

    images, result = lab.backup("after-rmfail", Chain.latest)
    assert result.code == 0, result
    assert "removed stale snapshot sbak-rmfail" in result.notes, result
    assert all(d["sync_type"] == "incremental" for d in result.reports[-1]["disks"])
    for key in KEYS:
        compare(images[key], expected[key])
    assert lab.snapshots() == []
    Chain.latest = images


def test_unknown_vm_and_bad_password_are_clear_errors(lab: Lab, tmp_path: Path) -> None:
    command = lab.command({2000: "nbd://127.0.0.1:1/x"})
    command[command.index(VM_PATH)] = "/DC0/vm/no-such-vm"
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no VM at inventory path /DC0/vm/no-such-vm" in proc.stdout
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    command = lab.command({2000: "nbd://127.0.0.1:1/x"})
    command[command.index(str(lab.password_file))] = str(wrong)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "login as 'user' refused" in proc.stdout
    command = lab.command({2000: "nbd://127.0.0.1:1/x"})
    command[command.index(lab.info["thumbprintSha256"])] = "AA:" * 31 + "AA"
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "does not match the pinned" in proc.stdout


def test_single_target_needs_a_single_disk(lab: Lab) -> None:
    command = [part for part in lab.command({}) if part != "--nbd-targets"]
    command.remove("")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "has 2 disks (2000, 2001): give one target per disk with --nbd-targets" in proc.stdout


def test_unpinned_self_signed_certificate_is_refused(lab: Lab) -> None:
    command = lab.command({2000: "nbd://127.0.0.1:1/x"})
    at = command.index("--vmware-thumbprint")
    del command[at : at + 2]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "TLS verification failed" in proc.stdout and "--vmware-thumbprint" in proc.stdout
    assert lab.snapshots() == []


def test_single_disk_vm_with_the_default_target_flags(tmp_path: Path) -> None:
    state = tmp_path / "vcsim"
    state.mkdir()
    with running_vcsim(state, "-vm-disks", "1", "-disk-size-mb", "4") as info:
        single = Lab(tmp_path, info)
        vmdisk.write(state, single.vm["moref"], 2000, 4096, os.urandom(100_000))
        expected = single.keep_copy(2000, "single")
        image = tmp_path / "single.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(4 * MIB))
        server = serve_images(image)
        try:
            command = [part for part in single.command({}) if part != "--nbd-targets"]
            command.remove("")
            command += ["--nbd-port", str(server.port), "--nbd-export-name", image.stem, "--mode", "full"]
            command[command.index(info["thumbprintSha256"])] = info["thumbprint"]  # pinned by SHA-1 this time
            proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env())
        finally:
            server.stop()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        compare(image, expected)
        assert set(single.recorded()) == {"2000"}


def test_a_bad_nbd_host_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    """--nbd-host goes into the default target's URI through the hosts' one normal form (client.uri): a host
    with a port, or a malformed zone id, stops the job with a sentence before vCenter is called."""
    password = tmp_path / "password"
    password.write_text("x")
    password.chmod(0o600)
    base = [str(Path(sys.executable).parent / "sendense-backup"), "migrate", "--vmware-endpoint", "127.0.0.1:1",
            "--vmware-username", "u", "--vmware-password-file", str(password), "--vmware-path", VM_PATH,
            "--job-id", "j1", "--state-file", str(tmp_path / "state")]  # fmt: skip
    for host, why in (("hub:10809", "must be a host name"), ("[fe80::1%25]", "zone id is 1-64")):
        proc = subprocess.run([*base, "--nbd-host", host], capture_output=True, text=True, timeout=60, env=env())
        assert proc.returncode == 2 and "Invalid value for --nbd-host" in proc.stderr and why in proc.stderr, (
            proc.stdout + proc.stderr
        )
    assert not (tmp_path / "state").exists()
