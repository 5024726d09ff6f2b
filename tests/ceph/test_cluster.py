"""The test Ceph cluster (simulator/ceph_cluster.py): reachable by librados, qemu's rbd driver and S3; a
restart keeps the data."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _ceph_cluster_module, run

pytestmark = pytest.mark.peer


def _ceph(cluster: Any, *args: str) -> str:
    return run("ceph", *cluster.client_args(), *args).stdout


def test_cluster_is_healthy_and_loopback_only(ceph_cluster: Any) -> None:
    status = json.loads(_ceph(ceph_cluster, "status", "-f", "json"))
    assert status["health"]["status"] == "HEALTH_OK"
    assert status["osdmap"]["num_up_osds"] == 1
    mon_addrs = json.loads(_ceph(ceph_cluster, "mon", "dump", "-f", "json"))["mons"][0]["public_addrs"]["addrvec"]
    assert {a["addr"].rsplit(":", 1)[0] for a in mon_addrs} == {"127.0.0.1"}
    osd = json.loads(_ceph(ceph_cluster, "osd", "dump", "-f", "json"))["osds"][0]
    assert all(a["addr"].startswith("127.0.0.1:") for a in osd["public_addrs"]["addrvec"])
    assert Path(ceph_cluster.conf).parent == Path(ceph_cluster.directory)
    assert "rbd" in _ceph(ceph_cluster, "osd", "pool", "application", "get", "rbd")


def test_librados_and_qemu_reach_the_rbd_pool(ceph_cluster: Any, tmp_path: Path) -> None:
    import rados

    with rados.Rados(conffile=ceph_cluster.conf, rados_id=ceph_cluster.user) as cluster:
        assert ceph_cluster.pool in cluster.list_pools()
    name = f"reach-{tmp_path.name}"
    run("qemu-img", "create", "-f", "raw", ceph_cluster.rbd_filename(name), "8M")
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 65536", ceph_cluster.rbd_filename(name))
        info = json.loads(run("rbd", *ceph_cluster.client_args(), "info", "--format", "json", name).stdout)
        assert info["size"] == 8 << 20
        run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 4096 65536", ceph_cluster.rbd_filename(name))
    finally:
        run("rbd", *ceph_cluster.client_args(), "rm", name)


def test_rgw_answers_s3(ceph_cluster: Any) -> None:
    assert ceph_cluster.rgw_endpoint and ceph_cluster.s3_access_key and ceph_cluster.s3_secret_key
    with urllib.request.urlopen(ceph_cluster.rgw_endpoint, timeout=10) as response:  # anonymous ListBuckets
        assert response.status == 200 and b"ListAllMyBucketsResult" in response.read()
    users = run("radosgw-admin", *ceph_cluster.client_args(), "user", "info", "--uid=ci").stdout
    assert json.loads(users)["keys"][0]["access_key"] == ceph_cluster.s3_access_key


def test_stop_and_start_keep_the_data(ceph_cluster: Any, tmp_path: Path) -> None:
    """The session's own cluster is restarted in place (stop by pid files, start the same directory)."""
    module = _ceph_cluster_module()
    name = f"restart-{tmp_path.name}"
    run("qemu-img", "create", "-f", "raw", ceph_cluster.rbd_filename(name), "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xc3 0 1M", ceph_cluster.rbd_filename(name))
    module.stop(ceph_cluster.directory)
    assert module.running(ceph_cluster.directory) == []
    down = subprocess.run(
        ["ceph", *ceph_cluster.client_args(), "--connect-timeout", "2", "status"], capture_output=True, timeout=30
    )
    assert down.returncode != 0
    again = module.start(ceph_cluster.directory)
    assert again == ceph_cluster == module.load(ceph_cluster.directory)
    assert module.running(ceph_cluster.directory) == ["mon.a", "mgr.x", "osd.0", "client.rgw.a"]
    run("qemu-io", "-f", "raw", "-c", "read -P 0xc3 0 1M", "-c", "read -P 0 1M 3M", ceph_cluster.rbd_filename(name))
    run("rbd", *ceph_cluster.client_args(), "rm", name)


def test_a_directory_that_is_not_a_cluster_is_refused(tmp_path: Path) -> None:
    module = _ceph_cluster_module()
    (tmp_path / "something").write_text("x")
    with pytest.raises(module.ClusterError, match="neither empty nor a test cluster"):
        module.start(tmp_path)
    with pytest.raises(module.ClusterError, match="no test cluster"):
        module.load(tmp_path)
