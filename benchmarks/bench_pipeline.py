#!/usr/bin/env python3
"""Benchmark one VM backup through the whole pipeline with added network latency (needs root).

Run with the project's venv python, as root (it creates a network namespace)::

    /work/main/.venv/bin/python benchmarks/bench_pipeline.py --quick          # smoke test
    /work/main/.venv/bin/python benchmarks/bench_pipeline.py --write-results  # adds a section to RESULTS.md

Layout: the node side runs in a network namespace of its own (``sdbench-node-<pid>``), joined to the
root namespace (the hub side) by a veth pair, 10.213.0.1/30 (hub) - 10.213.0.2/30 (node):

* hub side (root namespace): vcsim on 10.213.0.1, the hub (``sendense-nbd hub``) with its API, NBD
  ports and reverse-forwarded node API on 127.0.0.1 and its SSH endpoint on 10.213.0.1;
* node side (the namespace): the node (``sendense-backup node``, ``[node] connections = N``) and the
  SSH tunnel (``sendense-backup tunnel``), which listens on the namespace's 127.0.0.1 for the hub's NBD
  ports and API and reverse-forwards the node API to the hub's 127.0.0.1.

The namespace reaches the hub only across the veth: the hub's API and NBD ports listen on the root
namespace's loopback, so every byte of backup data crosses the link inside the SSH tunnel (the
benchmark checks that the hub's ports are not reachable from the namespace, and counts the bytes on the
veth). vSphere calls also cross the link; the disk data itself is read by the vddk stand-in from the
simulator's state directory (a real VDDK would read it from ESXi).

Latency: ``tc qdisc replace dev VETH root netem delay D/2`` on BOTH ends of the veth, so the added
round-trip time is D (0, 10, 50 ms by default; the 0 ms case has no qdisc at all). Kernels without
sch_netem (``CONFIG_NET_SCH_NETEM`` not set, as on this machine) get ``--link relay`` instead: two TUN
devices (one per namespace, MTU 65000, like veth's 64 KiB GSO packets) joined by a relay process of this
script that holds every IP packet D/2 per direction (in order, no loss, unbounded queue); the 0 ms case
also goes through the relay. The RTT is measured from the namespace as the median TCP connect time to
the hub side (``ping`` is not installed).

One run = ``POST /api/v1/backups {"vm_path": ..., "mode": "full"}`` to the hub, polled every 50 ms until
it completes; MB/s = 10^6 bytes of allocated disk data (what the full backup copies) per second of wall
time from the POST to the completed state (snapshot, copy and cleanup included). For each latency and
each connection count: a warm-up run, then ``--rounds`` rounds alternating the order of the connection
counts; medians. The first measured run of every case is verified with ``qemu-img compare``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "RESULTS.md"
BIN = REPO / ".venv" / "bin"
PYTHON = BIN / "python"
SIMULATOR = REPO / "simulator"
MiB = 1 << 20

NS_PREFIX = "sdbench-node-"
VETH_HUB_PREFIX, VETH_NODE_PREFIX = "sdbh", "sdbn"  # + pid: <= 15 characters
HUB_IP, NODE_IP, PREFIXLEN = "10.213.0.1", "10.213.0.2", 30
VM_PATH = "/DC0/vm/DC0_H0_VM0"
NODE_PORT = 8081  # the node API inside the namespace
CHUNK = 4 * MiB

_vmdisk_spec = importlib.util.spec_from_file_location("vmdisk", SIMULATOR / "vmdisk.py")
assert _vmdisk_spec is not None and _vmdisk_spec.loader is not None
vmdisk: Any = importlib.util.module_from_spec(_vmdisk_spec)
_vmdisk_spec.loader.exec_module(vmdisk)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------
# helpers


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def git(*args: str) -> str:
    return sh("git", "-C", str(REPO), *args, check=False).stdout.strip()


def free_port_range(count: int, hosts: tuple[str, ...]) -> range:
    """``count`` consecutive ports free now on every host (best effort on a busy machine)."""
    for start in range(31000, 60000, 97):
        ports = range(start, start + count)
        held: list[socket.socket] = []
        try:
            for host in hosts:
                for port in ports:
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((host, port))
            return ports
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free port range")


class Proc:
    """A subprocess that prints one JSON line on stdout when ready; stderr (and later stdout) to a log."""

    def __init__(self, name: str, command: list[str], logdir: Path, netns: str | None = None) -> None:
        self.name = name
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]  # ip execs the command: same pid
        self.log = logdir / f"{name}.log"
        self._log: IO[bytes] = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"{name} did not start: {self.log.read_text(errors='replace')[-2000:]}")
        self.info: dict[str, Any] = json.loads(line)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)

    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class Api:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/") + "/api/v1"

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


# --------------------------------------------------------------------------
# the network namespace


def remove_leftovers() -> None:
    """Namespaces and veths of crashed runs (their pid is gone); never those of a live run."""
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(NS_PREFIX) and not _alive(name[len(NS_PREFIX) :]):
            left = sh("ip", "netns", "pids", name, check=False).stdout.split()
            print(f"removing leftover namespace {name}" + (f" (processes still in it: {left})" if left else ""))
            sh("ip", "netns", "delete", name, check=False)
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(VETH_HUB_PREFIX) and not _alive(name[len(VETH_HUB_PREFIX) :]):
            print(f"removing leftover link {name}")
            sh("ip", "link", "delete", name, check=False)
    taken = sh("ip", "-o", "addr", "show", "to", f"{HUB_IP}/{PREFIXLEN}").stdout.strip()
    if taken:
        raise RuntimeError(f"{HUB_IP}/{PREFIXLEN} is in use here: {taken}")


def _alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def netem_available() -> bool:
    """Whether this kernel has sch_netem (tried on a throwaway veth pair)."""
    name = f"sdbt{os.getpid()}"
    if sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p", check=False).returncode:
        return False
    try:
        return not sh("tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms", check=False).returncode
    finally:
        sh("ip", "link", "delete", name, check=False)


@dataclass
class Netns:
    name: str
    veth_hub: str
    veth_node: str
    method: str = "netem"
    relay: subprocess.Popen[str] | None = None
    delay_ms: float = 0.0

    @classmethod
    def create(cls, method: str) -> Netns:
        pid = os.getpid()
        ns = cls(f"{NS_PREFIX}{pid}", f"{VETH_HUB_PREFIX}{pid}", f"{VETH_NODE_PREFIX}{pid}", method)
        sh("ip", "netns", "add", ns.name)
        try:
            if method == "netem":
                sh("ip", "link", "add", ns.veth_hub, "type", "veth", "peer", "name", ns.veth_node)
                sh("ip", "link", "set", ns.veth_node, "netns", ns.name)
            else:  # two TUN devices joined by our relay (below), which delays the packets
                ns.relay = subprocess.Popen(
                    [str(PYTHON), __file__, "--relay", ns.name, ns.veth_hub, ns.veth_node],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert ns.relay.stdout is not None
                if ns.relay.stdout.readline().strip() != "ready":
                    raise RuntimeError("the delay relay did not start")
                sh("ip", "link", "set", ns.veth_hub, "mtu", str(TUN_MTU))
                ns.run("ip", "link", "set", ns.veth_node, "mtu", str(TUN_MTU))
            sh("ip", "addr", "add", f"{HUB_IP}/{PREFIXLEN}", "dev", ns.veth_hub)
            sh("ip", "link", "set", ns.veth_hub, "up")
            ns.run("ip", "addr", "add", f"{NODE_IP}/{PREFIXLEN}", "dev", ns.veth_node)
            ns.run("ip", "link", "set", ns.veth_node, "up")
            ns.run("ip", "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def set_delay(self, rtt_ms: float) -> None:
        """Added RTT: half of it on each direction (netem: each end's egress; 0: no qdisc at all)."""
        self.delay_ms = rtt_ms
        if self.relay is not None:
            assert self.relay.stdin is not None and self.relay.stdout is not None
            self.relay.stdin.write(f"{rtt_ms / 2}\n")
            self.relay.stdin.flush()
            if self.relay.stdout.readline().strip() != "ok":
                raise RuntimeError("the delay relay did not take the new delay")
            return
        for prefix, dev in (((), self.veth_hub), (("ip", "netns", "exec", self.name), self.veth_node)):
            if rtt_ms:
                sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{rtt_ms / 2:g}ms",
                   "limit", "100000")  # fmt: skip
            else:
                sh(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def measure_rtt(self, samples: int = 15) -> float:
        """Median TCP connect time (one round trip) from the namespace to the hub side, in ms."""
        with socket.socket() as server:
            server.bind((HUB_IP, 0))
            server.listen(64)
            port = server.getsockname()[1]
            probe = (
                "import socket, statistics, time\n"
                "times = []\n"
                f"for _ in range({samples}):\n"
                "    t = time.perf_counter()\n"
                f"    s = socket.create_connection(({HUB_IP!r}, {port}), timeout=10)\n"
                "    times.append(time.perf_counter() - t)\n"
                "    s.close()\n"
                "print(statistics.median(times) * 1000)\n"
            )
            done = self.run(str(PYTHON), "-c", probe)
        return float(done.stdout.strip())

    def tx_bytes(self) -> int:
        return int(Path(f"/sys/class/net/{self.veth_hub}/statistics/rx_bytes").read_text()) + int(
            Path(f"/sys/class/net/{self.veth_hub}/statistics/tx_bytes").read_text()
        )

    def reachable(self, port: int) -> bool:
        done = self.run(
            str(PYTHON), "-c", f"import socket; socket.create_connection(({HUB_IP!r}, {port}), timeout=3)", check=False
        )
        return done.returncode == 0

    def delete(self) -> None:
        if self.relay is not None:
            self.relay.terminate()
            try:
                self.relay.wait(10)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait(10)
        sh("ip", "netns", "delete", self.name, check=False)
        sh("ip", "link", "delete", self.veth_hub, check=False)  # gone with the namespace's end, normally


# --------------------------------------------------------------------------
# the delay relay: used when the kernel has no sch_netem (CONFIG_NET_SCH_NETEM not set)

TUN_MTU = 65000  # like veth's 64 KiB GSO packets: a packet rate Python keeps up with
TUNSETIFF, IFF_TUN, IFF_NO_PI, CLONE_NEWNET = 0x400454CA, 0x0001, 0x1000, 0x40000000


def _open_tun(name: str) -> int:
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def relay_main(netns: str, hub_dev: str, node_dev: str) -> int:
    """Create TUN ``hub_dev`` here and ``node_dev`` in ``netns``; pass IP packets between them, each
    delayed by the one-way delay (ms) last read from stdin ("ok" on stdout after each). Order is kept."""
    import collections
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    hub = _open_tun(hub_dev)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(target, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    node = _open_tun(node_dev)
    libc.setns(home, CLONE_NEWNET)
    print("ready", flush=True)
    delay = 0.0
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {hub: collections.deque(), node: collections.deque()}
    other = {hub: node, node: hub}
    stdin = sys.stdin.fileno()
    drops = 0
    while True:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else None
        ready, _, _ = select.select([hub, node, stdin], [], [], timeout)
        for fd in ready:
            if fd == stdin:
                line = sys.stdin.readline()
                if not line:
                    return 0
                delay = float(line) / 1000
                print("ok", flush=True)
                continue
            while True:
                try:
                    packet = os.read(fd, TUN_MTU + 64)
                except BlockingIOError:
                    break
                if delay:
                    queues[other[fd]].append((time.monotonic() + delay, packet))
                else:
                    try:
                        os.write(other[fd], packet)
                    except OSError:
                        drops += 1
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                try:
                    os.write(fd, queue.popleft()[1])
                except OSError:
                    drops += 1


# --------------------------------------------------------------------------
# the pipeline


@dataclass
class Case:
    delay: float
    connections: int
    seconds: list[float] = field(default_factory=list)
    warmup: float = 0.0
    link_bytes: list[int] = field(default_factory=list)
    node_seconds: list[float] = field(default_factory=list)
    verified: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class Pipeline:
    def __init__(self, root: Path, ns: Netns, disk_mib: int, fill: float, tunnel_connections: int) -> None:
        self.root, self.ns, self.tunnel_connections = root, ns, tunnel_connections
        self.logs = root / "logs"
        self.logs.mkdir()
        self.procs: list[Proc] = []
        self.node: Proc | None = None
        build = sh("sh", str(SIMULATOR / "build-vcsim.sh"), timeout=900)
        vcsim_bin = build.stdout.strip().splitlines()[-1]
        state = root / "vcsim"
        state.mkdir()
        self.vcsim = self._start(
            "vcsim",
            [vcsim_bin, "-listen", f"{HUB_IP}:0", "-state", str(state), "-username", "user", "-password", "pass",
             "-vm-disks", "2", "-disk-size-mb", str(disk_mib)],
        )  # fmt: skip
        self.state = state
        self.vm = next(v for v in self.vcsim.info["vms"] if v["path"] == VM_PATH)
        self.data_bytes = self._fill(disk_mib, fill)
        self.copies = {}
        for disk in self.vm["disks"]:
            self.copies[disk["key"]] = root / f"expected-{disk['key']}.raw"
            sh("cp", "--sparse=always", disk["path"], str(self.copies[disk["key"]]), timeout=300)

        keys = root / "keys"
        keys.mkdir()
        import asyncssh

        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(keys / "host"))
        client_key.write_private_key(str(keys / "client"))
        (keys / "authorized_keys").write_bytes(client_key.export_public_key())
        self.keys = keys
        ports = free_port_range(7, ("127.0.0.1", HUB_IP))
        self.nbd_ports = ports[:4]
        self.api_port, self.ssh_port, self.node_reverse = ports[4:]
        (keys / "known_hosts").write_bytes(f"[{HUB_IP}]:{self.ssh_port} ".encode() + host_key.export_public_key())
        self.hub = self._start(
            "hub",
            [str(PYTHON), "-m", "sendense_nbd", "hub", "--repo", str(root / "repo"),
             "--listen", f"127.0.0.1:{self.api_port}",
             "--nbd-ports", f"{self.nbd_ports.start}-{self.nbd_ports.stop - 1}",
             "--nbd-bind", "127.0.0.1", "--nbd-advertise", "127.0.0.1",
             "--public-url", f"http://127.0.0.1:{self.api_port}",
             "--node-url", f"http://127.0.0.1:{self.node_reverse}",
             "--ssh-listen", f"{HUB_IP}:{self.ssh_port}", "--ssh-host-key", str(keys / "host"),
             "--ssh-authorized-keys", str(keys / "authorized_keys"),
             "--ssh-node-api", f"127.0.0.1:{self.node_reverse}", "--keep", "2", "--job-timeout", "1800"],
        )  # fmt: skip
        self.api = Api(f"http://127.0.0.1:{self.api_port}")
        self.tunnel = self._start(
            "tunnel",
            [str(BIN / "sendense-backup"), "tunnel", "--hub", f"{HUB_IP}:{self.ssh_port}",
             "--key", str(keys / "client"), "--known-hosts", str(keys / "known_hosts"),
             "--ports", f"{self.nbd_ports.start}-{self.nbd_ports.stop - 1}",
             "--listen-host", "127.0.0.1", "--dest-host", "127.0.0.1",
             "--forward", f"127.0.0.1:{self.api_port}=127.0.0.1:{self.api_port}",
             "--remote-forward", f"127.0.0.1:{self.node_reverse}=127.0.0.1:{NODE_PORT}",
             "--connections", str(tunnel_connections)],
            netns=ns.name,
        )  # fmt: skip
        if not self.tunnel.info.get("connected"):
            raise RuntimeError(f"the tunnel did not connect: {self.tunnel.info}")

    def _start(self, name: str, command: list[str], netns: str | None = None) -> Proc:
        proc = Proc(name, command, self.logs, netns)
        self.procs.append(proc)
        return proc

    def _fill(self, disk_mib: int, fill: float) -> int:
        """Random data in 4 MiB pieces, spread evenly: ``fill`` of each disk; returns the bytes written."""
        pieces = disk_mib * MiB // CHUNK
        wanted = round(pieces * fill)
        written = 0
        for disk in self.vm["disks"]:
            for i in range(wanted):
                index = i * pieces // wanted
                vmdisk.write(self.state, self.vm["moref"], disk["key"], index * CHUNK, os.urandom(CHUNK))
                written += CHUNK
        return written

    def use_connections(self, connections: int) -> None:
        """(Re)start the node with ``[node] connections = N``."""
        if self.node is not None and self.node.info.get("connections") == connections:
            return
        if self.node is not None:
            self.node.stop()
            self.procs.remove(self.node)
            self.node = None
        node_dir = self.root / f"node-{connections}"
        node_dir.mkdir(exist_ok=True)
        password = node_dir / "vcenter.password"
        password.write_text("pass\n")
        password.chmod(0o600)
        config = node_dir / "node.toml"
        config.write_text(
            f"""[vcenter]
endpoint = "{HUB_IP}:{self.vcsim.info["port"]}"
username = "user"
password_file = "{password}"
thumbprint = "{self.vcsim.info["thumbprintSha256"]}"

[vddk]
plugin = "python {SIMULATOR / "vddk_standin.py"}"
transports = "nbdssl:nbd"

[node]
max_jobs = 1
connections = {connections}
"""
        )
        config.chmod(0o600)
        self.node = self._start(
            f"node-{connections}",
            [str(BIN / "sendense-backup"), "node", "--config", str(config), "--listen", f"127.0.0.1:{NODE_PORT}"],
            netns=self.ns.name,
        )
        self.node.info["connections"] = connections

    def backup(self) -> tuple[float, dict[str, Any], int]:
        """One full backup: (wall seconds, the completed job, bytes that crossed the veth)."""
        link0 = self.ns.tx_bytes()
        started = time.monotonic()
        status, job = self.api.call("POST", "/backups", {"vm_path": VM_PATH, "mode": "full"})
        if status != 201:
            raise RuntimeError(f"POST /backups: {status} {job}")
        while True:
            status, job = self.api.call("GET", f"/backups/{job['job_id']}")
            if job["state"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
        if job["state"] != "completed":
            raise RuntimeError(f"the backup did not complete: {json.dumps(job)[:2000]}")
        # The node's final progress report can land just after the completion (clock stopped already).
        deadline = time.monotonic() + 10
        while (job.get("progress") or {}).get("status") != "completed" and time.monotonic() < deadline:
            time.sleep(0.1)
            job = self.api.call("GET", f"/backups/{job['job_id']}")[1]
        moved = int((job.get("progress") or {}).get("bytes_transferred") or 0)
        if moved != self.data_bytes:
            raise RuntimeError(f"the job reports {moved} bytes transferred, {self.data_bytes} written")
        for disk in job["detail"]["disks"]:
            if not disk["uri"].startswith("nbd://127.0.0.1:"):
                raise RuntimeError(f"unexpected target {disk['uri']}")
        return seconds, job, self.ns.tx_bytes() - link0

    def verify(self, job: dict[str, Any]) -> str:
        points = self.api.call("GET", f"/points?vm_path={VM_PATH}")[1]["points"]
        for disk in job["detail"]["disks"]:
            point = next(p for p in points if p["id"] == disk["point_id"])
            sh("qemu-img", "check", point["path"], timeout=300)
            done = sh("qemu-img", "compare", "-F", "raw", point["path"], str(self.copies[disk["disk_key"]]),
                      check=False, timeout=600)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"restore point {point['path']} differs: {done.stdout} {done.stderr}")
        return "identical"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - best effort
                print(f"stopping {proc.name}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[list[Case], dict[float, float], dict[str, Any]]:
    facts: dict[str, Any] = {}
    remove_leftovers()
    WORK.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pipeline-", dir=WORK))
    method = args.link if args.link != "auto" else ("netem" if netem_available() else "relay")
    facts["method"] = method
    ns = Netns.create(method)
    pipeline: Pipeline | None = None
    cases = [Case(d, c) for d in args.delays for c in args.connections]
    rtts: dict[float, float] = {}
    try:
        print(f"namespace {ns.name}, veth {ns.veth_hub} <-> {ns.veth_node}; work dir {root}", flush=True)
        pipeline = Pipeline(root, ns, args.disk_mib, args.fill, args.tunnel_connections)
        facts["data_bytes"] = pipeline.data_bytes
        # The hub's API and NBD ports are on the root namespace's loopback: the node cannot reach them
        # except through the tunnel.
        facts["direct_reachable"] = [p for p in (pipeline.api_port, *pipeline.nbd_ports) if ns.reachable(p)]
        facts["ssh_reachable"] = ns.reachable(pipeline.ssh_port)
        print(f"data: {pipeline.data_bytes / MiB:.0f} MiB over 2 disks of {args.disk_mib} MiB", flush=True)
        for delay in args.delays:
            ns.set_delay(delay)
            rtts[delay] = ns.measure_rtt()
            print(f"added RTT {delay:g} ms: measured TCP connect RTT {rtts[delay]:.2f} ms", flush=True)
            mine = [c for c in cases if c.delay == delay]
            for case in mine:  # warm-ups
                pipeline.use_connections(case.connections)
                case.warmup, _, _ = pipeline.backup()
                print(f"  warm-up {delay:g} ms x{case.connections}: {case.warmup:.2f} s", flush=True)
            for rnd in range(args.rounds):
                for case in mine if rnd % 2 == 0 else list(reversed(mine)):
                    pipeline.use_connections(case.connections)
                    seconds, job, link = pipeline.backup()
                    case.seconds.append(seconds)
                    if not facts.get("job_sample"):
                        facts["job_sample"] = job
                        (root / "job-sample.json").write_text(json.dumps(job, indent=1))
                    case.link_bytes.append(link)
                    case.node_seconds.append(float((job.get("progress") or {}).get("elapsed_seconds") or 0))
                    if not case.verified:
                        case.verified = pipeline.verify(job)
                    print(
                        f"  {delay:g} ms x{case.connections} round {rnd + 1}: {seconds:.2f} s,"
                        f" {pipeline.data_bytes / seconds / 1e6:.1f} MB/s, {link / 1e6:.0f} MB on the link",
                        flush=True,
                    )
    finally:
        if pipeline is not None:
            pipeline.stop()
        ns.delete()
        if args.keep_work:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return cases, rtts, facts


def table(cases: list[Case], data_bytes: int) -> str:
    lines = [
        "| added RTT | NBD connections per disk | wall s (median) | MB/s (median) | vs 0 ms, same connections"
        " | node's job s (median) | MB on the link per run | restore points |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = {c.connections: c.median for c in cases if c.delay == 0}
    for c in cases:
        ratio = f"{base[c.connections] / c.median:.2f}x" if c.connections in base else ""
        lines.append(
            f"| {c.delay:g} ms | {c.connections} | {c.median:.2f} | {data_bytes / c.median / 1e6:.1f} | {ratio}"
            f" | {statistics.median(c.node_seconds):.2f} | {statistics.median(c.link_bytes) / 1e6:.0f}"
            f" | {c.verified or 'not checked'} |"
        )
    return "\n".join(lines)


def reading(cases: list[Case], load0: float) -> str:
    """A short reading computed from the numbers (the ratios and the spread)."""
    base = {c.connections: c.median for c in cases if c.delay == 0}
    parts = []
    for delay in sorted({c.delay for c in cases} - {0}):
        kept = ", ".join(
            f"{c.connections} connection{'s' if c.connections > 1 else ''} keep {base[c.connections] / c.median:.0%}"
            for c in cases
            if c.delay == delay and c.connections in base
        )
        parts.append(f"with {delay:g} ms added RTT, {kept} of their 0 ms throughput")
    spread = max((max(c.seconds) - min(c.seconds)) / c.median for c in cases if c.seconds)
    return (
        "; ".join(parts)
        + f". Largest spread between rounds of one case: {spread:.0%} of its median. The machine was shared"
        f" (load average {load0:.2f} at start), so treat differences under that spread as noise."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 10, 50], help="Added RTT in ms.")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4], help="NBD connections per disk.")
    parser.add_argument("--tunnel-connections", type=int, default=1, help="SSH connections of the tunnel.")
    parser.add_argument("--disk-mib", type=int, default=512, help="Size of each of the 2 disks.")
    parser.add_argument("--fill", type=float, default=0.5, help="Share of each disk holding random data.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--link", choices=["auto", "netem", "relay"], default="auto",
        help="netem: veth + tc netem; relay: TUN pair + our delay relay (auto: netem when the kernel has it).",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="64 MiB disks, 1 round.")
    parser.add_argument("--keep-work", action="store_true", help="Keep the work directory (logs, repo).")
    parser.add_argument("--note", default="", help="A sentence added to the reading in RESULTS.md.")
    parser.add_argument("--write-results", action="store_true", help="Add a section to benchmarks/RESULTS.md.")
    args = parser.parse_args()
    if args.quick:
        args.disk_mib, args.rounds = 64, 1
    if 0 not in args.delays:
        args.delays.insert(0, 0.0)
    if os.geteuid() != 0:
        print("needs root (ip netns, tc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    cases, rtts, facts = run(args)
    elapsed = time.monotonic() - started
    data = facts["data_bytes"]
    text = table(cases, data)
    print(text)
    tunnel_ok = not facts["direct_reachable"] and facts["ssh_reachable"]
    links = [b for c in cases for b in c.link_bytes]
    print(
        f"tunnel end to end: {'yes' if tunnel_ok else 'NO'} (hub API/NBD ports reachable from the namespace without"
        f" the tunnel: {facts['direct_reachable'] or 'none'}; the link carried {min(links) / 1e6:.0f}-"
        f"{max(links) / 1e6:.0f} MB per run for {data / 1e6:.0f} MB of data)"
    )
    if args.write_results:
        import asyncssh

        rtt_text = ", ".join(f"{d:g} ms added -> {rtts[d]:.2f} ms" for d in args.delays)
        command = " ".join(["./.venv/bin/python benchmarks/bench_pipeline.py", *sys.argv[1:]])
        section = [
            f"## Pipeline with added latency, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC,"
            f" commit {git('rev-parse', '--short', 'HEAD')}"
            + (" (dirty tree)" if git("status", "--porcelain", "--", "sendense_nbd") else ""),
            "",
            f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python"
            f" {platform.python_version()}, asyncssh {asyncssh.__version__}; load average (1 min) {load0:.2f} at"
            f" start, {os.getloadavg()[0]:.2f} at end; {elapsed:.0f} s",
            f"- benchmark: `{command}` (as root)",
            f"- the VM: {VM_PATH} in vcsim, 2 disks of {args.disk_mib} MiB, {args.fill:.0%} random data in 4 MiB"
            f" pieces = {data / MiB:.0f} MiB copied per backup; `mode: full` every run (a fresh restore point)",
            "- hub side = root namespace: vcsim on 10.213.0.1, the hub (API, NBD ports, reverse forward on"
            " 127.0.0.1; SSH endpoint on 10.213.0.1); node side = its own network namespace (10.213.0.2/30):"
            " the node (`[node] connections = N`) and our SSH tunnel"
            f" (`--connections {args.tunnel_connections}`)",
            (
                "- latency: `tc qdisc ... netem delay D/2` on both ends of the veth"
                if facts["method"] == "netem"
                else "- latency: this kernel has no netem (`CONFIG_NET_SCH_NETEM` is not set), so the link is two"
                f" TUN devices (MTU {TUN_MTU}) joined by the benchmark's own relay (`bench_pipeline.py --relay`), which"
                " holds each IP packet D/2 in each direction, in order, unbounded queue, no loss; 0 ms also goes"
                " through the relay"
            )
            + f", so D is added round-trip time; measured RTT (median TCP connect from the node namespace): {rtt_text}",
            f"- tunnel end to end: {'yes' if tunnel_ok else 'NO'}: the hub's API and NBD ports are not reachable"
            f" from the node namespace except through the tunnel; the link carried {min(links) / 1e6:.0f}-"
            f"{max(links) / 1e6:.0f} MB per run (both directions)",
            f"- MB/s = 10^6 bytes of data / wall time from POST /backups to `completed` (snapshot and cleanup"
            f" included); a warm-up run per case, then {args.rounds} rounds alternating the order of the"
            " connection counts; medians; \"node's job s\" = the node's own `elapsed_seconds` in the final"
            " progress report (without the hub -> node dispatch and the poll); bytes = the job's `bytes_transferred`"
            " (checked equal to the data written); the first measured restore point of every case compared with"
            " `qemu-img compare`",
            "",
            text,
            "",
            f"Reading: {reading(cases, load0)}" + (f" {args.note}" if args.note else ""),
        ]
        lines = RESULTS.read_text().split("\n")
        rest = lines[3:]
        while rest and not rest[0].strip():
            rest.pop(0)
        RESULTS.write_text("\n".join([*lines[:3], "", "", *section, "", *rest]))
        print(f"added a section to {RESULTS}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--relay"]:
        sys.exit(relay_main(*sys.argv[2:5]))
    sys.exit(main())
