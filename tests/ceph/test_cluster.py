"""The test Ceph cluster (simulator/ceph_cluster.py): reachable by librados, qemu's rbd driver and S3; a
restart keeps the data."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
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


def test_a_restart_refuses_a_port_another_process_took(ceph_cluster: Any) -> None:
    """The mon's ports are in its monmap: a restart checks them instead of starting a mon that cannot bind."""
    module = _ceph_cluster_module()
    state = json.loads((Path(ceph_cluster.directory) / module.STATE_FILE).read_text())
    module.stop(ceph_cluster.directory)
    squatter = socket.create_server(("127.0.0.1", state["mon_v1"]))
    try:
        with pytest.raises(module.PortTaken, match=f"mon.a of .* port {state['mon_v1']} is held by another process"):
            module.start(ceph_cluster.directory)
        assert module.running(ceph_cluster.directory) == []
    finally:
        squatter.close()
    assert module.start(ceph_cluster.directory) == ceph_cluster


def test_bootstrap_takes_new_ports_when_one_was_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port may be taken between picking and binding: the mon's (it fails "Address already in use"), or
    radosgw's by another listener (another session's RGW would answer there). Each time the bootstrap
    starts over with new ports; the cluster that starts has our radosgw on its port."""
    module = _ceph_cluster_module()
    squatter = socket.create_server(("127.0.0.1", 0))
    taken = squatter.getsockname()[1]
    picks: list[list[int]] = []
    pick = module._pick_ports

    def unlucky(count: int) -> list[int]:
        ports = pick(count)
        if len(picks) < 2:
            ports[1 + len(picks)] = taken  # first the mon's v1 port, then radosgw's
        picks.append(ports)
        return ports

    monkeypatch.setattr(module, "_pick_ports", unlucky)
    directory = tmp_path / "cluster"
    try:
        cluster = module.start(directory, timeout=300)
        assert len(picks) == 3 and cluster.rgw_endpoint == f"http://127.0.0.1:{picks[2][2]}"
        rgw = int((directory / "run" / "client.rgw.a.pid").read_text())
        assert module._owns_port(rgw, picks[2][2]) and not module._owns_port(rgw, taken)
        low, high = module.PORT_RANGE
        assert high <= 32768 and all(low <= port < high for port in picks[2])  # below the ephemeral range
    finally:
        squatter.close()
        module.stop(directory)


def test_sweep_stops_and_removes_only_the_clusters_of_dead_sessions(tmp_path: Path) -> None:
    """A SIGKILLed session leaves its directory and daemons; the next one stops them by pid file and
    removes it. Clusters whose owner lives, and directories nobody claimed, stay."""
    module = _ceph_cluster_module()
    dead, alive, unclaimed = (tmp_path / f"sendense-ceph-{n}" for n in ("dead", "alive", "unclaimed"))
    for directory in (dead, alive, unclaimed):
        (directory / "run").mkdir(parents=True)
    owner = subprocess.Popen(["sleep", "600"])
    module.claim(dead, owner.pid)
    module.claim(alive)
    assert module.sweep(tmp_path, "sendense-ceph-") == []  # both owners live
    owner.kill()  # as SIGKILL ends a test session: no clean-up ran
    owner.wait()
    # a stand-in daemon of the dead session's cluster: a process whose command line names its conf
    stand_in = "import time; print('up', flush=True); time.sleep(600)"
    daemon = subprocess.Popen([sys.executable, "-c", stand_in, str(dead / "ceph.conf")], stdout=subprocess.PIPE)
    assert daemon.stdout is not None and daemon.stdout.readline() == b"up\n"  # its command line is readable now
    daemon.stdout.close()
    (dead / "run" / "mon.a.pid").write_text(f"{daemon.pid}\n")
    try:
        assert module.sweep(tmp_path, "sendense-ceph-") == [dead]
        assert daemon.wait(timeout=30) == -signal.SIGTERM
        assert not dead.exists() and alive.exists() and unclaimed.exists()
        assert module.sweep(tmp_path, "sendense-ceph-") == []
    finally:
        daemon.kill()
        daemon.wait()
