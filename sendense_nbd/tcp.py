"""TCP tuning shared by the tunnel and the NBD client and server: congestion control and buffers.

A :class:`LinkProfile` (rate, round-trip time) gives the bandwidth-delay
product, the bytes that must be in flight to fill the link. :func:`tune_socket`
sets one connected socket up for it and reports what took effect:

- congestion control (``TCP_CONGESTION``, default BBR): an algorithm the kernel
  does not offer is logged once and reported, never raised;
- send/receive buffers: setting ``SO_SNDBUF``/``SO_RCVBUF`` switches the
  kernel's autotuning off for that socket, so a buffer is set only when the
  wanted size exceeds what autotuning may reach (``tcp_wmem[2]`` /
  ``tcp_rmem[2]``). Above ``net.core.wmem_max`` / ``rmem_max`` the kernel caps
  the value; then ``SO_SNDBUFFORCE``/``SO_RCVBUFFORCE`` is tried (needs
  ``CAP_NET_ADMIN``). When it is refused, the capped value is set only if it
  is still above what autotuning reaches; otherwise the socket is left alone.

The receive window's scale is fixed when the connection opens, from
``max(tcp_rmem[2], rmem_max)``: a receive buffer set after connect cannot
advertise more than that allows, so raise ``net.ipv4.tcp_rmem`` for long fat
links (docs/TUNNEL.md, "Kernel limits").

Sizes are in the kernel's own units, as ``getsockopt`` reports them: the kernel
doubles a ``setsockopt`` value to leave room for its bookkeeping, and autotuning
limits count the same way. Call it once per socket, at connect or accept.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from pathlib import Path
from typing import Any, Final

import attrs

log = logging.getLogger(__name__)

#: The congestion control the options of the tunnel, NBD client and server default to.
DEFAULT_CONGESTION: Final = "bbr"
#: Linux's ``SO_SNDBUFFORCE`` / ``SO_RCVBUFFORCE`` (``socket`` does not name them).
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_PROC = Path("/proc/sys/net")
_warned: set[str] = set()


def positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """attrs validator: ``value`` must be above 0 (``ValueError`` naming the field)."""
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.frozen
class LinkProfile:
    """A network path: ``rate_bps`` bits per second at ``rtt`` seconds of round trip."""

    rate_bps: int = attrs.field(validator=positive)
    rtt: float = attrs.field(validator=positive)

    @property
    def bdp(self) -> int:
        """Bandwidth-delay product: the bytes in flight that fill the link."""
        return math.ceil(self.rate_bps / 8 * self.rtt)

    @classmethod
    def parse(cls, *, rtt_ms: float, rate_mbit: float) -> LinkProfile:
        """From command-line units: milliseconds and Mbit/s."""
        return cls(rate_bps=round(rate_mbit * 1_000_000), rtt=rtt_ms / 1000)

    def __str__(self) -> str:
        return f"{self.rate_bps / 1e6:g} Mbit/s at {self.rtt * 1000:g} ms (BDP {self.bdp / 2**20:.1f} MiB)"


#: The link the defaults are sized for: 1 Gbit/s at 100 ms round trip (12.5 MB in flight).
DEFAULT_LINK = LinkProfile(rate_bps=1_000_000_000, rtt=0.1)


@attrs.frozen
class KernelLimits:
    """The sysctls that bound a socket's buffers, read once per process (:func:`kernel_limits`)."""

    wmem_max: int
    rmem_max: int
    tcp_wmem_max: int
    tcp_rmem_max: int
    congestion: frozenset[str]


def _read(name: str, field: int = 0, default: int = 0) -> str | int:
    try:
        words = (_PROC / name).read_text().split()
    except OSError:
        return default
    return words[field] if field < len(words) else default


@functools.cache
def kernel_limits() -> KernelLimits:
    """``net.core.{w,r}mem_max``, ``tcp_{w,r}mem[2]`` and the congestion controls offered (0/empty if unknown)."""
    congestion: frozenset[str] = frozenset()
    try:
        congestion = frozenset((_PROC / "ipv4/tcp_available_congestion_control").read_text().split())
    except OSError:
        pass
    return KernelLimits(
        wmem_max=int(_read("core/wmem_max")),
        rmem_max=int(_read("core/rmem_max")),
        tcp_wmem_max=int(_read("ipv4/tcp_wmem", 2)),
        tcp_rmem_max=int(_read("ipv4/tcp_rmem", 2)),
        congestion=congestion,
    )


def socket_buffers(link: LinkProfile) -> int:
    """The send and receive buffer (kernel units) one connection needs for ``link``: twice its BDP."""
    return 2 * link.bdp


#: The buffer the NBD client and server ask for by default: the tunnel's, for :data:`DEFAULT_LINK`.
DEFAULT_SOCKET_BUFFER: Final = socket_buffers(DEFAULT_LINK)


@attrs.frozen
class TcpTuning:
    """What :func:`tune_socket` left in effect on one socket (read back with ``getsockopt``)."""

    #: The congestion control in effect (None where the platform cannot tell).
    congestion: str | None
    #: Why the wanted algorithm is not in effect (None when it is, or none was asked for).
    congestion_error: str | None
    sndbuf: int
    rcvbuf: int
    #: Whether we set the buffer (autotuning off) or left it to the kernel's autotuning.
    sndbuf_set: bool
    rcvbuf_set: bool


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _congestion(sock: socket.socket) -> str | None:
    option = getattr(socket, "TCP_CONGESTION", None)
    if option is None:
        return None
    return sock.getsockopt(socket.IPPROTO_TCP, option, 16).split(b"\0", 1)[0].decode("ascii", "replace")


def set_congestion(sock: socket.socket, name: str | None) -> tuple[str | None, str | None]:
    """Ask for congestion control ``name`` (None: keep the system's); returns (in effect, why not ``name``)."""
    option = getattr(socket, "TCP_CONGESTION", None)
    if name is None:
        return (_congestion(sock) if option is not None else None), None
    if option is None:
        _warn_once("no-option", "TCP_CONGESTION is not supported here; keeping the system's congestion control")
        return None, "TCP_CONGESTION is not supported on this platform"
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, name.encode("ascii"))
    except (OSError, UnicodeEncodeError) as exc:
        offered = " ".join(sorted(kernel_limits().congestion)) or "unknown"
        reason = f"congestion control {name!r} unavailable ({exc}); the kernel offers: {offered}"
        _warn_once(f"cc:{name}", "%s; keeping %s", reason, _congestion(sock))
        return _congestion(sock), reason
    return _congestion(sock), None


def _set_buffer(sock: socket.socket, wanted: int, *, send: bool) -> bool:
    """Set one buffer to ``wanted`` (kernel units) unless autotuning reaches as far; True if set."""
    limits = kernel_limits()
    autotune_max, core_max = (limits.tcp_wmem_max, limits.wmem_max) if send else (limits.tcp_rmem_max, limits.rmem_max)
    if wanted <= autotune_max:
        return False
    plain, force = (socket.SO_SNDBUF, SO_SNDBUFFORCE) if send else (socket.SO_RCVBUF, SO_RCVBUFFORCE)
    value = -(-wanted // 2)  # the kernel doubles it
    if value > core_max:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, value)
            return True
        except OSError:  # EPERM without CAP_NET_ADMIN: the capped value, if it beats autotuning
            name = "wmem_max" if send else "rmem_max"
            _warn_once(
                f"cap:{name}",
                "a %d-byte socket buffer is capped by net.core.%s=%d; raise it with sysctl for long fat links",
                wanted,
                name,
                core_max,
            )
            if 2 * core_max <= autotune_max:
                return False  # setting it would switch autotuning off for less
            value = core_max
    sock.setsockopt(socket.SOL_SOCKET, plain, value)
    return True


def tune_socket(
    sock: socket.socket,
    *,
    congestion: str | None = DEFAULT_CONGESTION,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
) -> TcpTuning:
    """Tune connected TCP socket ``sock`` (see the module doc); buffers None: leave them to autotuning.

    Never raises for an unavailable algorithm or a capped buffer: the result says what took effect.
    """
    in_effect, error = set_congestion(sock, congestion)
    sndbuf_set = sndbuf is not None and _set_buffer(sock, sndbuf, send=True)
    rcvbuf_set = rcvbuf is not None and _set_buffer(sock, rcvbuf, send=False)
    return TcpTuning(
        congestion=in_effect,
        congestion_error=error,
        sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sndbuf_set=sndbuf_set,
        rcvbuf_set=rcvbuf_set,
    )


def is_tcp(sock: socket.socket | None) -> bool:
    """Whether ``sock`` is a TCP socket (not a unix socket)."""
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
