"""Values shared by both tunnel ends: port ranges and forward specifications."""

from __future__ import annotations

import attrs

from sendense_nbd.errors import TunnelError
from sendense_nbd.tcp import DEFAULT_CONGESTION, DEFAULT_LINK, LinkProfile, socket_buffers

#: The hub's NBD port pool, pre-forwarded as a whole.
DEFAULT_PORTS = range(10100, 10201)
#: The node API, reachable from the hub through the reverse forward.
DEFAULT_NODE_API = ("127.0.0.1", 8081)
#: Connections the hub's SSH endpoint lets log in at once (OpenSSH's MaxStartups), and for how long.
DEFAULT_MAX_STARTUPS = 20
DEFAULT_LOGIN_TIMEOUT = 30.0
#: SSH connections a node's tunnel keeps (see docs/TUNNEL.md, "Sizing").
DEFAULT_CONNECTIONS = 2
#: SSH packets of a channel: bigger than asyncssh's and OpenSSH's 32 KiB (fewer packets), under
#: OpenSSH's 256 KiB packet limit.
CHANNEL_MAX_PACKET = 128 * 1024
#: The window never goes below asyncssh's and OpenSSH's 2 MiB default; above 256 MiB it is refused
#: (a peer's channels could hold that much memory each).
MIN_WINDOW = 2 * 1024 * 1024
MAX_WINDOW = 256 * 1024 * 1024
#: The SSH sockets' buffers (kernel units) are refused above this (setsockopt takes a C int).
MAX_SOCKET_BUFFER = 512 * 1024 * 1024
#: Direct-tcpip channels the hub's embedded server keeps open per SSH connection; more are refused.
DEFAULT_MAX_CHANNELS = 64


def channel_window(link: LinkProfile) -> int:
    """The receive window a channel gets for ``link``: twice its BDP (at least :data:`MIN_WINDOW`).

    asyncssh (like OpenSSH) sends WINDOW_ADJUST once half the window is consumed, and the window
    also covers what waits in the sender's queues: a channel was measured carrying ~0.25 x window
    per round trip (docs/TUNNEL.md, "Sizing for a WAN"), so 2 x BDP fills about half the link per
    channel; the NBD connections of a disk (several channels) make up the rest.
    """
    return max(2 * link.bdp, MIN_WINDOW)


def _congestion(value: str | None) -> str | None:
    return None if value in (None, "", "system") else value


@attrs.frozen
class LinkTuning:
    """Flow control of the tunnel's channels and SSH sockets, from the link they must fill.

    ``window``: each channel's receive window (bytes); ``max_packet``: largest SSH data packet;
    ``socket_buffer``: send and receive buffer asked for on the SSH connection's TCP socket
    (kernel units, see :mod:`sendense_nbd.tcp`); ``congestion``: its congestion control
    (None: the system's).
    """

    window: int = attrs.field(validator=[attrs.validators.ge(32 * 1024), attrs.validators.le(MAX_WINDOW)])
    socket_buffer: int = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(MAX_SOCKET_BUFFER)])
    max_packet: int = attrs.field(default=CHANNEL_MAX_PACKET, validator=attrs.validators.ge(1024))
    congestion: str | None = attrs.field(default=DEFAULT_CONGESTION, converter=_congestion)

    @classmethod
    def for_link(
        cls, link: LinkProfile = DEFAULT_LINK, *, window: int | None = None, congestion: str | None = DEFAULT_CONGESTION
    ) -> LinkTuning:
        """Windows and buffers sized for ``link``; ``window`` overrides the channel window.

        Raises :class:`TunnelError` naming the options when a size is out of bounds.
        """
        chosen = channel_window(link) if window is None else window
        if not 32 * 1024 <= chosen <= MAX_WINDOW:
            source = "--window" if window is not None else f"--link-rtt/--link-rate ({link})"
            raise TunnelError(f"{source}: a channel window of {chosen} bytes; it must be 32 KiB to 256 MiB")
        if socket_buffers(link) > MAX_SOCKET_BUFFER:
            raise TunnelError(
                f"--link-rtt/--link-rate ({link}): SSH socket buffers of {socket_buffers(link)} bytes; "
                f"at most {MAX_SOCKET_BUFFER} (a BDP of 256 MiB)"
            )
        return cls(
            window=chosen,
            socket_buffer=socket_buffers(link),
            max_packet=min(CHANNEL_MAX_PACKET, max(32 * 1024, chosen // 16)),
            congestion=congestion,
        )


#: Sized for 1 Gbit/s at 100 ms (:data:`sendense_nbd.tcp.DEFAULT_LINK`): 25 MB windows and socket buffers
#: (measured 64-80 MB/s at 100 ms on 2 CPUs, see docs/TUNNEL.md).
DEFAULT_TUNING = LinkTuning.for_link()


def parse_ports(text: str) -> range:
    """``10100-10200`` (inclusive) or a single ``10100``."""
    first, sep, last = text.partition("-")
    if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
        raise TunnelError(f"{text!r}: expected PORT or FIRST-LAST")
    low, high = int(first), int(last) if sep else int(first)
    if not 0 < low <= high < 65536:
        raise TunnelError(f"{text!r}: ports must be 1-65535 and FIRST <= LAST")
    return range(low, high + 1)


def parse_host_port(text: str, *, default_host: str | None = None, any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); a bare ``PORT`` takes ``default_host``; ``any_port``: 0 too."""
    host, sep, port = text.rpartition(":")
    if not sep and default_host is not None:
        host, port = default_host, text
    host = host.strip("[]")
    if not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise TunnelError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


@attrs.frozen
class Forward:
    """One TCP forward: connections to ``listen`` go to ``dest`` at the other end."""

    listen_host: str
    listen_port: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535)))
    dest_host: str
    dest_port: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535)))

    @classmethod
    def parse(cls, text: str) -> Forward:
        """``LISTEN_HOST:PORT=DEST_HOST:PORT`` (as ``--remote-forward`` takes it)."""
        listen, sep, dest = text.partition("=")
        if not sep:
            raise TunnelError(f"{text!r}: expected LISTEN_HOST:PORT=DEST_HOST:PORT")
        return cls(*parse_host_port(listen), *parse_host_port(dest))

    def __str__(self) -> str:
        return f"{self.listen_host}:{self.listen_port}={self.dest_host}:{self.dest_port}"
