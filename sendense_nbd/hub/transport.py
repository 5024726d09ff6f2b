"""How nodes reach the hub's NBD exports: plain or over TLS, at which host, and what the hub refuses.

One value, :class:`ExportTLS`, made from the hub's options, answers for the node registry (a node's
transport and ``nbd_host`` when it is added or changed), for each backup (its exports' :class:`Route`)
and for the exports themselves (:meth:`ExportTLS.peer_check`: with client certificates, an export of a
node's job admits only that node's certificate). :func:`check_exposure` refuses, before a hub opens
anything, exports that would be plain NBD on a network address without the operator saying so, and
TLS exports at a host the hub's certificate does not name (or at a wildcard address).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl

import attrs

from sendense_nbd.client.uri import uri_host
from sendense_nbd.errors import BadRequest, ConfigError, Conflict, TLSError
from sendense_nbd.http_api import is_loopback
from sendense_nbd.hub.certnames import CertificateNames, check_host
from sendense_nbd.hub.openers import BoundPeer
from sendense_nbd.server.context import AdmitPeer

log = logging.getLogger(__name__)

#: A node's NBD transport: through its SSH tunnel (plaintext NBD inside it), or NBD over TLS to the hub.
TRANSPORT_TUNNEL, TRANSPORT_TLS = "tunnel", "tls"
TRANSPORTS = (TRANSPORT_TUNNEL, TRANSPORT_TLS)

#: What an export asks of a client that picks it: (export name, its certificate) -> why refused, or None
#: (the server's ``admit_peer``).
PeerCheck = AdmitPeer


@attrs.frozen
class Route:
    """How a node reaches a job's exports: over TLS or not, at ``host``."""

    tls: bool
    host: str

    def uri(self, port: int, export: str) -> str:
        """The export's URI: ``nbds://`` with TLS (``host`` is then a name in the hub's certificate)."""
        return f"{'nbds' if self.tls else 'nbd'}://{uri_host(self.host)}:{port}/{export}"


@attrs.frozen
class ExportTLS:
    """The hub's NBD TLS: its credentials, whether every export requires TLS, its certificate's names
    (None: hosts are not checked, for a context made without them), and the host nodes dial by default
    (``--nbd-advertise``, else ``--nbd-bind``)."""

    context: ssl.SSLContext | None = None
    required: bool = False
    names: CertificateNames | None = None
    default_host: str = "127.0.0.1"
    #: The hub's option that gives ``default_host``, for sentences.
    default_option: str = "--nbd-bind"

    @property
    def verifies_clients(self) -> bool:
        """Mutual TLS: a TLS client must show a certificate signed by the deployment's CA."""
        return self.context is not None and self.context.verify_mode == ssl.CERT_REQUIRED

    def uses_tls(self, transport: str) -> bool:
        """Whether the exports of a node with this transport require TLS."""
        return self.required or transport == TRANSPORT_TLS

    def check_node(self, name: str, transport: str, nbd_host: str | None, *, pinned: bool = False) -> None:
        """Refuse (:class:`BadRequest`) a node whose exports could not work: transport ``tls`` on a hub
        without credentials, or a TLS export host that is not a name in the hub's certificate (unless
        ``pinned``: the node pins the hub's certificate by its fingerprint and checks no name)."""
        if transport == TRANSPORT_TLS and self.context is None:
            raise BadRequest(
                "transport tls needs the hub's NBD TLS credentials: start the hub with --nbd-tls-creds DIR "
                "(sendense-nbd tls init makes them), or keep the node on its tunnel"
            )
        try:
            self._check_host(name, transport, nbd_host, pinned)
        except TLSError as exc:
            raise BadRequest(str(exc)) from None

    def route(self, name: str, transport: str, nbd_host: str | None, *, pinned: bool = False) -> Route:
        """How node ``name`` reaches its backups' exports; :class:`Conflict` when they could not work:
        ``tls_unavailable`` (transport tls, no credentials), ``tls_host`` (a host the certificate does
        not name, e.g. after the hub was restarted with another certificate; not checked when ``pinned``)."""
        tls = self.uses_tls(transport)
        if tls and self.context is None:
            raise Conflict(
                f"node {name!r} has transport tls, but this hub has no NBD TLS credentials: start it with "
                f"--nbd-tls-creds DIR, or set the node's transport to tunnel",
                "tls_unavailable",
            )
        try:
            self._check_host(name, transport, nbd_host, pinned)
        except TLSError as exc:
            raise Conflict(f"{exc}; change it with sendense-nbd node edit {name} --nbd-host", "tls_host") from None
        return Route(tls, nbd_host or self.default_host)

    def restore_route(self) -> Route:
        """The route of a restore's export: TLS when the hub requires it, at the default host."""
        return Route(self.required, self.default_host)

    def peer_check(self, node: str | None, tls: bool) -> PeerCheck | None:
        """With client certificates, what binds a TLS export of node ``node``'s job to that node: a client
        whose certificate does not name it (:func:`~sendense_nbd.hub.certnames.client_names`, as ``tls init
        --node NAME`` issues them) is refused. None when there is nothing to bind (no node, no TLS, no client
        certificates)."""
        if node is None or not tls or not self.verifies_clients:
            return None
        return BoundPeer(
            node, f"serves a job of node {node!r}", f"each node uses its own certificate (tls init --node {node})"
        )

    def binds_readers(self, route: Route) -> bool:
        """Whether an export on ``route`` that serves no node's job must name its reader (TLS with client
        certificates: :meth:`reader_check`)."""
        return route.tls and self.verifies_clients

    def reader_check(self, route: Route, reader: str | None, what: str) -> PeerCheck | None:
        """What binds an export that serves no node's job (``what``: a restore's, an offsite copy's) to the
        one client certificate named ``reader`` (a node's name, as ``tls init --node NAME`` issues it).

        With client certificates (``--nbd-tls-verify-client``) on a TLS export, ``reader`` is required:
        without it the export would admit every certificate of the deployment, so any node could read any
        other's data. Without them (or on a plain export) a ``reader`` could not be enforced, and is refused
        rather than ignored. Either refusal is a :class:`BadRequest` saying what to do."""
        binds = self.binds_readers(route)
        if binds and reader is None:
            raise BadRequest(
                f"this hub checks client certificates (--nbd-tls-verify-client), so {what} admits exactly one: "
                "name it with reader, the name in the reading client's certificate (a node's registered name, "
                "as tls init --node NAME issued it)"
            )
        if not binds and reader is not None:
            raise BadRequest(
                f"reader binds {what} to a client certificate, which this hub does not check "
                f"({'no --nbd-tls-verify-client' if route.tls else 'the export is plain NBD'}): leave reader out, "
                "or start the hub with --nbd-tls require --nbd-tls-verify-client"
            )
        if reader is None:
            return None
        return BoundPeer(reader, f"is served to {reader!r} alone", f"read it with the certificate of {reader!r}")

    def _check_host(self, name: str, transport: str, nbd_host: str | None, pinned: bool) -> None:
        """The host node ``name`` dials its TLS exports at must be a name in the hub's certificate, unless the
        node pins the certificate (``pinned``: its ``[tls] fingerprint`` turns the name check off)."""
        if self.names is not None and self.uses_tls(transport) and not pinned:
            what = (
                f"the nbd_host of node {name!r}"
                if nbd_host
                else f"the NBD host of node {name!r} ({self.default_option})"
            )
            check_host(nbd_host or self.default_host, self.names, what)


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is the any-address (``0.0.0.0``, ``::``), which no node can dial."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_exposure(bind: str, tls: ExportTLS, *, allow_plain: bool, allow_any_client: bool = False) -> None:
    """Refuse (:class:`ConfigError`) exports on a network address ``bind`` that anyone reaching the port could
    read: plain NBD (unless ``allow_plain``: ``--allow-plain-nbd``), TLS without client certificates (unless
    ``allow_any_client``: ``--allow-any-tls-client``). With TLS credentials, refuse too a default export
    host nodes could not check the certificate against: a wildcard ``--nbd-bind`` without
    ``--nbd-advertise``, or a host that is not a name in the certificate."""
    network = not is_loopback(bind)
    if network and tls.context is not None and not tls.verifies_clients and not allow_any_client:
        raise ConfigError(
            f"the NBD exports would listen on {bind}, not loopback, and without --nbd-tls-verify-client their TLS "
            "admits any TLS client, which can then read and write them: add --nbd-tls-verify-client (each export "
            "then admits only its node's certificate), or say --allow-any-tls-client to serve them so anyway"
        )
    if network and not tls.required and not allow_plain:
        raise ConfigError(
            f"the NBD exports would listen on {bind}, not loopback, and without --nbd-tls require the exports "
            "of tunnel nodes and restores are plain NBD, which anyone who reaches the port can read or write: "
            "give --nbd-tls require (with --nbd-tls-creds and --nbd-tls-verify-client), or keep --nbd-bind on "
            "loopback (the SSH tunnel's way), or say --allow-plain-nbd to serve plain NBD there anyway"
        )
    if tls.context is None:
        return
    if is_wildcard(tls.default_host):
        names = "" if tls.names is None else f" (the certificate's names: {tls.names})"
        raise ConfigError(
            f"{tls.default_option} {tls.default_host} is every address, which is no host a node can dial or "
            f"check the hub's certificate against: give --nbd-advertise with a name in the certificate{names}"
        )
    if tls.names is not None:
        option = "--nbd-advertise" if tls.default_option == "--nbd-advertise" else "--nbd-bind, without --nbd-advertise"
        try:
            check_host(tls.default_host, tls.names, f"the NBD exports' host ({option})")
        except TLSError as exc:
            raise ConfigError(str(exc)) from None
