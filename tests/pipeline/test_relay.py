"""The delay relay under the pipeline test's tunnel: bytes intact both ways, the round trip it adds, its
memory bound, and both sides dropped when one fails. Plain sockets in threads talk to it, so no event
loop of the test is involved; timings are asserted only as lower bounds."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.pipeline.relay import MIB, DelayRelay

SEED = 1313
Handler = Callable[[socket.socket], None]


class Target:
    """A TCP server on 127.0.0.1 that runs ``handler`` on each accepted connection, in a thread."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self.stopped.set()
        self.acceptor.join(5)
        for thread in self.threads:
            thread.join(30)
        self.listener.close()
        assert not [t for t in self.threads if t.is_alive()], "a target connection did not finish"
        assert not self.errors, self.errors


@pytest.fixture
def target() -> Iterator[Callable[[Handler], Target]]:
    started: list[Target] = []

    def start(handler: Handler) -> Target:
        started.append(Target(handler))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def receive_all(sock: socket.socket) -> bytes:
    """Everything until the peer's end of stream."""
    chunks = []
    while chunk := sock.recv(MIB):
        chunks.append(chunk)
    return b"".join(chunks)


def send_and_half_close(sock: socket.socket, payload: bytes) -> threading.Thread:
    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_bytes_cross_intact_both_ways_and_half_closes_are_forwarded(target: Callable[[Handler], Target]) -> None:
    rng = random.Random(SEED)
    # Per connection: what the client sends, what the target answers (different sizes, both directions at once).
    payloads = {n: (rng.randbytes((3 + n) * MIB + n), rng.randbytes((2 + n) * MIB + 7 * n)) for n in range(2)}
    received_by_target: dict[int, bytes] = {}

    def swap(conn: socket.socket) -> None:
        number = conn.recv(1)[0]  # the client's first byte says which payload pair this is
        sender = send_and_half_close(conn, payloads[number][1])
        received_by_target[number] = receive_all(conn)
        sender.join(30)

    server = target(swap)
    with DelayRelay(server.address, rtt=0.02, queue_limit=2 * MIB) as relay:
        results: dict[int, bytes] = {}

        def client(number: int) -> None:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as sock:
                sender = send_and_half_close(sock, bytes([number]) + payloads[number][0])
                results[number] = receive_all(sock)
                sender.join(30)

        clients = [threading.Thread(target=client, args=(n,)) for n in payloads]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        server.stop()
        assert relay.accepted == 2
        for number, (up, down) in payloads.items():
            assert received_by_target[number] == up, f"seed {SEED}: connection {number}, client to target"
            assert results[number] == down, f"seed {SEED}: connection {number}, target to client"
        assert relay.up.bytes == sum(len(up) + 1 for up, _ in payloads.values())
        assert relay.down.bytes == sum(len(down) for _, down in payloads.values())
        assert relay.up.peak_queued <= 2 * MIB and relay.down.peak_queued <= 2 * MIB


def test_every_round_trip_takes_at_least_the_added_rtt(target: Callable[[Handler], Target]) -> None:
    rtt = 0.05
    arrivals: list[float] = []

    def echo(conn: socket.socket) -> None:
        while header := conn.recv(4):
            size = struct.unpack("!I", header)[0]
            arrivals.append(time.monotonic())
            body = b""
            while len(body) < size:
                body += conn.recv(size - len(body))
            conn.sendall(header + body)

    server = target(echo)
    with DelayRelay(server.address, rtt=rtt) as relay, socket.create_connection(("127.0.0.1", relay.port)) as sock:
        sock.settimeout(30)
        for size in (1, 1, 64 * 1024, MIB, 1):
            message = struct.pack("!I", size) + random.Random(size).randbytes(size)
            sent = time.monotonic()
            sock.sendall(message)
            answer = b""
            while len(answer) < len(message):
                answer += sock.recv(len(message))
            elapsed = time.monotonic() - sent
            assert answer == message
            # Lower bounds only: each way at least rtt/2 (the event loop's timers fire no earlier than due).
            assert arrivals[-1] - sent >= rtt / 2 - 1e-6, (size, arrivals[-1] - sent)
            assert elapsed >= rtt - 1e-6, (size, elapsed)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the target saw the end of stream and closed: the relay forwarded both
        server.stop()


def test_a_side_that_does_not_read_stops_the_relay_reading_at_its_queue_limit(
    target: Callable[[Handler], Target],
) -> None:
    limit = MIB
    payload = random.Random(SEED).randbytes(64 * MIB)
    go, received = threading.Event(), bytearray()

    def late_reader(conn: socket.socket) -> None:
        assert go.wait(30)
        received.extend(receive_all(conn))

    server = target(late_reader)
    sent = 0
    with DelayRelay(server.address, rtt=0.01, queue_limit=limit) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as sock:

            def send() -> None:
                nonlocal sent
                view = memoryview(payload)
                while sent < len(payload):
                    sent += sock.send(view[sent : sent + 64 * 1024])
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            deadline = time.monotonic() + 30
            while relay.up.queued < limit and time.monotonic() < deadline:
                time.sleep(0.01)
            stalled_at = _until_stalled(lambda: sent)
            # The line is full and the sender blocked well before the end: the relay stopped reading.
            assert relay.up.queued == limit and relay.up.peak_queued == limit
            assert stalled_at < len(payload), "the relay read everything while its target read nothing"
            go.set()
            sender.join(60)
        server.stop()
    assert bytes(received) == payload, f"seed {SEED}"
    assert relay.up.peak_queued == limit and relay.up.queued == 0


def _until_stalled(progress: Callable[[], int], *, quiet: float = 0.3, timeout: float = 30) -> int:
    """The value of ``progress()`` once it stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"the sender never stalled (sent {last} bytes)")


def test_a_failing_side_drops_the_other(target: Callable[[Handler], Target]) -> None:
    def reset_after_a_read(conn: socket.socket) -> None:
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset

    server = target(reset_after_a_read)
    with DelayRelay(server.address, rtt=0.01) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                sock.recv(1)  # the relay aborts the client's side too
        with socket.create_server(("127.0.0.1", 0)) as closed:
            nobody = closed.getsockname()[:2]
        with DelayRelay(nobody, rtt=0.01) as refused:
            with socket.create_connection(("127.0.0.1", refused.port), timeout=10) as sock:
                with pytest.raises(ConnectionResetError):
                    sock.recv(1)  # the target refused: the client is dropped at once
        assert relay.up.queued == 0 and relay.down.queued == 0
