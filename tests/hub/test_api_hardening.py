"""Hub API hardening over real HTTP: restores only into the restore directory, malformed input is a 4xx
JSON error, a refused request changes nothing, token files, and orphan images swept at start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, run
from tests.hub.conftest import Api, HubProcess

pytestmark = pytest.mark.peer

MIB = 1 << 20
VM = "/DC/vm/hardening"


def _completed_point(api: Api, data: Path, vm_path: str = VM) -> dict[str, Any]:
    """A completed full point holding ``data`` (written by nbdcopy through the hub's export)."""
    status, job = api.post("/backups", {"vm_path": vm_path, "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]})
    assert status == 201, job
    run(require("nbdcopy"), "--flush", str(data), job["detail"]["disks"][0]["uri"])
    completion = {"status": "completed", "disks": [{"disk_key": 2000, "change_id": "52 aa/1", "disk_uuid": None}]}
    status, done = api.post(f"/backups/{job['job_id']}/complete", completion)
    assert status == 200 and done["state"] == "completed", done
    [point] = api.get(f"/points?vm_path={vm_path}")[1]["points"]
    return point


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data.raw"
    data.write_bytes(b"\xa5" * (MIB // 2) + bytes(MIB // 2))
    return data


def _error(answer: tuple[int, Any], status: int, code: str, words: str = "") -> None:
    got, body = answer
    assert got == status and set(body) == {"error"} and body["error"]["code"] == code, answer
    assert words in body["error"]["message"], answer


def test_convert_writes_only_a_new_file_in_the_restore_dir(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    data = _data(tmp_path)
    point = _completed_point(api, data)
    restores = Path(hub.repo) / "restores"
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"keep me")
    for name in (str(outside / "x.raw"), "../x.raw", "a/b.raw", ".hidden", "x\n", "", "..", "x" * 129, 5, None):
        answer = api.post("/restores", {"point_id": point["id"], "action": "convert", "format": "raw", "path": name})
        _error(answer, 400, "bad_request", "plain file name")
    (restores / "link.raw").symlink_to(victim)
    _error(api.post("/restores", {"point_id": point["id"], "action": "convert", "path": "link.raw"}), 409, "exists")
    assert victim.read_bytes() == b"keep me"

    status, job = api.post("/restores", {"point_id": point["id"], "action": "convert", "format": "qcow2",
                                         "path": "web01.qcow2"})  # fmt: skip
    assert status == 201 and job["state"] == "completed", job
    assert job["detail"]["path"] == str(restores / "web01.qcow2")
    run(require("qemu-img"), "compare", "-F", "raw", str(restores / "web01.qcow2"), str(data))
    _error(api.post("/restores", {"point_id": point["id"], "action": "convert", "path": "web01.qcow2"}), 409, "exists")
    assert sorted(os.listdir(restores)) == ["link.raw", "web01.qcow2"]  # no temporary file left
    assert sorted(os.listdir(outside)) == ["victim"]
    _error(api.post("/restores", {"point_id": "20260101T000000Z-00000000"}), 404, "not_found", "no restore point")
    _error(api.post("/restores", {"point_id": point["id"], "path": "x.raw"}), 400, "bad_request", "convert")


def test_restore_dir_option_and_a_symlinked_restore_dir_is_refused(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    chosen = tmp_path / "chosen"
    hub = hub_factory(None, "--restore-dir", str(chosen))
    api = Api(hub.url)
    data = _data(tmp_path)
    point = _completed_point(api, data)
    status, job = api.post("/restores", {"point_id": point["id"], "action": "convert", "path": "d.raw"})
    assert status == 201 and job["state"] == "completed", job
    assert (chosen / "d.raw").read_bytes() == data.read_bytes()
    assert oct(chosen.stat().st_mode & 0o777) == oct(0o700)
    hub.stop()
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    refused = subprocess.run(
        [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(hub.repo), "--listen", "127.0.0.1:0",
         "--restore-dir", str(tmp_path / "linked")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and "give a real directory" in refused.stderr, refused.stderr


def test_malformed_bodies_and_queries_get_4xx_json_errors(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    disk = {"key": 2000, "capacity": MIB}
    bad_backups: list[tuple[object, str]] = [
        ({"vm_path": ["/DC/vm/a"], "disks": [disk]}, "vm_path"),
        ({"vm_path": {"a": 1}, "disks": [disk]}, "vm_path"),
        ({"vm_path": "/DC/vm/a", "mode": ["full"], "disks": [disk]}, "mode"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": [2000], "capacity": MIB}]}, "key"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": True, "capacity": MIB}]}, "key"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": 2000, "capacity": "1048576"}]}, "capacity"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": 2**64, "capacity": MIB}]}, "key"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": 2000, "capacity": 2**52}]}, "capacity"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": 2000, "capacity": 2**64}]}, "capacity"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": 2000, "capacity": MIB + 1}]}, "multiple of 512"),
        ({"vm_path": "/DC/vm/a", "disks": [{"key": 2000, "capacity": 1.5}]}, "capacity"),
        ({"vm_path": "/DC/vm/a\x01b", "disks": [disk]}, "control characters"),
        ({"vm_path": "/DC/vm/a\nb", "disks": [disk]}, "control characters"),
        ({"vm_path": "DC/vm/a", "disks": [disk]}, "inventory path"),
        ({"vm_path": "/DC//a", "disks": [disk]}, "inventory path"),
        ({"vm_path": "/DC/vm/a", "disks": [disk], "disk": []}, "unknown field"),
        ({"vm_path": "/DC/vm/a", "disks": [disk, disk]}, "twice"),
    ]
    for body, words in bad_backups:
        _error(api.post("/backups", body), 400, "bad_request", words)
    raw_bodies = [
        (b'{"vm_path": "/DC/vm/a", "disks": [{"key": 2000, "capacity": ' + b"1" * 5000 + b"}]}", "integer"),
        (b"[" * 100_000 + b"]" * 100_000, "nests"),
        (b'{"vm_path": "/DC/vm/\\ud800"}', "surrogate"),
        (b'{"vm_path": "/DC/vm/a", "disks": [{"key": NaN}]}', "NaN"),
        (b'{"vm_path": "/DC/vm/a", "disks": [{"key": 1e999}]}', "out of range"),
        (b'{"vm_path": "/DC/vm/\xff"}', "UTF-8"),
        (b"", "not JSON"),
    ]
    for raw, words in raw_bodies:
        _error(api.post("/backups", raw=raw), 400, "bad_request", words)
    for charset in ("x-no-such-charset", "latin-1"):
        answer = api.call(
            "POST", "/backups", raw=b'{"vm_path": "/DC/vm/a"}', content_type=f"application/json; charset={charset}"
        )
        _error(answer, 400, "bad_request", "charset")
    _error(api.post("/backups", raw=b" " * (2 * MIB)), 413, "too_large")
    _error(api.get("/backups/changeid?vm_path=/DC/vm/a&disk_key=%C2%B2"), 400, "bad_request", "disk_key")
    _error(api.get("/backups/changeid?vm_path=/DC/vm/a&disk_key=99999999999"), 400, "bad_request", "disk_key")
    _error(api.get("/backups/changeid?vm_path=%ED%A0%80&disk_key=1"), 400, "bad_request", "vm_path")
    _error(api.get("/points?vm_path=/a%00b"), 400, "bad_request", "control")
    _error(api.get("/backups?vm_path=relative"), 400, "bad_request", "inventory path")
    _error(api.get("/backups/%ED%A0%80"), 404, "not_found")
    _error(api.delete("/restores/..%2F..%2Fetc"), 404, "not_found")
    _error(api.call("PUT", "/ports"), 405, "method_not_allowed")
    assert api.get("/ports")[1]["used"] == [] and not (Path(hub.repo) / "vms").exists()


def test_a_malformed_completion_changes_nothing(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    status, job = api.post("/backups", {"vm_path": VM, "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]})
    assert status == 201
    uri = job["detail"]["disks"][0]["uri"]
    good = {"disk_key": 2000, "change_id": "52 aa/1", "disk_uuid": "6000C29"}
    malformed: list[object] = [
        {"status": "completed", "disks": [{**good, "change_id": ["52"]}]},
        {"status": "completed", "disks": [{**good, "disk_uuid": {"a": 1}}]},
        {"status": "completed", "disks": [{**good, "disk_key": "2000"}]},
        {"status": "completed", "disks": [{**good, "capacity": 2**70}]},
        {"status": "completed", "disks": [good, good]},
        {"status": "completed", "disks": {"2000": good}},
        {"status": "completed", "vm_path": "/DC/vm/other", "disks": [good]},
        {"status": ["completed"], "disks": [good]},
        {"status": "failed", "error": "oops"},
        {"status": "failed", "error": {"stage": ["x"]}},
    ]
    for body in malformed:
        assert api.post(f"/backups/{job['job_id']}/complete", body)[0] == 400, body
    after = api.get(f"/backups/{job['job_id']}")[1]
    assert after["state"] == "running", after
    ports = api.get("/ports")[1]
    assert [u["port"] for u in ports["used"]] == [job["detail"]["disks"][0]["port"]]
    assert [e["job_id"] for e in ports["exports"]] == [job["job_id"]]
    run(require("nbdcopy"), "--flush", str(_data(tmp_path)), uri)  # the export still serves
    status, done = api.post(f"/backups/{job['job_id']}/complete", {"status": "completed", "disks": [good]})
    assert status == 200 and done["state"] == "completed", done
    assert api.get("/ports")[1]["used"] == []
    # A failure report with odd text in its message is still taken: a failed job must not wait for its timeout.
    status, job = api.post("/backups", {"vm_path": VM, "mode": "full", "disks": [{"key": 2000, "capacity": MIB}]})
    report = {"status": "failed", "error": {"stage": "transferring", "message": "a\x00b\n" * 5000}}
    status, failed = api.post(f"/backups/{job['job_id']}/complete", report)
    assert status == 200 and failed["state"] == "failed", failed
    assert failed["error"]["message"].startswith("a\ufffdb\n") and len(failed["error"]["message"]) == 4096
    _error(api.post("/backups/changeid/complete", {"status": "completed", "disks": []}), 404, "not_found")


def test_a_refused_backup_leaves_no_job_image_or_port(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory(None)
    api = Api(hub.url)
    body = {"vm_path": VM, "mode": "full", "disks": [{"key": 2000, "capacity": MIB}, {"key": 2001}]}
    _error(api.post("/backups", body), 400, "bad_request", "capacity")
    body = {"vm_path": VM, "mode": "incremental", "disks": [{"key": 2000, "capacity": MIB}, 2001]}
    _error(api.post("/backups", body), 400, "bad_request", "capacity")
    assert api.get(f"/backups?vm_path={VM}")[1]["backups"] == []
    assert api.get("/ports")[1]["used"] == []
    assert not (Path(hub.repo) / "vms").exists() or list((Path(hub.repo) / "vms").rglob("*")) == []


def test_token_files_that_would_turn_auth_off_stop_the_start(tmp_path: Path) -> None:
    for content in ("", "  \n\n", "two words\n", "tab\there"):
        token = tmp_path / "token"
        token.write_text(content)
        for option in ("--token-file", "--node-token-file"):
            refused = subprocess.run(
                [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(tmp_path / "r"), "--listen",
                 "127.0.0.1:0", option, str(token)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert refused.returncode == 2, refused
            assert option in refused.stderr and ("is empty" in refused.stderr or "cannot have" in refused.stderr)
    refused = subprocess.run(
        [sys.executable, "-m", "sendense_nbd", "hub", "--repo", str(tmp_path / "r"), "--token-file",
         str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "cannot read" in refused.stderr, refused.stderr


def test_orphan_images_are_removed_at_start_and_other_files_reported(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    hub = hub_factory(None, repo=repo)
    api = Api(hub.url)
    point = _completed_point(api, _data(tmp_path))
    assert hub.stop() == 0
    folder = Path(point["path"]).parent
    orphan = folder / "20260101T000000Z-0123abcd.qcow2"
    run(require("qemu-img"), "create", "-f", "qcow2", str(orphan), "1M")
    temporary = folder / ".20260101T000000Z-0123abcd.qcow2.0123456789ab.creating"
    temporary.write_bytes(b"half")
    restore_temporary = repo / "restores" / ".web.raw.0123456789ab.creating"
    restore_temporary.write_bytes(b"half")
    notes = folder / "notes.txt"
    notes.write_text("an operator's file")
    (folder / "link.qcow2").symlink_to(point["path"])

    restarted = hub_factory(None, repo=repo, ports=hub.ports)
    assert sorted(restarted.startup["removed_orphans"]) == sorted(map(str, (orphan, temporary, restore_temporary)))
    assert sorted(restarted.startup["unexpected_files"]) == sorted([str(folder / "link.qcow2"), str(notes)])
    assert not orphan.exists() and not temporary.exists() and not restore_temporary.exists()
    assert notes.exists() and (folder / "link.qcow2").is_symlink()
    run(require("qemu-img"), "check", point["path"])
    [shown] = Api(restarted.url).get(f"/points?vm_path={VM}")[1]["points"]
    assert {**shown, "digests": None} == {**point, "digests": None}  # digests: recorded in the background
