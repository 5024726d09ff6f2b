"""The node's configuration file (TOML): vCenter credentials stay here, never on the API.

::

    [vcenter]
    endpoint = "vcenter.example:443"
    username = "backup@vsphere.local"
    password_file = "/etc/sendense/vcenter.password"   # or password = "..." in this file
    thumbprint = "AB:CD:..."                           # pin vCenter's certificate (else verify it)
    # ca_file = "/etc/ssl/vcenter-ca.pem"

    [vddk]                                             # all optional
    libdir = "/opt/vmware-vix-disklib-distrib"
    transports = "nbdssl:nbd"
    compression = "zlib"
    # thumbprint, nbdkit = "nbdkit", plugin = "vddk", options = {config = "/etc/vddk.conf"}

    [node]                                             # all optional
    listen = "127.0.0.1:8081"
    token_file = "/etc/sendense/node.token"            # the hub's bearer token
    hub_token_file = "/etc/sendense/hub.token"         # our token at the hub API
    hub_url = "http://127.0.0.1:8082"                  # pin the hub: jobs' api_url and targets' host
    # hub_url = ["http://127.0.0.2:8082", "http://127.0.0.5:8083"]   # or pin several: each job's own
    # nbd_host = "10.0.0.2"                            # the targets' host when it is not hub_url's (one hub)
    # nbd_host = {"http://127.0.0.2:8082" = "10.0.0.2"}  # or by hub (several); the others use hub_url's host
    max_jobs = 2                                       # jobs running at once
    max_queued = 16                                    # jobs waiting; more are refused (503 busy)
    connections = 4                                    # NBD connections per disk and side
    requests = 16                                      # requests in flight per connection (x 256 KiB)
    merge_gap = 0                                      # bytes; 1048576 on a LAN (docs/BACKUP_CLIENT.md)
    checkpoint = 67108864                              # bytes copied between FLUSHes (at most re-sent after a drop)

    [tls]                                              # optional: NBD over TLS, the hub API over HTTPS
    creds = "/etc/sendense/tls"                        # tls init's nodes/NAME: ca-cert.pem, client-*.pem
    fingerprint = "sha256:..."                         # or pin the hub's certificate instead of its CA

``[tls]`` serves the ``nbds://`` targets that do not name their own credentials (the hub cannot know
the node's paths) and an ``https://`` ``hub_url``: the hub's certificate is checked against ``creds``'s
``ca-cert.pem`` (or the pin), and ``client-cert.pem``/``client-key.pem`` are presented to a hub that
verifies clients (mutual TLS). The credentials are loaded at start, so unusable ones stop the node.

Unknown sections and keys are refused: the :class:`ConfigError` names the key
and its section. Files holding secrets (this file when it has ``password``, the
password and token files) must not be readable by group or others.
"""

from __future__ import annotations

import os
import ssl
import stat
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from sendense_nbd.backup.prepare import VddkSettings
from sendense_nbd.client.uri import normal_host, split_host
from sendense_nbd.errors import ConfigError, TLSError, URIError
from sendense_nbd.http_api import is_loopback

#: The keys each section may hold; any other key, or section, is refused.
SECTIONS: dict[str, frozenset[str]] = {
    "vcenter": frozenset({"endpoint", "username", "password", "password_file", "thumbprint", "ca_file"}),
    "vddk": frozenset(attrs.fields_dict(VddkSettings)),
    "node": frozenset(
        {"listen", "token_file", "hub_token_file", "hub_url", "nbd_host", "max_jobs", "max_queued"}
        | {"connections", "requests", "merge_gap", "checkpoint"}
    ),
    "tls": frozenset({"creds", "fingerprint"}),
}


@attrs.frozen
class NodeConfig:
    """The node's settings, read by :func:`load`; secrets are left out of its repr."""

    endpoint: str
    username: str
    password: str = attrs.field(repr=False)
    thumbprint: str | None = None
    ca_file: str | None = None
    vddk: VddkSettings = VddkSettings()
    listen: str = "127.0.0.1:8081"
    token: str | None = attrs.field(default=None, repr=False)
    hub_token: str | None = attrs.field(default=None, repr=False)
    #: ``[node] hub_url``: the hubs jobs may report to (empty: any); a job's targets must be on its hub's host.
    hub_urls: tuple[str, ...] = ()
    #: ``[node] nbd_host``: by pinned hub (its URL without a trailing ``/``), the host its jobs' targets must
    #: be on when it is not the hub URL's (the hub registered this node with that ``nbd_host``).
    nbd_hosts: Mapping[str, str] = attrs.field(factory=dict)
    max_jobs: int = 2
    max_queued: int = 16
    connections: int = 4
    #: Requests in flight per connection: with ``connections`` and the 256 KiB request size, the bytes in
    #: flight per disk, which must cover the link's bandwidth-delay product (docs/TUNNEL.md, "Sizing").
    requests: int = 16
    #: Changed areas closer than this are copied as one (:attr:`~sendense_nbd.backup.BackupSpec.merge_gap`).
    merge_gap: int = 0
    #: Data bytes between the copy's checkpoint FLUSHes (:attr:`~sendense_nbd.backup.BackupSpec.checkpoint_bytes`).
    checkpoint: int = 64 << 20
    #: ``[tls] creds``: a client credentials directory in qemu's layout.
    tls_creds: str | None = None
    #: ``[tls] fingerprint``: the hub's certificate pin (``sha256:HEX``).
    tls_fingerprint: str | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS client context of ``[tls]`` (None without the section): the hub API's over HTTPS.

        With ``fingerprint`` the context checks no certificate itself: whoever uses it passes
        :attr:`tls_fingerprint` with it (the hub API's ``tls_fingerprint``; NBD's
        ``ClientOptions.tls_fingerprint``, which a pinned context without its pin is refused for).
        """
        from sendense_nbd.tls import client_context

        if self.tls_creds is None and self.tls_fingerprint is None:
            return None
        return client_context(self.tls_creds, fingerprint=self.tls_fingerprint)


def check_private(path: str) -> None:
    """Refuse a secret file that group or others can read or write."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} holds a secret but its mode is {stat.filemode(mode)}: chmod 600 {path}")


def _secret_file(path: str) -> str:
    check_private(path)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _token_file(path: str) -> str:
    """A bearer token; an empty one would turn auth off, so it is refused."""
    from sendense_nbd.http_api import check_token

    token = _secret_file(path)
    if not check_token(token):
        raise ConfigError(f"{path}: a token is non-empty visible ASCII without spaces")
    return token


def load(path: str) -> NodeConfig:
    """Read and check the node's TOML file; :class:`ConfigError` names the file, section and key at fault."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    vcenter, vddk, node, tls = (_section(path, data, name) for name in ("vcenter", "vddk", "node", "tls"))
    for key in ("endpoint", "username"):
        if not isinstance(vcenter.get(key), str):
            raise ConfigError(f"{path}: [vcenter] {key} is required")
    config = NodeConfig(
        endpoint=vcenter["endpoint"],
        username=vcenter["username"],
        password=_password(path, vcenter),
        thumbprint=_text(path, "vcenter", vcenter, "thumbprint"),
        ca_file=_text(path, "vcenter", vcenter, "ca_file"),
        vddk=_vddk(path, vddk),
        listen=str(node.get("listen", "127.0.0.1:8081")),
        token=_token(path, node, "token_file"),
        hub_token=_token(path, node, "hub_token_file"),
        hub_urls=(hub_urls := _hub_urls(path, node.get("hub_url"))),
        nbd_hosts=_nbd_hosts(path, node.get("nbd_host"), hub_urls),
        max_jobs=_count(path, node, "max_jobs", 2, 64),
        max_queued=_count(path, node, "max_queued", 16, 10000),
        connections=_count(path, node, "connections", 4, 64),
        requests=_count(path, node, "requests", 16, 256),
        merge_gap=_bytes(path, node, "merge_gap", 0, 1 << 30),
        checkpoint=_bytes(path, node, "checkpoint", 64 << 20, 1 << 40, low=1 << 20),
        **_tls(path, tls),
    )
    _check_hub_link(path, config)
    return config


def _check_hub_link(path: str, config: NodeConfig) -> None:
    """``[tls]`` needs at least one pinned hub, and a TLS node reports to each hub over HTTPS unless the hub's
    API is on this machine (the tunnel's ``127.0.0.1``): its hub token and change IDs would otherwise cross the
    network in clear."""
    if config.tls_creds is None and config.tls_fingerprint is None:
        return
    if not config.hub_urls:
        raise ConfigError(
            f"{path}: [tls] needs [node] hub_url: without it a job could name any hub, and the hub token "
            "would go wherever it says"
        )
    for url in config.hub_urls:
        host = hub_host(url)
        if urlsplit(url).scheme == "http" and not is_loopback(host):
            raise ConfigError(
                f"{path}: [tls] with an http:// [node] hub_url on {host}, not loopback, would send the hub token "
                "and the jobs' change IDs in clear: use https:// (the hub's --api-tls-creds), or reach the API "
                "through the SSH tunnel at 127.0.0.1"
            )


def _tls(path: str, section: dict[str, Any]) -> dict[str, str | None]:
    """``[tls]``: ``creds`` (a directory) and ``fingerprint`` (a pin), each checked by loading them now."""
    from sendense_nbd.tls import client_context, parse_fingerprint

    creds, pin = _text(path, "tls", section, "creds"), _text(path, "tls", section, "fingerprint")
    if "creds" in section and not creds:
        raise ConfigError(f"{path}: [tls] creds must name a directory (ca-cert.pem, client-cert.pem, client-key.pem)")
    try:
        pin = None if pin is None else parse_fingerprint(pin)
        if creds is not None or pin is not None:
            client_context(creds, fingerprint=pin)
    except TLSError as exc:
        raise ConfigError(f"{path}: [tls] {exc}") from None
    return {"tls_creds": creds, "tls_fingerprint": pin}


def _section(path: str, data: dict[str, Any], name: str) -> dict[str, Any]:
    """Section ``name`` (empty when absent); a key it may not hold is refused, by name."""
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    for key in section:
        if key not in SECTIONS[name]:
            known = ", ".join(sorted(SECTIONS[name]))
            raise ConfigError(f"{path}: unknown key {key!r} in [{name}] (known keys: {known})")
    return section


def _password(path: str, vcenter: dict[str, Any]) -> str:
    if "password" in vcenter:
        check_private(path)
        return str(vcenter["password"])
    if isinstance(vcenter.get("password_file"), str):
        return _secret_file(vcenter["password_file"])
    raise ConfigError(f"{path}: [vcenter] needs password_file (or password, in a 0600 file)")


def _text(path: str, name: str, section: dict[str, Any], key: str) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}: [{name}] {key} must be a string")
    return value


def _token(path: str, node: dict[str, Any], key: str) -> str | None:
    """The token in the file ``[node] key`` names, if it names one."""
    token_file = _text(path, "node", node, key)
    return _token_file(token_file) if token_file else None


def _vddk(path: str, section: dict[str, Any]) -> VddkSettings:
    """``[vddk]``: strings, and ``options``, a table of more vddk parameters."""
    options = section.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f'{path}: [vddk] options must be a table, e.g. options = {{config = "/etc/vddk.conf"}}')
    texts = {key: _text(path, "vddk", section, key) for key in section if key != "options"}
    given = {key: value for key, value in texts.items() if value is not None}
    try:
        return VddkSettings(**given, options=tuple((str(k), str(v)) for k, v in options.items()))
    except ValueError as exc:
        raise ConfigError(f"{path}: [vddk] {exc}") from None


def _count(path: str, section: dict[str, Any], key: str, default: int, high: int) -> int:
    value = section.get(key, default)
    if type(value) is not int or not 1 <= value <= high:
        raise ConfigError(f"{path}: [node] {key} must be an integer from 1 to {high}")
    return value


def _bytes(path: str, section: dict[str, Any], key: str, default: int, high: int, *, low: int = 0) -> int:
    value = section.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(f"{path}: [node] {key} must be a number of bytes from {low} to {high}")
    return value


def _nbd_hosts(path: str, value: object, hub_urls: tuple[str, ...]) -> dict[str, str]:
    """``[node] nbd_host``: one host for the one pinned hub, or a table of hosts by pinned hub URL; by hub URL
    (without a trailing ``/``)."""
    if value is None:
        return {}
    if isinstance(value, str):
        if len(hub_urls) != 1:
            pinned = "hub_url" if not hub_urls else f"hub_url to pin one hub, not {len(hub_urls)}"
            raise ConfigError(
                f"{path}: [node] nbd_host = HOST needs {pinned}: it names the targets' host of the one pinned hub; "
                'with several, give a table by hub: nbd_host = {"http://hub-a:8082" = "10.0.0.2"}'
            )
        return {hub_urls[0].rstrip("/"): _nbd_host(path, value, "[node] nbd_host")}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{path}: [node] nbd_host must be a host name or an IP address without a port, e.g. 10.0.0.2, "
            'or a table of them by hub_url, e.g. {"http://hub-a:8082" = "10.0.0.2"}'
        )
    hubs = {url.rstrip("/") for url in hub_urls}
    hosts = {}
    for url, host in value.items():
        if url.rstrip("/") not in hubs:
            raise ConfigError(f"{path}: [node] nbd_host names {url!r}, which is not one of [node] hub_url")
        if url.rstrip("/") in hosts:
            raise ConfigError(f"{path}: [node] nbd_host names {url!r} twice")
        hosts[url.rstrip("/")] = _nbd_host(path, host, f"[node] nbd_host[{url!r}]")
    return hosts


def _nbd_host(path: str, value: object, name: str) -> str:
    """A host name or an IP address (an IPv6 one may have a zone id, ``fe80::1%eth0``), without a port, in the
    normal form the targets' hosts are compared in (:func:`~sendense_nbd.client.uri.normal_host`)."""
    if isinstance(value, str):
        try:
            return normal_host(value, name)
        except URIError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    raise ConfigError(f"{path}: {name} must be a host name or an IP address without a port, e.g. 10.0.0.2")


#: The most hubs ``[node] hub_url`` may pin.
MAX_HUBS = 64


def _hub_urls(path: str, value: object) -> tuple[str, ...]:
    """``[node] hub_url``: one URL, or a list of 1 to :data:`MAX_HUBS` different ones (a trailing ``/`` makes
    no difference); empty when absent."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (_hub_url(path, value, "[node] hub_url"),)
    if not isinstance(value, list):
        raise ConfigError(
            f'{path}: [node] hub_url must be an http:// or https:// URL or a list of them, e.g. "http://127.0.0.1:8082"'
        )
    if not 0 < len(value) <= MAX_HUBS:
        raise ConfigError(
            f"{path}: [node] hub_url lists {len(value)} URLs; give 1 to {MAX_HUBS} (leave it out to accept any hub)"
        )
    urls = tuple(_hub_url(path, item, f"[node] hub_url[{index}]") for index, item in enumerate(value))
    seen: dict[str, int] = {}
    for index, url in enumerate(urls):
        first = seen.setdefault(url.rstrip("/"), index)
        if first != index:
            raise ConfigError(f"{path}: [node] hub_url[{index}] repeats hub_url[{first}]: list each hub once")
    return urls


def _hub_url(path: str, value: object, name: str) -> str:
    """One hub's API URL: http:// or https:// with a host in normal form (:func:`hub_host`)."""
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # an unclosed [ of an IPv6 address
        parts = None
    if not isinstance(value, str) or parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: {name} must be an http:// or https:// URL, e.g. http://127.0.0.1:8082")
    try:
        hub_host(value, name)
    except URIError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return value


def hub_host(hub_url: str, name: str = "[node] hub_url") -> str:
    """The host of a pinned hub's URL in normal form (:func:`~sendense_nbd.client.uri.normal_host`);
    :class:`URIError`, naming the setting ``name``, when it is none."""
    return normal_host(split_host(urlsplit(hub_url)) or "", f"the host of {name}")
