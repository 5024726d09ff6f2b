"""The node's side of the tunnel: the hub's NBD ports appear on the node's loopback.

Theory of operation: a :class:`Tunnel` keeps ``connections`` SSH connections to
the hub (the embedded :mod:`sendense_nbd.tunnel.server` or any sshd). The tunnel
owns one listener per local forward (one per port of the range); each accepted
connection rides the SSH connection that is up and carries the fewest (ties
round robin), so the connections of one disk spread over all of them. The
remote forwards (the node API, reached from the hub) go over connection 0 only.

Each connection is a :class:`_Link` running one loop with the frozen
:class:`_Login` the tunnel read at start: connect (host key pinned
by a known_hosts file, key login), tune its TCP socket (:mod:`sendense_nbd.tcp`:
BBR, buffers for the link), make sure the listeners are open, wait until the
connection drops, abort the forwarded connections it carried, sleep
(exponential backoff, capped), again. While no link is up the ports have no
listener, so a client gets "connection refused" at once instead of hanging. A
changed or unknown host key and a refused login are not retried: the link fails
and :meth:`Tunnel.wait_closed` raises :class:`TunnelError`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import asyncssh
import attrs

from sendense_nbd.errors import TunnelError
from sendense_nbd.tcp import TcpTuning, positive
from sendense_nbd.tunnel.allocator import tune_malloc
from sendense_nbd.tunnel.config import (
    DEFAULT_CONNECTIONS,
    DEFAULT_NODE_API,
    DEFAULT_PORTS,
    DEFAULT_TUNING,
    Forward,
    LinkTuning,
)
from sendense_nbd.tunnel.forward import LocalForwarder, tune_connection

log = logging.getLogger(__name__)

#: Errors that reconnecting cannot fix.
_PERMANENT = (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _forwards(value: Iterable[Forward]) -> tuple[Forward, ...]:
    return tuple(value)


@attrs.frozen
class TunnelConfig:
    """Where the hub's SSH endpoint is, how to log in and what to forward."""

    host: str
    port: int
    client_keys: tuple[str, ...] = attrs.field(converter=_strings, validator=attrs.validators.min_len(1))
    #: OpenSSH known_hosts file pinning the hub's host key(s).
    known_hosts: str
    username: str = "sendense"
    local_forwards: tuple[Forward, ...] = attrs.field(default=(), converter=_forwards)
    remote_forwards: tuple[Forward, ...] = attrs.field(default=(), converter=_forwards)
    #: SSH connections the accepted connections of every port are spread over.
    connections: int = attrs.field(default=DEFAULT_CONNECTIONS, validator=attrs.validators.and_(attrs.validators.ge(1)))
    #: Channel windows, packet size, SSH socket buffers and congestion control.
    tuning: LinkTuning = DEFAULT_TUNING
    #: Ciphers to offer, e.g. ``("aes128-gcm@openssh.com",)``; empty: asyncssh's defaults.
    ciphers: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    keepalive_interval: float = attrs.field(default=15.0, validator=positive)
    keepalive_count_max: int = 3
    connect_timeout: float = attrs.field(default=15.0, validator=positive)
    backoff_initial: float = attrs.field(default=0.5, validator=positive)
    backoff_max: float = attrs.field(default=30.0, validator=positive)


def port_forwards(
    ports: Sequence[int] = DEFAULT_PORTS, *, listen_host: str = "127.0.0.1", dest_host: str = "127.0.0.1"
) -> tuple[Forward, ...]:
    """One local forward per port: ``listen_host:P`` to the hub's ``dest_host:P``."""
    return tuple(Forward(listen_host, port, dest_host, port) for port in ports)


def node_api_forward(listen: tuple[str, int] = DEFAULT_NODE_API, dest: tuple[str, int] = DEFAULT_NODE_API) -> Forward:
    """The reverse forward: the hub's ``listen`` reaches the node's ``dest``."""
    return Forward(*listen, *dest)


class LinkState(enum.Enum):
    """Where one SSH connection of a tunnel is."""

    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"
    FAILED = "failed"
    CLOSED = "closed"


@attrs.frozen
class LinkStatus:
    """A snapshot of one SSH connection, for logs and tests."""

    index: int
    state: LinkState
    reconnects: int
    #: Forwarded connections riding this SSH connection now.
    active_channels: int
    last_error: str | None
    #: What took effect on the SSH connection's TCP socket (None before the first connect).
    tcp: TcpTuning | None = None


@attrs.frozen
class TunnelStatus:
    """A snapshot of the whole tunnel."""

    connected: bool
    reconnects: int
    links: tuple[LinkStatus, ...]
    #: Local ports with a listener now (all of them while a link is up, none otherwise).
    listening: tuple[int, ...] = ()


@attrs.frozen
class _Login:
    """What a link needs to reach the hub: the configuration and the keys read from its files."""

    config: TunnelConfig
    keys: Sequence[asyncssh.SSHKeyPair]
    known_hosts: asyncssh.SSHKnownHosts


class _Listeners:
    """The tunnel's local listeners: open while at least one link is up; new connections to the least loaded."""

    def __init__(self, forwards: Sequence[Forward], tuning: LinkTuning) -> None:
        self.forwards = tuple(forwards)
        self.tuning = tuning
        self.links: list[_Link] = []
        self.forwarders: list[LocalForwarder] = []
        self._lock = asyncio.Lock()
        self._next = 0

    def pick(self) -> asyncssh.SSHClientConnection | None:
        """The SSH connection for the next accepted connection: the least loaded link that is up.

        Ties go round robin, so a link back from a reconnect takes the new connections first.
        """
        count = len(self.links)
        best: tuple[int, int, asyncssh.SSHClientConnection] | None = None
        for step in range(count):
            index = (self._next + step) % count
            conn = self.links[index].conn
            if self.links[index].state is LinkState.UP and conn is not None:
                load = self.active_on(conn)
                if best is None or load < best[0]:
                    best = (load, index, conn)
        if best is None:
            return None
        self._next = (best[1] + 1) % count
        return best[2]

    def active_on(self, conn: asyncssh.SSHClientConnection) -> int:
        """Forwarded connections riding ``conn`` now."""
        return sum(forwarder.active_on(conn) for forwarder in self.forwarders)

    @property
    def listening(self) -> tuple[int, ...]:
        """Ports listened on now."""
        return tuple(forwarder.forward.listen_port for forwarder in self.forwarders)

    async def link_up(self) -> None:
        """A link is up: open the listeners unless they are (``OSError`` when a port is taken)."""
        async with self._lock:
            if self.forwarders or not self.forwards:
                return
            try:
                for fwd in self.forwards:
                    forwarder = LocalForwarder(fwd, self.pick, self.tuning)
                    await forwarder.start()
                    self.forwarders.append(forwarder)
            except OSError:
                await self._close()
                raise

    async def link_down(self, conn: asyncssh.SSHClientConnection | None) -> None:
        """A link (no longer UP) lost ``conn``: close what rode it; the listeners too if no link is up."""
        async with self._lock:
            if conn is not None:
                for forwarder in self.forwarders:
                    forwarder.close_on(conn)
            if not any(link.state is LinkState.UP for link in self.links):
                await self._close()

    async def close(self) -> None:
        """Close every listener and forwarded connection."""
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        # Our listeners, not asyncssh's: they close even if asyncssh would not (asyncssh #309).
        for forwarder in self.forwarders:
            forwarder.close()
        await asyncio.gather(*(forwarder.wait_closed() for forwarder in self.forwarders))
        self.forwarders.clear()


class _Link:
    """One SSH connection and the remote forwards it carries, reconnected until closed."""

    def __init__(self, index: int, remote: Sequence[Forward], listeners: _Listeners) -> None:
        self.index = index
        self.remote = tuple(remote)
        self.listeners = listeners
        self.state = LinkState.CONNECTING
        self.connects = 0
        self.last_error: str | None = None
        self.up = asyncio.Event()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.tcp: TcpTuning | None = None

    def status(self) -> LinkStatus:
        """A snapshot of this link."""
        return LinkStatus(
            index=self.index,
            state=self.state,
            reconnects=max(self.connects - 1, 0),
            active_channels=self.listeners.active_on(self.conn) if self.conn is not None else 0,
            last_error=self.last_error,
            tcp=self.tcp,
        )

    async def run(self, login: _Login) -> None:
        """Connect, serve, reconnect with backoff until cancelled; :class:`TunnelError` on a permanent failure."""
        config = login.config
        delay = config.backoff_initial
        while True:
            self.state = LinkState.CONNECTING
            started = time.monotonic()
            try:
                await self._session(login)
            except _PERMANENT as exc:
                self.state, self.last_error = LinkState.FAILED, f"{type(exc).__name__}: {exc}"
                log.error("tunnel link %d to %s:%d failed: %s", self.index, config.host, config.port, self.last_error)
                raise TunnelError(f"SSH to {config.host}:{config.port}: {self.last_error}") from exc
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started > config.backoff_max:
                delay = config.backoff_initial  # it was up for a while: start the backoff over
            self.state = LinkState.BACKOFF
            pause = delay * random.uniform(0.8, 1.0)
            log.warning("tunnel link %d down (%s); reconnecting in %.1f s", self.index, self.last_error, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, config.backoff_max)

    async def _connect(self, login: _Login) -> asyncssh.SSHClientConnection:
        config = login.config
        return await asyncio.wait_for(
            asyncssh.connect(
                config.host,
                config.port,
                username=config.username,
                client_keys=login.keys,
                known_hosts=login.known_hosts,
                password_auth=False,
                kbdint_auth=False,
                gss_host=None,
                agent_path=None,
                config=[],
                encryption_algs=list(config.ciphers) or (),
                keepalive_interval=config.keepalive_interval,
                keepalive_count_max=config.keepalive_count_max,
            ),
            config.connect_timeout,
        )

    async def _session(self, login: _Login) -> None:
        config, tuning = login.config, login.config.tuning
        conn = await self._connect(login)
        try:
            self.connects += 1
            self.tcp = tune_connection(conn, tuning)
            for fwd in self.remote:
                await conn.create_server(
                    functools.partial(_reverse, conn, fwd),
                    fwd.listen_host,
                    fwd.listen_port,
                    window=tuning.window,
                    max_pktsize=tuning.max_packet,
                )
            self.conn, self.state, self.last_error = conn, LinkState.UP, None
            await self.listeners.link_up()
            self.up.set()
            log.info(
                "tunnel link %d up via %s:%d: %d remote forwards, %s",
                self.index,
                config.host,
                config.port,
                len(self.remote),
                self.tcp,
            )
            await conn.wait_closed()
            self.last_error = "the connection was closed"
        finally:
            self.up.clear()
            if self.state is LinkState.UP:
                self.state = LinkState.BACKOFF
            self.conn = None
            await self.listeners.link_down(conn)
            conn.close()
            await conn.wait_closed()


def _reverse(conn: asyncssh.SSHClientConnection, fwd: Forward, orig_host: str, orig_port: int) -> object:
    """A reverse-forwarded connection from the hub: connect it to ``fwd``'s destination here."""
    return conn.forward_connection(fwd.dest_host, fwd.dest_port)


class Tunnel:
    """Keeps the forwards of :class:`TunnelConfig` up; ``async with Tunnel(config) as tunnel: ...``."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self._listeners = _Listeners(config.local_forwards, config.tuning)
        self._links = [
            _Link(i, config.remote_forwards if i == 0 else (), self._listeners) for i in range(config.connections)
        ]
        self._listeners.links = self._links
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()

    async def start(self) -> None:
        """Read the keys, tune malloc (:mod:`.allocator`), start the links (see :meth:`wait_connected`)."""
        config = self.config
        try:
            login = _Login(
                config, asyncssh.load_keypairs(list(config.client_keys)), asyncssh.read_known_hosts(config.known_hosts)
            )
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise TunnelError(f"cannot read the client key or known_hosts file: {exc}") from exc
        tune_malloc()
        loop = asyncio.get_running_loop()
        for link in self._links:
            task = loop.create_task(link.run(login), name=f"tunnel-link-{link.index}")
            task.add_done_callback(self._link_done)
            self._tasks.append(task)

    def _link_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._failure is not None:
            return
        self._failure = task.exception() or TunnelError("a tunnel link stopped")
        self._failed.set()
        self.close()

    async def wait_connected(self) -> None:
        """Wait until every link is up; :class:`TunnelError` if one failed (bound it with ``asyncio.timeout``)."""
        if not self._tasks:
            raise TunnelError("the tunnel is not started")
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(asyncio.gather(*(link.up.wait() for link in self._links))),
            asyncio.ensure_future(self._failed.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)  # retrieved: no "never retrieved" warning
        self._raise_failure()

    def _raise_failure(self) -> None:
        if isinstance(self._failure, TunnelError):
            raise self._failure
        if self._failure is not None:
            raise TunnelError(str(self._failure)) from self._failure

    @property
    def connected(self) -> bool:
        """Every link is up."""
        return all(link.state is LinkState.UP for link in self._links)

    def status(self) -> TunnelStatus:
        """State, reconnect count and channels of every link."""
        links = tuple(link.status() for link in self._links)
        return TunnelStatus(
            self.connected, sum(link.reconnects for link in links), links, listening=self._listeners.listening
        )

    def close(self) -> None:
        """Stop reconnecting; close every listener, channel and connection."""
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until everything is closed; raises :class:`TunnelError` if a link failed."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._listeners.close()
        for link in self._links:
            if link.state is not LinkState.FAILED:
                link.state = LinkState.CLOSED
        self._raise_failure()

    async def __aenter__(self) -> Tunnel:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        await self.wait_closed()
