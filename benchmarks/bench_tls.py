#!/usr/bin/env python3
"""Benchmark NBD over TLS against plain NBD and our SSH tunnel, in the same run, at 0 and 50 ms added RTT.

Run with the project's venv python, as root (the links are bench_pipeline's network namespace)::

    /work/main/.venv/bin/python benchmarks/bench_tls.py --quick          # smoke test, 256 MiB, 1 round
    /work/main/.venv/bin/python benchmarks/bench_tls.py --write-results  # 1 GiB, 3 rounds, a RESULTS.md section

The NBD server is always ours (``sendense-nbd serve -f raw -e 16 -t -b 0.0.0.0``, ``-r`` for reads) on
the hub side; nbdcopy runs on the node side and reaches it by one of three paths:

* ``plain``: ``nbd://HUB:P/``;
* ``tls``: ``nbds://HUB:P/?tls-certificates=DIR`` to the server started with ``--tls require --tls-creds
  DIR/hub``; certificates from ``sendense_nbd.tls.pki.init_pki`` (``sendense-nbd tls init``), DIR holding
  only the CA certificate (no client certificate: server-authenticated TLS, as a node would use);
* ``tunnel``: ``nbd://127.0.0.1:P/`` on the node side, forwarded by our tunnel client (``sendense-backup
  tunnel``, its defaults but ``--cipher``, aes128-gcm by default) to our embedded endpoint
  (``tunnel-server``) and on to the server's 127.0.0.1:P: bench_tunnel's ``ours``.

Links (``--links``): ``0`` and ``50`` are bench_pipeline's emulated link (a network namespace for the
node side, joined to the root namespace by two TUN devices and its delay relay, or veth + netem when the
kernel has it) with that much added RTT; ``loopback`` runs everything in the root namespace on 127.0.0.x,
without the relay (the CPU ceiling: the relay is a Python process on the same cores).

Cases: dense write (``nbdcopy --flush --connections=4 dense.img URI`` into a fresh sparse file, ``cmp``-ed
with the source afterwards) and dense read (``nbdcopy --connections=4 URI null:`` from a read-only export
of dense.img). nbdcopy caps its connections at its threads, by default the CPU count: ``--threads 4`` makes
the 4 connections real.

Method: per (link, case) a warm-up run per path, then ``--rounds`` rounds; every other round reverses the
order of the links and of the paths (A B B A); medians. MB/s = 10^6 bytes of image per second of nbdcopy's
wall time (its start, connections and TLS handshakes included). CPU s/GiB on both sides: nbdcopy
(``wait4`` rusage), our server process (all threads, from ``/proc/PID/stat``, from the copy's start to its
end), the tunnel's two ends; the relay's apart.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import platform
import re
import select
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_pipeline as bp  # noqa: E402 - the emulated link: Netns, Link, netem_available, namespace_facts
import bench_results as br  # noqa: E402 - RESULTS.md sections
import bench_server as bs  # noqa: E402 - process bookkeeping (every child killed at exit), images, git
import bench_tunnel as bt  # noqa: E402 - SSH keys for the tunnel (Env), CPU from /proc

REPO, WORK, RESULTS, PYTHON, MiB, GiB = bs.REPO, bs.WORK, bs.RESULTS, bs.VENV_PYTHON, bs.MiB, 1 << 30
PATHS = ("plain", "tls", "tunnel")
KINDS = ("write", "read")
LOG = WORK / "bench-tls.log"
TARGETS = {"tls/plain at 0 ms": 0.7, "tls/tunnel at 50 ms": 1.0}


@dataclass(frozen=True)
class Where:
    """Where a link puts things: the node side's namespace (None: the root one) and the addresses."""

    label: str
    rtt_ms: float | None  # None: loopback, no emulated link
    netns: str | None
    hub_host: str  # where the node reaches the hub's NBD server and SSH endpoint
    node_host: str  # where the tunnel client listens on the node side

    def node_cmd(self, cmd: list[str]) -> list[str]:
        return cmd if self.netns is None else ["ip", "netns", "exec", self.netns, *cmd]


@dataclass
class Sample:
    mbps: float
    cpu: dict[str, float]  # s/GiB by process role


@dataclass
class Cell:
    """One (link, case, path): its measured runs."""

    samples: list[Sample] = field(default_factory=list)

    def mbps(self) -> float:
        return statistics.median(s.mbps for s in self.samples)

    def cpu(self, role: str) -> float:
        return statistics.median(s.cpu.get(role, 0.0) for s in self.samples)


@dataclass
class Bench:
    args: argparse.Namespace
    size: int
    dense: Path
    port: int
    creds: Path  # tls init's deployment
    env: bt.Env  # SSH keys
    ns: bp.Netns | None = None
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)

    # -- processes -------------------------------------------------------------

    def server(self, path: str, kind: str, bind: str) -> subprocess.Popen[bytes]:
        image = self.dense if kind == "read" else WORK / f"tls-target-{os.getpid()}.img"
        if kind == "write":
            image.unlink(missing_ok=True)
            with open(image, "wb") as f:
                f.truncate(self.size)
        cmd = [str(PYTHON), *self.args.server_prefix.split(), "-m", "sendense_nbd", "-v", "serve"]
        cmd += ["-f", "raw"]
        cmd += ["-b", bind, "-p", str(self.port), "-e", "16", "-t", *self.args.server_arg]
        if path == "tls":
            cmd += ["--tls", "require", "--tls-creds", str(self.creds / "hub")]
        env = {**os.environ, **dict(kv.split("=", 1) for kv in self.args.server_env)}
        proc = bs._spawn([*cmd, *(["-r"] if kind == "read" else []), str(image)], LOG, env=env, cwd=str(REPO))
        bs.wait_listening(self.port, proc)
        return proc

    def tunnel(self, where: Where) -> list[subprocess.Popen[bytes]]:
        """Our tunnel up: after this, node_host:port on the node side reaches the server's 127.0.0.1:port."""
        env = self.env
        hub = bs._spawn(
            [str(PYTHON), "-c", "from sendense_nbd.tunnel.cli import tunnel_server_command; tunnel_server_command()",
             f"--ssh-listen={where.hub_host}:0", f"--ssh-host-key={env.host_key}",
             f"--ssh-authorized-keys={env.authorized}", f"--nbd-ports={self.port}-{self.port}"],
            LOG, stdout=subprocess.PIPE,
        )  # fmt: skip
        procs = [hub]
        try:
            ssh_port = int(_ready_line(hub))
            with open(env.known_hosts, "a") as f:
                f.write(f"[{where.hub_host}]:{ssh_port} {env.host_public}\n")
            node_cmd = [
                str(PYTHON), "-c", "from sendense_nbd.tunnel.cli import tunnel_command; tunnel_command()",
                f"--hub={where.hub_host}:{ssh_port}", f"--key={env.client_key}", f"--known-hosts={env.known_hosts}",
                f"--user={getpass.getuser()}", f"--ports={self.port}-{self.port}", f"--listen-host={where.node_host}",
                f"--cipher={self.args.cipher}", "--remote-forward=none",
            ]  # fmt: skip
            node = bs._spawn(where.node_cmd(node_cmd), LOG, stdout=subprocess.PIPE)
            procs.insert(0, node)
            line = _ready_line(node)
            if '"connected": true' not in line:
                raise RuntimeError(f"our tunnel did not come up: {line!r}; see {LOG}")
        except BaseException:
            for proc in procs:
                bs._kill(proc)
            raise
        return procs

    # -- one run ---------------------------------------------------------------

    def uri(self, path: str, where: Where) -> str:
        if path == "tunnel":
            return f"nbd://{where.node_host}:{self.port}/"
        if path == "tls":
            return f"nbds://{where.hub_host}:{self.port}/?tls-certificates={self.creds / 'client'}"
        return f"nbd://{where.hub_host}:{self.port}/"

    def nbdcopy(self, path: str, kind: str, where: Where) -> list[str]:
        threads = [f"--threads={self.args.threads}"] if self.args.threads else []
        conns = f"--connections={self.args.connections}"
        uri = self.uri(path, where)
        if self.args.client == "ours":  # the node's own copy engine (write only: it has no null: target)
            return where.node_cmd([str(PYTHON), "-m", "sendense_nbd", "copy", "-C", str(self.args.connections),
                                   str(self.dense), uri])  # fmt: skip
        if kind == "write":
            return where.node_cmd(["nbdcopy", "--flush", conns, *threads, str(self.dense), uri])
        return where.node_cmd(["nbdcopy", conns, *threads, uri, "null:"])

    def run_once(self, path: str, kind: str, where: Where) -> Sample:
        server = self.server(path, kind, "127.0.0.1" if path == "tunnel" else "0.0.0.0")
        tunnel: list[subprocess.Popen[bytes]] = []
        try:
            if path == "tunnel":
                tunnel = self.tunnel(where)
            subprocess.run(["sync"], check=True)
            roles = {"server": server.pid} | (
                {"tunnel node": tunnel[0].pid, "tunnel hub": tunnel[1].pid} if tunnel else {}
            )
            before = {role: bt.cpu_seconds([pid]) for role, pid in roles.items()}
            relay0 = self.ns.relay_cpu() if self.ns is not None and where.netns else 0.0
            started = time.monotonic()
            client_cpu = run_timed(self.nbdcopy(path, kind, where), self.args.timeout)
            elapsed = time.monotonic() - started
            cpu = {role: bt.cpu_seconds([pid]) - before[role] for role, pid in roles.items()}
            cpu["nbdcopy"] = client_cpu
            if self.ns is not None and where.netns:
                cpu["relay"] = self.ns.relay_cpu() - relay0
        finally:
            for proc in [*tunnel, server]:
                bs._kill(proc)
        if kind == "write":
            target = WORK / f"tls-target-{os.getpid()}.img"
            subprocess.run(["cmp", str(self.dense), str(target)], check=True)
            target.unlink()
        gib = self.size / GiB
        return Sample(self.size / elapsed / 1e6, {role: seconds / gib for role, seconds in cpu.items()})

    def measure(self, path: str, kind: str, where: Where, warmup: bool) -> None:
        sample = self.run_once(path, kind, where)
        cpu = "  ".join(f"{role} {value:.2f}" for role, value in sample.cpu.items())
        print(f"  {where.label:>8} {kind:<5} {path:<6}{' warm-up' if warmup else ''}: {sample.mbps:7.1f} MB/s,"
              f" CPU s/GiB: {cpu}", flush=True)  # fmt: skip
        if not warmup:
            self.cells.setdefault((where.label, kind, path), Cell()).samples.append(sample)


def _ready_line(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    if not line:
        raise RuntimeError(f"{proc.args!r} printed nothing within {timeout:g} s; see {LOG}")
    return line


def run_timed(cmd: list[str], timeout: float) -> float:
    """Run ``cmd`` to completion (killed after ``timeout``); its CPU seconds (user + system, wait4)."""
    with open(LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {LOG}")
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------
# the matrix


def wheres(bench: Bench) -> dict[str, Where]:
    found = {}
    for name in bench.args.links:
        if name == "loopback":
            found[name] = Where("loopback", None, None, "127.0.0.1", bt.NODE)
        else:
            assert bench.ns is not None
            found[name] = Where(f"{float(name):g} ms", float(name), bench.ns.name, bp.HUB_IP, "127.0.0.1")
    return found


def run_matrix(bench: Bench) -> None:
    links = list(wheres(bench).values())
    paths = list(bench.args.paths)
    warmed: set[tuple[str, str]] = set()
    for rnd in range(bench.args.rounds):
        for where in links if rnd % 2 == 0 else links[::-1]:
            if bench.ns is not None and where.rtt_ms is not None:
                bench.ns.set_link(bp.Link(where.rtt_ms), 1)
            for kind in bench.args.kinds:
                if bench.args.warmup and (where.label, kind) not in warmed:
                    warmed.add((where.label, kind))
                    for path in paths:
                        bench.measure(path, kind, where, warmup=True)
                for path in paths if rnd % 2 == 0 else paths[::-1]:
                    bench.measure(path, kind, where, warmup=False)


def setup_creds(root: Path) -> Path:
    """A ``tls init`` deployment in ``root``; ``root/client`` holds only the CA certificate."""
    from sendense_nbd.tls import pki

    creds = root / "pki"
    pki.init_pki(creds, hub_names=["localhost"], hub_addresses=["127.0.0.1", bp.HUB_IP], nodes=[])
    (creds / "client").mkdir()
    shutil.copy(creds / "ca-cert.pem", creds / "client" / "ca-cert.pem")
    return creds


# --------------------------------------------------------------------------
# the report


def _ratio(a: Cell | None, b: Cell | None) -> float | None:
    return a.mbps() / b.mbps() if a and b and b.mbps() else None


def _fmt(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else ""


def table(bench: Bench) -> str:
    lines = [
        "| link | case | path | MB/s (median) | vs plain | tls / tunnel | nbdcopy | server | tunnel node"
        " | tunnel hub | node side | hub side | relay |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (link, kind, path), cell in bench.cells.items():
        plain = bench.cells.get((link, kind, "plain"))
        tunnel = bench.cells.get((link, kind, "tunnel"))
        vs_tunnel = _fmt(_ratio(cell, tunnel)) if path == "tls" else ""
        roles = ("nbdcopy", "server", "tunnel node", "tunnel hub")
        cpu = {role: cell.cpu(role) for role in roles}
        node, hub = cpu["nbdcopy"] + cpu["tunnel node"], cpu["server"] + cpu["tunnel hub"]
        shown = [f"{cpu[r]:.2f}" if (path == "tunnel" or not r.startswith("tunnel")) else "" for r in roles]
        relay = f"{cell.cpu('relay'):.2f}" if link != "loopback" else ""
        lines.append(
            f"| {link} | {kind} | {path} | {cell.mbps():.0f} | {_fmt(_ratio(cell, plain))} | {vs_tunnel} | "
            + " | ".join(shown)
            + f" | {node:.2f} | {hub:.2f} | {relay} |"
        )
    return "\n".join(lines)


def targets(bench: Bench) -> list[str]:
    found = []
    for kind in bench.args.kinds:
        for link, other, goal in (("0 ms", "plain", 0.7), ("loopback", "plain", 0.7), ("50 ms", "tunnel", 1.0)):
            ratio = _ratio(bench.cells.get((link, kind, "tls")), bench.cells.get((link, kind, other)))
            if ratio is None:
                continue
            verdict = "met" if ratio >= goal else f"MISSED by {goal - ratio:.2f} ({ratio / goal - 1:+.0%})"
            info = " (no emulated link: information, the target is the 0 ms link's)" if link == "loopback" else ""
            found.append(f"- {kind}, TLS / {other} at {link}: {ratio:.2f}x (target >= {goal}x): {verdict}{info}")
    return found


def versions() -> str:
    nbdcopy = subprocess.run(["nbdcopy", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    import asyncssh

    return f"{nbdcopy}; Python {platform.python_version()} with {ssl.OPENSSL_VERSION}; asyncssh {asyncssh.__version__}"


def header(bench: Bench, load0: float, elapsed: float, argv: list[str]) -> list[str]:
    ktls = getattr(ssl, "OP_ENABLE_KTLS", None)
    return [
        br.machine(load0, elapsed),
        f"- versions: {versions()}; kTLS: ssl.OP_ENABLE_KTLS {'present' if ktls else 'absent (Python < 3.12)'},"
        f" kernel CONFIG_TLS {bench.facts.get('kernel_tls', '?')}",
        f"- benchmark: `.venv/bin/python benchmarks/bench_tls.py {' '.join(argv)}`",
        f"- {bs.human(bench.size)} random image; server `sendense-nbd -v serve -f raw -e 16 -t -b ADDR`"
        " (`-r` for reads; tls: `--tls require --tls-creds DIR/hub`, certificates from `tls init`, ECDSA P-256);"
        f" write = `nbdcopy --flush --connections={bench.args.connections}"
        f"{f' --threads={bench.args.threads}' if bench.args.threads else ''} dense.img URI` + `cmp`, read ="
        f" `nbdcopy --connections={bench.args.connections} URI null:`; tunnel: ours (`tunnel` to `tunnel-server`,"
        f" defaults, `--cipher {bench.args.cipher}`)",
        f"- link: {bench.facts.get('method', 'none')}; TLS negotiated: {bench.facts.get('tls_cipher', '?')};"
        f" node namespace sysctls: {bench.facts.get('sysctls', {})}"
        + (f", then set: {bench.facts['node_sysctl']}" if "node_sysctl" in bench.facts else ""),
        f"- a warm-up run per path and case on each link, then {bench.args.rounds} rounds, links and paths in"
        " A B B A order; medians; CPU in s/GiB (node side = nbdcopy + tunnel client, hub side = server +"
        " tunnel endpoint; relay apart)",
    ]


def kernel_tls() -> str:
    try:
        import gzip

        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("CONFIG_TLS=") or line == "# CONFIG_TLS is not set":
            return line.split("=", 1)[1] if "=" in line else "not set"
    return "unknown"


def tls_cipher(offset: int) -> str:
    """The protocol and cipher the servers of this run (the log from ``offset`` on; they run with ``-v``)
    logged for their TLS clients, e.g. ``TLSv1.3 (TLS_AES_256_GCM_SHA384)``."""
    try:
        with open(LOG, "rb") as f:
            f.seek(offset)
            found = re.findall(r"TLSv[\d.]+ \([A-Z0-9_-]+\)", f.read().decode(errors="replace"))
    except OSError:
        return "?"
    return ", ".join(sorted(set(found))) or "?"


def write_results(bench: Bench, text: str, goals: list[str], load0: float, elapsed: float, argv: list[str]) -> None:
    dirty = " (dirty tree)" if bs.git_dirty() else ""
    now = datetime.datetime.now(datetime.UTC)
    title = (
        f"## NBD over TLS vs plain NBD vs our SSH tunnel (issue 16), {now:%Y-%m-%d %H:%M} UTC,"
        f" commit {bs.git_head()}{dirty}"
    )
    br.add_section(RESULTS, br.section(title, header(bench, load0, elapsed, argv), text, 16, goals, bench.args.note))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default="1G", help="Image size (default 1G).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 round: a smoke test.")
    parser.add_argument("--links", nargs="+", default=["0", "50"], help="loopback and/or added RTTs in ms.")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--client", choices=("nbdcopy", "ours"), default="nbdcopy",
        help="The node side's client: nbdcopy, or ours (sendense-nbd copy, as the node's copy engine; write only).",
    )  # fmt: skip
    parser.add_argument("--connections", type=int, default=4, help="nbdcopy --connections.")
    parser.add_argument("--threads", type=int, default=0, help="nbdcopy --threads (0: its default, the CPUs).")
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com", help="Our tunnel's --cipher.")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--server-prefix", default="", help="Arguments between python and -m sendense_nbd.")
    parser.add_argument("--server-arg", action="append", default=[], help="An extra argument of serve (repeat).")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeat).")
    parser.add_argument(
        "--node-sysctl", action="append", default=[], help="NAME=VALUE set in the node namespace (repeat)."
    )
    parser.add_argument("--timeout", type=float, default=600, help="Seconds one nbdcopy may take.")
    parser.add_argument("--json", type=Path, help="Write every sample here.")
    parser.add_argument("--note", default="", help="A sentence added to the RESULTS.md section.")
    parser.add_argument("--write-results", action="store_true", help="Add a section to benchmarks/RESULTS.md.")
    args = parser.parse_args(argv)
    if args.client == "ours" and "read" in args.kinds:
        parser.error("--client ours copies into the server only: give --kinds write")
    if args.quick:
        args.size, args.rounds = "256M", 1
    return args


def main() -> int:
    argv = sys.argv[1:]
    args = parse_args(argv)
    emulated = [name for name in args.links if name != "loopback"]
    if emulated and os.geteuid() != 0:
        print("needs root for the emulated links (ip netns, TUN devices); try --links loopback", file=sys.stderr)
        return 2
    WORK.mkdir(exist_ok=True)
    size = bs.parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="bench-tls-", dir=WORK))
    env = bt.Env.create(bt.two_free_ports())
    bench = Bench(args, size, bs.make_dense(size), env.base, setup_creds(root), env)
    bench.facts["kernel_tls"] = kernel_tls()
    load0, started = os.getloadavg()[0], time.monotonic()
    log_start = LOG.stat().st_size if LOG.exists() else 0
    try:
        if emulated:
            bp.remove_leftovers()
            method = "netem" if bp.netem_available() else "relay"
            bench.facts["method"] = {"relay": "TUN pair + bench_pipeline's relay", "netem": "veth + netem"}[method]
            bench.ns = bp.Netns.create(method)
            bench.facts["sysctls"] = bp.namespace_facts(bench.ns, True)
            for setting in args.node_sysctl:  # e.g. a larger tcp_wmem for nbdcopy's sends
                name, value = setting.split("=", 1)
                bench.facts.setdefault("node_sysctl", {})[name] = bench.ns.sysctl(name, value)  # type: ignore[index]
        run_matrix(bench)
    finally:
        if bench.ns is not None:
            bench.ns.delete()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(env.dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    bench.facts["tls_cipher"] = tls_cipher(log_start)
    text, goals = table(bench), targets(bench)
    print(text, "", "Targets:", *goals, sep="\n")
    if args.json:
        cells = {" | ".join(key): [s.__dict__ for s in cell.samples] for key, cell in bench.cells.items()}
        raw = {"argv": argv, "facts": bench.facts, "cells": cells}
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if args.write_results:
        write_results(bench, text, goals, load0, elapsed, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
