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
    max_jobs = 2                                       # jobs running at once
    max_queued = 16                                    # jobs waiting; more are refused (503 busy)
    connections = 4

Files holding secrets (this file when it has ``password``, the password and
token files) must not be readable by group or others.
"""

from __future__ import annotations

import os
import stat
import tomllib
from typing import Any
from urllib.parse import urlsplit

import attrs

from sendense_nbd.errors import ConfigError


@attrs.frozen
class NodeConfig:
    endpoint: str
    username: str
    password: str = attrs.field(repr=False)
    thumbprint: str | None = None
    ca_file: str | None = None
    vddk: dict[str, Any] = attrs.Factory(dict)
    listen: str = "127.0.0.1:8081"
    token: str | None = attrs.field(default=None, repr=False)
    hub_token: str | None = attrs.field(default=None, repr=False)
    #: When set, the only hub jobs may report to, and the host every target must be on.
    hub_url: str | None = None
    max_jobs: int = 2
    max_queued: int = 16
    connections: int = 4


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
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    vcenter, vddk, node = data.get("vcenter", {}), data.get("vddk", {}), data.get("node", {})
    unknown = set(data) - {"vcenter", "vddk", "node"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    for key in ("endpoint", "username"):
        if not isinstance(vcenter.get(key), str):
            raise ConfigError(f"{path}: [vcenter] {key} is required")
    if "password" in vcenter:
        check_private(path)
        password = str(vcenter["password"])
    elif isinstance(vcenter.get("password_file"), str):
        password = _secret_file(vcenter["password_file"])
    else:
        raise ConfigError(f"{path}: [vcenter] needs password_file (or password, in a 0600 file)")
    return NodeConfig(
        endpoint=vcenter["endpoint"],
        username=vcenter["username"],
        password=password,
        thumbprint=vcenter.get("thumbprint"),
        ca_file=vcenter.get("ca_file"),
        vddk=dict(vddk),
        listen=str(node.get("listen", "127.0.0.1:8081")),
        token=_token_file(node["token_file"]) if node.get("token_file") else None,
        hub_token=_token_file(node["hub_token_file"]) if node.get("hub_token_file") else None,
        hub_url=_hub_url(path, node.get("hub_url")),
        max_jobs=_count(path, node, "max_jobs", 2, 64),
        max_queued=_count(path, node, "max_queued", 16, 10000),
        connections=_count(path, node, "connections", 4, 64),
    )


def _count(path: str, section: dict[str, Any], key: str, default: int, high: int) -> int:
    value = section.get(key, default)
    if type(value) is not int or not 1 <= value <= high:
        raise ConfigError(f"{path}: [node] {key} must be an integer from 1 to {high}")
    return value


def _hub_url(path: str, value: object) -> str | None:
    if value is None:
        return None
    parts = urlsplit(str(value))
    if not isinstance(value, str) or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: [node] hub_url must be an http:// or https:// URL, e.g. http://127.0.0.1:8082")
    return value
