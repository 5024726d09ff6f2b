"""NBD URIs (doc/uri.md of NetworkBlockDevice/nbd).

``nbd://host[:port]/export`` is TCP (port 10809 by default);
``nbd+unix:///export?socket=PATH`` is a unix socket. The export name is the
path without its leading ``/``, percent-decoded, so ``nbd://h//disk`` names
``/disk`` and ``nbd://h`` the default export ``""``.

``nbds://`` and ``nbds+unix://`` require TLS (``NBD_OPT_STARTTLS``; the
connection fails rather than going on unencrypted). Their query parameters:

* ``tls-certificates=DIR``: a directory in qemu's layout (``ca-cert.pem``,
  and ``client-cert.pem``/``client-key.pem`` for mutual TLS), as libnbd's;
  without it the system's CAs are trusted.
* ``tls-verify-peer=false``: encryption without checking the server.
* ``tls-hostname=NAME``: the name the server's certificate must carry
  (default: the URI's host; ``localhost`` over a unix socket).
* ``tls-type=x509``: the only type this client speaks.
* ``tls-fingerprint=sha256:HEX``: an extension of this client: trust exactly
  the server certificate with this SHA-256 pin, whatever signed it.

TLS parameters on ``nbd://`` are errors, as are unknown query parameters
("SHOULD be diagnosed").

An IPv6 host may carry a zone id (RFC 6874): ``nbd://[fe80::1%25eth0]/x``
(:func:`uri_host` writes it, :func:`split_host` reads it back). Hosts that two
sides compare (the hub's export host, a node's pin on it) go through
:func:`normal_host` on both sides.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import SplitResult, parse_qs, quote, unquote, urlsplit

import attrs

from sendense_nbd.errors import TLSError, URIError
from sendense_nbd.protocol.constants import DEFAULT_PORT, MAX_STRING
from sendense_nbd.tls import parse_fingerprint

#: A DNS name: RFC 1123 labels, at most 253 characters (without the trailing dot :func:`normal_host` drops).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
#: An IPv6 zone id (RFC 6874's unreserved characters), e.g. ``eth0`` in ``fe80::1%eth0``.
_ZONE = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_HEX_PAIR = re.compile(r"[0-9A-Fa-f]{2}")
_ZONE_RULE = "an IPv6 zone id is 1-64 of letters, digits, '.', '_', '~', '-' (fe80::1%eth0, in a URI [fe80::1%25eth0])"


def uri_host(host: str) -> str:
    """``host`` as it goes in a URI: an IPv6 address in brackets, its zone id's ``%`` as ``%25`` (RFC 6874)."""
    return f"[{host.replace('%', '%25')}]" if ":" in host else host


def normal_host(host: str, what: str = "the host") -> str:
    """The one form in which hub and node write and compare a host (:class:`URIError`, naming ``what``, for
    anything that is not a host): an IP address as :mod:`ipaddress` prints it (an IPv6 one compressed and in
    lower case, its zone id kept as given, since it names an interface; in brackets, ``[fe80::1%25eth0]``,
    it is read as in a URI), a DNS name in lower case without its trailing dot. Two hosts are the same
    exactly when their normal forms are equal (for addresses: equal :mod:`ipaddress` values, scope included)."""
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        literal = _ipv6_literal(host[1:-1]) if bracketed else host
    except URIError as exc:
        raise URIError(f"{what} {exc}") from None
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    if address is not None:
        zone = getattr(address, "scope_id", None)
        if bracketed and address.version != 6:
            raise URIError(f"{what} {host!r}: brackets hold an IPv6 address only")
        if zone is not None and not _ZONE.fullmatch(zone):
            raise URIError(f"{what} {host!r}: {_ZONE_RULE}")
        return str(address)
    name = host.removesuffix(".")
    if bracketed or not _HOST_NAME.fullmatch(name):
        raise URIError(
            f"{what} {host[:80]!r} must be a host name or an IP address without a port (hub.example.com, "
            "10.0.0.2, fe80::1%eth0)"
        )
    return name.lower()


def _ipv6_literal(inside: str) -> str:
    """The text inside a URI's brackets with its zone id decoded (RFC 6874: ``%25``, then the zone
    percent-encoded, so ``[fe80::1%2525]`` is zone ``25``; a bare ``%`` is taken when two hex digits do
    not follow it, as its section 4 advises). :class:`URIError` for an empty zone id, or one outside RFC
    6874's unreserved characters."""
    address, percent, rest = inside.partition("%")
    if not percent:
        return inside
    if rest.startswith("25"):
        rest = rest[2:]
    elif _HEX_PAIR.match(rest):
        raise URIError(f"[{inside}]: a zone id follows %25 (RFC 6874), as in [fe80::1%25eth0]")
    try:
        zone = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        zone = ""
    if not _ZONE.fullmatch(zone):
        raise URIError(f"[{inside}]: {_ZONE_RULE}")
    return f"{address.lower()}%{zone}"


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
    #: TLS is required (``nbds://``); the other ``tls_*`` fields only apply then.
    tls: bool = False
    #: Credentials directory in qemu's layout (None: the system's CAs).
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    #: The name the server's certificate must carry (None: the host, or ``localhost``).
    tls_hostname: str | None = None
    #: ``sha256:HEX`` pin of the server's certificate (instead of CA verification).
    tls_fingerprint: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.host is None) == (self.socket is None):
            raise URIError("an NBD address has either a host or a unix socket")
        if not 0 < self.port < 65536:
            raise URIError(f"port {self.port} is out of range")
        if not self.tls and self._tls_query():
            raise URIError("TLS settings need TLS (an nbds:// or nbds+unix:// URI)")

    @property
    def server_hostname(self) -> str:
        """The name the server's TLS certificate is checked against (an IPv6 address without its zone id,
        which names this side's interface, not the server)."""
        host = self.host.partition("%")[0] if self.host and ":" in self.host else self.host
        return self.tls_hostname or host or "localhost"

    def _tls_query(self) -> list[tuple[str, str]]:
        query = [
            ("tls-certificates", self.tls_certificates),
            ("tls-verify-peer", None if self.tls_verify_peer else "false"),
            ("tls-hostname", self.tls_hostname),
            ("tls-fingerprint", self.tls_fingerprint),
        ]
        return [(key, value) for key, value in query if value is not None]

    @property
    def is_unix(self) -> bool:
        """The export is reached through a unix socket."""
        return self.socket is not None

    @property
    def uri(self) -> str:
        """The address as an NBD URI (inverse of :func:`parse_uri`)."""
        path = "/" + quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        query = [f"{key}={quote(value, safe='/:')}" for key, value in self._tls_query()]
        if self.socket is not None:
            query.insert(0, f"socket={quote(self.socket, safe='/')}")
            return f"{scheme}+unix://{path}?{'&'.join(query)}"
        assert self.host is not None
        host = uri_host(self.host)
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{scheme}://{host}{port}{path}" + (f"?{'&'.join(query)}" if query else "")

    def __str__(self) -> str:
        return self.uri


_TLS_PARAMETERS = frozenset({"tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates", "tls-fingerprint"})
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def parse_uri(uri: str) -> NBDAddress:
    """Parse an ``nbd://``, ``nbd+unix://``, ``nbds://`` or ``nbds+unix://`` URI; raise :class:`URIError`."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise URIError(f"{uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise URIError(f"{uri!r} is not an NBD URI (nbd://, nbd+unix://, nbds:// or nbds+unix://)")
    tls = scheme.startswith("nbds")
    unix = scheme.endswith("+unix")
    if parts.fragment:
        raise URIError(f"{uri!r}: NBD URIs have no fragment")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query), errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise URIError(f"{uri!r}: bad query: {exc}") from None
    for key, values in query.items():
        if len(values) > 1:
            raise URIError(f"{uri!r}: query parameter {key!r} is given more than once")
    if not tls and _TLS_PARAMETERS & query.keys():
        given = ", ".join(sorted(_TLS_PARAMETERS & query.keys()))
        raise URIError(f"{uri!r}: TLS parameters ({given}) need TLS: use nbds:// or nbds+unix://")
    try:
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path, errors="strict")
    except UnicodeDecodeError:
        raise URIError(f"{uri!r}: the export name is not UTF-8") from None
    allowed = ({"socket"} if unix else set()) | (_TLS_PARAMETERS if tls else set())
    unknown = query.keys() - allowed
    if unknown:
        raise URIError(f"{uri!r}: unknown query parameter(s) {', '.join(sorted(unknown))}")
    settings = _tls_settings(uri, {key: values[0] for key, values in query.items()}) if tls else {}
    if unix:
        if parts.netloc:
            raise URIError(f"{uri!r}: {scheme} URIs have no host (use {scheme}:///export?socket=PATH)")
        socket = query.get("socket", [""])[0]
        if not socket:
            raise URIError(f"{uri!r}: {scheme} URIs need ?socket=PATH")
        return NBDAddress(export, socket=socket, **settings)
    host = split_host(parts)
    if not host:
        raise URIError(f"{uri!r}: {scheme} URIs need a host")
    return NBDAddress(export, host=host, port=DEFAULT_PORT if port is None else port, **settings)


def split_host(parts: SplitResult) -> str | None:
    """The host of a split URI, as ``hostname`` gives it, except an IPv6 literal's zone id (RFC 6874:
    ``[fe80::1%25eth0]``; a bare ``%`` is taken too, see :func:`_ipv6_literal`), which is decoded and keeps
    its case; :class:`URIError` for an empty or malformed zone id."""
    host = parts.hostname
    netloc = parts.netloc.rpartition("@")[2]
    if host is None or "%" not in host or not netloc.startswith("["):
        return host
    return _ipv6_literal(netloc[1:].partition("]")[0])


def _tls_settings(uri: str, query: dict[str, str]) -> dict[str, Any]:
    """The :class:`NBDAddress` fields of an nbds URI's query."""
    kind = query.get("tls-type", "x509")
    if kind.lower() != "x509":
        raise URIError(f"{uri!r}: tls-type={kind} is not supported (only x509 certificates)")
    verify = query.get("tls-verify-peer", "true").lower()
    if verify not in _TRUE | _FALSE:
        raise URIError(f"{uri!r}: tls-verify-peer={verify} is neither true nor false")
    settings: dict[str, Any] = {"tls": True, "tls_verify_peer": verify in _TRUE}
    for key in ("tls-certificates", "tls-hostname", "tls-fingerprint"):
        value = query.get(key)
        if value is not None:
            if not value:
                raise URIError(f"{uri!r}: {key} is empty")
            settings[key.replace("-", "_")] = value
    if "tls_fingerprint" in settings:
        try:
            settings["tls_fingerprint"] = parse_fingerprint(settings["tls_fingerprint"])
        except TLSError as exc:
            raise URIError(f"{uri!r}: {exc}") from None
    return settings


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
