"""The tunnel between real asyncssh peers: forwards, policy, host keys, reconnects, leaks."""

from __future__ import annotations

import asyncio

import asyncssh
import attrs
import pytest

from sendense_nbd.errors import TunnelError
from sendense_nbd.tunnel.client import LinkState, Tunnel, port_forwards
from sendense_nbd.tunnel.config import Forward
from sendense_nbd.tunnel.server import TunnelServer
from tests.tunnel.conftest import (
    Echo,
    Keys,
    connected,
    eventually,
    free_port,
    open_fds,
    refused,
    roundtrip,
    running,
    server_config,
    tunnel_config,
)


def forwards_to(*ports: int) -> list[Forward]:
    return [Forward("127.0.0.1", free_port(), "127.0.0.1", port) for port in ports]


async def raw_client(keys: Keys, port: int) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username="node",
        client_keys=[str(keys.client_key)],
        known_hosts=str(keys.known_hosts(port, name="raw_known_hosts")),
        config=[],
        agent_path=None,
    )


async def test_forwards_several_ports_over_several_connections(keys: Keys, echo: tuple[Echo, ...]) -> None:
    local = forwards_to(*(e.port for e in echo))
    async with running(server_config(keys, {e.port for e in echo})) as server:
        async with connected(tunnel_config(keys, server.port, local, connections=2)) as tunnel:
            for fwd, target in zip(local, echo):
                payload = f"to {fwd.dest_port}".encode() * 1000
                assert await roundtrip(fwd.listen_port, payload) == payload
                assert target.served == 1
            status = tunnel.status()
            assert status.connected and status.reconnects == 0
            assert status.listening == tuple(fwd.listen_port for fwd in local)
            assert len(server.connections) == 2


async def test_forward_outside_the_range_or_to_another_host_is_refused(keys: Keys, echo: tuple[Echo, ...]) -> None:
    allowed, outside = echo[0].port, echo[1].port
    async with running(server_config(keys, {allowed})) as server:
        conn = await raw_client(keys, server.port)
        async with conn:
            for host, port in (("127.0.0.1", outside), ("localhost", allowed), ("127.0.0.2", allowed)):
                with pytest.raises(asyncssh.ChannelOpenError, match="not allowed"):
                    await conn.open_connection(host, port)
            reader, writer = await conn.open_connection("127.0.0.1", allowed)
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"ok"
            writer.close()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
        # Through the tunnel, a refused channel closes the local client at once.
        local = forwards_to(outside)
        async with connected(tunnel_config(keys, server.port, local)):
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", local[0].listen_port)
                assert await reader.read() == b""
                writer.close()
    assert echo[1].served == 0


async def test_remote_forward_only_on_the_configured_address(keys: Keys, echo: tuple[Echo, ...]) -> None:
    api_port, other_port = free_port(), free_port()
    cfg = server_config(keys, set(), remote_listens={("127.0.0.1", api_port)})
    async with running(cfg) as server:
        conn = await raw_client(keys, server.port)
        async with conn:
            for host, port in (("127.0.0.1", other_port), ("0.0.0.0", api_port), ("127.0.0.1", 0)):
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port(host, port, "127.0.0.1", echo[0].port)
        # The tunnel's reverse forward: the hub's api_port reaches the node's echo server.
        config = tunnel_config(
            keys, server.port, [], remote_forwards=[Forward("127.0.0.1", api_port, "127.0.0.1", echo[0].port)]
        )
        async with connected(config) as tunnel:
            assert await roundtrip(api_port) == b"hello through the tunnel"
            tunnel.close()
            await tunnel.wait_closed()
            # The hub closed the listener with the connection (asyncssh #309, hub side).
            await eventually(lambda: not server.connections)
            assert await refused(api_port)


async def test_unknown_or_changed_host_key_is_refused(keys: Keys, echo: tuple[Echo, ...]) -> None:
    async with running(server_config(keys, {echo[0].port})) as server:
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        empty = keys.dir / "empty_known_hosts"
        empty.write_text("")
        for known_hosts in (keys.known_hosts(server.port, public=other, name="changed_known_hosts"), empty):
            config = tunnel_config(keys, server.port, forwards_to(echo[0].port))
            config = attrs.evolve(config, known_hosts=str(known_hosts))
            tunnel = Tunnel(config)
            await tunnel.start()
            with pytest.raises(TunnelError, match="HostKeyNotVerifiable"):
                async with asyncio.timeout(10):
                    await tunnel.wait_connected()
            assert LinkState.FAILED in {link.state for link in tunnel.status().links}
            with pytest.raises(TunnelError):
                await tunnel.wait_closed()
            assert await refused(config.local_forwards[0].listen_port)
    assert echo[0].served == 0


async def test_wrong_client_key_is_refused(keys: Keys, echo: tuple[Echo, ...]) -> None:
    from tests.tunnel.conftest import write_key

    stranger = write_key(keys.dir / "stranger", asyncssh.generate_private_key("ssh-ed25519"))
    async with running(server_config(keys, {echo[0].port})) as server:
        config = tunnel_config(keys, server.port, forwards_to(echo[0].port))
        config = attrs.evolve(config, client_keys=(str(stranger),))
        tunnel = Tunnel(config)
        await tunnel.start()
        with pytest.raises(TunnelError, match="PermissionDenied"):
            async with asyncio.timeout(10):
                await tunnel.wait_connected()
        tunnel.close()
        with pytest.raises(TunnelError):
            await tunnel.wait_closed()
        # Passwords are not even offered.
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(
                "127.0.0.1",
                server.port,
                username="node",
                password="secret",
                client_keys=None,
                known_hosts=str(keys.known_hosts(server.port)),
                config=[],
                agent_path=None,
            )


async def test_server_restart_reconnects_and_rebuilds_listeners(keys: Keys, echo: tuple[Echo, ...]) -> None:
    local = forwards_to(echo[0].port, echo[1].port)
    cfg = server_config(keys, {echo[0].port, echo[1].port})
    server = TunnelServer(cfg)
    await server.start()
    port = server.port
    cfg = attrs.evolve(cfg, port=port)
    try:
        async with connected(tunnel_config(keys, port, local, connections=2)) as tunnel:
            assert await roundtrip(local[0].listen_port) == b"hello through the tunnel"
            server.close()
            await server.wait_closed()
            # The listeners went with the connections (asyncssh #309): refused at once, not hung.
            await eventually(lambda: not tunnel.connected)
            for fwd in local:
                await eventually(lambda fwd=fwd: tunnel.status().links[local.index(fwd)].state is not LinkState.UP)
                assert await refused(fwd.listen_port)
            assert {link.state for link in tunnel.status().links} <= {LinkState.BACKOFF, LinkState.CONNECTING}
            await asyncio.sleep(1)  # a few failed attempts: the backoff grows up to its cap
            server = TunnelServer(cfg)
            await server.start()
            async with asyncio.timeout(10):
                await tunnel.wait_connected()
            status = tunnel.status()
            assert status.connected and all(link.reconnects == 1 for link in status.links)
            for fwd in local:
                assert await roundtrip(fwd.listen_port) == b"hello through the tunnel"
    finally:
        server.close()
        await server.wait_closed()


async def test_no_channel_leak_after_many_short_connections(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """asyncssh #823: clients that leave while their channel opens must not leak it."""
    local = forwards_to(echo[0].port)
    listen = local[0].listen_port
    async with running(server_config(keys, {echo[0].port})) as server:
        async with connected(tunnel_config(keys, server.port, local)) as tunnel:
            assert await roundtrip(listen) == b"hello through the tunnel"
            await eventually(
                lambda: echo[0].active == 0 and all(link.active_channels == 0 for link in tunnel.status().links)
            )
            fds = open_fds()

            async def abrupt() -> None:
                _, writer = await asyncio.open_connection("127.0.0.1", listen)
                writer.transport.abort()  # gone before the channel is open

            for _ in range(4):
                await asyncio.gather(*(abrupt() for _ in range(25)))
                await asyncio.gather(*(roundtrip(listen, b"x" * 100) for _ in range(25)))
            await eventually(lambda: all(link.active_channels == 0 for link in tunnel.status().links))
            await eventually(lambda: echo[0].active == 0)
            conn = next(iter(server.connections))
            await eventually(lambda: not conn._channels)  # the hub's side (no public count in asyncssh)
            await eventually(lambda: open_fds() <= fds)
            assert await roundtrip(listen) == b"hello through the tunnel"


async def test_clean_close_leaves_no_listening_socket(keys: Keys, echo: tuple[Echo, ...]) -> None:
    local = forwards_to(*(e.port for e in echo))
    async with running(server_config(keys, {e.port for e in echo})) as server:
        fds = open_fds()
        tunnel = Tunnel(tunnel_config(keys, server.port, local, connections=3))
        await tunnel.start()
        async with asyncio.timeout(10):
            await tunnel.wait_connected()
        reader, writer = await asyncio.open_connection("127.0.0.1", local[0].listen_port)
        writer.write(b"open")
        assert await reader.readexactly(4) == b"open"
        tunnel.close()
        await tunnel.wait_closed()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # the open forwarded connection was closed too
        writer.close()
        assert all(link.state is LinkState.CLOSED for link in tunnel.status().links)
        for fwd in local:
            assert await refused(fwd.listen_port)
        await eventually(lambda: not server.connections)
        await eventually(lambda: all(e.active == 0 for e in echo))
        await eventually(lambda: open_fds() <= fds)


async def test_default_ports_map_to_the_same_port() -> None:
    forwards = port_forwards(range(10100, 10201))
    assert len(forwards) == 101
    assert all(f.listen_port == f.dest_port and f.listen_host == f.dest_host == "127.0.0.1" for f in forwards)


async def test_half_close_is_forwarded(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """The client's EOF reaches the target, whose replies still come back; then everything closes."""
    local = forwards_to(echo[0].port)
    async with running(server_config(keys, {echo[0].port})) as server:
        async with connected(tunnel_config(keys, server.port, local)) as tunnel:
            payload = bytes(range(256)) * 4096
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", local[0].listen_port)
                writer.write(payload)
                writer.write_eof()
                assert await reader.read() == payload
                writer.close()
            await eventually(
                lambda: all(link.active_channels == 0 for link in tunnel.status().links) and echo[0].active == 0
            )
            await eventually(lambda: not next(iter(server.connections))._channels)


async def test_unreadable_key_fails_at_start(keys: Keys) -> None:
    config = attrs.evolve(tunnel_config(keys, free_port(), []), client_keys=(str(keys.dir / "missing"),))
    with pytest.raises(TunnelError, match="cannot read"):
        await Tunnel(config).start()


async def test_status_while_the_hub_is_unreachable(keys: Keys) -> None:
    """Refused TCP is retried with backoff, never given up; the status says why."""
    local = forwards_to(free_port())
    async with Tunnel(tunnel_config(keys, free_port(), local)) as tunnel:
        await eventually(lambda: tunnel.status().links[0].last_error is not None)
        await asyncio.sleep(0.5)
        status = tunnel.status()
        assert not status.connected and status.links[0].state in (LinkState.BACKOFF, LinkState.CONNECTING)
        assert "Errno 111" in str(status.links[0].last_error) or "refused" in str(status.links[0].last_error)
        assert await refused(local[0].listen_port)


async def test_unauthenticated_connections_are_bounded(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """A flood of idle connections: at most max_startups are held and the rest are dropped at once
    (not at the login timeout); logged-in nodes do not count against the limit."""
    cfg = server_config(keys, {echo[0].port}, max_startups=5, login_timeout=120.0)
    async with running(cfg) as server:
        first = await raw_client(keys, server.port)
        second = await raw_client(keys, server.port)  # logged in: neither holds a slot
        flood = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(200)]
        try:
            await eventually(lambda: len(server.connections) <= 2 + 5)
            assert len(server.logging_in) == 5

            async def dropped(reader: asyncio.StreamReader) -> bool:
                try:
                    async with asyncio.timeout(1):
                        while await reader.read(4096):
                            pass
                except ConnectionError:
                    pass
                except TimeoutError:
                    return False
                return True

            outcomes = await asyncio.gather(*(dropped(reader) for reader, _ in flood))
            assert outcomes.count(True) == 195, outcomes.count(True)
            for (_, writer), was_dropped in zip(flood, outcomes):
                if not was_dropped:
                    writer.close()
            await eventually(lambda: not server.logging_in)
            third = await raw_client(keys, server.port)
            third.close()
            assert not first.is_closed() and not second.is_closed()
        finally:
            for _, writer in flood:
                writer.close()
            first.close()
            second.close()


async def test_endpoint_offers_strict_kex_against_terrapin(keys: Keys, echo: tuple[Echo, ...]) -> None:
    """CVE-2023-48795: the server's KEXINIT advertises OpenSSH's strict key exchange."""
    async with running(server_config(keys, {echo[0].port})) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"SSH-2.0-terrapin-probe\r\n")
            received = b""
            async with asyncio.timeout(10):
                while b"kex-strict-s-v00@openssh.com" not in received and len(received) < 65536:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    received += chunk
            assert b"kex-strict-s-v00@openssh.com" in received, received[:200]
        finally:
            writer.close()
