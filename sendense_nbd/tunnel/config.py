"""Values shared by both tunnel ends: port ranges and forward specifications."""

from __future__ import annotations

import attrs

from sendense_nbd.errors import TunnelError

#: The hub's NBD port pool, pre-forwarded as a whole.
DEFAULT_PORTS = range(10100, 10201)
#: The node API, reachable from the hub through the reverse forward.
DEFAULT_NODE_API = ("127.0.0.1", 8081)
#: Connections the hub's SSH endpoint lets log in at once (OpenSSH's MaxStartups), and for how long.
DEFAULT_MAX_STARTUPS = 20
DEFAULT_LOGIN_TIMEOUT = 30.0
#: Per-channel SSH flow control: bigger than asyncssh's 2 MiB / 32 KiB defaults, fewer packets and stalls.
CHANNEL_WINDOW = 8 * 1024 * 1024
CHANNEL_MAX_PACKET = 128 * 1024


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
