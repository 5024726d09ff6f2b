"""Soak: hundreds of hostile sessions while a real client copies a disk through the same server.

``sendense-nbd serve`` (a subprocess) serves two exports: ``disk``, the copy
target of ``nbdcopy``, and the default export ``scratch``, where the hostile
sessions go (so that their writes cannot touch the copy). Worker threads run
a fixed number of sessions each: port probes, mutated handshakes, WRITEs
that vanish or stall mid-payload, READs whose replies are never read,
stalled handshakes and garbage after negotiation. Every checkpoint a fresh
libnbd client must connect and read within a second, and the server's RSS
must stay bounded. Each copy must be byte-identical.

The randomness is seeded: ``SENDENSE_SOAK_SEED=N`` replays a run (the seed
is printed, and named in every failure).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import BASE_ALLOCATION, MAX_PAYLOAD, Command, Option
from tests.conftest import require, run, server_command, sparse_file, stop_process
from tests.peers import nbd

pytestmark = pytest.mark.peer

MiB = 1 << 20
SIZE = 32 * MiB
WORKERS = 6
SESSIONS = 50  # per worker: 300 hostile sessions in all
COPIES = 3
DEADLINE = 75.0  # seconds; the test fails if the sessions have not all run by then
RSS_LIMIT = 256 * MiB
IO_TIMEOUT = 1.5
#: Slots for the copy's 4 connections, the checkpoint client and the hostile ones still around.
SHARED = 16


def _seed() -> int:
    return int(os.environ.get("SENDENSE_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))


class Hostile:
    """One worker's sessions against ``port``; each session ends within a few seconds.

    Sessions that check the server's answers (the TLS soak's) note what it did wrong in ``errors``.
    """

    def __init__(self, port: int, rng: random.Random, stop: threading.Event, sessions: int = SESSIONS) -> None:
        self.port = port
        self.rng = rng
        self.stop = stop
        self.sessions = sessions
        self.done = 0
        self.errors: list[str] = []

    def kinds(self) -> dict[Callable[[], None], int]:
        """The session kinds and their weights."""
        return {
            self.probe: 3,
            self.mutated_handshake: 4,
            self.vanish_mid_payload: 3,
            self.stall_mid_payload: 1,
            self.unread_reads: 1,
            self.stall_handshake: 1,
            self.garbage_after_negotiation: 2,
        }

    def run(self) -> None:
        """Run ``sessions`` sessions of kinds drawn by weight (fewer once ``stop`` is set)."""
        kinds = self.kinds()
        for _ in range(self.sessions):
            if self.stop.is_set():
                return
            kind = self.rng.choices(list(kinds), list(kinds.values()))[0]
            try:
                kind()
            except OSError:
                pass  # the server dropping a hostile client is the point
            self.done += 1

    # -- helpers -------------------------------------------------------------------------

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if self.rng.random() < 0.3:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return sock

    def vanish(self, sock: socket.socket) -> None:
        if self.rng.random() < 0.5:  # a reset, as a dropped tunnel
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def negotiated(self) -> socket.socket:
        sock = self.connect()
        _recv_exactly(sock, wire.GREETING.size)
        sock.sendall(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.EXPORT_NAME, b"scratch"))
        _recv_exactly(sock, wire.EXPORT_NAME_REPLY.size)
        return sock

    def drain(self, sock: socket.socket, seconds: float) -> None:
        sock.settimeout(seconds)
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass

    # -- sessions ------------------------------------------------------------------------

    def probe(self) -> None:
        self.connect().close()

    def mutated_handshake(self) -> None:
        stream = _mutated(self.rng, wire.CLIENT_FLAGS.pack(3) + _valid_options(self.rng))
        self.trickle(self.connect(), stream)

    def trickle(self, sock: socket.socket, stream: bytearray) -> None:
        """Send ``stream`` in small random pieces, read what comes for a moment, go."""
        while stream:
            piece = self.rng.randint(1, 64)
            sock.sendall(stream[:piece])
            del stream[:piece]
        self.drain(sock, 0.2)
        self.vanish(sock)

    def vanish_mid_payload(self) -> None:
        sock = self.negotiated()
        length = self.rng.choice([MAX_PAYLOAD, self.rng.randint(MiB, MAX_PAYLOAD)])
        sock.sendall(wire.encode_request(Command.WRITE, 1, 0, length) + bytes(self.rng.randint(0, MiB)))
        self.vanish(sock)

    def stall_mid_payload(self) -> None:
        sock = self.negotiated()
        sock.sendall(wire.encode_request(Command.WRITE, 1, 0, MAX_PAYLOAD) + bytes(self.rng.randint(0, MiB)))
        self.stop.wait(self.rng.uniform(0.2, IO_TIMEOUT + 1))  # the server may drop it first
        self.vanish(sock)

    def unread_reads(self) -> None:
        sock = self.negotiated()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for handle in range(self.rng.randint(1, 4)):
            sock.sendall(wire.encode_request(Command.READ, handle, 0, self.rng.randint(1, MAX_PAYLOAD)))
        self.stop.wait(self.rng.uniform(0.1, IO_TIMEOUT + 1))
        self.vanish(sock)

    def stall_handshake(self) -> None:
        sock = self.connect()
        sock.sendall(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.LIST)[: self.rng.randint(0, 15)])
        self.stop.wait(self.rng.uniform(0.1, 2.5))
        self.vanish(sock)

    def garbage_after_negotiation(self) -> None:
        sock = self.negotiated()
        garbage = bytearray()
        for _ in range(self.rng.randint(1, 8)):
            if self.rng.random() < 0.5:
                command = self.rng.choice([Command.READ, Command.FLUSH, Command.BLOCK_STATUS, 9])
                garbage += wire.encode_request(command, 7, self.rng.randrange(SIZE), self.rng.randint(0, 65536))
            else:
                garbage += self.rng.randbytes(self.rng.randint(1, 200))
        sock.sendall(garbage)
        self.drain(sock, 0.2)
        self.vanish(sock)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _mutated(rng: random.Random, valid: bytes) -> bytearray:
    """``valid`` with one to four bit flips, cuts, insertions or truncations."""
    stream = bytearray(valid)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(stream))
        action = rng.randrange(4)
        if action == 0:
            stream[pos] ^= 1 << rng.randrange(8)
        elif action == 1:
            del stream[pos : pos + rng.randint(1, 16)]
        elif action == 2:
            stream[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            del stream[pos:]
        if not stream:
            stream += rng.randbytes(4)
    return stream


def _valid_options(rng: random.Random) -> bytes:
    """A well-formed client byte stream on the scratch export after the client flags, to be mutated."""
    name = rng.choice(["", "scratch"])
    go = wire.encode_string(name) + wire.U16.pack(1) + wire.U16.pack(3)
    meta = wire.encode_string(name) + wire.U32.pack(1) + wire.encode_string(BASE_ALLOCATION)
    stream = wire.encode_option(Option.STRUCTURED_REPLY)
    stream += wire.encode_option(Option.LIST)
    stream += wire.encode_option(Option.INFO, go)
    stream += wire.encode_option(Option.SET_META_CONTEXT, meta)
    stream += wire.encode_option(Option.GO, go)
    for handle in range(rng.randint(0, 4)):
        offset = rng.randrange(0, SIZE, 4096)
        command = rng.choice([Command.READ, Command.WRITE, Command.BLOCK_STATUS, Command.FLUSH])
        stream += wire.encode_request(command, handle, offset, 4096)
        if command == Command.WRITE:
            stream += rng.randbytes(4096)
    return stream + wire.encode_request(Command.DISC, 99, 0, 0)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _checkpoint(uri: str, pid: int, seed: int, within: float = 1.0) -> int:
    """A fresh client is served ``within`` seconds; the server's RSS stays bounded (and is returned)."""
    result: list[bytes] = []
    failure: list[str] = []

    def client() -> None:
        try:
            h = nbd.NBD()
            h.set_uri_allow_local_file(True)  # nbds://...?tls-certificates=DIR
            h.connect_uri(uri)
            result.append(h.pread(4096, SIZE - 4096))
            h.shutdown()
        except nbd.Error as exc:
            failure.append(str(exc))

    start = time.monotonic()
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    thread.join(within)
    elapsed = time.monotonic() - start
    assert result, f"seed {seed}: a fresh client was not served within {within:g} s ({elapsed:.2f} s) {failure}"
    rss = _rss(pid)
    assert rss < RSS_LIMIT, f"seed {seed}: server RSS {rss >> 20} MiB exceeds {RSS_LIMIT >> 20} MiB"
    return rss


def test_soak_hostile_sessions_during_a_copy(tmp_path: Path) -> None:
    seed = _seed()
    print(f"soak seed {seed} (replay with SENDENSE_SOAK_SEED={seed})")
    rng = random.Random(seed)
    sources = []
    for i in range(2):
        ranges = [(o, rng.randint(64 * 1024, 2 * MiB)) for o in sorted(rng.sample(range(0, SIZE - 2 * MiB, MiB), 20))]
        sources.append(sparse_file(tmp_path / f"src{i}.raw", SIZE, ranges, seed=seed + i))
    target, scratch = tmp_path / "target.raw", tmp_path / "scratch.raw"
    for path in (target, scratch):
        with open(path, "wb") as f:
            f.truncate(SIZE)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115  (hundreds of warnings: never a pipe)
    args = ["serve", "-f", "raw", "-p", "0", "-t", "-e", str(SHARED), "--io-timeout", str(IO_TIMEOUT)]
    args += ["--handshake-limit", "2", "-x", "scratch", "-x", "disk", str(scratch), str(target)]
    proc = subprocess.Popen(server_command(*args), stdout=subprocess.PIPE, stderr=log)
    stop = threading.Event()
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        uri = f"nbd://127.0.0.1:{port}/disk"
        workers = [Hostile(port, random.Random(rng.random()), stop) for _ in range(WORKERS)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + DEADLINE
        copies = peak = 0
        while any(t.is_alive() for t in threads) or copies < COPIES:
            assert time.monotonic() < deadline, f"seed {seed}: not done within {DEADLINE} s"
            if copies < COPIES:
                source = sources[copies % 2]
                copy = subprocess.Popen([require("nbdcopy"), "--flush", str(source), uri])
                while copy.poll() is None:
                    peak = max(peak, _checkpoint(uri, proc.pid, seed))
                    assert time.monotonic() < deadline, f"seed {seed}: copy {copies} not done within {DEADLINE} s"
                    time.sleep(0.5)
                assert copy.returncode == 0, f"seed {seed}: nbdcopy failed"
                run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, target, timeout=60)
                copies += 1
            else:
                peak = max(peak, _checkpoint(uri, proc.pid, seed))
                time.sleep(0.5)
        done = sum(w.done for w in workers)
        assert done == WORKERS * SESSIONS, f"seed {seed}: {done} hostile sessions ran"
        peak = max(peak, _checkpoint(uri, proc.pid, seed))
        assert proc.poll() is None, f"seed {seed}: the server died"
    finally:
        stop.set()
        code = stop_process(proc)
        log.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert code == 0, f"seed {seed}: server exited {code}: {text[-2000:]}"
    assert "Traceback" not in text and "internal error" not in text, f"seed {seed}: {text[-4000:]}"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", sources[(COPIES - 1) % 2], target, timeout=60)
    print(f"soak: {done} hostile sessions, {copies} copies, server RSS peak {peak >> 20} MiB")
