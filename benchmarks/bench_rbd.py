#!/usr/bin/env python3
"""Benchmark ``sendense-nbd serve rbd:...`` against ``qemu-nbd -f raw rbd:...``, in the same run, on loopback.

Run with the project's venv python, as root (the test cluster's bluestore opens its file with O_DIRECT)::

    /work/main/.venv/bin/python benchmarks/bench_rbd.py --quick          # smoke test: 64 MiB, 1 round
    /work/main/.venv/bin/python benchmarks/bench_rbd.py --write-results  # 1 GiB, 3 rounds, a RESULTS.md section

A fresh single-node Ceph (``simulator/ceph_cluster.py``, no RGW) is started under benchmarks/work and
stopped at the end (``--cluster DIR`` uses a running one instead). Both servers serve the same image
by qemu's name, ``rbd:rbd/IMAGE:conf=CONF:id=admin``, with the same flags ``-f raw -e 16 -t`` (``-r``
for reads):

* ``ours``: ``sendense-nbd serve -f raw -p 0 -e 16 -t NAME`` (librbd's cache off in every mode, so each write
  is answered once the OSDs have it: docs/STORAGE.md);
* ``qemu``: ``qemu-nbd -f raw -x '' -p PORT -b 127.0.0.1 -e 16 -t NAME`` (qemu-block-extra's rbd driver; its
  default ``--cache writeback`` is librbd's cache, which writes through until the client's first FLUSH: the
  whole dense write here, as nbdcopy flushes at the end);
* ``qemu-none`` (with ``--servers``): qemu-nbd ``--cache=none`` (``rbd_cache=false``, librbd as ours runs it);
* ``qemu-wb`` (with ``--servers``): qemu-nbd with ``:rbd_cache_writethrough_until_flush=false`` added to the
  name: librbd answering writes before the OSDs do, the mode that can lose a refused write (not ours since
  the issue 17 review), to show what that early answer is worth.

Cases: ``write`` = ``nbdcopy --flush --connections=4 --threads=4 dense.img nbd://...`` into a freshly created
(empty, thin) image of the same size, 1 GiB of random data by default; ``read`` = ``nbdcopy
--connections=4 --threads=4 nbd://... null:`` from a read-only export of an image filled once with the same
data. Each server's warm-up write is checked with ``qemu-img compare`` against the source through qemu's
rbd driver. nbdcopy's requests are the larger of 256 KiB and the preferred block size the server advertises
(recorded with nbdinfo): ours advertises the image's object size (4 MiB), qemu-nbd 4096, so ours gets 16
times fewer, larger requests.

Method: per case a warm-up run per server, then ``--rounds`` rounds in A B, B A order; medians; MB/s =
10^6 bytes of image per second of nbdcopy's wall time (``--flush`` included); CPU s/GiB of the server
process (all threads, ``/proc/PID/stat``) and, for context, of the OSD. Target: dense write >= 1.0x of
qemu-nbd (issue 17); read is reported against bench_server's read target, >= 0.8x.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_results as br  # noqa: E402 - RESULTS.md sections
import bench_server as bs  # noqa: E402 - process bookkeeping (every child killed at exit), images, git

REPO, WORK, RESULTS, PYTHON, MiB, GiB = bs.REPO, bs.WORK, bs.RESULTS, bs.VENV_PYTHON, bs.MiB, 1 << 30
SERVERS = ("ours", "qemu", "qemu-none", "qemu-wb")
KINDS = ("write", "read")
TARGETS = {"write": 1.0, "read": 0.8}
LOG = WORK / "bench-rbd.log"
POOL = "rbd"


def _ceph_cluster() -> Any:
    """simulator/ceph_cluster.py, loaded by path."""
    spec = importlib.util.spec_from_file_location("ceph_cluster", REPO / "simulator" / "ceph_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ceph_cluster"] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Sample:
    mbps: float
    server_cpu: float  # s/GiB
    osd_cpu: float  # s/GiB


@dataclass
class Bench:
    args: argparse.Namespace
    size: int
    dense: Path
    cluster: Any
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)
    #: The preferred block size each server advertised (nbdinfo): nbdcopy's request size follows it.
    preferred: dict[str, int] = field(default_factory=dict)

    # -- the cluster's side ------------------------------------------------------

    def rbd(self, *args: str) -> None:
        subprocess.run(["rbd", *self.cluster.client_args(), *args], check=True, capture_output=True, timeout=300)

    def name(self, image: str, which: str) -> str:
        extra = ":rbd_cache_writethrough_until_flush=false" if which == "qemu-wb" else ""
        return f"rbd:{POOL}/{image}:conf={self.cluster.conf}:id={self.cluster.user}{extra}"

    def fresh(self, image: str) -> None:
        subprocess.run(["rbd", *self.cluster.client_args(), "rm", "--no-progress", image], capture_output=True)
        self.rbd("create", "--size", f"{self.size}B", image)

    def osd_cpu(self) -> float:
        pid = int((Path(self.cluster.directory) / "run" / "osd.0.pid").read_text())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # -- one run -----------------------------------------------------------------

    def server(self, which: str, image: str, readonly: bool) -> bs.Server:
        name = self.name(image, which)
        ro = ["-r"] if readonly else []
        if which == "ours":
            cmd = [str(PYTHON), "-m", "sendense_nbd", "serve", "-f", "raw", "-p", "0", "-e", "16", "-t", *ro, name]
            proc = bs._spawn(cmd, LOG, stdout=subprocess.PIPE, cwd=str(REPO))
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()
            if not line.isdigit():
                bs._kill(proc)
                raise RuntimeError(f"our server printed {line!r}, not its port; see {LOG}")
            port = int(line)
        else:
            port = bs.free_port()
            cache = ["--cache=none"] if which == "qemu-none" else []
            listen = ["-x", "", "-p", str(port), "-b", bs.HOST]
            cmd = ["qemu-nbd", "-f", "raw", *listen, "-e", "16", "-t", *cache, *ro, name]
            proc = bs._spawn(cmd, LOG, stdout=subprocess.DEVNULL)
        bs.wait_listening(port, proc, timeout=60)
        return bs.Server(which, proc, port, cmd)

    def run_once(self, which: str, kind: str, check: bool) -> Sample:
        image = f"bench-{kind}" if kind == "read" else f"bench-w-{os.getpid()}"
        if kind == "write":
            self.fresh(image)
        server = self.server(which, image, readonly=kind == "read")
        if which not in self.preferred:
            info = subprocess.run(["nbdinfo", "--json", server.uri], check=True, capture_output=True, timeout=60)
            self.preferred[which] = int(json.loads(info.stdout)["exports"][0]["block_size_preferred"])
        threads = ["--connections=4", "--threads=4"]
        cmd = ["nbdcopy", "--flush", *threads, str(self.dense), server.uri] if kind == "write" else [
            "nbdcopy", *threads, server.uri, "null:"]  # fmt: skip
        try:
            server0, osd0 = server.cpu_seconds(), self.osd_cpu()
            started = time.monotonic()
            with open(LOG, "ab") as log:
                subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               timeout=self.args.timeout)  # fmt: skip
            elapsed = time.monotonic() - started
            server_cpu, osd_cpu = server.cpu_seconds() - server0, self.osd_cpu() - osd0
        finally:
            server.stop()  # SIGTERM: the image is closed (and its watch dropped) before the next run
        if check:
            subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(self.dense),
                            self.name(image, "qemu")], check=True, timeout=600)  # fmt: skip
        gib = self.size / GiB
        return Sample(self.size / elapsed / 1e6, server_cpu / gib, osd_cpu / gib)

    def measure(self, which: str, kind: str, warmup: bool) -> None:
        check = kind == "write" and which not in self.checked
        sample = self.run_once(which, kind, check)
        self.checked.add(which)
        print(f"  {kind:<5} {which:<7}{' warm-up' if warmup else ''}: {sample.mbps:7.1f} MB/s, CPU s/GiB server"
              f" {sample.server_cpu:.2f}, OSD {sample.osd_cpu:.2f}{' (compared: identical)' if check else ''}",
              flush=True)  # fmt: skip
        if not warmup:
            self.samples.setdefault((kind, which), []).append(sample)


def run_matrix(bench: Bench) -> None:
    servers = list(bench.args.servers)
    if "read" in bench.args.kinds:
        bench.fresh("bench-read")
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(bench.dense),
                        bench.name("bench-read", "qemu")], check=True, timeout=900)  # fmt: skip
    for kind in bench.args.kinds:
        print(f"{kind}:", flush=True)
        if bench.args.warmup:
            for which in servers:
                bench.measure(which, kind, warmup=True)
        for round_ in range(bench.args.rounds):
            for which in servers if round_ % 2 == 0 else reversed(servers):
                bench.measure(which, kind, warmup=False)


def _median(bench: Bench, kind: str, which: str, attr: str) -> float | None:
    samples = bench.samples.get((kind, which))
    return statistics.median(getattr(s, attr) for s in samples) if samples else None


def table(bench: Bench) -> tuple[str, list[str]]:
    rows = ["| case | server | MB/s (median) | vs qemu-nbd | server CPU s/GiB | OSD CPU s/GiB |",
            "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    goals = []
    for kind in bench.args.kinds:
        base = _median(bench, kind, "qemu", "mbps")
        for which in bench.args.servers:
            mbps = _median(bench, kind, which, "mbps")
            if mbps is None:
                continue
            ratio = f"{mbps / base:.2f}x" if base else ""
            server_cpu = _median(bench, kind, which, "server_cpu") or 0.0
            osd_cpu = _median(bench, kind, which, "osd_cpu") or 0.0
            rows.append(f"| dense {kind} | {which} | {mbps:.0f} | {ratio} | {server_cpu:.2f} | {osd_cpu:.2f} |")
        ours = _median(bench, kind, "ours", "mbps")
        if ours and base:
            ratio_value, target = ours / base, TARGETS[kind]
            verdict = "met" if ratio_value >= target else f"MISSED by {target - ratio_value:.2f}"
            goals.append(f"- dense {kind}, ours / qemu-nbd: {ratio_value:.2f}x (target >= {target:.1f}x): {verdict}")
    return "\n".join(rows), goals


def versions() -> str:
    def first_line(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")[0]

    tools = (("qemu-nbd", "--version"), ("nbdcopy", "--version"), ("ceph", "--version"))
    return "; ".join(first_line(*tool) for tool in tools)


def write_results(bench: Bench, text: str, goals: list[str], load0: float, elapsed: float, argv: list[str]) -> None:
    dirty = " (dirty tree)" if bs.git_dirty() else ""
    now = datetime.datetime.now(datetime.UTC)
    servers = ", ".join(bench.args.servers)
    title = (
        f"## RBD: sendense-nbd serve rbd: vs qemu-nbd rbd: (issue 17), {now:%Y-%m-%d %H:%M} UTC, commit"
        f" {bs.git_head()}{dirty}"
    )
    about = [
        br.machine(load0, elapsed),
        f"- versions: {versions()}; Python {platform.python_version()}",
        f"- benchmark: `.venv/bin/python benchmarks/bench_rbd.py {' '.join(argv)}`",
        "- cluster: simulator/ceph_cluster.py (1 mon, 1 mgr, 1 bluestore OSD on a sparse file, size 1, loopback)",
        f"- {bs.human(bench.size)} random image; servers ({servers}) serve `rbd:rbd/IMAGE:conf=CONF:id=admin` with"
        " `-f raw -e 16 -t` (`-r` for reads); ours with librbd's cache off, qemu with its defaults (qemu-none:"
        " `--cache=none`; qemu-wb: `:rbd_cache_writethrough_until_flush=false`); write = `nbdcopy --flush"
        " --connections=4 --threads=4 dense.img URI` into a fresh image, each server's warm-up write compared with"
        " `qemu-img compare`; read = `nbdcopy --connections=4 --threads=4 URI null:`",
        f"- a warm-up run per server and case, then {bench.args.rounds} rounds in A B B A order; medians; CPU in"
        " s/GiB (server process, all threads; the OSD for context)",
        "- preferred block size advertised (nbdcopy sends requests of max(256 KiB, this)): "
        + ", ".join(f"{which} {bs.human(size)}" for which, size in bench.preferred.items()),
    ]
    br.add_section(RESULTS, br.section(title, about, text, 17, goals, bench.args.note))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default="1G", help="Image size (default 1G).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 round: a smoke test.")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=["ours", "qemu"])
    parser.add_argument("--cluster", type=Path, help="A running cluster's directory (default: start one).")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds one nbdcopy may take.")
    parser.add_argument("--json", type=Path, help="Write every sample here.")
    parser.add_argument("--note", default="", help="A sentence added to the RESULTS.md section.")
    parser.add_argument("--write-results", action="store_true", help="Add a section to benchmarks/RESULTS.md.")
    args = parser.parse_args(argv)
    if "qemu" not in args.servers:
        parser.error("--servers must include qemu (the baseline)")
    if args.quick:
        args.size, args.rounds = "64M", 1
    return args


def main() -> int:
    argv = sys.argv[1:]
    args = parse_args(argv)
    WORK.mkdir(exist_ok=True)
    size = bs.parse_size(args.size)
    module = _ceph_cluster()
    directory = args.cluster or Path(tempfile.mkdtemp(prefix="ceph-", dir=WORK))
    load0, started = os.getloadavg()[0], time.monotonic()
    cluster = module.start(directory, rgw=False) if args.cluster is None else module.load(directory)
    bench = Bench(args, size, bs.make_dense(size), cluster)
    try:
        run_matrix(bench)
    finally:
        for image in ("bench-read", f"bench-w-{os.getpid()}"):
            subprocess.run(["rbd", *cluster.client_args(), "rm", "--no-progress", image], capture_output=True)
        if args.cluster is None:
            module.stop(directory)
            shutil.rmtree(directory, ignore_errors=True)
    elapsed = time.monotonic() - started
    text, goals = table(bench)
    print(text, "", "Targets:", *goals, sep="\n")
    if args.json:
        samples = {" | ".join(key): [s.__dict__ for s in values] for key, values in bench.samples.items()}
        args.json.write_text(json.dumps({"argv": argv, "samples": samples}, indent=1))
    if args.write_results:
        write_results(bench, text, goals, load0, elapsed, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
