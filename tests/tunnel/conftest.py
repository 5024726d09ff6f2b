"""Tunnel fixtures: keys in a temp dir, the embedded SSH server, echo targets, a private sshd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncssh
import attrs
import pytest

from sendense_nbd.tunnel.client import Tunnel, TunnelConfig
from sendense_nbd.tunnel.config import Forward
from sendense_nbd.tunnel.server import TunnelServer, TunnelServerConfig
from tests.conftest import require


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_key(path: Path, key: asyncssh.SSHKey) -> Path:
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    return path


@attrs.define
class Keys:
    """A host key and a client key, with the files each side reads."""

    dir: Path
    host_key: Path
    client_key: Path
    authorized_keys: Path
    host_public: str

    def known_hosts(self, port: int, public: str | None = None, name: str = "known_hosts") -> Path:
        path = self.dir / name
        path.write_text(f"[127.0.0.1]:{port} {public or self.host_public}\n")
        return path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    host = asyncssh.generate_private_key("ssh-ed25519")
    client = asyncssh.generate_private_key("ssh-ed25519")
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(client.export_public_key())
    return Keys(
        tmp_path,
        write_key(tmp_path / "host_key", host),
        write_key(tmp_path / "client_key", client),
        authorized,
        host.export_public_key().decode().strip(),
    )


class Echo:
    """A TCP echo server on 127.0.0.1 that counts its open connections."""

    def __init__(self) -> None:
        self.active = 0
        self.served = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        self.served += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.active -= 1
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, Echo, Echo]]:
    """Three echo targets on 127.0.0.1."""
    servers = (Echo(), Echo(), Echo())
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        assert server.server is not None
        server.server.close()


def server_config(keys: Keys, ports: set[int], **kwargs: object) -> TunnelServerConfig:
    return TunnelServerConfig(
        host_keys=(str(keys.host_key),), authorized_keys=str(keys.authorized_keys), port=0, ports=ports, **kwargs
    )


def tunnel_config(keys: Keys, port: int, local: list[Forward], **kwargs: object) -> TunnelConfig:
    options: dict[str, object] = {"backoff_initial": 0.1, "backoff_max": 0.5, "connect_timeout": 5.0}
    options.update(kwargs)
    return TunnelConfig(
        host="127.0.0.1",
        port=port,
        client_keys=(str(keys.client_key),),
        known_hosts=str(keys.known_hosts(port)),
        local_forwards=local,
        **options,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running(server_cfg: TunnelServerConfig) -> AsyncIterator[TunnelServer]:
    async with TunnelServer(server_cfg) as server:
        yield server


@contextlib.asynccontextmanager
async def connected(config: TunnelConfig) -> AsyncIterator[Tunnel]:
    async with Tunnel(config) as tunnel:
        async with asyncio.timeout(10):
            await tunnel.wait_connected()
        yield tunnel


async def roundtrip(port: int, payload: bytes = b"hello through the tunnel") -> bytes:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            await writer.drain()
            return await reader.readexactly(len(payload))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def refused(port: int) -> bool:
    """True when nothing listens on ``port``: refused at once (within a second), not hung."""
    async with asyncio.timeout(1):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        return False


async def eventually(predicate: Callable[[], bool], seconds: float = 10) -> None:
    """Poll ``predicate`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@attrs.define
class Sshd:
    """A private OpenSSH sshd on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        """Stop sshd and its per-connection processes (which outlive the listener, as in a real restart)."""
        sessions = descendants(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@pytest.fixture
def sshd(tmp_path: Path, keys: Keys) -> Iterator[object]:
    """Factory: ``sshd(permit_open=[ports], permit_listen=[ports], log_level=...)`` runs ``sshd -D -e``."""
    binary = require("sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    started: list[Sshd] = []

    def start(permit_open: list[int], permit_listen: tuple[int, ...] = (), log_level: str = "VERBOSE") -> Sshd:
        port = free_port()
        config = tmp_path / "sshd_config"
        lines = [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {keys.host_key}",
            f"AuthorizedKeysFile {keys.authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "PermitOpen " + " ".join(f"127.0.0.1:{p}" for p in permit_open),
            "PermitListen " + (" ".join(f"127.0.0.1:{p}" for p in permit_listen) or "none"),
            "StrictModes no",
            "UsePAM no",
            f"PidFile {tmp_path / 'sshd.pid'}",
            f"LogLevel {log_level}",
        ]
        config.write_text("\n".join(lines) + "\n")
        log = tmp_path / "sshd.log"
        proc = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log.open("wb")
        )
        server = Sshd(proc, port, log)
        started.append(server)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"sshd exited: {log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
            if time.monotonic() > deadline:
                raise AssertionError(f"sshd did not listen: {log.read_text()}")
            time.sleep(0.05)

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()
