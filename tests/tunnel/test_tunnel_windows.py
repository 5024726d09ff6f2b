"""Windows, TCP tuning and spreading of the tunnel, seen by real peers (OpenSSH's ssh and sshd, asyncssh)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import click
import pytest
from click.testing import CliRunner

from sendense_nbd.errors import TunnelError
from sendense_nbd.tcp import LinkProfile
from sendense_nbd.tunnel.cli import tunnel_command
from sendense_nbd.tunnel.client import LinkState
from sendense_nbd.tunnel.config import DEFAULT_TUNING, MAX_WINDOW, MIN_WINDOW, Forward, LinkTuning, channel_window
from sendense_nbd.tunnel.server import TunnelServer
from tests.conftest import require
from tests.tunnel.conftest import (
    Echo,
    Keys,
    connected,
    eventually,
    free_port,
    roundtrip,
    running,
    server_config,
    tunnel_config,
)

pytestmark = pytest.mark.peer

MiB = 1 << 20
#: Distinct from every default, so seeing it proves it was passed through.
WINDOW = 5 * MiB + 4096


#: This kernel's default congestion control.
SYSTEM_CONGESTION = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def test_windows_are_twice_the_bdp_and_fill_1_gbit_at_100_ms() -> None:
    assert DEFAULT_TUNING.window == 2 * 12_500_000 and DEFAULT_TUNING.socket_buffer == 25_000_000
    assert DEFAULT_TUNING.congestion == "bbr" and DEFAULT_TUNING.max_packet == 128 * 1024
    assert channel_window(LinkProfile.parse(rtt_ms=50, rate_mbit=10_000)) == 125_000_000
    assert channel_window(LinkProfile.parse(rtt_ms=1, rate_mbit=100)) == MIN_WINDOW
    assert LinkTuning.for_link(window=WINDOW, congestion="system").congestion is None


async def test_openssh_client_sees_the_window_our_server_grants(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """``ssh -vvv -L`` prints the window of each channel our server confirms."""
    tuning = LinkTuning(window=WINDOW, socket_buffer=0, max_packet=64 * 1024)
    async with running(server_config(keys, {echo[0].port}, tuning=tuning)) as server:
        listen = free_port()
        ssh = await asyncio.create_subprocess_exec(
            require("ssh"), "-vvv", "-N", "-F", "none", "-p", str(server.port), "-i", str(keys.client_key),
            "-o", f"UserKnownHostsFile={keys.known_hosts(server.port)}", "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{listen}:127.0.0.1:{echo[0].port}", "node@127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert ssh.stderr is not None
        log: list[str] = []
        try:
            async with asyncio.timeout(15):
                while "Local connections to" not in "".join(log):
                    log.append((await ssh.stderr.readline()).decode(errors="replace"))
                assert await roundtrip(listen) == b"hello through the tunnel"
                while not (confirm := re.search(r"open confirm rwindow (\d+) rmax (\d+)", "".join(log))):
                    log.append((await ssh.stderr.readline()).decode(errors="replace"))
        except BaseException:
            print("".join(log), file=sys.stderr)
            raise
        finally:
            ssh.terminate()
            await ssh.wait()
    assert (int(confirm[1]), int(confirm[2])) == (WINDOW, 64 * 1024)


async def test_sshd_sees_the_window_our_client_asks_for(keys: Keys, sshd, echo: tuple[Echo, ...]) -> None:  # type: ignore[no-untyped-def]
    hub = sshd(permit_open=[echo[0].port], log_level="DEBUG")
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    tuning = LinkTuning(window=WINDOW, socket_buffer=0, max_packet=64 * 1024)
    config = attrs.evolve(tunnel_config(keys, hub.port, local, tuning=tuning), username=getpass.getuser())
    async with connected(config):
        assert await roundtrip(local[0].listen_port) == b"hello through the tunnel"
    pattern = r"ctype direct-tcpip rchan \d+ win (\d+) max (\d+)"
    await eventually(lambda: re.search(pattern, hub.log.read_text()) is not None)
    opened = re.findall(pattern, hub.log.read_text())
    assert opened and all((int(win), int(top)) == (WINDOW, 64 * 1024) for win, top in opened)


async def test_our_server_sees_the_window_our_client_asks_for(keys: Keys, echo: tuple[Echo, ...]) -> None:
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    tuning = LinkTuning(window=WINDOW, socket_buffer=0)
    async with running(server_config(keys, {echo[0].port})) as server:
        async with connected(tunnel_config(keys, server.port, local, connections=1, tuning=tuning)):
            reader, writer = await asyncio.open_connection("127.0.0.1", local[0].listen_port)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            (conn,) = server.connections
            (chan,) = conn._channels.values()  # asyncssh has no public view of the peer's window
            assert chan._send_window == WINDOW - 1  # the client's window, less the echoed byte
            writer.close()


async def test_bbr_on_both_ends_of_the_ssh_connection(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """cubic as the asked algorithm shows the setting is ours (this kernel's default is bbr)."""
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    for algorithm in ("cubic", "bbr"):
        tuning = LinkTuning.for_link(congestion=algorithm)
        async with running(server_config(keys, {echo[0].port}, tuning=tuning)) as server:
            async with connected(tunnel_config(keys, server.port, local, connections=2, tuning=tuning)) as tunnel:
                for link in tunnel.status().links:
                    assert link.tcp is not None
                    assert (link.tcp.congestion, link.tcp.congestion_error) == (algorithm, None)
                    # Above tcp_wmem[2] and net.core.wmem_max: set with SO_SNDBUFFORCE (CAP_NET_ADMIN).
                    assert link.tcp.sndbuf == tuning.socket_buffer, "run as root: SO_SNDBUFFORCE needs CAP_NET_ADMIN"
                    assert not link.tcp.rcvbuf_set  # 25 MB is within tcp_rmem[2]: autotuning stays
                assert len(server.connections) == 2
                for conn in server.connections:
                    assert congestion(conn.get_extra_info("socket")) == algorithm
                assert await roundtrip(local[0].listen_port) == b"hello through the tunnel"


async def test_unknown_congestion_control_is_reported_not_fatal(keys: Keys, echo: tuple[Echo, ...]) -> None:
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    tuning = LinkTuning.for_link(congestion="no-such-cc")
    async with running(server_config(keys, {echo[0].port}, tuning=tuning)) as server:
        async with connected(tunnel_config(keys, server.port, local, connections=1, tuning=tuning)) as tunnel:
            (link,) = tunnel.status().links
            assert link.tcp is not None and "'no-such-cc' unavailable" in (link.tcp.congestion_error or "")
            assert await roundtrip(local[0].listen_port) == b"hello through the tunnel"


async def _hold(port: int, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    assert await reader.readexactly(len(payload)) == payload
    return reader, writer


async def test_a_ports_connections_spread_over_the_links(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """One port, 6 connections held open: 3 on each SSH connection; a link going down leaves the port served,
    and once it is back it takes the new connections (least loaded first)."""
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    port = local[0].listen_port
    payloads = [os.urandom(256 * 1024) for _ in range(6)]
    async with running(server_config(keys, {echo[0].port})) as server:
        async with connected(tunnel_config(keys, server.port, local, connections=2)) as tunnel:
            held = [await _hold(port, payload) for payload in payloads]  # byte-identical echoes
            assert [link.active_channels for link in tunnel.status().links] == [3, 3]
            assert {len(conn._channels) for conn in server.connections} == {3}
            for _, writer in held:
                writer.close()
            await eventually(lambda: [link.active_channels for link in tunnel.status().links] == [0, 0])
            # Link 1's SSH connection drops (the hub closes it): the port stays, served by link 0.
            link1 = tunnel._links[1].conn
            assert link1 is not None
            for conn in server.connections:
                if conn.get_extra_info("peername")[1] == link1.get_extra_info("sockname")[1]:
                    conn.close()
            await eventually(lambda: tunnel.status().links[1].state is not LinkState.UP)
            assert tunnel.status().listening == (port,)
            held = [await _hold(port, payload) for payload in payloads[:3]]
            assert [link.active_channels for link in tunnel.status().links] == [3, 0]
            async with asyncio.timeout(10):
                await tunnel.wait_connected()  # link 1 is back: the least loaded link takes new connections
            held += [await _hold(port, payload) for payload in payloads[3:5]]
            assert [link.active_channels for link in tunnel.status().links] == [3, 2]
            for _, writer in held:
                writer.close()


async def _send_until_stalled(writer: asyncio.StreamWriter, total: int = 128 * MiB) -> int:
    """Write zeros until ``total`` or until a write does not drain within 2 s; the bytes that went."""
    sent, chunk = 0, bytes(MiB)
    with contextlib.suppress(TimeoutError):
        while sent < total:
            writer.write(chunk)
            async with asyncio.timeout(2):
                await writer.drain()
            sent += len(chunk)
    return sent


@contextlib.asynccontextmanager
async def _never_reading_target(pushed: list[int] | None, total: int = 128 * MiB) -> AsyncIterator[list[Forward]]:
    """A TCP target that never reads, and the forward to it; with ``pushed``, it first writes until stalled
    and appends how much went."""
    done = asyncio.Event()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if pushed is not None:
            pushed.append(await _send_until_stalled(writer, total))
        await done.wait()
        writer.close()

    server_socket = await asyncio.start_server(target, "127.0.0.1", 0)
    try:
        yield [Forward("127.0.0.1", free_port(), "127.0.0.1", int(server_socket.sockets[0].getsockname()[1]))]
    finally:
        done.set()
        server_socket.close()


@pytest.mark.parametrize("sender", ["node", "hub"])
async def test_a_full_local_socket_stops_the_window(keys: Keys, sender: str) -> None:
    """The receiving end never reads: the sender stalls after about one window plus socket buffers.

    ``node``: the hub's target is full (asyncssh's forwarder pauses the channel); ``hub``: the node's
    local client is full (our forwarder pauses the channel).
    """
    pushed: list[int] = []
    tuning = LinkTuning(window=MIN_WINDOW, socket_buffer=0)
    async with _never_reading_target(pushed if sender == "hub" else None) as local:
        async with running(server_config(keys, {local[0].dest_port}, tuning=tuning)) as server:
            async with connected(tunnel_config(keys, server.port, local, connections=1, tuning=tuning)):
                _, writer = await asyncio.open_connection("127.0.0.1", local[0].listen_port)
                if sender == "node":
                    pushed.append(await _send_until_stalled(writer))
                else:
                    await eventually(lambda: bool(pushed), seconds=60)
                writer.transport.abort()
    # Unbounded, all 128 MiB would go; bounded: the window and the kernel's loopback buffers.
    assert 0 < pushed[0] < 48 * MiB, f"{pushed[0] / MiB:.0f} MiB went to a peer that never reads"


def test_cli_link_options() -> None:
    result = CliRunner().invoke(
        tunnel_command, ["--hub=127.0.0.1:1", "--key=/dev/null", "--known-hosts=/dev/null", "--window=1000"]
    )
    assert result.exit_code == 2 and "--window" in result.output
    result = CliRunner().invoke(
        tunnel_command, ["--hub=127.0.0.1:1", "--key=/dev/null", "--known-hosts=/dev/null", "--link-rtt=0"]
    )
    assert result.exit_code == 2 and "--link-rtt" in result.output


async def test_server_config_from_hub_options(keys: Keys) -> None:
    from sendense_nbd.tunnel.cli import server_config_from_options

    options = {
        "ssh_listen": "127.0.0.1:0",
        "ssh_host_keys": (str(keys.host_key),),
        "ssh_authorized_keys": str(keys.authorized_keys),
        "ssh_link_rtt": 50.0,
        "ssh_link_rate": 100.0,
        "ssh_window": None,
        "ssh_congestion": "system",
    }
    config = server_config_from_options(options, ports=[10100])
    assert config is not None
    assert config.tuning == LinkTuning.for_link(LinkProfile.parse(rtt_ms=50, rate_mbit=100), congestion=None)
    assert config.tuning.window == MIN_WINDOW  # 2 x 625 kB is below the 2 MiB floor
    async with TunnelServer(config) as server:
        assert server.port > 0


def test_link_tuning_is_bounded() -> None:
    """Windows and socket buffers have a ceiling; the error names the options to change."""
    huge = LinkProfile.parse(rtt_ms=400, rate_mbit=100_000)  # a 5 GB BDP
    with pytest.raises(TunnelError, match="--link-rtt/--link-rate"):
        LinkTuning.for_link(huge)
    with pytest.raises(TunnelError, match="SSH socket buffers"):
        LinkTuning.for_link(huge, window=WINDOW)
    with pytest.raises(TunnelError, match="--window"):
        LinkTuning.for_link(window=MAX_WINDOW + 1)
    assert LinkTuning.for_link(LinkProfile.parse(rtt_ms=100, rate_mbit=10_000)).window == 250_000_000
    result = CliRunner().invoke(
        tunnel_command,
        ["--hub=127.0.0.1:1", "--key=/dev/null", "--known-hosts=/dev/null", "--link-rate=100000", "--link-rtt=400"],
    )
    assert result.exit_code == 2 and "--link-rtt/--link-rate" in result.output
    assert not isinstance(result.exception, TypeError)


def test_hub_link_options_are_bounded(keys: Keys) -> None:
    from sendense_nbd.tunnel.cli import server_config_from_options

    options = {
        "ssh_listen": "127.0.0.1:0",
        "ssh_host_keys": (str(keys.host_key),),
        "ssh_authorized_keys": str(keys.authorized_keys),
        "ssh_link_rtt": 400.0,
        "ssh_link_rate": 100_000.0,
    }
    with pytest.raises(click.UsageError, match="--ssh-link-rtt/--ssh-link-rate"):
        server_config_from_options(options, ports=[10100])


async def test_hub_caps_the_channels_of_one_connection(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """With max_channels=2 a third forwarded connection is refused (closed); one slot freed, it works again."""
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    port = local[0].listen_port
    async with running(server_config(keys, {echo[0].port}, max_channels=2)) as server:
        async with connected(tunnel_config(keys, server.port, local, connections=1)) as tunnel:
            held = [await _hold(port, payload) for payload in (b"one", b"two")]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # refused by the hub: the local side is closed
            writer.close()
            await eventually(lambda: tunnel.status().links[0].active_channels == 2)
            held[0][1].close()
            await eventually(lambda: tunnel.status().links[0].active_channels == 1)
            await eventually(lambda: max(len(conn._channels) for conn in server.connections) == 1)
            assert await roundtrip(port) == b"hello through the tunnel"
            held[1][1].close()


async def test_a_dropped_link_aborts_its_local_sockets(keys: Keys) -> None:
    """The SSH connection of a forward whose local client does not read drops: the forwarded socket is
    aborted (not left closing forever with unsent data), so nothing waits for that client."""
    pushed: list[int] = []
    tuning = LinkTuning(window=MIN_WINDOW, socket_buffer=0)
    async with _never_reading_target(pushed, 32 * MiB) as local:
        async with running(server_config(keys, {local[0].dest_port}, tuning=tuning)) as server:
            async with connected(tunnel_config(keys, server.port, local, connections=2, tuning=tuning)) as tunnel:
                _, writer = await asyncio.open_connection("127.0.0.1", local[0].listen_port)  # never reads
                await eventually(lambda: bool(pushed), seconds=60)
                forwarder = tunnel._listeners.forwarders[0]
                carrier = next(link for link in tunnel._links if link.status().active_channels == 1)
                assert carrier.conn is not None
                for conn in server.connections:
                    if conn.get_extra_info("peername")[1] == carrier.conn.get_extra_info("sockname")[1]:
                        conn.close()
                await eventually(lambda: forwarder.active == 0)
                assert tunnel.status().listening == (local[0].listen_port,)  # the other link serves the port
                writer.transport.abort()


async def test_the_hub_tunes_a_socket_only_after_login(
    keys: Keys, echo: tuple[Echo, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that never logs in keeps the system's congestion control; a node's gets the configured one."""
    caplog.set_level("INFO", logger="sendense_nbd.tunnel.server")
    system = SYSTEM_CONGESTION
    wanted = "cubic" if system != "cubic" else "bbr"
    local = [Forward("127.0.0.1", free_port(), "127.0.0.1", echo[0].port)]
    tuning = LinkTuning.for_link(congestion=wanted)
    async with running(server_config(keys, {echo[0].port}, tuning=tuning)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"SSH-2.0-")  # connection_made has run
        (idle,) = server.connections
        assert congestion(idle.get_extra_info("socket")) == system
        async with connected(tunnel_config(keys, server.port, local, connections=1, tuning=tuning)):
            (node,) = server.connections - {idle}
            assert congestion(node.get_extra_info("socket")) == wanted
        writer.close()
    assert any(f"accepted; its socket: TcpTuning(congestion='{wanted}'" in r.getMessage() for r in caplog.records)
