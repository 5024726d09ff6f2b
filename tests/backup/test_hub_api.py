"""`sendense-backup migrate` against the hub API contract (docs/HUB_API.md), over real HTTP.

The hub is not built yet (a later issue), so a recording stand-in plays it (hub_standin.py); the
vSphere side, nbdkit and the NBD targets are the real peers, as in test_migrate.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backup.hub_standin import HubStandin
from tests.backup.lab import KEYS, MIB, Lab, compare, new_images, serve_images, targets_of
from tests.conftest import require
from tests.vmware.vsphere import running_vcsim, vmdisk

pytestmark = pytest.mark.peer

VM = "/DC0/vm/DC0_H0_VM1"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require("nbdkit")
    root = tmp_path_factory.mktemp("hubapi")
    state = root / "vcsim"
    state.mkdir()
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "8") as info:
        yield Lab(root, info, VM)


@pytest.fixture
def hub() -> Iterator[HubStandin]:
    standin = HubStandin(token=TOKEN).start()
    yield standin
    standin.stop()


def _token_file(root: Path) -> Path:
    path = root / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_change_ids_progress_and_completion_go_through_the_api(lab: Lab, hub: HubStandin) -> None:
    api = ("--api-url", hub.url, "--api-token-file", str(_token_file(lab.root)))
    for key in KEYS:
        vmdisk.write(lab.state, lab.vm["moref"], key, MIB, os.urandom(2 * MIB))
    expected = {key: lab.keep_copy(key, "api1") for key in KEYS}
    full = new_images(lab.root, "api-full")
    server = serve_images(*full.values())
    try:
        result = lab.migrate(targets_of(server, full), *api, job="api1")
    finally:
        server.stop()
    assert result.code == 0, result
    assert hub.unauthorized == 0
    assert not lab.state_file.exists(), "with an API the local state file is not used"
    [completion] = hub.completions
    assert completion["job"] == "api1" and completion["status"] == "completed" and completion["vm_path"] == VM
    by_key = {d["disk_key"]: d for d in completion["disks"]}
    assert set(by_key) == set(KEYS)
    for key in KEYS:
        disk = next(d for d in lab.vm["disks"] if d["key"] == key)
        assert by_key[key]["disk_uuid"] == disk["uuid"] and by_key[key]["capacity"] == 8 * MIB
        assert by_key[key]["change_id"].startswith(vmdisk.cbt_id(lab.state, lab.vm["moref"], key) + "/")
        assert by_key[key]["sync_type"] == "full" and by_key[key]["bytes_transferred"] >= 2 * MIB
        compare(full[key], expected[key])
    # Progress: stages in order, bounded in rate, and the final state delivered last.
    stages = [p["stage"] for p in hub.progress]
    assert stages, result.stderr
    assert stages[0] == "initializing" and stages[-1] == "finalizing", stages
    final = hub.progress[-1]
    assert final["status"] == "completed" and final["percent"] == 100.0 and final["job"] == "api1"
    assert final["bytes_transferred"] == sum(by_key[k]["bytes_transferred"] for k in KEYS)
    assert len(hub.progress) <= 2 + final["elapsed_seconds"] / 2.0 + 1, len(hub.progress)

    for key in KEYS:
        vmdisk.write(lab.state, lab.vm["moref"], key, 6 * MIB, os.urandom(100_000))
    expected = {key: lab.keep_copy(key, "api2") for key in KEYS}
    incremental = new_images(lab.root, "api-inc", backing=full)
    server = serve_images(*incremental.values())
    try:
        result = lab.migrate(targets_of(server, incremental), *api, job="api2")
    finally:
        server.stop()
    assert result.code == 0, result
    assert [d["sync_type"] for d in hub.completions[-1]["disks"]] == ["incremental", "incremental"]
    for key in KEYS:
        compare(incremental[key], expected[key])


def test_completion_refused_records_nothing(lab: Lab, hub: HubStandin) -> None:
    api = ("--api-url", hub.url, "--api-token-file", str(_token_file(lab.root)), "--api-retries", "1")
    hub.change_ids[(VM, 2000)] = {"change_id": "*", "disk_uuid": None, "capacity": None}
    hub.fail_complete = True
    images = new_images(lab.root, "api-refused")
    server = serve_images(*images.values())
    try:
        result = lab.migrate(targets_of(server, images), *api, "--mode", "full", job="api3")
    finally:
        server.stop()
    assert result.code == 4, result
    assert hub.change_ids == {(VM, 2000): {"change_id": "*", "disk_uuid": None, "capacity": None}}
    assert lab.snapshots() == []
    assert "recording its change IDs failed" in result.notes[-1], result
    # The completion was retried once, then the failure was reported (also refused, so retried).
    assert [c["status"] for c in hub.completions] == ["completed", "completed", "failed", "failed"]
    assert hub.progress[-1]["status"] == "failed"


def test_wrong_token_fails_before_any_snapshot(lab: Lab, hub: HubStandin, tmp_path: Path) -> None:
    wrong = tmp_path / "token"
    wrong.write_text("not-it")
    images = new_images(lab.root, "api-token")
    result = lab.migrate(
        {key: f"nbd://127.0.0.1:1/{image.stem}" for key, image in images.items()},
        *("--api-url", hub.url + "/api/v1", "--api-token-file", str(wrong)),
    )
    assert result.code == 4, result
    assert "HTTP 401" in result.notes[-1], result
    assert lab.snapshots() == []
    assert hub.completions == [] and hub.unauthorized >= 2  # the change-ID read, then the failure report
