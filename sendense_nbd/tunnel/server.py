"""The hub's embedded SSH endpoint: forwards only, to the NBD ports and the node API.

Theory of operation: a node connects with a key listed in the authorized_keys
file (re-read for every login, so keys rotate without a restart; passwords,
keyboard-interactive and host-based logins are off). It may then

- open ``direct-tcpip`` channels (``ssh -L``, RFC 4254 section 7.2) to
  ``dest_host`` on a port of the NBD range, nothing else;
- ask for ``tcpip-forward`` listeners (``ssh -R``, section 7.1) on the
  configured addresses only (by default 127.0.0.1:8081, the node API).

Sessions (shells, exec, subsystems), agent/X11 forwarding and unix-socket
forwards are refused. Every refusal is logged with its reason. When a
connection drops, asyncssh closes the listeners it opened for it.

Unauthenticated connections are bounded, like OpenSSH's ``MaxStartups``: at
most ``max_startups`` may be logging in at once (each for at most
``login_timeout``); one more is dropped as soon as it connects, so a flood of
idle connections costs a bounded amount of memory and file descriptors. A
logged-in connection may hold at most ``max_channels`` channels, each with at
most one window buffered per direction; its TCP socket is tuned (congestion
control, buffers) only once it has logged in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Collection, Iterable, Sequence, Set
from types import TracebackType
from typing import cast

import asyncssh
import attrs

from sendense_nbd.errors import TunnelError
from sendense_nbd.tunnel.allocator import tune_malloc
from sendense_nbd.tunnel.config import (
    DEFAULT_LOGIN_TIMEOUT,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_STARTUPS,
    DEFAULT_NODE_API,
    DEFAULT_PORTS,
    DEFAULT_TUNING,
    LinkTuning,
)
from sendense_nbd.tunnel.forward import tune_connection

log = logging.getLogger(__name__)


def _ports(value: Iterable[int]) -> frozenset[int]:
    return frozenset(value)


def _addresses(value: Iterable[tuple[str, int]]) -> frozenset[tuple[str, int]]:
    return frozenset(value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class TunnelServerConfig:
    """What the embedded SSH server listens on and what it lets nodes forward."""

    host_keys: tuple[str, ...] = attrs.field(converter=_strings, validator=attrs.validators.min_len(1))
    authorized_keys: str
    host: str = "127.0.0.1"
    port: int = 2222
    #: direct-tcpip channels may reach only this host ...
    dest_host: str = "127.0.0.1"
    #: ... on these ports (the NBD pool).
    ports: frozenset[int] = attrs.field(default=frozenset(DEFAULT_PORTS), converter=_ports)
    #: tcpip-forward requests allowed, as (listen host, port).
    remote_listens: frozenset[tuple[str, int]] = attrs.field(
        default=frozenset({DEFAULT_NODE_API}), converter=_addresses
    )
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    #: Connections that have not logged in yet, at most (OpenSSH's MaxStartups).
    max_startups: int = attrs.field(default=DEFAULT_MAX_STARTUPS, validator=attrs.validators.ge(1))
    #: Window and packet size granted to direct-tcpip channels; SSH socket buffers and congestion control.
    tuning: LinkTuning = DEFAULT_TUNING
    #: direct-tcpip channels one SSH connection may have open (each may hold a window in memory).
    max_channels: int = attrs.field(default=DEFAULT_MAX_CHANNELS, validator=attrs.validators.ge(1))


class _LoginGate:
    """Tracks the server's connections and bounds those still logging in (``max_startups``)."""

    def __init__(self, max_startups: int) -> None:
        self.max_startups = max_startups
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self.logging_in: set[asyncssh.SSHServerConnection] = set()

    def accept(self, conn: asyncssh.SSHServerConnection) -> bool:
        """A new connection; False when ``max_startups`` are already logging in (the caller drops it)."""
        self.connections.add(conn)
        if len(self.logging_in) >= self.max_startups:
            return False
        self.logging_in.add(conn)
        return True

    def logged_in(self, conn: asyncssh.SSHServerConnection) -> None:
        """``conn`` logged in: it no longer counts against ``max_startups``."""
        self.logging_in.discard(conn)

    def release(self, conn: asyncssh.SSHServerConnection) -> None:
        """``conn`` is closed."""
        self.connections.discard(conn)
        self.logging_in.discard(conn)


class _Handler(asyncssh.SSHServer):
    """One SSH connection: applies the forwarding policy of ``config``, reports to the login gate."""

    def __init__(self, config: TunnelServerConfig, gate: _LoginGate) -> None:
        self._config = config
        self._gate = gate
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "?"
        #: Open direct-tcpip channels (bounded by ``config.max_channels``).
        self.channels: set[asyncssh.SSHTCPChannel[bytes]] = set()
        self._watchers: set[asyncio.Task[None]] = set()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if not self._gate.accept(conn):
            log.warning(
                "dropped a connection from %s: %d connections are already logging in (max startups)",
                self._peer,
                len(self._gate.logging_in),
            )
            asyncio.get_running_loop().call_soon(conn.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._gate.release(self._conn)
        log.info("tunnel connection from %s closed%s", self._peer, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        assert self._conn is not None
        try:
            self._conn.set_authorized_keys(self._config.authorized_keys)
        except (OSError, asyncssh.KeyImportError) as exc:
            log.error("refusing %s: cannot read authorized keys: %s", self._peer, exc)
            self._conn.set_authorized_keys(asyncssh.SSHAuthorizedKeys())
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def auth_completed(self) -> None:
        if self._conn is None:
            return
        self._gate.logged_in(self._conn)
        tcp = tune_connection(self._conn, self._config.tuning)  # only for a logged-in node
        log.info("tunnel login from %s accepted; its socket: %s", self._peer, tcp)

    def session_requested(self) -> bool:
        log.warning("refused a session (shell/exec) from %s: this endpoint only forwards", self._peer)
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> tuple[asyncssh.SSHTCPChannel[bytes], Awaitable[asyncssh.SSHTCPSession[bytes]]]:
        allowed = self._config
        if dest_host != allowed.dest_host or dest_port not in allowed.ports:
            log.warning(
                "refused a forward from %s to %s:%d: only %s on the NBD ports is allowed",
                self._peer,
                dest_host,
                dest_port,
                allowed.dest_host,
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"forwarding to {dest_host}:{dest_port} is not allowed"
            )
        assert self._conn is not None
        if len(self.channels) >= self._config.max_channels:
            log.warning("refused a forward from %s: %d channels already open", self._peer, len(self.channels))
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, f"at most {self._config.max_channels} forwards per connection"
            )
        tuning = self._config.tuning
        chan = self._conn.create_tcp_channel(window=tuning.window, max_pktsize=tuning.max_packet)
        self._watch(chan)
        session = cast(Awaitable[asyncssh.SSHTCPSession[bytes]], self._conn.forward_connection(dest_host, dest_port))
        return chan, session

    def _watch(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        """Count ``chan`` among the open channels until it is closed."""
        self.channels.add(chan)
        watcher = asyncio.get_running_loop().create_task(chan.wait_closed())
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        watcher.add_done_callback(lambda _: self.channels.discard(chan))

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        if (listen_host, listen_port) not in self._config.remote_listens:
            log.warning(
                "refused a remote forward listener on %s:%d from %s: not a configured address",
                listen_host,
                listen_port,
                self._peer,
            )
            return False
        log.info("remote forward listener on %s:%d for %s", listen_host, listen_port, self._peer)
        return True

    def unix_connection_requested(self, dest_path: str) -> bool:
        log.warning("refused a unix-socket forward to %s from %s", dest_path, self._peer)
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        log.warning("refused a unix-socket listener on %s from %s", listen_path, self._peer)
        return False


class TunnelServer:
    """The embedded SSH server; ``async with TunnelServer(config) as server: ...``."""

    def __init__(self, config: TunnelServerConfig) -> None:
        self.config = config
        self._gate = _LoginGate(config.max_startups)
        self._acceptor: asyncssh.SSHAcceptor | None = None

    @property
    def connections(self) -> Set[asyncssh.SSHServerConnection]:
        """The SSH connections open now."""
        return self._gate.connections

    @property
    def logging_in(self) -> Set[asyncssh.SSHServerConnection]:
        """Connections not logged in yet (bounded by ``config.max_startups``)."""
        return self._gate.logging_in

    async def start(self) -> None:
        """Tune malloc (:mod:`.allocator`) and listen; ``port=0`` picks :attr:`port`. Raises :class:`TunnelError`."""
        config = self.config
        tune_malloc()
        try:
            host_keys: Sequence[asyncssh.SSHKey] = [asyncssh.read_private_key(path) for path in config.host_keys]
            self._acceptor = await asyncssh.listen(
                config.host,
                config.port,
                server_factory=lambda: _Handler(config, self._gate),
                server_host_keys=host_keys,
                password_auth=False,
                kbdint_auth=False,
                host_based_auth=False,
                gss_host=None,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
                keepalive_interval=config.keepalive_interval,
                keepalive_count_max=config.keepalive_count_max,
                login_timeout=config.login_timeout,
            )
        except (OSError, asyncssh.Error, asyncssh.KeyImportError) as exc:
            raise TunnelError(f"cannot start the SSH server on {config.host}:{config.port}: {exc}") from exc
        log.info("SSH tunnel endpoint listening on %s:%d", config.host, self.port)

    @property
    def port(self) -> int:
        """The port listened on."""
        if self._acceptor is None:
            raise TunnelError("the SSH server is not started")
        return self._acceptor.get_port()

    def close(self) -> None:
        """Stop listening and drop every connection (with its listeners and channels)."""
        if self._acceptor is not None:
            self._acceptor.close()
        for conn in list(self.connections):
            conn.close()

    async def wait_closed(self) -> None:
        """Wait until the listener and every connection are closed."""
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
        await asyncio.gather(*(conn.wait_closed() for conn in list(self.connections)))

    async def __aenter__(self) -> TunnelServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        await self.wait_closed()


async def start_tunnel_server(
    host_keys: Sequence[str],
    authorized_keys: str,
    *,
    host: str = "127.0.0.1",
    port: int = 2222,
    dest_host: str = "127.0.0.1",
    ports: Collection[int] = DEFAULT_PORTS,
    remote_listens: Collection[tuple[str, int]] = (DEFAULT_NODE_API,),
) -> TunnelServer:
    """Start the embedded SSH server (what the hub calls); close it with ``close()`` + ``wait_closed()``."""
    server = TunnelServer(
        TunnelServerConfig(
            host_keys=host_keys,
            authorized_keys=authorized_keys,
            host=host,
            port=port,
            dest_host=dest_host,
            ports=ports,
            remote_listens=remote_listens,
        )
    )
    await server.start()
    return server
