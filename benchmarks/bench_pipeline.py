#!/usr/bin/env python3
"""Benchmark VM backups through the whole pipeline over an emulated WAN link (needs root).

Run with the project's venv python, as root (it creates a network namespace)::

    /work/main/.venv/bin/python benchmarks/bench_pipeline.py --quick          # smoke test, ~3 min
    /work/main/.venv/bin/python benchmarks/bench_pipeline.py --write-results  # the matrix, <= 25 min

Layout: the node side runs in a network namespace of its own (``sdbench-node-<pid>``), joined to the
root namespace (the hub side) by a link, 10.213.0.1/30 (hub) - 10.213.0.2/30 (node):

* hub side (root namespace): the hub (``sendense-nbd hub``) with its API, NBD ports and reverse-forwarded
  node API on 127.0.0.1 and its embedded SSH endpoint on 10.213.0.1; a private OpenSSH ``sshd`` on
  10.213.0.1 for the OpenSSH tunnels;
* node side (the namespace): vcsim (``--vcenter node``, the default: a node sits next to its vCenter;
  ``--vcenter hub`` puts it on 10.213.0.1, across the link), the node (``sendense-backup node``,
  ``[node] connections = N``) and one tunnel at a time, listening on the namespace's 127.0.0.1 for the
  hub's NBD ports and API and reverse-forwarding the node API to the hub's 127.0.0.1:

  - ``ours``: ``sendense-backup tunnel`` (its defaults, plus ``--tunnel-arg``) to the hub's endpoint;
  - ``ours cubic``: the same with cubic congestion control (``--congestion cubic`` when the tunnel has
    that flag, else the namespace's ``net.ipv4.tcp_congestion_control`` while it connects);
  - ``openssh``: ``ssh -N -L ... -R ...`` with its defaults to the private sshd;
  - ``openssh aes``: the same with ``-c aes128-gcm@openssh.com``.

Link: without sch_netem (``CONFIG_NET_SCH_NETEM`` not set, as here) two TUN devices (MTU 65000) joined
by a relay process of this script (``--relay``) that holds each IP packet RTT/2 per direction (in order,
unbounded queue) and drops ``--loss`` percent of the packets of each direction, with a seeded generator
per direction (reproducible). With netem: ``tc qdisc ... netem delay RTT/2 loss PCT`` on both veth ends.
Before the matrix the relay's own capacity is measured (a TCP stream across it, its CPU time).

A run = ``POST /api/v1/backups {"vm_path": ..., "mode": "full"}`` to the hub, polled every 50 ms until
it completes; every restore point is checked (``qemu-img check`` and ``qemu-img compare`` with a copy of
the disk). Whole-job MB/s = 10^6 bytes of allocated disk data per second from the POST to the completed
state; the node's copy time is the time its job spent in the ``transferring`` stage, seen by a watcher
inside the namespace polling the node API every 50 ms. ``--rounds`` rounds; a round visits every link
and, on each, every (tunnel, connections) variant; every other round reverses both orders (A B B A across
links too: this machine's speed drifts for minutes, and a ratio between links must compare runs of the
same state); medians. A link change restarts the tunnel, and after every tunnel (re)start a warm-up run
goes first (the first backup over a fresh tunnel or a changed path is slower), not in the medians.
Then a 1 MiB incremental (16 x 64 KiB changes) over the 50 ms link, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import bench_results as br  # RESULTS.md sections (benchmarks/ is sys.path[0] when run as a script)

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
BEST_CIPHER = "aes128-gcm@openssh.com"
TUNNELS = ("ours", "openssh", "openssh aes")  # the order of a round (reversed every other round)
CUBIC = "ours cubic"
# The targets: (added RTT, loss %) -> the share of the 0 ms whole-job throughput to keep.
KEEP_TARGETS = {(50.0, 0.0): 0.8, (100.0, 0.0): 0.6, (50.0, 0.5): 0.5}
INCREMENTAL_PIECES, INCREMENTAL_PIECE, INCREMENTAL_STRIDE = 16, 64 * 1024, 256 * 1024  # 1 MiB changed

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def wait_connectable(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until ``host:port`` (in this namespace) accepts a connection; fails early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


class Proc:
    """A subprocess; with ``ready_line`` it must print one JSON line on stdout when ready.

    stderr (and later stdout) go to a log file."""

    def __init__(
        self,
        name: str,
        command: list[str],
        logdir: Path,
        netns: str | None = None,
        *,
        ready_line: bool = True,
        on_line: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name, self.on_line = name, on_line
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]  # ip execs the command: same pid
        self.log = logdir / f"{name.replace(' ', '-')}.log"
        self._log: IO[bytes] = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        self.info: dict[str, Any] = {}
        if ready_line:
            ready, _, _ = select.select([self.proc.stdout], [], [], 60)
            line = self.proc.stdout.readline() if ready else b""
            if not line:
                self.stop()
                raise RuntimeError(f"{name} did not start: {self.log.read_text(errors='replace')[-2000:]}")
            self.info = json.loads(line)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.on_line is not None:
                self.on_line(line)
            self._log.write(line)

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
# the network namespace and its link


@dataclass(frozen=True)
class Link:
    """An emulated link: added round-trip time and packet loss per direction."""

    rtt_ms: float
    loss_pct: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms" + (f" + {self.loss_pct:g}% loss" if self.loss_pct else "")


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
    link: Link = Link(0.0)

    @classmethod
    def create(cls, method: str) -> Netns:
        pid = os.getpid()
        ns = cls(f"{NS_PREFIX}{pid}", f"{VETH_HUB_PREFIX}{pid}", f"{VETH_NODE_PREFIX}{pid}", method)
        sh("ip", "netns", "add", ns.name)
        try:
            if method == "netem":
                sh("ip", "link", "add", ns.veth_hub, "type", "veth", "peer", "name", ns.veth_node)
                sh("ip", "link", "set", ns.veth_node, "netns", ns.name)
            else:  # two TUN devices joined by our relay (below), which delays and drops the packets
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

    def sysctl(self, name: str, value: str | None = None) -> str:
        """The namespace's sysctl ``name`` (set to ``value`` first when given)."""
        if value is not None:
            self.run("sysctl", "-q", "-w", f"{name}={value}")
        return self.run("sysctl", "-n", name).stdout.strip().replace("\t", " ")

    def _relay_command(self, line: str) -> str:
        assert self.relay is not None and self.relay.stdin is not None and self.relay.stdout is not None
        self.relay.stdin.write(line + "\n")
        self.relay.stdin.flush()
        return self.relay.stdout.readline().strip()

    def set_link(self, link: Link, seed: int) -> None:
        """Added RTT (half on each direction) and loss (each direction; netem: each end's egress)."""
        self.link = link
        if self.relay is not None:
            if self._relay_command(f"{link.rtt_ms / 2} {link.loss_pct} {seed}") != "ok":
                raise RuntimeError("the delay relay did not take the new link")
            return
        for prefix, dev in (((), self.veth_hub), (("ip", "netns", "exec", self.name), self.veth_node)):
            if link.rtt_ms or link.loss_pct:
                sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{link.rtt_ms / 2:g}ms",
                   "loss", "random", f"{link.loss_pct:g}%", "limit", "100000")  # fmt: skip
            else:
                sh(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def relay_stats(self) -> dict[str, Any]:
        """The relay's packet and drop counters per direction (empty with netem)."""
        return json.loads(self._relay_command("stats")) if self.relay is not None else {}

    def relay_cpu(self) -> float:
        return cpu_seconds(self.relay.pid) if self.relay is not None else 0.0

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

    def stream(self, total: int, streams: int) -> tuple[float, float]:
        """``total`` bytes over ``streams`` TCP connections from the namespace to the hub side (plain
        sockets, no tunnel): (MB/s, relay CPU seconds per second)."""
        with socket.socket() as server:
            server.bind((HUB_IP, 0))
            server.listen(64)
            port = server.getsockname()[1]
            sinks = [threading.Thread(target=_sink, args=(server,), daemon=True) for _ in range(streams)]
            for sink in sinks:
                sink.start()
            sender = (
                "import socket, threading\n"
                f"def send(n):\n    s = socket.create_connection(({HUB_IP!r}, {port}), timeout=60)\n"
                "    block = bytes(1 << 20)\n"
                "    for _ in range(n >> 20):\n        s.sendall(block)\n    s.close()\n"
                f"ts = [threading.Thread(target=send, args=({total // streams},)) for _ in range({streams})]\n"
                "[t.start() for t in ts]; [t.join() for t in ts]\n"
            )
            cpu0, started = self.relay_cpu(), time.monotonic()
            self.run(str(PYTHON), "-c", sender, timeout=300)
            for sink in sinks:
                sink.join(60)
            seconds = time.monotonic() - started
        return total / seconds / 1e6, (self.relay_cpu() - cpu0) / seconds

    def link_bytes(self) -> int:
        stats = Path(f"/sys/class/net/{self.veth_hub}/statistics")
        return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())

    def reachable(self, port: int, host: str = HUB_IP) -> bool:
        done = self.run(
            str(PYTHON), "-c", f"import socket; socket.create_connection(({host!r}, {port}), timeout=3)", check=False
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


def _sink(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        while conn.recv(1 << 20):
            pass


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
    """Create TUN ``hub_dev`` here and ``node_dev`` in ``netns``; pass IP packets between them.

    stdin commands, one a line: ``DELAY_MS LOSS_PCT SEED`` (one-way delay; each direction drops LOSS_PCT
    percent of its packets, drawn from its own generator seeded by SEED), answered ``ok``; ``stats``,
    answered with a JSON line of the counters per direction. Order is kept."""
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
    delay, loss = 0.0, 0.0
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {hub: collections.deque(), node: collections.deque()}
    other = {hub: node, node: hub}
    names = {hub: "node->hub", node: "hub->node"}  # by the device a packet is written to
    rngs = {fd: random.Random() for fd in queues}
    counts = {fd: {"packets": 0, "lost": 0, "write_errors": 0} for fd in queues}
    stdin = sys.stdin.fileno()
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
                if line.strip() == "stats":
                    print(json.dumps({names[fd]: c for fd, c in counts.items()}), flush=True)
                    continue
                words = line.split()
                delay, loss, seed = float(words[0]) / 1000, float(words[1]) / 100, int(words[2])
                for fd_, rng in rngs.items():
                    rng.seed(f"{seed}-{names[fd_]}")
                print("ok", flush=True)
                continue
            _relay_read(fd, other[fd], delay, loss, rngs[other[fd]], queues[other[fd]], counts[other[fd]])
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                _relay_write(fd, queue.popleft()[1], counts[fd])


def _relay_read(fd: int, out: int, delay: float, loss: float, rng: random.Random, queue: Any, count: dict) -> None:
    """Every packet waiting on ``fd``: dropped (``loss``), queued (``delay``) or written to ``out``."""
    while True:
        try:
            packet = os.read(fd, TUN_MTU + 64)
        except BlockingIOError:
            return
        count["packets"] += 1
        if loss and rng.random() < loss:
            count["lost"] += 1
        elif delay:
            queue.append((time.monotonic() + delay, packet))
        else:
            _relay_write(out, packet, count)


def _relay_write(fd: int, packet: bytes, count: dict) -> None:
    try:
        os.write(fd, packet)
    except OSError:
        count["write_errors"] += 1


# --------------------------------------------------------------------------
# the node's copy time: a watcher inside the namespace


def watch_main(port: str) -> int:
    """Poll the node API on 127.0.0.1:``port`` every 50 ms; print a JSON line per job stage change."""
    print(json.dumps({"watching": int(port)}), flush=True)
    seen: dict[str, tuple[str, str]] = {}
    url = f"http://127.0.0.1:{port}/api/v1/backups"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                jobs = json.loads(response.read())["backups"]
        except (OSError, ValueError, KeyError):
            jobs = []
        now = time.monotonic()  # CLOCK_MONOTONIC is not per network namespace
        for job in jobs:
            stage = (job.get("progress") or {}).get("stage") or ""
            if seen.get(job["job_id"]) != (stage, job["state"]):
                seen[job["job_id"]] = (stage, job["state"])
                print(json.dumps({"job": job["job_id"], "stage": stage, "state": job["state"], "t": now}), flush=True)
        time.sleep(0.05)


class Watcher:
    """Runs :func:`watch_main` in the namespace; keeps the first time each job entered each stage."""

    def __init__(self, ns: Netns, logdir: Path) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.proc = Proc(
            "watcher", [str(PYTHON), __file__, "--watch", str(NODE_PORT)], logdir, ns.name, on_line=self._event
        )

    def _event(self, line: bytes) -> None:
        if line.startswith(b"{"):
            event = json.loads(line)
            self.stages.setdefault(event["job"], {}).setdefault(event["stage"], event["t"])

    def copy_seconds(self, job_id: str) -> float | None:
        """Seconds the node's job spent transferring (None when the watcher missed either end)."""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            stages = self.stages.get(job_id, {})
            if "transferring" in stages and "finalizing" in stages:
                return stages["finalizing"] - stages["transferring"]
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------
# the pipeline


@dataclass
class Case:
    link: Link
    tunnel: str
    connections: int
    seconds: list[float] = field(default_factory=list)
    copy_seconds: list[float] = field(default_factory=list)
    link_bytes: list[int] = field(default_factory=list)
    relay_cpu: list[float] = field(default_factory=list)  # relay CPU seconds per second of the run
    warmups: list[float] = field(default_factory=list)
    verified: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Run:
    """One measured backup."""

    seconds: float
    job: dict[str, Any]
    link_bytes: int
    relay_cpu: float
    copy_seconds: float | None


class Pipeline:
    def __init__(self, root: Path, ns: Netns, args: argparse.Namespace) -> None:
        self.root, self.ns, self.args = root, ns, args
        self.logs = root / "logs"
        self.logs.mkdir()
        self.procs: list[Proc] = []
        self.node: Proc | None = None
        self.watcher: Watcher | None = None
        self.tunnel: Proc | None = None
        self.tunnel_name = ""
        self.congestion_seen: dict[str, list[str]] = {}
        self._start_vcsim(args.vcenter, args.disk_mib)
        self.data_bytes = self._fill(args.disk_mib, args.fill)
        self.copies = {}
        for disk in self.vm["disks"]:
            self.copies[disk["key"]] = root / f"expected-{disk['key']}.raw"
            sh("cp", "--sparse=always", disk["path"], str(self.copies[disk["key"]]), timeout=300)
        self._make_keys()
        ports = free_port_range(8, ("127.0.0.1", HUB_IP))
        self.nbd_ports = ports[:4]
        self.api_port, self.ssh_port, self.node_reverse, self.sshd_port = ports[4:]
        with open(self.keys / "known_hosts", "w") as known:
            for port in (self.ssh_port, self.sshd_port):
                known.write(f"[{HUB_IP}]:{port} {self.host_public}\n")
        self._start_hub()
        self.sshd = self._start_sshd()
        help_text = sh(str(BIN / "sendense-backup"), "tunnel", "--help").stdout
        self.congestion_flag = "--congestion" in help_text

    def _start(self, name: str, command: list[str], netns: str | None = None, *, ready_line: bool = True) -> Proc:
        proc = Proc(name, command, self.logs, netns, ready_line=ready_line)
        self.procs.append(proc)
        return proc

    def _start_vcsim(self, where: str, disk_mib: int) -> None:
        build = sh("sh", str(SIMULATOR / "build-vcsim.sh"), timeout=900)
        vcsim_bin = build.stdout.strip().splitlines()[-1]
        self.state = self.root / "vcsim"
        self.state.mkdir()
        self.vcsim_host = "127.0.0.1" if where == "node" else HUB_IP
        self.vcsim = self._start(
            "vcsim",
            [vcsim_bin, "-listen", f"{self.vcsim_host}:0", "-state", str(self.state), "-username", "user",
             "-password", "pass", "-vm-disks", "2", "-disk-size-mb", str(disk_mib)],
            netns=self.ns.name if where == "node" else None,
        )  # fmt: skip
        self.vm = next(v for v in self.vcsim.info["vms"] if v["path"] == VM_PATH)

    def _make_keys(self) -> None:
        import asyncssh

        self.keys = self.root / "keys"
        self.keys.mkdir()
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(self.keys / "host"))
        client_key.write_private_key(str(self.keys / "client"))
        for name in ("host", "client"):
            (self.keys / name).chmod(0o600)
        (self.keys / "authorized_keys").write_bytes(client_key.export_public_key())
        self.host_public = host_key.export_public_key().decode().strip()

    def _start_hub(self) -> None:
        keys = self.keys
        self.hub = self._start(
            "hub",
            [str(PYTHON), "-m", "sendense_nbd", "hub", "--repo", str(self.root / "repo"),
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

    def _start_sshd(self) -> Proc:
        """A private OpenSSH sshd on the hub side, allowing exactly the forwards the tunnels use."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        opens = " ".join(f"127.0.0.1:{p}" for p in (*self.nbd_ports, self.api_port))
        config = self.keys / "sshd_config"
        config.write_text(
            f"Port {self.sshd_port}\nListenAddress {HUB_IP}\nHostKey {self.keys / 'host'}\n"
            f"AuthorizedKeysFile {self.keys / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
            f"PermitOpen {opens}\nPermitListen 127.0.0.1:{self.node_reverse}\nStrictModes no\nUsePAM no\n"
            f"PidFile {self.keys / 'sshd.pid'}\n"
        )
        sshd = self._start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], ready_line=False)
        wait_connectable(HUB_IP, self.sshd_port, sshd.proc)
        return sshd

    def _fill(self, disk_mib: int, fill: float) -> int:
        """Random data in 4 MiB pieces, spread evenly: ``fill`` of each disk; returns the bytes written."""
        pieces = disk_mib * MiB // CHUNK
        wanted = round(pieces * fill)
        written = 0
        self.filled = [i * pieces // wanted for i in range(wanted)]
        for disk in self.vm["disks"]:
            for index in self.filled:
                vmdisk.write(self.state, self.vm["moref"], disk["key"], index * CHUNK, os.urandom(CHUNK))
                written += CHUNK
        return written

    # -- tunnels and the node

    def use(self, tunnel: str, connections: int) -> bool:
        """Make ``tunnel`` the running tunnel and run the node with ``connections``; True when the
        tunnel was (re)started."""
        started = tunnel != self.tunnel_name
        if started:
            self.stop_tunnel()
            self.tunnel = self._start_openssh(tunnel) if tunnel.startswith("openssh") else self._start_ours(tunnel)
            self.tunnel_name = tunnel
            found = self.ns.run("ss", "-tin", "dst", HUB_IP).stdout
            seen = sorted({w for w in found.split() if w in ("bbr", "cubic", "reno")})
            self.congestion_seen.setdefault(tunnel, [])
            self.congestion_seen[tunnel] = sorted({*self.congestion_seen[tunnel], *seen})
        self._use_node(connections)
        return started

    def stop_tunnel(self) -> None:
        """Stop the running tunnel (the next :meth:`use` starts it again)."""
        if self.tunnel is None:
            return
        self.tunnel.stop()
        self.procs.remove(self.tunnel)
        self.tunnel, self.tunnel_name = None, ""
        deadline = time.monotonic() + 15  # the hub side drops the reverse listener when the link goes
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.node_reverse), timeout=1).close()
            except OSError:
                return
            time.sleep(0.1)
        raise RuntimeError(f"127.0.0.1:{self.node_reverse} still listens after the tunnel stopped")

    def _start_ours(self, tunnel: str) -> Proc:
        extra = list(self.args.tunnel_arg)
        cc = "net.ipv4.tcp_congestion_control"
        old = ""
        if tunnel == CUBIC:
            if self.congestion_flag:
                extra += ["--congestion", "cubic"]
            else:  # the socket takes the namespace's default when it is made
                old = self.ns.sysctl(cc)
                self.ns.sysctl(cc, "cubic")
        try:
            proc = self._start(
                tunnel,
                [str(BIN / "sendense-backup"), "tunnel", "--hub", f"{HUB_IP}:{self.ssh_port}",
                 "--key", str(self.keys / "client"), "--known-hosts", str(self.keys / "known_hosts"),
                 "--ports", f"{self.nbd_ports.start}-{self.nbd_ports.stop - 1}",
                 "--listen-host", "127.0.0.1", "--dest-host", "127.0.0.1",
                 "--forward", f"127.0.0.1:{self.api_port}=127.0.0.1:{self.api_port}",
                 "--remote-forward", f"127.0.0.1:{self.node_reverse}=127.0.0.1:{NODE_PORT}", *extra],
                netns=self.ns.name,
            )  # fmt: skip
        finally:
            if old:
                self.ns.sysctl(cc, old)
        if not proc.info.get("connected"):
            raise RuntimeError(f"the tunnel did not connect: {proc.info}")
        return proc

    def _start_openssh(self, tunnel: str) -> Proc:
        forwards = [a for p in (*self.nbd_ports, self.api_port) for a in ("-L", f"127.0.0.1:{p}:127.0.0.1:{p}")]
        cipher = ["-c", BEST_CIPHER] if tunnel == "openssh aes" else []
        proc = self._start(
            tunnel,
            ["ssh", "-N", "-F", "/dev/null", "-p", str(self.sshd_port), "-i", str(self.keys / "client"),
             "-o", f"UserKnownHostsFile={self.keys / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
             "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", *cipher, *forwards,
             "-R", f"127.0.0.1:{self.node_reverse}:127.0.0.1:{NODE_PORT}", f"root@{HUB_IP}"],
            netns=self.ns.name, ready_line=False,
        )  # fmt: skip
        wait_connectable("127.0.0.1", self.node_reverse, proc.proc)  # -R comes after the -L listeners
        return proc

    def _use_node(self, connections: int) -> None:
        """(Re)start the node (and its watcher) with ``[node] connections = N``."""
        if self.node is not None and self.node.info.get("connections") == connections:
            return
        for proc in (self.watcher.proc if self.watcher else None, self.node):
            if proc is not None:
                proc.stop()
                self.procs.remove(proc)
        node_dir = self.root / f"node-{connections}"
        node_dir.mkdir(exist_ok=True)
        password = node_dir / "vcenter.password"
        password.write_text("pass\n")
        password.chmod(0o600)
        config = node_dir / "node.toml"
        config.write_text(
            f"""[vcenter]
endpoint = "{self.vcsim_host}:{self.vcsim.info["port"]}"
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
            + "".join(setting + "\n" for setting in self.args.node_setting)
        )
        config.chmod(0o600)
        self.node = self._start(
            f"node-{connections}",
            [str(BIN / "sendense-backup"), "node", "--config", str(config), "--listen", f"127.0.0.1:{NODE_PORT}"],
            netns=self.ns.name,
        )
        self.node.info["connections"] = connections
        self.watcher = Watcher(self.ns, self.logs)
        self.procs.append(self.watcher.proc)

    # -- jobs

    def backup(self, mode: str = "full") -> Run:
        """One backup, from the POST to the completed state, with what crossed the link meanwhile."""
        link0, cpu0 = self.ns.link_bytes(), self.ns.relay_cpu()
        started = time.monotonic()
        status, job = self.api.call("POST", "/backups", {"vm_path": VM_PATH, "mode": mode})
        if status != 201:
            raise RuntimeError(f"POST /backups: {status} {job}")
        deadline = started + 900
        while job["state"] not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backup did not finish in 900 s: {json.dumps(job)[:2000]}")
            time.sleep(0.05)
            status, job = self.api.call("GET", f"/backups/{job['job_id']}")
        seconds = time.monotonic() - started
        cpu = (self.ns.relay_cpu() - cpu0) / seconds
        if job["state"] != "completed":
            raise RuntimeError(f"the backup did not complete: {json.dumps(job)[:2000]}")
        # The node's final progress report can land just after the completion (clock stopped already).
        deadline = time.monotonic() + 10
        while (job.get("progress") or {}).get("status") != "completed" and time.monotonic() < deadline:
            time.sleep(0.1)
            job = self.api.call("GET", f"/backups/{job['job_id']}")[1]
        moved = int((job.get("progress") or {}).get("bytes_transferred") or 0)
        if mode == "full" and moved != self.data_bytes:
            raise RuntimeError(f"the job reports {moved} bytes transferred, {self.data_bytes} written")
        for disk in job["detail"]["disks"]:
            if not disk["uri"].startswith("nbd://127.0.0.1:"):
                raise RuntimeError(f"unexpected target {disk['uri']}")
        assert self.watcher is not None
        return Run(seconds, job, self.ns.link_bytes() - link0, cpu, self.watcher.copy_seconds(job["job_id"]))

    def verify(self, job: dict[str, Any]) -> None:
        """Every restore point of the job: ``qemu-img check``, and ``qemu-img compare`` with the disk."""
        points = self.api.call("GET", f"/points?vm_path={VM_PATH}")[1]["points"]
        for disk in job["detail"]["disks"]:
            point = next(p for p in points if p["id"] == disk["point_id"])
            sh("qemu-img", "check", point["path"], timeout=300)
            done = sh("qemu-img", "compare", "-F", "raw", point["path"], str(self.copies[disk["disk_key"]]),
                      check=False, timeout=600)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"restore point {point['path']} differs: {done.stdout} {done.stderr}")

    def change(self, rng: random.Random) -> int:
        """Overwrite INCREMENTAL_PIECES pieces of one 4 MiB piece of data of the first disk, a piece every
        INCREMENTAL_STRIDE bytes (gaps a merge gap would bridge); returns the bytes changed. The disk's
        allocated data (what a full backup copies) stays the same."""
        assert INCREMENTAL_PIECES * INCREMENTAL_STRIDE <= CHUNK
        disk = self.vm["disks"][0]
        start = rng.choice(self.filled) * CHUNK
        with open(self.copies[disk["key"]], "r+b") as copy:
            for i in range(INCREMENTAL_PIECES):
                data = rng.randbytes(INCREMENTAL_PIECE)
                vmdisk.write(self.state, self.vm["moref"], disk["key"], start + i * INCREMENTAL_STRIDE, data)
                os.pwrite(copy.fileno(), data, start + i * INCREMENTAL_STRIDE)
        return INCREMENTAL_PIECES * INCREMENTAL_PIECE

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - best effort
                print(f"stopping {proc.name}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------
# the matrix


@dataclass
class Results:
    cases: list[Case] = field(default_factory=list)
    rtts: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    incremental: list[dict[str, Any]] = field(default_factory=list)

    def case(self, link: Link, tunnel: str, connections: int) -> Case | None:
        return next((c for c in self.cases if (c.link, c.tunnel, c.connections) == (link, tunnel, connections)), None)


def namespace_facts(ns: Netns, copy_from_hub: bool) -> dict[str, str]:
    """The namespace's own TCP sysctls (``tcp_*`` are per namespace); with ``copy_from_hub`` its
    tcp_rmem/tcp_wmem are first set to the root namespace's, so both ends of the link match."""
    names = ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.core.rmem_max", "net.core.wmem_max",
             "net.ipv4.tcp_congestion_control", "net.ipv4.tcp_slow_start_after_idle",
             "net.ipv4.tcp_no_metrics_save")  # fmt: skip
    facts: dict[str, str] = {}
    for name in names:
        hub = sh("sysctl", "-n", name, check=False).stdout.strip().replace("\t", " ")
        if copy_from_hub and name.startswith("net.ipv4.tcp_") and name.endswith("mem"):
            ns.sysctl(name, hub)
        node = ns.run("sysctl", "-n", name, check=False).stdout.strip().replace("\t", " ")
        facts[name] = f"node {node or 'n/a'}, hub {hub or 'n/a'}"
    return facts


def measure_relay(ns: Netns, total: int) -> list[dict[str, Any]]:
    """What the link carries alone (plain TCP, no tunnel) and the relay's CPU meanwhile; with added RTT a
    quarter of ``total`` (one TCP connection is bounded there by its send buffer, tcp_wmem)."""
    found = []
    for link, streams in ((Link(0.0), 1), (Link(0.0), 4), (Link(50.0), 1), (Link(50.0), 4), (Link(100.0), 1)):
        ns.set_link(link, 0)
        mbps, cpu = ns.stream(total if not link.rtt_ms else total // 4, streams)
        found.append({"link": link.label, "streams": streams, "MB/s": round(mbps), "relay_cpu": round(cpu, 2)})
        print(f"relay alone, {link.label}, {streams} TCP stream(s): {mbps:.0f} MB/s, relay CPU {cpu:.0%}", flush=True)
    return found


def measured_run(pipeline: Pipeline, case: Case, args: argparse.Namespace) -> None:
    """A run of ``case``; after a tunnel (re)start, a warm-up run first (the first backup over a fresh
    tunnel is slower; kept apart in ``case.warmups``)."""
    if pipeline.use(case.tunnel, case.connections) and args.warmup:
        _one_run(pipeline, case, warmup=True)
    _one_run(pipeline, case, warmup=False)


def _one_run(pipeline: Pipeline, case: Case, warmup: bool) -> None:
    run = pipeline.backup()
    pipeline.verify(run.job)
    case.verified += 1
    data = pipeline.data_bytes
    copy = f"{run.copy_seconds:.2f} s" if run.copy_seconds is not None else "n/a"
    print(
        f"  {case.link.label} {case.tunnel} x{case.connections}{' warm-up' if warmup else ''}: {run.seconds:.2f} s,"
        f" {data / run.seconds / 1e6:.1f} MB/s, copy {copy}, {run.link_bytes / 1e6:.0f} MB on the link,"
        f" relay CPU {run.relay_cpu:.0%}",
        flush=True,
    )
    if warmup:
        case.warmups.append(run.seconds)
        return
    case.seconds.append(run.seconds)
    if run.copy_seconds is not None:
        case.copy_seconds.append(run.copy_seconds)
    case.link_bytes.append(run.link_bytes)
    case.relay_cpu.append(run.relay_cpu)


def _link_cases(results: Results, link: Link, args: argparse.Namespace) -> list[Case]:
    """The (tunnel, connections) variants of one link, in their A B order."""
    tunnels = list(args.tunnels) + ([CUBIC] if link.loss_pct and args.cubic else [])
    conns = list(args.connections)
    cases = [Case(link, t, c) for i, t in enumerate(tunnels) for c in (conns if i % 2 == 0 else conns[::-1])]
    results.cases.extend(cases)
    return cases


def run_links(pipeline: Pipeline, results: Results, links: list[Link], args: argparse.Namespace) -> None:
    """Every link's variants, round by round. The order reverses every other round, of the variants within
    a link and of the links themselves (A B B A across links too): this machine's speed drifts for
    minutes at a time, and a ratio between links must not compare two machine states. A link change
    restarts the tunnel, so the warm-up after a tunnel start also covers the new path."""
    ns = pipeline.ns
    plans = {link: _link_cases(results, link, args) for link in links}
    for rnd in range(args.rounds):
        for link in links if rnd % 2 == 0 else links[::-1]:
            before = ns.relay_stats()
            ns.set_link(link, args.seed)
            pipeline.stop_tunnel()
            if link.label not in results.rtts:
                results.rtts[link.label] = ns.measure_rtt()
                print(f"link {link.label}: measured TCP connect RTT {results.rtts[link.label]:.2f} ms", flush=True)
            for case in plans[link] if rnd % 2 == 0 else plans[link][::-1]:
                measured_run(pipeline, case, args)
            counts = results.facts.setdefault("relay_counts", {}).setdefault(link.label, {})
            for direction, now in ns.relay_stats().items():
                total = counts.setdefault(direction, {})
                for key, value in now.items():
                    total[key] = total.get(key, 0) + value - before.get(direction, {}).get(key, 0)


def run_incremental(pipeline: Pipeline, results: Results, args: argparse.Namespace) -> None:
    """1 MiB of changes, then an incremental backup with our tunnel; ``--rounds`` times."""
    rng = random.Random(args.seed)
    if pipeline.use("ours", max(args.connections)) and args.warmup:
        pipeline.verify(pipeline.backup().job)  # a warm-up over the fresh tunnel, as for the cases
    for _ in range(args.rounds):
        changed = pipeline.change(rng)
        run = pipeline.backup("incremental")
        pipeline.verify(run.job)
        disks = run.job["detail"]["disks"]
        progress = run.job.get("progress") or {}
        reported = (
            [progress.get("bytes_changed")] if "bytes_changed" in progress else [d.get("bytes_changed") for d in disks]
        )
        numbers = [int(n) for n in reported if isinstance(n, int | float)]
        entry = {
            "seconds": run.seconds,
            "copy_seconds": run.copy_seconds,
            "changed_written": changed,
            "bytes_changed": sum(numbers) if numbers else None,
            "bytes_transferred": int((run.job.get("progress") or {}).get("bytes_transferred") or 0),
            "link_bytes": run.link_bytes,
            "sync_types": sorted({str(d.get("sync_type")) for d in disks}),
        }
        results.incremental.append(entry)
        print(f"  incremental over {pipeline.ns.link.label}: {json.dumps(entry)}", flush=True)


def run(args: argparse.Namespace) -> Results:
    results = Results()
    facts = results.facts
    remove_leftovers()
    WORK.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pipeline-", dir=WORK))
    method = args.link if args.link != "auto" else ("netem" if netem_available() else "relay")
    facts["method"] = method
    ns = Netns.create(method)
    pipeline: Pipeline | None = None
    links = [Link(d) for d in args.delays] + ([Link(args.loss_rtt, args.loss)] if args.loss else [])
    try:
        print(f"namespace {ns.name}, link {ns.veth_hub} <-> {ns.veth_node}; work dir {root}", flush=True)
        facts["sysctls"] = namespace_facts(ns, args.node_sysctls == "hub")
        facts["relay_alone"] = measure_relay(ns, args.relay_check_mib * MiB)
        pipeline = Pipeline(root, ns, args)
        facts["data_bytes"] = pipeline.data_bytes
        facts["congestion_flag"] = pipeline.congestion_flag
        # The hub's API and NBD ports are on the root namespace's loopback: the node cannot reach them
        # except through a tunnel.
        facts["direct_reachable"] = [p for p in (pipeline.api_port, *pipeline.nbd_ports) if ns.reachable(p)]
        facts["ssh_reachable"] = ns.reachable(pipeline.ssh_port) and ns.reachable(pipeline.sshd_port)
        print(f"data: {pipeline.data_bytes / MiB:.0f} MiB over 2 disks of {args.disk_mib} MiB", flush=True)
        run_links(pipeline, results, links, args)
        if args.incremental:
            ns.set_link(Link(args.loss_rtt), args.seed)
            pipeline.stop_tunnel()
            run_incremental(pipeline, results, args)
        facts["congestion_seen"] = pipeline.congestion_seen
    finally:
        if pipeline is not None:
            pipeline.stop()
        ns.delete()
        if args.keep_work:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results


# --------------------------------------------------------------------------
# the report


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def mbps(results: Results, link: Link, tunnel: str, connections: int) -> float | None:
    """Median whole-job MB/s of a case (None when it was not run)."""
    case = results.case(link, tunnel, connections)
    return results.facts["data_bytes"] / case.median / 1e6 if case and case.seconds else None


def table(results: Results) -> str:
    data = results.facts["data_bytes"]
    lines = [
        "| link (added RTT) | tunnel | NBD conns per disk | wall s | node's copy s | MB/s (whole job) | MB/s (copy)"
        " | vs 0 ms | ours / OpenSSH default | ours / OpenSSH aes128-gcm | MB on the link | relay CPU"
        " | first run after a tunnel start s | points checked |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results.cases:
        if not c.seconds:
            continue
        mine = mbps(results, c.link, c.tunnel, c.connections)
        base = mbps(results, Link(0.0), "ours" if c.tunnel == CUBIC else c.tunnel, c.connections)
        ours = c.tunnel.startswith("ours")
        vs_default = _ratio(mine, mbps(results, c.link, "openssh", c.connections)) if ours else ""
        vs_best = _ratio(mine, mbps(results, c.link, "openssh aes", c.connections)) if ours else ""
        copy = statistics.median(c.copy_seconds) if c.copy_seconds else None
        first = f"{statistics.median(c.warmups):.2f} ({len(c.warmups)})" if c.warmups else ""
        lines.append(
            f"| {c.link.label} | {c.tunnel} | {c.connections} | {c.median:.2f}"
            f" | {f'{copy:.2f}' if copy else 'n/a'} | {mine:.1f} | {f'{data / copy / 1e6:.1f}' if copy else 'n/a'}"
            f" | {_ratio(mine, base)} | {vs_default} | {vs_best} | {statistics.median(c.link_bytes) / 1e6:.0f}"
            f" | {statistics.median(c.relay_cpu):.0%} | {first} | {c.verified} identical |"
        )
    return "\n".join(lines)


def targets(results: Results, args: argparse.Namespace) -> list[str]:
    """Each target of the issue, per connection count: met / missed (or not run)."""
    lines = []
    for connections in args.connections:
        base = mbps(results, Link(0.0), "ours", connections)
        for (rtt, loss), keep in KEEP_TARGETS.items():
            link = Link(rtt, loss)
            got = mbps(results, link, "ours", connections)
            verdict = ("met" if got / base >= keep else "missed") if got and base else "not run"
            shown = f"{got / base:.2f}x" if got and base else "-"
            lines.append(f"- ours x{connections}, {link.label}: keeps {shown} of 0 ms, target >= {keep}x: {verdict}")
        got, ssh = mbps(results, Link(50.0), "ours", connections), mbps(results, Link(50.0), "openssh", connections)
        verdict = ("met" if got / ssh >= 2 else "missed") if got and ssh else "not run"
        shown = f"{got / ssh:.2f}x" if got and ssh else "-"
        lines.append(f"- ours x{connections}, 50 ms: {shown} OpenSSH default, target >= 2x: {verdict}")
        lossy = Link(args.loss_rtt, args.loss)
        bbr, cubic = mbps(results, lossy, "ours", connections), mbps(results, lossy, CUBIC, connections)
        if bbr and cubic:
            lines.append(f"- ours x{connections}, {lossy.label}: bbr {bbr:.1f} MB/s, cubic {cubic:.1f} MB/s"
                         f" (bbr / cubic {bbr / cubic:.2f}x)")  # fmt: skip
    if results.incremental:
        wall = statistics.median(e["seconds"] for e in results.incremental)
        lines.append(f"- 1 MiB incremental over {args.loss_rtt:g} ms: {wall:.2f} s (median), target < 2 s:"
                     f" {'met' if wall < 2 else 'missed'}")  # fmt: skip
    return lines


def incremental_text(results: Results) -> str:
    if not results.incremental:
        return ""
    rows = [
        "| round | wall s | node's copy s | changed (written) | bytes_changed (job) | bytes sent (job) | MB on the link"
        " | sync types |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, e in enumerate(results.incremental, 1):
        copy = f"{e['copy_seconds']:.2f}" if e["copy_seconds"] is not None else "n/a"
        changed = e["bytes_changed"] if e["bytes_changed"] is not None else "not reported"
        rows.append(
            f"| {i} | {e['seconds']:.2f} | {copy} | {e['changed_written']} | {changed} | {e['bytes_transferred']}"
            f" | {e['link_bytes'] / 1e6:.2f} | {', '.join(e['sync_types'])} |"
        )
    return "\n".join(rows)


def versions() -> str:
    import asyncssh

    ssh = sh("ssh", "-V", check=False).stderr.strip()
    default = sh("ssh", "-G", "-F", "/dev/null", "x", check=False).stdout
    ciphers = next((line.split()[1] for line in default.splitlines() if line.startswith("ciphers ")), "?")
    ours = asyncssh.encryption.get_default_encryption_algs()[0].decode()
    return (
        f"{ssh}; asyncssh {asyncssh.__version__}; ciphers: ours = asyncssh's first preference ({ours}) unless"
        f" `--tunnel-arg --cipher ...`; OpenSSH default = its first preference ({ciphers.split(',')[0]});"
        f" OpenSSH best = `-c {BEST_CIPHER}` (the CPU has AES-NI: `aes` in /proc/cpuinfo"
        f" {'yes' if ' aes ' in Path('/proc/cpuinfo').read_text() else 'NO'}; it beat chacha20 in the SSH"
        " tunnel section below, 452 vs 392 MB/s write)"
    )


def header(results: Results, args: argparse.Namespace, load0: float, elapsed: float) -> list[str]:
    facts = results.facts
    data = facts["data_bytes"]
    rtt_text = ", ".join(f"{label} -> {rtt:.2f} ms" for label, rtt in results.rtts.items())
    command = " ".join(["./.venv/bin/python benchmarks/bench_pipeline.py", *sys.argv[1:]])
    relay = "; ".join(f"{r['link']}, {r['streams']} stream(s): {r['MB/s']} MB/s at {r['relay_cpu']:.0%} relay CPU"
                      for r in facts["relay_alone"])  # fmt: skip
    lost = "; ".join(
        f"{label}: " + ", ".join(f"{d} {c['lost']}/{c['packets']} dropped" for d, c in counts.items())
        for label, counts in facts.get("relay_counts", {}).items()
        if any(c["lost"] for c in counts.values())
    )
    sysctls = "; ".join(f"`{k}` {v}" for k, v in facts["sysctls"].items())
    cc = ", ".join(f"{t}: {'/'.join(v) or '?'}" for t, v in facts["congestion_seen"].items())
    copied = ", tcp_rmem/tcp_wmem copied from the hub side" if args.node_sysctls == "hub" else ""
    return [
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python"
        f" {platform.python_version()}; load average (1 min) {load0:.2f} at start, {os.getloadavg()[0]:.2f} at"
        f" end; {elapsed:.0f} s",
        f"- benchmark: `{command}` (as root)",
        f"- versions and ciphers: {versions()}",
        f"- the VM: {VM_PATH} in vcsim, 2 disks of {args.disk_mib} MiB, {args.fill:.1%} random data in 4 MiB"
        f" pieces = {data / MiB:.0f} MiB copied per backup; `mode: full` every run (a fresh restore point);"
        f" vcsim on the {'node side (next to the node)' if args.vcenter == 'node' else 'hub side (across the link)'};"
        f" node settings: `connections` per case{''.join(f', `{s}`' for s in args.node_setting)}",
        "- tunnels (one at a time, node side -> hub side, same hub, same NBD ports): ours = `sendense-backup"
        f" tunnel` with its defaults{' + ' + ' '.join(args.tunnel_arg) if args.tunnel_arg else ''} to the hub's"
        " embedded endpoint; openssh = `ssh -N -L` (4 NBD ports + the hub API) `-R` (node API) to a private"
        " sshd; openssh aes = the same with `-c aes128-gcm@openssh.com`; ours cubic = ours with"
        + (" `--congestion cubic`" if facts["congestion_flag"] else " the namespace's tcp_congestion_control = cubic")
        + f"; congestion control seen on the tunnels' sockets (`ss -ti`): {cc}",
        f"- node namespace sysctls (tcp_* are per namespace{copied}): {sysctls}",
        (
            "- link: `tc qdisc ... netem delay RTT/2 loss P%` on both ends of the veth"
            if facts["method"] == "netem"
            else "- link: this kernel has no netem, so two TUN devices (MTU 65000) joined by the benchmark's relay"
            " (`--relay`): each IP packet held RTT/2 per direction, in order, unbounded queue; loss drops that"
            f" share of each direction's packets (seeded, `--seed {args.seed}`; a packet is up to 64 KB, so one"
            " loss costs a whole 64 KB segment)"
        )
        + f"; measured RTT (median TCP connect from the node namespace): {rtt_text}",
        f"- the relay alone (plain TCP from the namespace, no tunnel; a fixed byte count, slow start included): {relay}"
        + (f"; packets dropped: {lost}" if lost else ""),
        f"- tunnel end to end: {'yes' if not facts['direct_reachable'] and facts['ssh_reachable'] else 'NO'}"
        " (the hub's API and NBD ports are not reachable from the node namespace except through a tunnel)",
        "- MB/s (whole job) = 10^6 bytes of data / wall time from POST /backups to `completed`; node's copy s ="
        " the node's time in its `transferring` stage (a watcher in the namespace polls the node API every 50 ms);"
        f" {args.rounds} round(s) over every link and variant, both orders reversed every other round (A B B A"
        " across links too); medians;"
        + (
            " after every tunnel (re)start a warm-up run first, not in the medians (its median and count in"
            ' "first run after a tunnel start");'
            if args.warmup
            else ""
        )
        + " vs 0 ms = same tunnel and connections (ours cubic: vs"
        " ours at 0 ms); relay CPU = the relay's CPU seconds per second of the run; every restore point"
        " checked (`qemu-img check`, `qemu-img compare` with a copy of the disk)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 10, 50, 100], help="Added RTT in ms.")
    parser.add_argument("--loss", type=float, default=0.5, help="Packet loss %% of the extra lossy link (0: none).")
    parser.add_argument("--loss-rtt", type=float, default=50, help="Added RTT of the lossy link and the incremental.")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the relay's loss and the incremental changes.")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4], help="NBD connections per disk.")
    parser.add_argument("--tunnels", nargs="+", choices=TUNNELS, default=list(TUNNELS))
    parser.add_argument("--no-cubic", dest="cubic", action="store_false", help="Skip ours with cubic on the loss link.")
    parser.add_argument("--no-incremental", dest="incremental", action="store_false")
    parser.add_argument("--tunnel-arg", action="append", default=[], help="Extra argument of our tunnel (repeat).")
    parser.add_argument(
        "--node-setting", action="append", default=[], help="A KEY = VALUE line added to the node's [node] (repeat)."
    )
    parser.add_argument("--vcenter", choices=["node", "hub"], default="node", help="Which side vcsim runs on.")
    parser.add_argument(
        "--node-sysctls", choices=["hub", "default"], default="hub",
        help="hub: the node namespace gets the root namespace's tcp_rmem/tcp_wmem; default: a new namespace's.",
    )  # fmt: skip
    parser.add_argument("--disk-mib", type=int, default=1024, help="Size of each of the 2 disks.")
    parser.add_argument("--fill", type=float, default=0.125, help="Share of each disk holding random data.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--relay-check-mib", type=int, default=1024, help="Bytes of each relay capacity check.")
    parser.add_argument(
        "--link", choices=["auto", "netem", "relay"], default="auto",
        help="netem: veth + tc netem; relay: TUN pair + our relay (auto: netem when the kernel has it).",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="64 MiB disks, 1 round, no warm-up: a smoke run.")
    parser.add_argument("--keep-work", action="store_true", help="Keep the work directory (logs, repo).")
    parser.add_argument("--json", type=Path, help="Write the raw numbers here.")
    parser.add_argument("--note", default="", help="A sentence added to the reading in RESULTS.md.")
    parser.add_argument("--write-results", action="store_true", help="Add a section to benchmarks/RESULTS.md.")
    args = parser.parse_args()
    if args.quick:
        args.disk_mib, args.fill, args.rounds, args.warmup, args.relay_check_mib = 64, 0.5, 1, False, 256
    if 0 not in args.delays:
        args.delays.insert(0, 0.0)
    if os.geteuid() != 0:
        print("needs root (ip netns, TUN devices)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    results = run(args)
    elapsed = time.monotonic() - started
    text, goals, incremental = table(results), targets(results, args), incremental_text(results)
    print(text, "", "Targets:", *goals, "", incremental, sep="\n")
    print(f"whole run: {elapsed:.0f} s")
    if args.json:
        raw = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "elapsed": elapsed, "rtts": results.rtts, "facts": results.facts,
               "cases": [{**asdict(c), "link": asdict(c.link)} for c in results.cases],
               "incremental": results.incremental}  # fmt: skip
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if args.write_results:
        dirty = " (dirty tree)" if git("status", "--porcelain", "--", "sendense_nbd") else ""
        section = [
            f"## Pipeline over an emulated WAN link, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC,"
            f" commit {git('rev-parse', '--short', 'HEAD')}{dirty}",
            "",
            *header(results, args, load0, elapsed),
            "",
            text,
            "",
            "Targets (issue 13, medians of the whole job):",
            "",
            *goals,
            *(
                ["", "1 MiB incremental (16 x 64 KiB changes, 192 KiB apart, on one disk), ours:", "", incremental]
                if incremental
                else []
            ),  # fmt: skip
            *(["", args.note] if args.note else []),
        ]
        br.add_section(RESULTS, section)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--relay"]:
        sys.exit(relay_main(*sys.argv[2:5]))
    if sys.argv[1:2] == ["--watch"]:
        sys.exit(watch_main(sys.argv[2]))
    sys.exit(main())
