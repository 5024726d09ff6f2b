"""The tunnel with real peers: nbdcopy/nbdinfo and our NBD server behind it, OpenSSH's sshd as the hub endpoint."""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from sendense_nbd.tunnel.client import Tunnel
from sendense_nbd.tunnel.config import Forward
from tests.conftest import random_file, require, run
from tests.tunnel.conftest import (
    Echo,
    Keys,
    connected,
    eventually,
    free_port,
    refused,
    roundtrip,
    running,
    server_config,
    tunnel_config,
)

pytestmark = pytest.mark.peer

SIZE = 24 * 1024 * 1024


def nbd_target(tmp_path: Path, serve) -> tuple[Path, int]:  # type: ignore[no-untyped-def]
    """A zeroed raw image behind ``sendense-nbd serve`` (8 clients, persistent); returns (image, port)."""
    image = tmp_path / "target.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    server = serve("-f", "raw", "-t", "-e", "8", str(image))
    return image, server.port


async def copy_through(port: int, source: Path, back: Path) -> None:
    """nbdcopy into the export at ``port``, nbdinfo it, nbdcopy it back; both files must match byte for byte."""
    uri = f"nbd://127.0.0.1:{port}/"
    await asyncio.to_thread(run, require("nbdcopy"), "--connections=4", "--flush", source, uri, timeout=60)
    info = await asyncio.to_thread(run, require("nbdinfo"), "--size", uri, timeout=30)
    assert int(info.stdout) == SIZE
    await asyncio.to_thread(run, require("nbdcopy"), "--connections=4", uri, back, timeout=60)
    await asyncio.to_thread(run, "cmp", source, back, timeout=30)


async def test_nbdcopy_through_the_embedded_server(tmp_path: Path, keys: Keys, serve) -> None:  # type: ignore[no-untyped-def]
    image, nbd_port = nbd_target(tmp_path, serve)
    source = random_file(tmp_path / "source.raw", SIZE)
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", nbd_port)]
    async with running(server_config(keys, {nbd_port})) as server:
        async with connected(tunnel_config(keys, server.port, local)) as tunnel:
            await copy_through(local[0].listen_port, source, tmp_path / "back.raw")
            await eventually(lambda: all(link.active_channels == 0 for link in tunnel.status().links))
    await asyncio.to_thread(run, "cmp", source, image)


async def test_tunnel_through_openssh_sshd(tmp_path: Path, keys: Keys, serve, sshd, echo: tuple[Echo, ...]) -> None:  # type: ignore[no-untyped-def]
    """OpenSSH's sshd as the hub endpoint: its PermitOpen/PermitListen do the policing."""
    _, nbd_port = nbd_target(tmp_path, serve)
    api_port = free_port()
    hub = sshd(permit_open=[nbd_port], permit_listen=(api_port,))
    source = random_file(tmp_path / "source.raw", SIZE)
    local = [
        Forward("127.0.0.1", free_port(), "127.0.0.1", nbd_port),
        Forward("127.0.0.1", free_port(), "127.0.0.1", echo[1].port),  # not in PermitOpen
    ]
    remote = [Forward("127.0.0.1", api_port, "127.0.0.1", echo[0].port)]
    config = attrs.evolve(
        tunnel_config(keys, hub.port, local, ciphers=("aes128-gcm@openssh.com",)),
        username=getpass.getuser(),
        remote_forwards=remote,
    )
    try:
        async with connected(config) as tunnel:
            await copy_through(local[0].listen_port, source, tmp_path / "back.raw")
            assert await roundtrip(api_port) == b"hello through the tunnel"  # sshd -> node: the node API path
            async with asyncio.timeout(5):  # sshd refuses the channel: the local client is closed at once
                reader, writer = await asyncio.open_connection("127.0.0.1", local[1].listen_port)
                assert await reader.read() == b""
                writer.close()
            assert echo[1].served == 0
            await asyncio.to_thread(hub.stop)  # the hub goes away: its forwarded ports close with the connection
            await eventually(lambda: not tunnel.connected)
            assert await refused(local[0].listen_port)
        assert await refused(local[0].listen_port)
    except BaseException:
        print(hub.log.read_text(), file=sys.stderr)
        raise


async def test_reconnect_to_a_restarted_sshd(tmp_path: Path, keys: Keys, sshd, echo: tuple[Echo, ...]) -> None:  # type: ignore[no-untyped-def]
    hub = sshd(permit_open=[echo[0].port])
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    config = attrs.evolve(tunnel_config(keys, hub.port, local), username=getpass.getuser())
    tunnel = Tunnel(config)
    async with tunnel:
        async with asyncio.timeout(10):
            await tunnel.wait_connected()
        assert await roundtrip(local[0].listen_port) == b"hello through the tunnel"
        await asyncio.to_thread(hub.stop)
        await eventually(lambda: not tunnel.connected)
        assert await refused(local[0].listen_port)
        # Same port, same host key: a new sshd.
        args = [str(arg) for arg in hub.proc.args]  # type: ignore[union-attr]
        proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with asyncio.timeout(15):
                await tunnel.wait_connected()
            assert tunnel.status().reconnects >= 1
            assert await roundtrip(local[0].listen_port) == b"hello through the tunnel"
        finally:
            proc.terminate()
            await proc.wait()


def test_cli_tunnel_server_and_tunnel(tmp_path: Path, keys: Keys, serve) -> None:  # type: ignore[no-untyped-def]
    """Both commands as subprocesses; the node side listens on 127.0.0.2 (same port numbers, one machine).

    Killing the node (SIGKILL) closes the hub's reverse-forward listener (asyncssh #309, hub side).
    """
    _, nbd_port = nbd_target(tmp_path, serve)
    api_port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    hub = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from sendense_nbd.tunnel.cli import tunnel_server_command; tunnel_server_command()",
            "--ssh-listen=127.0.0.1:0",
            f"--ssh-host-key={keys.host_key}",
            f"--ssh-authorized-keys={keys.authorized_keys}",
            f"--nbd-ports={nbd_port}-{nbd_port}",
            f"--ssh-node-api=127.0.0.1:{api_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    node = None
    try:
        assert hub.stdout is not None
        ssh_port = int(hub.stdout.readline())
        node = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from sendense_nbd.tunnel.cli import tunnel_command; tunnel_command()",
                f"--hub=127.0.0.1:{ssh_port}",
                f"--key={keys.client_key}",
                f"--known-hosts={keys.known_hosts(ssh_port)}",
                f"--ports={nbd_port}",
                "--listen-host=127.0.0.2",
                f"--remote-forward=127.0.0.1:{api_port}=127.0.0.1:{free_port()}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert node.stdout is not None
        assert b'"connected": true' in node.stdout.readline()
        info = run(require("nbdinfo"), "--size", f"nbd://127.0.0.2:{nbd_port}/", timeout=30)
        assert int(info.stdout) == SIZE
        socket.create_connection(("127.0.0.1", api_port), timeout=5).close()  # the hub listens for the node API
        node.terminate()
        assert node.wait(timeout=10) == 0
        deadline = time.monotonic() + 10
        while not _refused(api_port):
            assert time.monotonic() < deadline, "the hub kept the reverse-forward listener"
            time.sleep(0.05)
        node = subprocess.Popen(node.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert node.stdout is not None
        assert b'"connected": true' in node.stdout.readline()
        node.kill()  # no goodbye: the hub notices the dropped connection
        node.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _refused(api_port):
            assert time.monotonic() < deadline, "the hub kept the reverse-forward listener"
            time.sleep(0.05)
    finally:
        for proc in (node, hub):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
    assert hub.returncode == 0


def _refused(port: int) -> bool:
    """Whether nothing listens on ``port`` any more (a reset: the listener is closing, so ask again)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def test_cli_usage_errors() -> None:
    from click.testing import CliRunner

    from sendense_nbd.tunnel.cli import tunnel_command, tunnel_server_command

    result = CliRunner().invoke(tunnel_command, ["--hub=nohost", "--key=/dev/null", "--known-hosts=/dev/null"])
    assert result.exit_code == 2
    assert "expected HOST:PORT" in result.output
    result = CliRunner().invoke(tunnel_server_command, ["--ssh-listen=127.0.0.1:0"])
    assert result.exit_code == 2
    assert "needs --ssh-host-key" in result.output
