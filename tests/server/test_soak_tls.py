"""Soak over TLS: hostile sessions, in plaintext and inside TLS, while nbdcopy copies a disk over nbds://.

The plaintext soak (:mod:`tests.server.test_soak`) against ``sendense-nbd serve --tls require
--tls-creds DIR``: ``nbdcopy`` (4 connections) copies to the ``disk`` export over
``nbds://...?tls-certificates=DIR``, hostile sessions go to the default export ``scratch``. Every
checkpoint a fresh libnbd client over ``nbds://`` must connect and read within a second, the
server's RSS must stay bounded, and each copy must be byte-identical. A second server with
``--tls-verify-client`` (mutual TLS) takes the clients showing a certificate of another CA, or
none, and must be as responsive to a client with a good one.

The sessions, each checked for what the server must do (a wrong answer, or a connection kept
open past the handshake deadline, fails the test): options in plaintext (each refused with
``NBD_REP_ERR_TLS_REQD``, ``NBD_OPT_EXPORT_NAME`` closed; or then STARTTLS and ``NBD_OPT_GO``
over TLS served); STARTTLS and then no TLS handshake, or garbage instead of a ClientHello;
plaintext pipelined after STARTTLS (never answered: closed); a TLS handshake abandoned midway;
refused client certificates; and, inside TLS, the plaintext soak's sessions (mutated options,
WRITEs vanishing or stalling mid-payload, unread READ replies, stalled options, garbage after
negotiation). The workers use Python's ``ssl`` on their sockets once the STARTTLS ACK is read.

Fewer sessions than the plaintext soak (4 workers of 40, 160 in all, against 300), with the same
RSS bound: every session pays a TLS handshake in this process, and several wait out the server's
2 s handshake deadline (the encrypted copy of a reply, outside the server's request budget, is at
most two 256 KiB pieces per connection); about 25 s on two cores.

The randomness is seeded: ``SENDENSE_SOAK_SEED=N`` replays a run (the seed is printed, and named
in every failure).
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import OPTION_REPLY_MAGIC, Option, OptionReply
from sendense_nbd.tls.pki import Layout, init_pki
from tests.conftest import require, run, server_command, sparse_file, stop_process
from tests.server.test_soak import (
    IO_TIMEOUT,
    SIZE,
    Hostile,
    _checkpoint,
    _mutated,
    _recv_exactly,
    _seed,
    _valid_options,
)

pytestmark = pytest.mark.peer

MiB = 1 << 20
WORKERS = 4
SESSIONS = 40  # per worker
COPIES = 3
DEADLINE = 80.0  # seconds; the test fails if the sessions and copies have not all run by then
HANDSHAKE_LIMIT = 2.0
#: Seconds a session waits for the server to drop it: the handshake deadline and some slack.
DROPPED_WITHIN = HANDSHAKE_LIMIT + 2.5
#: Slots for the copy's 4 connections, the checkpoint client and the hostile ones still around.
SHARED = 16
_REPLY_MAGIC = OPTION_REPLY_MAGIC.to_bytes(8, "big")
_STARTTLS_ACK = wire.encode_option_reply(Option.STARTTLS, OptionReply.ACK)
_TLS_ALERT = 0x15  # a TLS record's content type


@attrs.frozen
class Contexts:
    """The workers' TLS client contexts: ``good`` ones (TLS 1.3, and 1.2 at most) trust the CA and
    show no certificate; ``refused``: what a server verifying clients must turn away, by name."""

    good: list[ssl.SSLContext]
    refused: dict[str, ssl.SSLContext]


def _contexts(deploy: Layout, other: Layout) -> Contexts:
    def made(tls12: bool, cert_dir: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=deploy.ca_cert)
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert_dir is not None:
            context.load_cert_chain(cert_dir / "client-cert.pem", cert_dir / "client-key.pem")
        return context

    intruder = other.nodes["intruder"]
    refused = {
        "another CA's certificate over TLS 1.3": made(False, intruder),
        "another CA's certificate over TLS 1.2": made(True, intruder),
        "no certificate over TLS 1.3": made(False),
        "no certificate over TLS 1.2": made(True),
    }
    return Contexts(good=[made(False), made(True)], refused=refused)


def _go(name: str = "scratch") -> bytes:
    return wire.encode_string(name) + wire.U16.pack(0)


class TLSHostile(Hostile):
    """One worker's sessions against a ``--tls require`` server on ``port`` and a mutual-TLS one on
    ``mutual_port``; what the server does wrong goes to ``errors``, ``kinds_run`` counts sessions."""

    def __init__(
        self, port: int, mutual_port: int, contexts: Contexts, rng: random.Random, stop: threading.Event
    ) -> None:
        super().__init__(port, rng, stop, SESSIONS)
        self.mutual_port = mutual_port
        self.contexts = contexts
        self.kinds_run: collections.Counter[str] = collections.Counter()

    def kinds(self) -> dict[Callable[[], None], int]:
        """TLS's own sessions, then the plaintext soak's inside TLS."""
        kinds = {
            self.probe: 1,
            self.refused_in_plaintext: 3,
            self.starttls_then_nothing: 1,
            self.starttls_then_garbage: 2,
            self.injected_after_starttls: 2,
            self.abandoned_tls_handshake: 2,
            self.refused_client_certificate: 2,
            self.mutated_handshake: 3,
            self.vanish_mid_payload: 2,
            self.stall_mid_payload: 1,
            self.unread_reads: 1,
            self.stall_handshake: 1,
            self.garbage_after_negotiation: 2,
        }
        return {self._counted(kind): weight for kind, weight in kinds.items()}

    def _counted(self, kind: Callable[[], None]) -> Callable[[], None]:
        def counted() -> None:
            self.kinds_run[kind.__name__] += 1
            kind()

        return counted

    # -- helpers -------------------------------------------------------------------------

    def greeted(self, port: int | None = None) -> socket.socket:
        """A connection that read the greeting and sent the client flags: options come next."""
        if port is None:
            sock = self.connect()
        else:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        _recv_exactly(sock, wire.GREETING.size)
        sock.sendall(wire.CLIENT_FLAGS.pack(3))
        return sock

    def starttls(self, sock: socket.socket) -> None:
        """Send NBD_OPT_STARTTLS; the server must acknowledge it."""
        sock.sendall(wire.encode_option(Option.STARTTLS))
        reply = _recv_exactly(sock, wire.OPTION_REPLY_HEADER.size)
        if reply != _STARTTLS_ACK:
            self.errors.append(f"STARTTLS answered {reply.hex()}, not an ACK")
            raise ConnectionError("no STARTTLS ACK")

    def upgraded(self, port: int | None = None, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """A connection upgraded to TLS (a good context by default) where options come next."""
        sock = self.greeted(port)
        self.starttls(sock)
        context = context or self.rng.choice(self.contexts.good)
        return context.wrap_socket(sock, server_hostname="localhost")

    def replies(self, sock: socket.socket, option: int) -> list[int]:
        """The reply types to ``option`` up to its final one (an ACK or an error)."""
        types = []
        while True:
            magic, echoed, reply, length = wire.OPTION_REPLY_HEADER.unpack(
                _recv_exactly(sock, wire.OPTION_REPLY_HEADER.size)
            )
            if (magic, echoed) != (OPTION_REPLY_MAGIC, option):
                self.errors.append(f"a reply to option {option} came as magic {magic:#x}, option {echoed}")
                raise ConnectionError("not an option reply")
            _recv_exactly(sock, length)
            types.append(reply)
            if reply == OptionReply.ACK or OptionReply(reply).is_error:
                return types

    def dropped(self, sock: socket.socket, what: str) -> bytes | None:
        """What the server sent until it dropped ``sock``; None (an error named ``what``) when it
        was still open after :data:`DROPPED_WITHIN` seconds."""
        end = time.monotonic() + DROPPED_WITHIN
        data = b""
        try:
            while (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return data
                data += chunk
        except TimeoutError:
            pass
        except OSError:  # a reset or a TLS alert
            return data
        self.errors.append(f"{what}: still open after {DROPPED_WITHIN:g} s")
        return None

    # -- before TLS ------------------------------------------------------------------------

    def refused_in_plaintext(self) -> None:
        """Options in plaintext, pipelined: each refused with ERR_TLS_REQD; then an ending."""
        sock = self.greeted()
        options = []
        for _ in range(self.rng.randint(1, 4)):
            option = self.rng.choice(
                [Option.GO, Option.INFO, Option.LIST, Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT]
                + [Option.LIST_META_CONTEXT, self.rng.randrange(16, 1 << 32)]
            )
            data = _go() if option in (Option.GO, Option.INFO) else self.rng.randbytes(self.rng.randint(0, 5000))
            options.append(int(option))
            sock.sendall(wire.encode_option(option, data))
        for option in options:
            if (types := self.replies(sock, option)) != [OptionReply.ERR_TLS_REQD]:
                self.errors.append(f"option {option} before STARTTLS answered {types}, not ERR_TLS_REQD")
        ending = self.rng.choice(["export-name", "garbage", "vanish", "tls"])
        if ending == "export-name":
            sock.sendall(wire.encode_option(Option.EXPORT_NAME, b"scratch"))
            if self.dropped(sock, "NBD_OPT_EXPORT_NAME before STARTTLS") not in (None, b""):
                self.errors.append("NBD_OPT_EXPORT_NAME before STARTTLS was answered")
        elif ending == "garbage":
            sock.sendall(self.rng.randbytes(self.rng.randint(1, 200)))
            self.drain(sock, 0.2)
        elif ending == "tls":  # the refusals left nothing behind: TLS and GO are served
            self.starttls(sock)
            sock = self.rng.choice(self.contexts.good).wrap_socket(sock, server_hostname="localhost")
            sock.sendall(wire.encode_option(Option.GO, _go()))
            if (types := self.replies(sock, Option.GO))[-1] != OptionReply.ACK:
                self.errors.append(f"NBD_OPT_GO over TLS after plaintext refusals answered {types}")
        self.vanish(sock)

    def starttls_then_nothing(self) -> None:
        """STARTTLS, then silence: the handshake deadline drops it."""
        sock = self.greeted()
        self.starttls(sock)
        self.dropped(sock, "a client silent after the STARTTLS ACK")
        self.vanish(sock)

    def starttls_then_garbage(self) -> None:
        """STARTTLS, then random bytes, or a TLS record header with garbage, instead of a ClientHello."""
        sock = self.greeted()
        self.starttls(sock)
        garbage = self.rng.randbytes(self.rng.randint(1, 300))
        if self.rng.random() < 0.5:
            garbage = bytes([0x16, 3, self.rng.randint(0, 4)]) + garbage
        sock.sendall(garbage)
        self.dropped(sock, f"garbage instead of a ClientHello ({garbage[:8].hex()}...)")
        self.vanish(sock)

    def injected_after_starttls(self) -> None:
        """Plaintext pipelined after STARTTLS, in its segment or just after: never answered."""
        sock = self.greeted()
        injected = self.rng.choice(
            [
                wire.encode_option(Option.GO, _go()),
                wire.encode_option(Option.LIST),
                wire.encode_option(Option.STRUCTURED_REPLY),
                wire.encode_option(Option.EXPORT_NAME, b"scratch"),
                self.rng.randbytes(self.rng.randint(1, 64)),
            ]
        )
        if self.rng.random() < 0.5:
            sock.sendall(wire.encode_option(Option.STARTTLS) + injected)
        else:
            sock.sendall(wire.encode_option(Option.STARTTLS))
            self.stop.wait(self.rng.uniform(0, 0.05))
            sock.sendall(injected)
        answer = self.dropped(sock, "plaintext injected after STARTTLS")
        if answer is not None:
            rest = answer.removeprefix(_STARTTLS_ACK)
            if _REPLY_MAGIC in rest or rest and rest[0] != _TLS_ALERT:
                self.errors.append(f"plaintext injected after STARTTLS ({injected[:24].hex()}) got {answer[:64].hex()}")
        self.vanish(sock)

    def abandoned_tls_handshake(self) -> None:
        """A TLS handshake left midway: part of the ClientHello, all of it, or all but the Finished;
        then the client stalls (the deadline drops it) or vanishes."""
        sock = self.greeted()
        self.starttls(sock)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.rng.choice(self.contexts.good).wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        stage = self.rng.choice(["part of the ClientHello", "the ClientHello", "all but the Finished"])
        if stage == "part of the ClientHello":
            sock.sendall(hello[: self.rng.randint(1, len(hello) - 1)])
        else:
            sock.sendall(hello)
        if stage == "all but the Finished":
            while not outgoing.pending:  # the server's flight, until the client has its answer
                incoming.write(_recv_some(sock))
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
            finished = outgoing.read()
            sock.sendall(finished[: self.rng.randrange(len(finished))])
        if self.rng.random() < 0.5:
            self.dropped(sock, f"a TLS handshake abandoned after {stage}")
        else:
            self.stop.wait(self.rng.uniform(0, 0.5))
        self.vanish(sock)

    def refused_client_certificate(self) -> None:
        """The mutual-TLS server: another CA's certificate, or none, never gets an option answered."""
        sock = self.greeted(self.mutual_port)
        self.starttls(sock)
        name, context = self.rng.choice(list(self.contexts.refused.items()))
        try:
            tls = context.wrap_socket(sock, server_hostname="localhost")
            tls.sendall(wire.encode_option(Option.GO, _go("")))
        except OSError:
            return  # refused in the handshake (TLS 1.2), or by an alert already (TLS 1.3)
        answer = self.dropped(tls, f"a client with {name}")
        if answer:
            self.errors.append(f"the mutual-TLS server answered a client with {name}: {answer[:64].hex()}")
        self.vanish(tls)

    # -- the plaintext soak's sessions, inside TLS -------------------------------------------------

    def negotiated(self) -> socket.socket:
        """Upgraded, then NBD_OPT_EXPORT_NAME of the scratch export."""
        sock = self.upgraded()
        sock.sendall(wire.encode_option(Option.EXPORT_NAME, b"scratch"))
        _recv_exactly(sock, wire.EXPORT_NAME_REPLY.size)
        return sock

    def mutated_handshake(self) -> None:
        """The plaintext soak's mutated options, over TLS."""
        self.trickle(self.upgraded(), _mutated(self.rng, _valid_options(self.rng)))

    def stall_handshake(self) -> None:
        """Part of an option over TLS, then silence or a vanishing."""
        sock = self.upgraded()
        sock.sendall(wire.encode_option(Option.LIST)[: self.rng.randint(0, 15)])
        self.stop.wait(self.rng.uniform(0.1, 2.5))
        self.vanish(sock)


def _recv_some(sock: socket.socket) -> bytes:
    data = sock.recv(1 << 16)
    if not data:
        raise ConnectionError("closed")
    return data


@attrs.frozen
class Served:
    """A ``sendense-nbd serve`` process, its port and its log."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path


@contextlib.contextmanager
def _serving(log: Path, seed: int, *args: str) -> Iterator[Served]:
    """``sendense-nbd serve ARGS`` on a free port, logging to ``log``; stopped at the end and its
    exit status and log checked."""
    with open(log, "wb") as out:  # hundreds of warnings: never a pipe
        proc = subprocess.Popen(server_command("serve", "-p", "0", *args), stdout=subprocess.PIPE, stderr=out)
        try:
            assert proc.stdout is not None
            yield Served(proc, int(proc.stdout.readline()), log)
        finally:
            code = stop_process(proc)
    text = log.read_text(errors="replace")
    assert code == 0, f"seed {seed}: server exited {code}: {text[-2000:]}"
    assert "Traceback" not in text and "internal error" not in text, f"seed {seed}: {text[-4000:]}"


def _images(tmp_path: Path, rng: random.Random, seed: int) -> list[Path]:
    """Two sparse sources, then the target, the scratch export and the mutual server's."""
    images = []
    for i in range(2):
        ranges = [(o, rng.randint(64 * 1024, 2 * MiB)) for o in sorted(rng.sample(range(0, SIZE - 2 * MiB, MiB), 20))]
        images.append(sparse_file(tmp_path / f"src{i}.raw", SIZE, ranges, seed=seed + i))
    for name in ("target", "scratch", "mutual"):
        images.append(sparse_file(tmp_path / f"{name}.raw", SIZE, []))
    return images


def _soak(
    seed: int,
    sources: list[Path],
    target: Path,
    uri: str,
    checkpoint: Callable[[], None],
    workers: list[threading.Thread],
) -> None:
    """Copies to ``uri`` while the workers run, then the workers' end; a checkpoint every half second."""
    deadline = time.monotonic() + DEADLINE
    for copies in range(COPIES):
        source = sources[copies % 2]
        copy = subprocess.Popen([require("nbdcopy"), "--flush", "--connections=4", str(source), uri])
        try:
            while copy.poll() is None:
                checkpoint()
                assert time.monotonic() < deadline, f"seed {seed}: copy {copies} not done within {DEADLINE} s"
                time.sleep(0.5)
        finally:
            if copy.poll() is None:
                copy.kill()
            copy.wait()
        assert copy.returncode == 0, f"seed {seed}: nbdcopy over TLS failed"
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, target, timeout=60)
    while any(t.is_alive() for t in workers):
        assert time.monotonic() < deadline, f"seed {seed}: hostile sessions not done within {DEADLINE} s"
        checkpoint()
        time.sleep(0.5)


def test_soak_hostile_sessions_over_tls_during_a_copy(tmp_path: Path) -> None:
    seed = _seed()
    print(f"TLS soak seed {seed} (replay with SENDENSE_SOAK_SEED={seed})")
    rng = random.Random(seed)
    deploy = init_pki(tmp_path / "pki", nodes=["node1"])
    contexts = _contexts(deploy, init_pki(tmp_path / "other", nodes=["intruder"]))
    *sources, target, scratch, mutual_image = _images(tmp_path, rng, seed)
    limits = ["-f", "raw", "-t", "--io-timeout", str(IO_TIMEOUT), "--handshake-limit", str(HANDSHAKE_LIMIT)]
    tls = ["--tls", "require", "--tls-creds", str(deploy.hub)]
    stop = threading.Event()
    peak = [0, 0]
    exports = ["-e", str(SHARED), "-x", "scratch", "-x", "disk", str(scratch), str(target)]
    with (
        _serving(tmp_path / "server.log", seed, *limits, *tls, *exports) as main,
        _serving(
            tmp_path / "mutual.log", seed, *limits, *tls, "--tls-verify-client", "-e", "4", str(mutual_image)
        ) as mutual,
    ):
        uri = f"nbds://127.0.0.1:{main.port}/disk?tls-certificates={deploy.hub}"
        mutual_uri = f"nbds://127.0.0.1:{mutual.port}/?tls-certificates={deploy.nodes['node1']}"

        def checkpoint() -> None:
            peak[0] = max(peak[0], _checkpoint(uri, main.proc.pid, seed))
            peak[1] = max(peak[1], _checkpoint(mutual_uri, mutual.proc.pid, seed))

        workers = [
            TLSHostile(main.port, mutual.port, contexts, random.Random(rng.random()), stop) for _ in range(WORKERS)
        ]
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        try:
            _soak(seed, sources, target, uri, checkpoint, threads)
        finally:
            stop.set()
        checkpoint()
        errors = [error for w in workers for error in w.errors]
        assert not errors, f"seed {seed}: {errors}"
        done = sum(w.done for w in workers)
        assert done == WORKERS * SESSIONS, f"seed {seed}: {done} hostile sessions ran"
        assert main.proc.poll() is None and mutual.proc.poll() is None, f"seed {seed}: a server died"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", sources[(COPIES - 1) % 2], target, timeout=60)
    kinds = sum((w.kinds_run for w in workers), collections.Counter())
    print(
        f"TLS soak: {done} hostile sessions {dict(kinds)}, {COPIES} copies, server RSS peaks "
        f"{peak[0] >> 20} MiB and {peak[1] >> 20} MiB (mutual TLS)"
    )
