#!/usr/bin/env python3
"""A real single-node Ceph test cluster on 127.0.0.1, every file under one directory.

One mon, one mgr, one bluestore OSD on a sparse file and, optionally, one radosgw with an S3
user; each daemon started directly (no systemd, no cephadm), writing its pid file, log and admin
socket under the directory. The recipe and its traps: /work/shared/notes/ceph.md.

    python3 simulator/ceph_cluster.py start DIR [--no-rgw]   # bootstrap (or restart) DIR, print the Cluster as JSON
    python3 simulator/ceph_cluster.py status DIR             # the Cluster and `ceph status`
    python3 simulator/ceph_cluster.py stop DIR               # stop the daemons by their pid files

From Python: ``start(directory, rgw=True) -> Cluster``, ``stop(directory)``, ``load(directory)``;
``claim(directory)`` marks a directory as this process's and ``sweep(parent, prefix)`` stops and
removes the claimed ones whose process is gone. Starting a directory that holds a cluster restarts
it with its data. Stdlib and attrs only; run as root (bluestore opens its file with O_DIRECT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import claims  # simulator/claims.py
from claims import OWNER_FILE, claim  # noqa: F401  (claim: this module's, for its callers)

#: The daemons in start order (stopped in reverse).
DAEMONS = ("mon.a", "mgr.x", "osd.0", "client.rgw.a")
#: Ceph's tools that must be installed (Debian 12: ceph-mon ceph-mgr ceph-osd ceph-common radosgw).
TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd", "radosgw", "radosgw-admin")
STATE_FILE = "cluster.json"
S3_USER = "ci"
#: Sparse bluestore block file: room for tests, never really allocated.
BLOCK_SIZE = 8 << 30


class ClusterError(Exception):
    """The cluster could not be started, reached or stopped; the message says which step and why."""


@attrs.frozen
class Cluster:
    """How clients reach a running test cluster (``conf`` and ``keyring`` are what qemu's rbd: takes)."""

    directory: str
    conf: str
    keyring: str
    user: str = "admin"
    pool: str = "rbd"
    rgw_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None

    def rbd_filename(self, image: str, snapshot: str | None = None) -> str:
        """qemu's ``rbd:`` filename of ``image`` (at ``snapshot``) in this cluster's pool."""
        snap = f"@{snapshot}" if snapshot else ""
        return f"rbd:{self.pool}/{image}{snap}:conf={self.conf}:id={self.user}:keyring={self.keyring}"

    def client_args(self) -> list[str]:
        """The ``-c CONF --id USER -k KEYRING`` arguments of ceph's command-line tools."""
        return ["-c", self.conf, "--id", self.user, "-k", self.keyring]


@attrs.frozen
class _Layout:
    """The files of a cluster directory, and the ports its conf names."""

    directory: Path
    mon_v2: int = 0
    mon_v1: int = 0
    rgw_port: int = 0

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def run(self) -> Path:
        return self.directory / "run"

    def keyring(self, name: str) -> Path:
        """Where the key of entity ``name`` lives (what the conf's ``$cluster.$name.keyring`` expands to)."""
        return self.directory / f"ceph.{name}.keyring"


#: Ports a new cluster's mon and radosgw are picked from: below Linux's ephemeral range (32768-60999), so
#: that an outgoing connection cannot take one between picking and binding.
PORT_RANGE = (20000, 32000)
#: Bootstraps tried with new ports when one was taken meanwhile ("Address already in use").
BOOTSTRAP_ATTEMPTS = 3


class PortTaken(ClusterError):
    """A port the cluster was to listen on is held by another process."""


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` now (connections in TIME_WAIT do not count, as for the daemons)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    """``count`` distinct ports of :data:`PORT_RANGE` free now (a daemon may still lose one: see PortTaken)."""
    rng = secrets.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*PORT_RANGE)
        if port not in ports and _port_free(port):
            ports.append(port)
    return ports


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on TCP ``port`` (IPv4 or IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    return inodes


def _owns_port(pid: int, port: int) -> bool:
    """Process ``pid`` holds the socket listening on ``port`` (not some other process's listener)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return any(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


def _daemon_env() -> dict[str, str]:
    """The environment without the variables that would also reach the daemons (the notes' keyring trap)."""
    env = dict(os.environ)
    for name in ("CEPH_ARGS", "CEPH_KEYRING", "CEPH_CONF"):
        env.pop(name, None)
    return env


def _raise_nofile() -> None:
    """A file limit an OSD can live with (1024 is too low), raised in this process: its children inherit it.
    (Not in a ``preexec_fn``: that runs between fork and exec, unsafe in a process with threads.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _left(deadline: float, step: float) -> float:
    """Seconds a step may take: its own limit, or what is left until ``deadline`` if less."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClusterError("the start's deadline passed")
    return min(step, left)


def _run(args: Sequence[str | Path], *, what: str, stdin: str | None = None, timeout: float = 60) -> str:
    """Run a Ceph tool; its stdout, or ClusterError naming ``what`` with the tool's output (PortTaken when a
    port was taken)."""
    try:
        result = subprocess.run(
            [str(a) for a in args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_daemon_env(),
        )
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"{what}: {args[0]} did not finish in {timeout:g} s") from e
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        error = PortTaken if "Address already in use" in output else ClusterError
        raise error(f"{what}: {args[0]} exited {result.returncode}: {output}")
    return result.stdout


def _conf_text(layout: _Layout, fsid: str) -> str:
    """ceph.conf: loopback only, redundancy of one, small PG counts, fast ticks, all paths under the directory."""
    d = layout.directory
    mon_addr = f"[v2:127.0.0.1:{layout.mon_v2},v1:127.0.0.1:{layout.mon_v1}]"
    daemon_paths = (
        f"admin socket = {d}/run/$name.asok\npid file = {d}/run/$name.pid\nlog file = {d}/log/$name.log\n"
        f"keyring = {d}/$cluster.$name.keyring\n"
    )
    return f"""[global]
fsid = {fsid}
mon host = {mon_addr}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = 6800
ms bind port max = 7568
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.1
mgr stats period = 1
mon tick interval = 1
mgr initial modules = iostat
run dir = {d}/run
crash dir = {d}/crash
mon data = {d}/mon/$cluster-$id
mgr data = {d}/mgr/$cluster-$id
osd data = {d}/osd/$cluster-$id
rgw data = {d}/rgw/$cluster-$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {BLOCK_SIZE}
bluestore fsck on mount = false
osd memory target = 1073741824

[mon]
{daemon_paths}[mgr]
{daemon_paths}[osd]
{daemon_paths}[client]
keyring = {d}/$cluster.$name.keyring

[client.rgw.a]
{daemon_paths}rgw frontends = beast endpoint=127.0.0.1:{layout.rgw_port}
"""


def _make_keys(layout: _Layout) -> Path:
    """The mon keyring holding mon., client.admin, mgr.x and client.rgw.a (each also in its own keyring)."""
    mon_keyring = layout.directory / "mon.keyring"
    caps = {
        "client.admin": ["mon", "allow *", "osd", "allow *", "mds", "allow *", "mgr", "allow *"],
        "mgr.x": ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"],
        "client.rgw.a": ["mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw"],
    }
    _run(
        ["ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
        what="mon key",
    )
    for name, cap in caps.items():
        path = layout.keyring(name)
        cap_args = [a for i in range(0, len(cap), 2) for a in ("--cap", cap[i], cap[i + 1])]
        _run(["ceph-authtool", "--create-keyring", path, "--gen-key", "-n", name, *cap_args], what=f"{name} key")
        _run(["ceph-authtool", mon_keyring, "--import-keyring", path], what=f"import {name} key")
    return mon_keyring


def _ceph(layout: _Layout, *args: str, what: str, stdin: str | None = None, timeout: float = 60) -> str:
    """``ceph ARGS`` as client.admin of this cluster."""
    admin = ["-c", str(layout.conf), "-n", "client.admin", "-k", str(layout.keyring("client.admin"))]
    return _run(["ceph", *admin, "--connect-timeout", "30", *args], what=what, stdin=stdin, timeout=timeout)


def _start_daemon(layout: _Layout, name: str, deadline: float) -> None:
    """Start one daemon (it forks into the background once initialised and writes its pid file)."""
    kind, _, ident = name.partition(".")
    if kind == "client":
        args: list[str | Path] = ["radosgw", "-c", layout.conf, "-n", name]
        (layout.directory / "rgw" / f"ceph-{ident}").mkdir(parents=True, exist_ok=True)
    else:
        args = [f"ceph-{kind}", "-c", layout.conf, "-i", ident]
    _run(args, what=f"start {name}", timeout=_left(deadline, 120))


def _bootstrap_mon(layout: _Layout, fsid: str, deadline: float) -> None:
    """monmap, mon mkfs and start, then the mgr."""
    mon_keyring = _make_keys(layout)
    monmap = layout.directory / "monmap"
    addr = f"[v2:127.0.0.1:{layout.mon_v2},v1:127.0.0.1:{layout.mon_v1}]"
    _run(
        [
            "monmaptool",
            "--create",
            "--fsid",
            fsid,
            "--addv",
            "a",
            addr,
            "--enable-all-features",
            "--set-min-mon-release",
            "pacific",
            monmap,
        ],
        what="monmap",
    )
    (layout.directory / "mon" / "ceph-a").mkdir(parents=True)
    _run(
        ["ceph-mon", "-c", layout.conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", mon_keyring],
        what="mon mkfs",
    )
    # The mon reads its own key where the conf's keyring line says.
    shutil.copy(mon_keyring, layout.keyring("mon.a"))
    _start_daemon(layout, "mon.a", deadline)
    (layout.directory / "mgr" / "ceph-x").mkdir(parents=True)
    _start_daemon(layout, "mgr.x", deadline)


def _bootstrap_osd(layout: _Layout, deadline: float) -> None:
    """Register osd.0 with its key, mkfs bluestore on a sparse file, start it."""
    osd_uuid = str(uuid.uuid4())
    key = _run(["ceph-authtool", "--gen-print-key"], what="osd key").strip()
    osd_id = _ceph(
        layout,
        "osd",
        "new",
        osd_uuid,
        "-i",
        "-",
        what="osd new",
        stdin=json.dumps({"cephx_secret": key}),
        timeout=_left(deadline, 60),
    ).strip()
    if osd_id != "0":
        raise ClusterError(f"osd new: expected id 0, got {osd_id!r}")
    _run(
        ["ceph-authtool", "--create-keyring", layout.keyring("osd.0"), "--name", "osd.0", "--add-key", key],
        what="osd keyring",
    )
    (layout.directory / "osd" / "ceph-0").mkdir(parents=True)
    mkfs: list[str | Path] = ["ceph-osd", "-c", layout.conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid]
    _run(mkfs, what="osd mkfs", timeout=_left(deadline, 180))
    _start_daemon(layout, "osd.0", deadline)


def _status(layout: _Layout, deadline: float) -> dict[str, Any]:
    text = _ceph(layout, "status", "-f", "json", what="ceph status", timeout=_left(deadline, 40))
    status: dict[str, Any] = json.loads(text)
    return status


def _healthy(status: dict[str, Any]) -> bool:
    """HEALTH_OK, every PG active+clean, the mgr available and the OSD up."""
    pgmap = status.get("pgmap", {})
    clean = sum(s["count"] for s in pgmap.get("pgs_by_state", []) if s["state_name"] == "active+clean")
    osds = status.get("osdmap", {})
    return bool(
        status.get("health", {}).get("status") == "HEALTH_OK"
        and clean == pgmap.get("num_pgs", -1)
        and status.get("mgrmap", {}).get("available", False)
        and osds.get("num_up_osds", 0) >= 1
    )


def _wait_healthy(layout: _Layout, deadline: float) -> None:
    """Poll ``ceph status`` until healthy, or ClusterError with the last status seen."""
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = _status(layout, deadline)
        except ClusterError:
            last = {}
        if _healthy(last):
            return
        time.sleep(0.5)
    health = json.dumps(last.get("health", {}).get("checks", {}))[:2000]
    raise ClusterError(f"cluster in {layout.directory} not healthy in time: {health} (logs in {layout.directory}/log)")


def _wait_osd_up(layout: _Layout, deadline: float) -> None:
    """Until the OSD is up; a ``ceph status`` that fails meanwhile (the mon still starting) is asked again."""
    last = ""
    while time.monotonic() < deadline:
        try:
            if _status(layout, deadline).get("osdmap", {}).get("num_up_osds", 0) >= 1:
                return
        except ClusterError as e:
            last = f" (last: {e})"
        time.sleep(0.5)
    raise ClusterError(f"osd.0 did not come up (log: {layout.directory}/log/osd.0.log){last}")


def _bootstrap_rgw(layout: _Layout, deadline: float) -> tuple[str, str]:
    """Start radosgw and create the S3 user; its access and secret keys."""
    _start_daemon(layout, "client.rgw.a", deadline)
    access, secret = secrets.token_hex(10).upper(), secrets.token_urlsafe(30)
    admin: list[str | Path] = ["-c", layout.conf, "-n", "client.admin", "-k", layout.keyring("client.admin")]
    _run(
        [
            "radosgw-admin",
            *admin,
            "user",
            "create",
            f"--uid={S3_USER}",
            f"--display-name={S3_USER}",
            f"--access-key={access}",
            f"--secret={secret}",
        ],
        what="rgw user",
        timeout=_left(deadline, 120),
    )
    return access, secret


def _save(layout: _Layout, cluster: Cluster) -> None:
    state = {
        "cluster": attrs.asdict(cluster),
        "mon_v2": layout.mon_v2,
        "mon_v1": layout.mon_v1,
        "rgw_port": layout.rgw_port,
    }
    path = layout.directory / STATE_FILE
    path.write_text(json.dumps(state, indent=2) + "\n")
    path.chmod(0o600)


def _bootstrap_once(directory: Path, *, rgw: bool, deadline: float) -> Cluster:
    """A new cluster in the empty ``directory`` (PortTaken if a port was taken between picking and binding)."""
    mon_v2, mon_v1, rgw_port = _pick_ports(3)
    layout = _Layout(directory, mon_v2=mon_v2, mon_v1=mon_v1, rgw_port=rgw_port)
    for sub in ("run", "log", "crash"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    fsid = str(uuid.uuid4())
    layout.conf.write_text(_conf_text(layout, fsid))
    _bootstrap_mon(layout, fsid, deadline)
    _bootstrap_osd(layout, deadline)
    _wait_osd_up(layout, deadline)
    _ceph(layout, "osd", "pool", "create", "rbd", what="create the rbd pool", timeout=_left(deadline, 60))
    admin: list[str | Path] = ["-c", layout.conf, "-n", "client.admin", "-k", layout.keyring("client.admin")]
    _run(["rbd", *admin, "pool", "init", "rbd"], what="rbd pool init", timeout=_left(deadline, 120))
    access = secret = None
    if rgw:
        access, secret = _bootstrap_rgw(layout, deadline)
    cluster = Cluster(
        directory=str(directory),
        conf=str(layout.conf),
        keyring=str(layout.keyring("client.admin")),
        rgw_endpoint=f"http://127.0.0.1:{layout.rgw_port}" if rgw else None,
        s3_access_key=access,
        s3_secret_key=secret,
    )
    _save(layout, cluster)
    return cluster


def _bootstrap(directory: Path, *, rgw: bool, deadline: float) -> Cluster:
    """A new cluster in the empty ``directory``: again with new ports (the directory emptied) when one was
    taken before a daemon bound it, up to :data:`BOOTSTRAP_ATTEMPTS` times; healthy on return."""
    for attempt in range(1, BOOTSTRAP_ATTEMPTS + 1):
        try:
            cluster = _bootstrap_once(directory, rgw=rgw, deadline=deadline)
            _wait_ready(directory, cluster, deadline)
            return cluster
        except PortTaken:
            if attempt == BOOTSTRAP_ATTEMPTS:
                raise
            stop(directory)
            for entry in directory.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.name != OWNER_FILE:
                    entry.unlink()
    raise AssertionError("unreachable")


def _load_state(directory: Path) -> tuple[_Layout, Cluster]:
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"no test cluster in {directory} (no {STATE_FILE})") from None
    layout = _Layout(directory, mon_v2=state["mon_v2"], mon_v1=state["mon_v1"], rgw_port=state["rgw_port"])
    return layout, Cluster(**state["cluster"])


def load(directory: str | os.PathLike[str]) -> Cluster:
    """The cluster that ``start`` made in ``directory`` (whether it runs or not)."""
    return _load_state(Path(directory).resolve())[1]


def _restart(directory: Path, *, rgw: bool, deadline: float) -> Cluster:
    """Start the daemons of an existing cluster that are not running (their saved ports must be free: a
    mon's is in its monmap); add RGW if asked and missing. Healthy on return."""
    layout, cluster = _load_state(directory)
    ports = {"mon.a": (layout.mon_v2, layout.mon_v1), "client.rgw.a": (layout.rgw_port,)}
    for name, numbers in ports.items():
        taken = [n for n in numbers if _running_pid(layout, name) is None and not _port_free(n)]
        if taken:
            raise PortTaken(f"{name} of {directory} cannot start: port {taken[0]} is held by another process")
    for name in DAEMONS[:3]:
        if _running_pid(layout, name) is None:
            _start_daemon(layout, name, deadline)
    if cluster.rgw_endpoint is not None:
        if _running_pid(layout, "client.rgw.a") is None:
            _start_daemon(layout, "client.rgw.a", deadline)
    elif rgw:
        _wait_osd_up(layout, deadline)
        access, secret = _bootstrap_rgw(layout, deadline)
        cluster = attrs.evolve(
            cluster, rgw_endpoint=f"http://127.0.0.1:{layout.rgw_port}", s3_access_key=access, s3_secret_key=secret
        )
        _save(layout, cluster)
    _wait_ready(directory, cluster, deadline)
    return cluster


def _check_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"Ceph is not installed (missing {', '.join(missing)}); run ./setup.sh")


def start(directory: str | os.PathLike[str], *, rgw: bool = True, timeout: float = 120) -> Cluster:
    """Bootstrap a cluster in ``directory`` (created if needed), or restart the one it holds; healthy on return.

    Healthy: HEALTH_OK, every PG active+clean, the mgr available, the ``rbd`` pool initialised and,
    with ``rgw``, our radosgw answering on its port with an S3 user. Every step gets what is left of
    ``timeout`` at most. On failure (or an interrupt) the daemons started are stopped.
    """
    _check_tools()
    _raise_nofile()
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    try:
        if (path / STATE_FILE).exists():
            return _restart(path, rgw=rgw, deadline=deadline)
        if any(entry.name != OWNER_FILE for entry in path.iterdir()):
            raise ClusterError(f"{path} is neither empty nor a test cluster")
        return _bootstrap(path, rgw=rgw, deadline=deadline)
    except BaseException:
        stop(path)
        raise


def _wait_ready(directory: Path, cluster: Cluster, deadline: float) -> None:
    """Until the cluster is healthy and, with RGW, our radosgw listens on its port."""
    layout = _load_state(directory)[0]
    _wait_healthy(layout, deadline)
    if cluster.rgw_endpoint is not None:
        _wait_rgw(layout, deadline)


def _wait_rgw(layout: _Layout, deadline: float) -> None:
    """Until our radosgw (its pid file's process) holds the socket listening on its port: another session's
    RGW answering there is not ours. PortTaken once another process has held the port for 2 s."""
    taken_since = None
    while time.monotonic() < deadline:
        pid = _running_pid(layout, "client.rgw.a")
        if pid is not None and _owns_port(pid, layout.rgw_port):
            return
        if _listening_inodes(layout.rgw_port):
            taken_since = taken_since or time.monotonic()
            if time.monotonic() - taken_since > 2:
                raise PortTaken(f"radosgw's port {layout.rgw_port} is held by another process")
        time.sleep(0.2)
    raise ClusterError(f"radosgw does not listen on port {layout.rgw_port} (log: {layout.directory}/log)")


def _running_pid(layout: _Layout, name: str) -> int | None:
    """The pid in ``name``'s pid file if that process is this cluster's daemon (not a reused pid)."""
    try:
        pid = int((layout.run / f"{name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid if str(layout.conf).encode() in cmdline else None


def stop(directory: str | os.PathLike[str], *, timeout: float = 30) -> None:
    """Stop the cluster's daemons by their pid files (SIGTERM, SIGKILL after ``timeout``); never by name."""
    layout = _Layout(Path(directory).resolve())
    for name in reversed(DAEMONS):
        pid = _running_pid(layout, name)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running_pid(layout, name) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running_pid(layout, name) == pid:
            os.kill(pid, signal.SIGKILL)
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline + 10:
                time.sleep(0.05)


def running(directory: str | os.PathLike[str]) -> list[str]:
    """The daemons of the cluster in ``directory`` that run now."""
    layout = _Layout(Path(directory).resolve())
    return [name for name in DAEMONS if _running_pid(layout, name) is not None]


def sweep(parent: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Stop (by pid files) and remove the clusters in ``parent``/``prefix``* whose owner process is gone, as
    a SIGKILLed test session leaves them (daemons using about 0.5 GiB); the directories removed."""
    return claims.sweep(parent, prefix, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: start, stop or status of the cluster in DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("directory")
    parser.add_argument("--no-rgw", action="store_true", help="no radosgw (S3) on a new cluster")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(json.dumps(attrs.asdict(start(args.directory, rgw=not args.no_rgw, timeout=args.timeout))))
        elif args.action == "stop":
            stop(args.directory)
        else:
            cluster = load(args.directory)
            up = running(args.directory)
            print(json.dumps({"cluster": attrs.asdict(cluster), "running": up}))
            if up:
                print(_ceph(_Layout(Path(args.directory).resolve()), "status", what="ceph status"), end="")
    except ClusterError as e:
        print(f"ceph_cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
