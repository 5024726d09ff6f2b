#!/usr/bin/env python3
"""Benchmark sendense-nbd against qemu-nbd, in the same run, on loopback.

Run with the project's venv python (stdlib only)::

    /work/main/.venv/bin/python benchmarks/bench_server.py            # full, 2 GiB
    /work/main/.venv/bin/python benchmarks/bench_server.py --quick    # smoke test
    /work/main/.venv/bin/python benchmarks/bench_server.py --write-results

Cases (each against both servers, same flags: ``-f raw -e N -t --cache=MODE
--discard=MODE``):

* ``dense write``: ``nbdcopy --flush dense.img nbd://...`` into a fresh
  sparse target, default connections (4) and ``--connections=1``;
* ``sparse write``: the same from a sparse source with 10% data;
* ``read``: ``nbdcopy nbd://... null:`` from an export of the dense file;
* ``memory``: peak RSS (VmHWM) of each server while 10 libnbd clients keep
  16 x 2 MiB requests in flight each for ~10 s.

Each timed case: one warm-up run per server, then ``--rounds`` rounds in
A B, B A, A B ... order; the median MB/s (10^6 bytes of virtual size per
second, nbdcopy's wall time including ``--flush``) and ours/qemu ratio are
reported. A server is started per run, and every server is killed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "RESULTS.md"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, the one that imports python3-libnbd
HOST = "127.0.0.1"
MiB = 1024 * 1024
SPARSE_STRIDE = 10 * MiB  # one 1 MiB random block every 10 MiB: 10% data
SPARSE_BLOCK = 1 * MiB

TARGETS = {
    # case kind -> minimal ours/qemu ratio
    "dense": 1.0,
    "sparse": 0.8,
    "read": 0.8,
}
RSS_LIMIT_MIB = 100

# --------------------------------------------------------------------------
# process bookkeeping: every server we start is killed at exit, even on error

_children: dict[int, subprocess.Popen[bytes]] = {}


def _kill(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    _children.pop(proc.pid, None)


def _kill_all() -> None:
    for proc in list(_children.values()):
        try:
            _kill(proc, grace=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


atexit.register(_kill_all)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background


def _spawn(cmd: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            cmd, stdin=subprocess.DEVNULL, stderr=err, **kw
        )
    _children[proc.pid] = proc
    return proc


# --------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} after {timeout}s")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    cmd: list[str]

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}"

    def status(self, key: str) -> int:
        """A kB figure from /proc/PID/status, e.g. VmHWM."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) if m else 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        _kill(self.proc)


class Config:
    def __init__(self, args: argparse.Namespace) -> None:
        self.cache: str = args.cache
        self.discard: str = args.discard
        self.shared: int = args.shared
        self.timeout: float = args.timeout
        self.prefault: bool = getattr(args, "prefault", False)
        self.ours_prefix: list[str] = []  # e.g. a profiler wrapping our server

    def server_flags(self) -> str:
        return f"-f raw -e {self.shared} -t --cache={self.cache} --discard={self.discard}"

    def ours_cmd(self, image: Path, readonly: bool, port: int = 0) -> list[str]:
        cmd = [str(VENV_PYTHON), *self.ours_prefix, "-m", "sendense_nbd", "serve", "-f", "raw", "--port", str(port)]
        cmd += ["-e", str(self.shared), "-t", "--cache", self.cache, "--discard", self.discard]
        if readonly:
            cmd.append("-r")
        return cmd + [str(image)]

    def qemu_cmd(self, image: Path, readonly: bool, port: int) -> list[str]:
        cmd = ["qemu-nbd", "-f", "raw", "-x", "", "-p", str(port), "-b", HOST, "-e", str(self.shared), "-t"]
        cmd += [f"--cache={self.cache}", f"--discard={self.discard}"]
        if readonly:
            cmd.append("-r")
        return cmd + [str(image)]

    def start(self, which: str, image: Path, readonly: bool = False) -> Server:
        log = WORK / f"{which}-server.log"
        if which == "ours":
            out = tempfile.NamedTemporaryFile(dir=WORK, prefix="ours-port-", delete=False)
            out.close()
            out_path = Path(out.name)
            cmd = self.ours_cmd(image, readonly)
            with open(out_path, "wb") as stdout:
                proc = _spawn(cmd, log, stdout=stdout, cwd=str(REPO))
            try:
                deadline = time.monotonic() + 30
                port = 0
                while time.monotonic() < deadline:
                    text = out_path.read_text()
                    m = re.match(r"\s*(\d+)\s*\n", text)
                    if m:
                        port = int(m.group(1))
                        break
                    if proc.poll() is not None:
                        raise RuntimeError(f"our server exited with {proc.returncode}; see {log}")
                    time.sleep(0.05)
                if not port:
                    raise RuntimeError(f"our server printed no port; see {log}")
            except BaseException:
                _kill(proc)
                raise
            finally:
                out_path.unlink(missing_ok=True)
        else:
            port = free_port()
            cmd = self.qemu_cmd(image, readonly, port)
            proc = _spawn(cmd, log, stdout=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
        except BaseException:
            _kill(proc)
            raise
        return Server(which, proc, port, cmd)


# --------------------------------------------------------------------------
# images


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    scale: int = 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return int(m.group(1)) * scale


def human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def make_dense(size: int) -> Path:
    path = WORK / f"dense-{size}.img"
    if path.exists() and path.stat().st_size == size and path.stat().st_blocks * 512 >= size:
        return path
    print(f"generating {path} ({human(size)} random data)...", flush=True)
    tmp = path.with_suffix(".tmp")
    chunk = 8 * MiB
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def make_sparse(size: int) -> Path:
    path = WORK / f"sparse-{size}.img"
    if path.exists() and path.stat().st_size == size:
        return path
    print(f"generating {path} ({human(size)}, 1 MiB random every 10 MiB)...", flush=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, SPARSE_STRIDE):
            f.seek(offset)
            f.write(os.urandom(min(SPARSE_BLOCK, size - offset)))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def prefault(nbytes: int) -> None:
    """Touch then free ``nbytes`` of anonymous memory.

    On this VM, memory the guest left free for a few seconds goes back to the
    host (virtio-balloon free page reporting); the next 2 GiB of page cache
    then costs ~5 s of hypervisor faults inside whichever pwrite allocates it,
    swamping what the servers do. Writing the memory just before a timed run
    makes those pages resident again. It only partly helps: the guest reports
    free pages again after ~2 s, before a slow run has used them all, so it
    is off by default (``--prefault``).
    """
    import mmap

    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            m.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14+)
        except OSError:
            for off in range(0, nbytes, 4096):
                m[off] = 1
    finally:
        m.close()


def warm_cache(path: Path) -> None:
    """Read a source file through, so every run starts with it in page cache."""
    buf = bytearray(8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            offset += n
    finally:
        os.close(fd)


def fresh_target(size: int) -> Path:
    path = WORK / "target.img"
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------------------
# cases


@dataclass
class Case:
    key: str
    title: str
    kind: str  # dense | sparse | read
    connections: int | None  # None: nbdcopy's default (4)
    source: Path | None = None  # None for reads
    export: Path | None = None  # for reads
    samples: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "qemu": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "qemu": []})

    def nbdcopy_args(self, uri: str) -> list[str]:
        conn = [] if self.connections is None else [f"--connections={self.connections}"]
        if self.kind == "read":
            return ["nbdcopy", *conn, uri, "null:"]
        return ["nbdcopy", "--flush", *conn, str(self.source), uri]

    def command_text(self) -> str:
        return " ".join(shlex.quote(a) for a in self.nbdcopy_args("nbd://127.0.0.1:PORT")).replace(str(REPO) + "/", "")

    def median(self, which: str) -> float:
        return statistics.median(self.samples[which]) if self.samples[which] else float("nan")

    def ratio(self) -> float:
        q = self.median("qemu")
        return self.median("ours") / q if q else float("nan")


def run_once(cfg: Config, case: Case, which: str, size: int) -> tuple[float, float]:
    """One timed nbdcopy against a fresh server; returns (MB/s, server CPU s)."""
    if case.kind == "read":
        assert case.export is not None
        image, readonly = case.export, True
    else:
        image, readonly = fresh_target(size), False
    warm_cache(case.export if readonly else case.source)  # type: ignore[arg-type]
    os.sync()  # do not let the previous run's writeback land in this one
    server = cfg.start(which, image, readonly)
    try:
        if cfg.prefault and not readonly:
            prefault(size + 256 * MiB)
        cpu0 = server.cpu_seconds()
        args = case.nbdcopy_args(server.uri)
        t0 = time.perf_counter()
        res = subprocess.run(args, capture_output=True, timeout=cfg.timeout)
        elapsed = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
    finally:
        server.stop()
    if not readonly:
        (WORK / "target.img").unlink(missing_ok=True)
    return size / elapsed / 1e6, cpu


def run_case(cfg: Config, case: Case, size: int, rounds: int, warmup: bool) -> None:
    print(f"\n== {case.title}: {case.command_text()}", flush=True)
    if warmup:
        for which in ("ours", "qemu"):
            mbs, cpu = run_once(cfg, case, which, size)
            print(f"   warm-up {which:4s} {mbs:8.1f} MB/s  (server CPU {cpu:.2f} s)", flush=True)
    for r in range(rounds):
        order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
        for which in order:
            mbs, cpu = run_once(cfg, case, which, size)
            case.samples[which].append(mbs)
            case.cpu[which].append(cpu)
            print(f"   round {r + 1} {which:4s} {mbs:8.1f} MB/s  (server CPU {cpu:.2f} s)", flush=True)
    print(
        f"   median ours {case.median('ours'):.1f} MB/s, qemu-nbd {case.median('qemu'):.1f} MB/s,"
        f" ratio {case.ratio():.2f}",
        flush=True,
    )


# --------------------------------------------------------------------------
# memory: 10 libnbd clients with 16 x 2 MiB requests in flight each

HAMMER = r"""
import os, random, select, sys, time
import nbd

uri = sys.argv[1]
clients, depth, reqsize = (int(a) for a in sys.argv[2:5])
seconds = float(sys.argv[5])
payload = os.urandom(reqsize)
handles = []
for i in range(clients):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
size = handles[0].get_size()
slots = max(1, size // reqsize)
rng = random.Random(1)
done_bytes = 0
errors = 0
bufs = {}

def submit(h):
    off = rng.randrange(slots) * reqsize
    if rng.random() < 0.5:
        c = h.aio_pwrite(payload, off)
        bufs[(id(h), c)] = None
    else:
        b = nbd.Buffer(reqsize)
        c = h.aio_pread(b, off)
        bufs[(id(h), c)] = b

for h in handles:
    for _ in range(depth):
        submit(h)
deadline = time.monotonic() + seconds
while True:
    stopping = time.monotonic() >= deadline
    rl, wl = [], []
    for h in handles:
        d = h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(h)
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(h)
    r, w, _ = select.select([h.aio_get_fd() for h in rl], [h.aio_get_fd() for h in wl], [], 1.0)
    for h in rl:
        if h.aio_get_fd() in r:
            h.aio_notify_read()
    for h in wl:
        if h.aio_get_fd() in w:
            h.aio_notify_write()
    for h in handles:
        while True:
            try:
                c = h.aio_peek_command_completed()
            except nbd.Error:  # nothing in flight on this handle
                break
            if c <= 0:
                break
            try:
                h.aio_command_completed(c)
                done_bytes += reqsize
            except nbd.Error:
                errors += 1
            bufs.pop((id(h), c), None)
            if not stopping:
                submit(h)
    if stopping and all(h.aio_in_flight() == 0 for h in handles):
        break
for h in handles:
    h.shutdown()
print(done_bytes, errors, flush=True)
"""


def run_memory(cfg: Config, which: str, size: int, seconds: float) -> dict[str, float]:
    image = fresh_target(size)
    os.sync()
    server = cfg.start(which, image)
    try:
        idle = server.status("VmRSS")
        t0 = time.perf_counter()
        res = subprocess.run(
            [SYSTEM_PYTHON, "-c", HAMMER, server.uri, "10", "16", str(2 * MiB), str(seconds)],
            capture_output=True,
            timeout=seconds + 60,
        )
        elapsed = time.perf_counter() - t0
        hwm = server.status("VmHWM")
        if res.returncode != 0:
            raise RuntimeError(f"memory client failed: {res.stderr.decode(errors='replace')}")
        done, errors = (int(x) for x in res.stdout.split())
    finally:
        server.stop()
        (WORK / "target.img").unlink(missing_ok=True)
    return {"idle_mib": idle / 1024, "peak_mib": hwm / 1024, "mbs": done / elapsed / 1e6, "errors": errors}


# --------------------------------------------------------------------------
# report


def fmt_ratio(r: float) -> str:
    return "n/a" if r != r else f"{r:.2f}x"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def table(cases: list[Case], memory: dict[str, dict[str, float]], size: int) -> str:
    lines = [
        "| case | ours MB/s | qemu-nbd MB/s | ours/qemu | target | | server CPU s/GiB ours / qemu |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    gib = size / 1024**3
    for c in cases:
        target = TARGETS[c.kind]
        r = c.ratio()
        cpu = f"{statistics.median(c.cpu['ours']) / gib:.2f} / {statistics.median(c.cpu['qemu']) / gib:.2f}"
        lines.append(
            f"| {c.title} | {c.median('ours'):.0f} | {c.median('qemu'):.0f} | {fmt_ratio(r)} | >= {target:.1f}x "
            f"| {verdict(r >= target)} | {cpu} |"
        )
    if memory:
        ours, qemu = memory.get("ours"), memory.get("qemu")
        lines.append("")
        lines.append("| memory (10 clients x 16 x 2 MiB in flight) | ours | qemu-nbd | target | |")
        lines.append("|---|---:|---:|---:|---|")
        if ours and qemu:
            lines.append(
                f"| peak RSS (VmHWM), MiB | {ours['peak_mib']:.1f} | {qemu['peak_mib']:.1f} | < {RSS_LIMIT_MIB} "
                f"| {verdict(ours['peak_mib'] < RSS_LIMIT_MIB)} |"
            )
            lines.append(f"| idle RSS before load, MiB | {ours['idle_mib']:.1f} | {qemu['idle_mib']:.1f} | | |")
            lines.append(f"| throughput during the test, MB/s | {ours['mbs']:.0f} | {qemu['mbs']:.0f} | | |")
            lines.append(f"| failed requests | {ours['errors']:.0f} | {qemu['errors']:.0f} | | |")
    return "\n".join(lines)


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def git_dirty() -> bool:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "sendense_nbd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return bool(out.strip())
    except Exception:  # noqa: BLE001
        return False


def tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        return "?"


def section(
    args: argparse.Namespace,
    cfg: Config,
    cases: list[Case],
    memory: dict[str, dict[str, float]],
    size: int,
    argv: list[str],
) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = git_head() + (" (with uncommitted changes under sendense_nbd/)" if git_dirty() else "")
    dense, sparse = WORK / f"dense-{size}.img", WORK / f"sparse-{size}.img"

    def rel(path: Path | str) -> str:
        return str(path).replace(str(REPO) + "/", "")

    qemu_text = " ".join(shlex.quote(a) for a in cfg.qemu_cmd(Path("IMAGE"), False, 0)).replace("-p 0", "-p PORT")
    out = [
        f"## {now}, commit {head}",
        "",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {platform.machine()}, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        f"- peers: {tool_version(['qemu-nbd', '--version'])}; {tool_version(['nbdcopy', '--version'])}",
        f"- benchmark: `{' '.join(shlex.quote(a) for a in [rel(sys.executable), rel(sys.argv[0]), *argv])}`",
        f"- image size {human(size)}; {args.rounds} round(s) after "
        f"{'a warm-up run per server' if not args.no_warmup else 'no warm-up'}, order A B / B A alternating;"
        " median MB/s = 10^6 bytes of virtual size per second of nbdcopy wall time (includes --flush);"
        " a fresh server per run, a fresh sparse target per write run, the source read into page cache and"
        " `sync` before each run"
        + (
            "; `--prefault`: before each write run size+256 MiB of anonymous memory is touched and freed,"
            " because on this VM freed memory returns to the host and re-faulting it costs seconds per 2 GiB"
            if args.prefault
            else ""
        ),
        "- servers (same flags):",
        f"  - ours: `{' '.join(shlex.quote(a) for a in cfg.ours_cmd(Path('IMAGE'), False))}` (`-r` added for reads;"
        " prints its port)",
        f"  - qemu-nbd: `{qemu_text}` (`-r` added for reads)",
        "- clients:",
    ]
    for c in cases:
        out.append(f"  - {c.title}: `{c.command_text()}`")
    out.append(
        f"  - sources: `{rel(dense)}` = random data; `{rel(sparse)}` = sparse, 1 MiB random every 10 MiB (10% data)"
    )
    if memory:
        out.append(
            f"  - memory: `{SYSTEM_PYTHON} -c HAMMER nbd://127.0.0.1:PORT 10 16 {2 * MiB} {args.memory_seconds:g}`"
            " (10 libnbd handles, aio_pwrite/aio_pread 50/50 at random 2 MiB slots, 16 in flight each),"
            " VmHWM from /proc/PID/status"
        )
    out += ["", table(cases, memory, size), ""]
    out.append("Targets: dense write >= 1.0x, read >= 0.8x, sparse write >= 0.8x of qemu-nbd; our peak RSS < 100 MiB.")
    if args.quick:
        out.append("\n*Quick smoke run (--quick): too small and too few rounds to judge the targets.*")
    return "\n".join(out) + "\n"


def write_results(text: str) -> None:
    title = "# Benchmark results: sendense-nbd vs qemu-nbd\n\n"
    intro = (
        "Written by `benchmarks/bench_server.py --write-results`; newest run first."
        " See `benchmarks/README.md` for what each case measures.\n\n"
    )
    old = RESULTS.read_text() if RESULTS.exists() else ""
    idx = old.find("\n## ")
    previous = old[idx + 1 :] if idx >= 0 else ""
    RESULTS.write_text(title + intro + text + ("\n" + previous if previous else ""))
    print(f"wrote {RESULTS}")


# --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size (default 2G)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case and server (default 5)")
    p.add_argument("--cache", choices=["writeback", "writethrough", "none"], default="writeback")
    p.add_argument("--discard", choices=["ignore", "unmap"], default="ignore", help="passed to both servers")
    p.add_argument("--shared", type=int, default=16, help="-e for both servers (default 16)")
    p.add_argument("--quick", action="store_true", help="smoke test: 256 MiB, 1 round, no warm-up, 3 s memory test")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--prefault",
        action="store_true",
        help="touch size+256 MiB of memory right before each write run (see prefault(); experimental)",
    )
    p.add_argument(
        "--cases",
        default="dense,dense1,sparse,sparse1,read,read1,memory",
        help="comma list of: dense dense1 sparse sparse1 read read1 memory",
    )
    p.add_argument("--memory-seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one nbdcopy run")
    p.add_argument("--write-results", action="store_true", help=f"rewrite {RESULTS.relative_to(REPO)}")
    p.add_argument("--json", type=Path, help="also dump raw samples here")
    p.add_argument(
        "--ours-prefix",
        default="",
        help="arguments put between our python and '-m sendense_nbd', e.g. '-m cProfile -o /tmp/x.prof'",
    )
    args = p.parse_args(argv)
    if args.quick:
        if "--size" not in " ".join(argv):
            args.size = 256 * MiB
        args.rounds, args.no_warmup, args.memory_seconds = 1, True, min(args.memory_seconds, 3.0)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    for tool in ("nbdcopy", "qemu-nbd"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    cfg = Config(args)
    cfg.ours_prefix = shlex.split(args.ours_prefix)
    WORK.mkdir(exist_ok=True)
    size = args.size

    dense = make_dense(size)
    sparse = make_sparse(size) if any(w.startswith("sparse") for w in wanted) else None
    all_cases = {
        "dense": Case("dense", "dense write, 4 conn", "dense", None, source=dense),
        "dense1": Case("dense1", "dense write, 1 conn", "dense", 1, source=dense),
        "sparse": Case("sparse", "sparse write (10% data), 4 conn", "sparse", None, source=sparse),
        "sparse1": Case("sparse1", "sparse write (10% data), 1 conn", "sparse", 1, source=sparse),
        "read": Case("read", "read to null:, 4 conn", "read", None, export=dense),
        "read1": Case("read1", "read to null:, 1 conn", "read", 1, export=dense),
    }
    unknown = [w for w in wanted if w not in all_cases and w != "memory"]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)}")
    cases = [all_cases[w] for w in wanted if w in all_cases]
    memory: dict[str, dict[str, float]] = {}
    print(f"sizes {human(size)}, cache={args.cache}, discard={args.discard}, -e {args.shared}, rounds {args.rounds}")
    try:
        for case in cases:
            run_case(cfg, case, size, args.rounds, warmup=not args.no_warmup)
        if "memory" in wanted:
            print(f"\n== memory: 10 clients x 16 x 2 MiB in flight, {args.memory_seconds:g} s", flush=True)
            for which in ("ours", "qemu"):
                memory[which] = run_memory(cfg, which, size, args.memory_seconds)
                m = memory[which]
                print(
                    f"   {which:4s} peak RSS {m['peak_mib']:.1f} MiB (idle {m['idle_mib']:.1f}),"
                    f" {m['mbs']:.0f} MB/s, {m['errors']:.0f} failed requests",
                    flush=True,
                )
    finally:
        _kill_all()
        (WORK / "target.img").unlink(missing_ok=True)

    print()
    print(table(cases, memory, size))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": size,
                    "cases": {c.key: {"samples": c.samples, "cpu": c.cpu} for c in cases},
                    "memory": memory,
                },
                indent=2,
            )
        )
    if args.write_results:
        write_results(section(args, cfg, cases, memory, size, argv))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        _kill_all()
        sys.exit(130)
