#!/usr/bin/env python3
"""A lean NBD load generator: write a raw file into an NBD export with ``sendfile``, then flush.

Run with the project's venv python::

    .venv/bin/python benchmarks/nbd_sendfile.py [--connections 4] [--request-size 262144] SRC nbd://HOST:PORT/EXPORT

It stands in for a node on another machine in the hub benchmarks (bench_workers.py ``--client sendfile``).
On one small machine, a client's CPU is taken from the server under test; nbdcopy spends ~0.75 CPU s per GiB
(mostly the kernel's copies out of the source and into the socket), which leaves a 2-core box no core for a
second export worker. This client sends each request's payload straight from the page cache
(``os.sendfile``: no copy through user space), so the machine's CPU goes to the server.

Each connection makes the fixed-newstyle handshake with the library's sans-IO client (``NBD_OPT_GO``, simple
replies), then writes every ``--connections``-th request of the file with up to ``--depth`` requests in
flight; a reader thread per connection checks every reply (an error or an unknown handle fails the run).
The end: ``NBD_CMD_FLUSH`` on every connection, then ``NBD_CMD_DISC``. Exit status 0 only when every
request and every flush succeeded.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sendense_nbd.protocol import wire  # noqa: E402 - the project's package, from the checkout
from sendense_nbd.protocol.client import ClientHandshake, Ready  # noqa: E402
from sendense_nbd.protocol.constants import Command  # noqa: E402
from sendense_nbd.protocol.sansio import NeedData  # noqa: E402

TIMEOUT = 60.0


def handshake(host: str, port: int, export: str) -> tuple[socket.socket, int]:
    """A connected socket in the transmission phase, and the export's size."""
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    machine = ClientHandshake(export, structured_replies=False, meta_contexts=(), request_block_size=False)
    while True:
        out = machine.data_to_send()
        if out:
            sock.sendall(out)
        event = machine.next_event()
        if isinstance(event, Ready):
            if machine.trailing_data():
                raise RuntimeError("the server sent data after its handshake reply")
            sock.settimeout(None)  # blocking for sendfile, with the kernel's own timeouts instead
            limit = struct.pack("ll", int(TIMEOUT), 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            return sock, event.export.size
        if not isinstance(event, NeedData):
            raise RuntimeError(f"unexpected handshake event {event!r}")
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the server closed the connection during the handshake")
        machine.receive_data(data)


class Connection:
    """One NBD connection writing its share of the file, with a bounded number of requests in flight."""

    def __init__(self, sock: socket.socket, depth: int) -> None:
        self.sock = sock
        self.slots = threading.Semaphore(depth)
        self.pending: dict[int, int] = {}  # handle -> offset
        self.lock = threading.Lock()
        self.error: str | None = None
        self.next_handle = 1

    def request(self, command: int, offset: int, length: int) -> None:
        """Send one request's header (the payload, if any, follows in the same segments)."""
        if not self.slots.acquire(timeout=TIMEOUT) or self.error is not None:
            raise RuntimeError(self.error or f"no reply within {TIMEOUT:.0f} s")
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
            self.pending[handle] = offset
        self.sock.sendall(wire.encode_request(command, handle, offset, length), socket.MSG_MORE if length else 0)

    def drain(self, depth: int) -> None:
        """Wait for every reply so far (a flush covers the writes already replied to)."""
        for _ in range(depth):
            if not self.slots.acquire(timeout=TIMEOUT) or self.error is not None:
                raise RuntimeError(self.error or f"no reply within {TIMEOUT:.0f} s")
        for _ in range(depth):
            self.slots.release()

    def write(self, fd: int, offset: int, length: int) -> None:
        self.request(Command.WRITE, offset, length)
        sent = 0
        while sent < length:
            count = os.sendfile(self.sock.fileno(), fd, offset + sent, length - sent)
            if count == 0:
                raise RuntimeError(f"the source ended at {offset + sent}")
            sent += count

    def read_replies(self, expected: int) -> None:
        """Take ``expected`` simple replies; the first failure is kept in :attr:`error`."""
        header = bytearray(wire.SIMPLE_REPLY.size)
        view = memoryview(header)
        try:
            for _ in range(expected):
                got = 0
                while got < len(header):
                    count = self.sock.recv_into(view[got:])
                    if count == 0:
                        raise RuntimeError("the server closed the connection")
                    got += count
                handle, error = wire.decode_simple_reply(header)
                with self.lock:
                    offset = self.pending.pop(handle, None)
                if offset is None:
                    raise RuntimeError(f"a reply to an unknown handle {handle}")
                if error:
                    raise RuntimeError(f"the request at offset {offset} failed with error {error}")
                self.slots.release()
        except (OSError, RuntimeError) as exc:
            self.error = str(exc)
            self.slots.release()


def push(src: Path, uri: str, connections: int, request_size: int, depth: int) -> int:
    """Write ``src`` into the export at ``uri`` and flush it; the bytes written."""
    # not sendense_nbd.client.uri: importing the client package (asyncio, ssl) would cost this run ~0.1 CPU s
    target = urllib.parse.urlsplit(uri)
    if target.scheme != "nbd" or target.hostname is None:
        raise SystemExit("the target must be nbd://HOST[:PORT]/EXPORT")
    host, port, export = target.hostname, target.port or 10809, urllib.parse.unquote(target.path[1:])
    size = src.stat().st_size
    conns = []
    for _ in range(connections):
        sock, export_size = handshake(host, port, export)
        if export_size < size:
            raise SystemExit(f"the export holds {export_size} bytes, less than the source's {size}")
        conns.append(Connection(sock, depth))
    requests = [(o, min(request_size, size - o)) for o in range(0, size, request_size)]
    with open(src, "rb") as source:
        fd = source.fileno()

        def run(index: int) -> None:
            conn = conns[index]
            mine = requests[index::connections]
            reader = threading.Thread(target=conn.read_replies, args=(len(mine) + 1,))
            reader.start()
            try:
                for offset, length in mine:
                    conn.write(fd, offset, length)
                conn.drain(depth)
                conn.request(Command.FLUSH, 0, 0)
            except (OSError, RuntimeError) as exc:
                conn.error = conn.error or str(exc)
            reader.join()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for conn in conns:
        if conn.error is None:
            conn.sock.sendall(wire.encode_request(Command.DISC, 0, 0, 0))
        conn.sock.close()
    errors = [c.error for c in conns if c.error is not None]
    if errors:
        raise SystemExit(f"nbd_sendfile: {errors[0]}")
    return size


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--request-size", type=int, default=256 * 1024)
    parser.add_argument("--depth", type=int, default=8, help="requests in flight per connection")
    parser.add_argument("source", type=Path)
    parser.add_argument("uri")
    args = parser.parse_args(argv)
    start = time.monotonic()
    size = push(args.source, args.uri, args.connections, args.request_size, args.depth)
    seconds = time.monotonic() - start
    print(f"{size} bytes in {seconds:.2f} s: {size / seconds / 1e6:.0f} MB/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
