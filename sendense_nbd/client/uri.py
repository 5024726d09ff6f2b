"""NBD URIs (doc/uri.md of NetworkBlockDevice/nbd).

``nbd://host[:port]/export`` is TCP (port 10809 by default);
``nbd+unix:///export?socket=PATH`` is a unix socket. The export name is the
path without its leading ``/``, percent-decoded, so ``nbd://h//disk`` names
``/disk`` and ``nbd://h`` the default export ``""``. This client speaks no
TLS, so, as the URI spec asks, the ``nbds`` schemes and TLS parameters are
errors rather than silently unencrypted connections; so are unknown query
parameters ("SHOULD be diagnosed").
"""

from __future__ import annotations

from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs

from sendense_nbd.errors import URIError
from sendense_nbd.protocol.constants import DEFAULT_PORT, MAX_STRING


def _check_export(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if "\0" in value or len(value.encode()) > MAX_STRING:
        raise URIError("an export name is at most 4096 bytes of UTF-8 without NUL")


@attrs.frozen(slots=True)
class NBDAddress:
    """Where an export is: a TCP ``host``/``port`` or a unix ``socket``."""

    export: str = attrs.field(default="", validator=_check_export)
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.host is None) == (self.socket is None):
            raise URIError("an NBD address has either a host or a unix socket")
        if not 0 < self.port < 65536:
            raise URIError(f"port {self.port} is out of range")

    @property
    def is_unix(self) -> bool:
        """The export is reached through a unix socket."""
        return self.socket is not None

    @property
    def uri(self) -> str:
        """The address as an NBD URI (inverse of :func:`parse_uri`)."""
        path = "/" + quote(self.export, safe="")
        if self.socket is not None:
            return f"nbd+unix://{path}?socket={quote(self.socket, safe='/')}"
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"nbd://{host}{port}{path}"

    def __str__(self) -> str:
        return self.uri


_TLS_PARAMETERS = frozenset({"tls-type", "tls-hostname", "tls-verify-peer"})


def parse_uri(uri: str) -> NBDAddress:
    """Parse an ``nbd://`` or ``nbd+unix://`` URI; raise :class:`URIError`."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise URIError(f"{uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise URIError(f"{uri!r}: TLS ({scheme}://) is not supported by this client")
    if scheme not in ("nbd", "nbd+unix"):
        raise URIError(f"{uri!r} is not an NBD URI (nbd:// or nbd+unix://)")
    if parts.fragment:
        raise URIError(f"{uri!r}: NBD URIs have no fragment")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query), errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise URIError(f"{uri!r}: bad query: {exc}") from None
    for key, values in query.items():
        if len(values) > 1:
            raise URIError(f"{uri!r}: query parameter {key!r} is given more than once")
    tls = _TLS_PARAMETERS & query.keys()
    if tls:
        raise URIError(f"{uri!r}: TLS parameters ({', '.join(sorted(tls))}) are not supported by this client")
    try:
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path, errors="strict")
    except UnicodeDecodeError:
        raise URIError(f"{uri!r}: the export name is not UTF-8") from None
    allowed = {"socket"} if scheme == "nbd+unix" else set()
    unknown = query.keys() - allowed
    if unknown:
        raise URIError(f"{uri!r}: unknown query parameter(s) {', '.join(sorted(unknown))}")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise URIError(f"{uri!r}: nbd+unix URIs have no host (use nbd+unix:///export?socket=PATH)")
        socket = query.get("socket", [""])[0]
        if not socket:
            raise URIError(f"{uri!r}: nbd+unix URIs need ?socket=PATH")
        return NBDAddress(export, socket=socket)
    if not parts.hostname:
        raise URIError(f"{uri!r}: nbd URIs need a host")
    return NBDAddress(export, host=parts.hostname, port=DEFAULT_PORT if port is None else port)


def resolve(target: str | NBDAddress, port: int | None = None, export: str | None = None) -> NBDAddress:
    """An :class:`NBDAddress` from a URI, an address, or a host (+ port, export)."""
    if isinstance(target, NBDAddress):
        address = target
    elif "://" in target:
        if port is not None:
            raise URIError("give the port inside the URI, not as an argument")
        address = parse_uri(target)
    else:
        return NBDAddress(export or "", host=target, port=DEFAULT_PORT if port is None else port)
    return address if export is None else attrs.evolve(address, export=export)
