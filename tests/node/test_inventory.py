"""The node's VM listing (``GET /vms``) and health (``GET /health``), against vcsim.

The listing is one property-collector read of a container view: folder paths come from the parent
chains, so moving a VM into nested folders changes its path without any call per VM.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask

import sendense_nbd
from sendense_nbd.errors import VSphereError
from sendense_nbd.vmware import inventory
from sendense_nbd.vmware.inventory import list_vms
from tests.conftest import require
from tests.hub.conftest import Api
from tests.node.test_node import NodeProcess, write_config
from tests.vmware.vsphere import running_vcsim

pytestmark = pytest.mark.peer

VPX_VMS = ["/DC0/vm/DC0_C0_RP0_VM0", "/DC0/vm/DC0_C0_RP0_VM1", "/DC0/vm/DC0_H0_VM0", "/DC0/vm/DC0_H0_VM1"]


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require("nbdkit")
    state = tmp_path_factory.mktemp("inventory-vcsim")
    with running_vcsim(state, "-vm-disks", "1", "-disk-size-mb", "1") as info:
        yield info


@pytest.fixture(scope="module")
def content(vcsim: dict[str, Any]) -> Iterator[Any]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    si = SmartConnect(host="127.0.0.1", port=vcsim["port"], user="user", pwd="pass", sslContext=context)
    try:
        yield si.RetrieveContent()
    finally:
        Disconnect(si)


def _count_calls(content: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the vSphere methods called from now on (every call goes through the one stub)."""
    stub = content.propertyCollector._stub
    calls: list[str] = []
    invoke = stub.InvokeMethod

    def counted(mo: Any, info: Any, args: Any) -> Any:
        calls.append(info.name)
        return invoke(mo, info, args)

    monkeypatch.setattr(stub, "InvokeMethod", counted)
    return calls


def test_list_vms_builds_folder_paths_in_one_read(
    vcsim: dict[str, Any], content: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_uuid = {vm["uuid"]: vm["path"] for vm in vcsim["vms"]}
    listed = list_vms(content)
    assert [vm.path for vm in listed] == VPX_VMS
    assert all(by_uuid[vm.uuid] == vm.path and vm.path.endswith("/" + vm.name) for vm in listed if vm.uuid)
    datacenter = content.rootFolder.childEntity[0]
    web = datacenter.vmFolder.CreateFolder("prod").CreateFolder("web")
    moved = content.searchIndex.FindByInventoryPath("DC0/vm/DC0_H0_VM1")
    WaitForTask(web.MoveIntoFolder_Task([moved]))
    try:
        calls = _count_calls(content, monkeypatch)
        paths = [vm.path for vm in list_vms(content)]
        assert calls == ["CreateContainerView", "RetrievePropertiesEx", "Destroy"], calls
        assert paths == sorted([*VPX_VMS[:3], "/DC0/vm/prod/web/DC0_H0_VM1"])
        assert content.searchIndex.FindByInventoryPath("DC0/vm/prod/web/DC0_H0_VM1") == moved
        monkeypatch.setattr(inventory, "_PAGE", 2)  # pages of two objects: the same list
        assert [vm.path for vm in list_vms(content)] == paths
    finally:
        WaitForTask(datacenter.vmFolder.MoveIntoFolder_Task([moved]))


def test_list_vms_refuses_more_than_its_limit(content: Any) -> None:
    with pytest.raises(VSphereError, match="more than 3 VMs"):
        list_vms(content, limit=3)
    assert len(list_vms(content, limit=4)) == 4


def test_node_lists_vms_and_reports_health(tmp_path: Path, vcsim: dict[str, Any]) -> None:
    node = NodeProcess(write_config(tmp_path, vcsim))
    try:
        api = Api(node.url)
        status, body = api.get("/vms")
        assert status == 200, body
        assert [vm["path"] for vm in body["vms"]] == VPX_VMS
        assert all(set(vm) == {"path", "name", "uuid"} and vm["uuid"] for vm in body["vms"])
        status, health = api.get("/health")
        assert status == 200
        assert health == {"version": sendense_nbd.__version__, "running_jobs": 0, "queued_jobs": 0, "max_jobs": 2}
    finally:
        assert node.stop() == 0


def test_node_vm_listing_fails_clearly_when_vcenter_refuses(tmp_path: Path, vcsim: dict[str, Any]) -> None:
    (tmp_path / "wrong").mkdir()
    config = write_config(tmp_path / "wrong", {**vcsim, "password": "not-the-password"})
    node = NodeProcess(config)
    try:
        status, body = Api(node.url).get("/vms")
        assert status == 502 and body["error"]["code"] == "vsphere"
        assert "login as 'user' refused" in body["error"]["message"]
        assert Api(node.url).get("/health")[0] == 200  # health never calls vCenter
    finally:
        assert node.stop() == 0
