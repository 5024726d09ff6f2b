"""A server over TLS stops at once when its clients hung up with replies unread.

asyncio's TLS transport, told of the end of the stream while the server had paused reading, waits to
flush and ignores ``close()``: the server aborts such a connection rather than waiting out its
``--io-timeout`` (as it did, 30 s here, before).
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import Command, Option
from sendense_nbd.tls.pki import init_pki
from tests.conftest import server_command, sparse_file

pytestmark = pytest.mark.peer

MiB = 1 << 20
IO_TIMEOUT = 30


def _stalled_tls_client(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS client that asked for 24 MiB of reads it never takes (a 4 KiB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.recv(wire.GREETING.size, socket.MSG_WAITALL)
    sock.sendall(wire.CLIENT_FLAGS.pack(3))
    sock.sendall(wire.encode_option(Option.STARTTLS))
    sock.recv(wire.OPTION_REPLY_HEADER.size, socket.MSG_WAITALL)
    tls = context.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(wire.encode_option(Option.EXPORT_NAME, b""))
    received = b""
    while len(received) < wire.EXPORT_NAME_REPLY.size:
        received += tls.recv(wire.EXPORT_NAME_REPLY.size - len(received))
    for handle in range(3):
        tls.sendall(wire.encode_request(Command.READ, handle, handle * 8 * MiB, 8 * MiB))
    return tls


def test_shutdown_does_not_wait_for_tls_clients_that_hung_up(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki")
    image = sparse_file(tmp_path / "disk.raw", 32 * MiB, [(0, 32 * MiB)])
    command = server_command(
        "serve", "-p", "0", "-f", "raw", "-e", "16", "-t", "--tls", "require", "--tls-creds", str(layout.hub),
        "--io-timeout", str(IO_TIMEOUT), str(image),
    )  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        context = ssl.create_default_context(cafile=layout.ca_cert)
        clients = [_stalled_tls_client(port, context) for _ in range(8)]
        time.sleep(0.5)  # the server has filled what the clients take, and paused reading
        for client in clients:
            client.close()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(IO_TIMEOUT + 10)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert code == 0, stderr[-2000:]
    assert took < 5, f"the server took {took:.1f} s to stop: {stderr[-2000:]}"
    assert "not finished" not in stderr, stderr[-2000:]
