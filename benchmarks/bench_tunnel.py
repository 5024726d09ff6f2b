#!/usr/bin/env python3
"""Benchmark the SSH tunnel against OpenSSH ``ssh -N -L``, in the same run, on loopback.

Run with the project's venv python::

    /work/main/.venv/bin/python benchmarks/bench_tunnel.py --quick          # smoke test, 256 MiB
    /work/main/.venv/bin/python benchmarks/bench_tunnel.py --write-results  # 1 GiB, appends to RESULTS.md

The target is always our NBD server (``sendense-nbd serve -f raw -e 16 -t``)
on 127.0.0.1:P; nbdcopy reaches it through one of these paths:

* ``direct``: ``nbd://127.0.0.1:P``, no tunnel (the ceiling);
* ``openssh``: ``ssh -N -L 127.0.0.2:P:127.0.0.1:P -c CIPHER`` to a private
  OpenSSH ``sshd`` (the reference the issue names);
* ``ours``: our tunnel client (``sendense-backup tunnel``, ``--listen-host
  127.0.0.2 --cipher CIPHER``) to our embedded server (``tunnel-server``):
  the deployed pair;
* ``ours->sshd``: our tunnel client to the same private sshd (our client alone).

The forwarded port listens on 127.0.0.2 because node and hub are one machine
here and the tunnel keeps port numbers. Cases: write (``nbdcopy --flush
--connections=4 dense.img URI`` into a fresh sparse target) and read
(``nbdcopy --connections=4 URI null:`` from a read-only export of dense.img),
for each cipher; and "2 disks": two exports on two ports written at once,
where our tunnel runs with ``--connections 1`` and ``2`` (port i goes over SSH
connection i % N) and OpenSSH with one ``ssh`` carrying both ports.

Every case: a warm-up run per path, then ``--rounds`` rounds alternating the
order (A B, B A, ...); medians; MB/s = 10^6 bytes per second of nbdcopy wall
time; the tunnel is up before the clock starts. CPU s/GiB is user+system of
the tunnel's client and hub-side processes (sshd: its session children). The
written image is compared with the source after every write run.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_server as bs  # noqa: E402 - the house helpers: process bookkeeping, images, git

REPO, WORK, RESULTS, VENV_PYTHON, MiB = bs.REPO, bs.WORK, bs.RESULTS, bs.VENV_PYTHON, bs.MiB
CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
SHORT = {"aes128-gcm@openssh.com": "aes128-gcm", "chacha20-poly1305@openssh.com": "chacha20"}
NODE = "127.0.0.2"  # where forwarded ports listen
CLK = os.sysconf("SC_CLK_TCK")


def two_free_ports() -> int:
    """A base port P with P and P+1 both free on 127.0.0.1 and 127.0.0.2."""
    for base in range(21000, 30000, 7):
        try:
            for host in ("127.0.0.1", NODE):
                for port in (base, base + 1):
                    with socket.socket() as s:
                        s.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no two consecutive free ports")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK
    return total


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd: the per-connection monitor and session processes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass
class Env:
    """Keys, the private sshd, logs: what every path shares."""

    dir: Path
    base: int
    host_key: Path
    client_key: Path
    authorized: Path
    known_hosts: Path
    host_public: str
    sshd_port: int = 0
    sshd: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: WORK / "bench-tunnel.log")

    @classmethod
    def create(cls, base: int) -> Env:
        import asyncssh

        d = Path(tempfile.mkdtemp(prefix="bench-tunnel-", dir=WORK))
        host, client = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
        host.write_private_key(str(d / "host_key"))
        client.write_private_key(str(d / "client_key"))
        for key in ("host_key", "client_key"):
            os.chmod(d / key, 0o600)
        (d / "authorized_keys").write_bytes(client.export_public_key())
        public = host.export_public_key().decode().strip()
        env = cls(d, base, d / "host_key", d / "client_key", d / "authorized_keys", d / "known_hosts", public)
        env.known_hosts.write_text("")
        return env

    def pin(self, port: int) -> None:
        """Trust the host key for 127.0.0.1:port (both endpoints use the same key)."""
        with open(self.known_hosts, "a") as f:
            f.write(f"[127.0.0.1]:{port} {self.host_public}\n")

    def start_sshd(self) -> None:
        self.sshd_port = bs.free_port()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        config = self.dir / "sshd_config"
        ports = " ".join(f"127.0.0.1:{p}" for p in (self.base, self.base + 1))
        config.write_text(
            "\n".join(
                [
                    f"Port {self.sshd_port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {self.authorized}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    f"PermitOpen {ports}",
                    "StrictModes no",
                    "UsePAM no",
                    f"PidFile {self.dir / 'sshd.pid'}",
                ]
            )
            + "\n"
        )
        self.sshd = bs._spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], self.log)
        wait_port("127.0.0.1", self.sshd_port, self.sshd)
        self.pin(self.sshd_port)


@dataclass
class Tunnel:
    """One running path: its processes and how to measure their CPU."""

    procs: list[subprocess.Popen[bytes]]
    hub_pids: list[int]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs] + self.hub_pids

    def stop(self) -> None:
        for proc in self.procs:
            bs._kill(proc)


def open_path(env: Env, path: str, cipher: str, ports: list[int], connections: int = 1) -> Tunnel | None:
    """Bring a path up: after this, NODE:port reaches 127.0.0.1:port (None: ``direct``)."""
    if path == "direct":
        return None
    if path == "openssh":
        assert env.sshd is not None
        forwards = [arg for p in ports for arg in ("-L", f"{NODE}:{p}:127.0.0.1:{p}")]
        cmd = [
            "ssh",
            "-N",
            "-p",
            str(env.sshd_port),
            "-i",
            str(env.client_key),
            "-c",
            cipher,
            "-o",
            f"UserKnownHostsFile={env.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
            "-F",
            "/dev/null",
            *forwards,
            f"{getpass.getuser()}@127.0.0.1",
        ]
        proc = bs._spawn(cmd, env.log)
        for p in ports:
            wait_port(NODE, p, proc)
        return Tunnel([proc], descendants(env.sshd.pid))
    hub_procs: list[subprocess.Popen[bytes]] = []
    hub_pids: list[int] = []
    if path == "ours":
        hub = bs._spawn(
            [
                str(VENV_PYTHON),
                "-c",
                "from sendense_nbd.tunnel.cli import tunnel_server_command; tunnel_server_command()",
                "--ssh-listen=127.0.0.1:0",
                f"--ssh-host-key={env.host_key}",
                f"--ssh-authorized-keys={env.authorized}",
                f"--nbd-ports={env.base}-{env.base + 1}",
            ],
            env.log,
            stdout=subprocess.PIPE,
        )
        assert hub.stdout is not None
        ssh_port = int(hub.stdout.readline())
        env.pin(ssh_port)
        hub_procs.append(hub)
    else:  # ours->sshd
        assert env.sshd is not None
        ssh_port = env.sshd_port
    node = bs._spawn(
        [
            str(VENV_PYTHON),
            "-c",
            "from sendense_nbd.tunnel.cli import tunnel_command; tunnel_command()",
            f"--hub=127.0.0.1:{ssh_port}",
            f"--key={env.client_key}",
            f"--known-hosts={env.known_hosts}",
            f"--user={getpass.getuser()}",
            f"--ports={ports[0]}-{ports[-1]}",
            f"--listen-host={NODE}",
            f"--connections={connections}",
            f"--cipher={cipher}",
            "--remote-forward=none",
        ],
        env.log,
        stdout=subprocess.PIPE,
    )
    assert node.stdout is not None
    line = node.stdout.readline()
    if b'"connected": true' not in line:
        raise RuntimeError(f"our tunnel did not come up: {line!r}; see {env.log}")
    if path == "ours->sshd":
        assert env.sshd is not None
        hub_pids = descendants(env.sshd.pid)
    return Tunnel([node, *hub_procs], hub_pids)


def nbd_server(image: Path, port: int, readonly: bool) -> subprocess.Popen[bytes]:
    cmd = [str(VENV_PYTHON), "-m", "sendense_nbd", "serve", "-f", "raw", "-p", str(port), "-e", "16", "-t"]
    proc = bs._spawn([*cmd, *(["-r"] if readonly else []), str(image)], WORK / "bench-tunnel.log")
    bs.wait_listening(port, proc)
    return proc


@dataclass
class Result:
    mbps: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def run_once(env: Env, path: str, cipher: str, kind: str, dense: Path, size: int, disks: int, conns: int) -> tuple:
    """One measured copy (or ``disks`` copies at once); returns (MB/s, tunnel CPU s/GiB)."""
    ports = [env.base + i for i in range(disks)]
    targets = [WORK / f"tunnel-target-{i}.img" for i in range(disks)]
    servers = []
    for port, target in zip(ports, targets, strict=True):
        if kind == "write":
            target.unlink(missing_ok=True)
            with open(target, "wb") as f:
                f.truncate(size)
        servers.append(nbd_server(dense if kind == "read" else target, port, readonly=kind == "read"))
    tunnel = None
    try:
        tunnel = open_path(env, path, cipher, ports, conns)
        host = "127.0.0.1" if tunnel is None else NODE
        if kind == "write":
            cmds = [["nbdcopy", "--flush", "--connections=4", str(dense), f"nbd://{host}:{p}/"] for p in ports]
        else:
            cmds = [["nbdcopy", "--connections=4", f"nbd://{host}:{p}/", "null:"] for p in ports]
        subprocess.run(["sync"], check=True)
        cpu0 = cpu_seconds(tunnel.pids()) if tunnel else 0.0
        start = time.monotonic()
        copies = [subprocess.Popen(cmd, stderr=subprocess.PIPE) for cmd in cmds]
        for copy in copies:
            _, err = copy.communicate(timeout=900)
            if copy.returncode != 0:
                raise RuntimeError(f"nbdcopy failed: {err.decode(errors='replace')}")
        elapsed = time.monotonic() - start
        cpu = (cpu_seconds(tunnel.pids()) - cpu0) if tunnel else 0.0
    finally:
        if tunnel is not None:
            tunnel.stop()
        for server in servers:
            bs._kill(server)
    if kind == "write":
        for target in targets:
            subprocess.run(["cmp", str(dense), str(target)], check=True)
            target.unlink()
    total = size * disks
    return total / elapsed / 1e6, cpu / (total / (1 << 30))


@dataclass
class Case:
    name: str
    kind: str
    cipher: str
    disks: int
    paths: list[tuple[str, int]]  # (path, our --connections)
    results: dict[str, Result] = field(default_factory=dict)


def label(path: str, conns: int, case: Case) -> str:
    return f"{path} x{conns}" if case.disks > 1 and path.startswith("ours") else path


def run_case(env: Env, case: Case, dense: Path, size: int, rounds: int) -> None:
    print(f"== {case.name}", flush=True)
    for path, conns in case.paths:  # warm-up
        run_once(env, path, case.cipher, case.kind, dense, size, case.disks, conns)
    for r in range(rounds):
        order = case.paths if r % 2 == 0 else list(reversed(case.paths))
        for path, conns in order:
            mbps, cpu = run_once(env, path, case.cipher, case.kind, dense, size, case.disks, conns)
            result = case.results.setdefault(label(path, conns, case), Result())
            result.mbps.append(mbps)
            result.cpu.append(cpu)
            print(f"   {label(path, conns, case):<14} {mbps:8.1f} MB/s  tunnel CPU {cpu:5.2f} s/GiB", flush=True)


def table(cases: list[Case]) -> str:
    lines = [
        "| case | path | MB/s (median) | vs OpenSSH | vs direct | tunnel CPU s/GiB (client + hub) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        med = {name: statistics.median(r.mbps) for name, r in case.results.items()}
        ssh = med.get("openssh")
        direct = med.get("direct")
        for name, r in case.results.items():
            vs_ssh = f"{med[name] / ssh:.2f}x" if ssh else ""
            vs_direct = f"{med[name] / direct:.2f}x" if direct else ""
            cpu = f"{statistics.median(r.cpu):.2f}" if name != "direct" else ""
            lines.append(f"| {case.name} | {name} | {med[name]:.0f} | {vs_ssh} | {vs_direct} | {cpu} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="Image size (default 1G).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 round, aes128-gcm only.")
    parser.add_argument("--write-results", action="store_true", help="Append a section to benchmarks/RESULTS.md.")
    args = parser.parse_args()
    size = 256 * MiB if args.quick else bs.parse_size(args.size)
    rounds = 1 if args.quick else args.rounds
    ciphers = CIPHERS[:1] if args.quick else CIPHERS
    WORK.mkdir(exist_ok=True)
    dense = bs.make_dense(size)
    env = Env.create(two_free_ports())
    env.start_sshd()
    one = [("direct", 1), ("openssh", 1), ("ours", 1), ("ours->sshd", 1)]
    cases = [Case(f"write, {SHORT[c]}", "write", c, 1, list(one)) for c in ciphers]
    cases += [Case(f"read, {SHORT[c]}", "read", c, 1, list(one)) for c in ciphers]
    cases.append(
        Case(
            "2 disks write, aes128-gcm",
            "write",
            CIPHERS[0],
            2,
            [("direct", 1), ("openssh", 1), ("ours", 1), ("ours", 2)],
        )
    )
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    try:
        for case in cases:
            run_case(env, case, dense, size, rounds)
    finally:
        if env.sshd is not None:
            bs._kill(env.sshd)
        shutil.rmtree(env.dir, ignore_errors=True)
    text = table(cases)
    print(text)
    if args.write_results:
        sshd_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        import asyncssh

        section = [
            "",
            f"## SSH tunnel, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {bs.git_head()}"
            + (" (dirty tree)" if bs.git_dirty() else ""),
            "",
            f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python"
            f" {platform.python_version()}; load average (1 min) {load0:.2f} at start,"
            f" {os.getloadavg()[0]:.2f} at end; {time.monotonic() - started:.0f} s",
            f"- peers: {sshd_version} (ssh and sshd), asyncssh {asyncssh.__version__}, nbdcopy 1.14",
            "- benchmark: `.venv/bin/python benchmarks/bench_tunnel.py --write-results`",
            f"- {bs.human(size)} random image; target our NBD server (`sendense-nbd serve -f raw -e 16 -t`,"
            " `-r` for reads); write = `nbdcopy --flush --connections=4 dense.img nbd://HOST:P/` + `cmp`,"
            " read = `nbdcopy --connections=4 nbd://HOST:P/ null:`",
            "- paths: direct (no tunnel); openssh = `ssh -N -L 127.0.0.2:P:127.0.0.1:P -c CIPHER` to a private"
            " sshd; ours = our `tunnel` client to our embedded `tunnel-server`; ours->sshd = our client to the"
            " same sshd; ours xN = `--connections N` (2 disks: port i over SSH connection i % N)",
            f"- a warm-up run per path, then {rounds} rounds alternating the order; medians",
            "",
            text,
            "",
        ]
        with open(RESULTS, "a") as f:
            f.write("\n".join(section))
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
