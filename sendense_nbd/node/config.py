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
    max_jobs = 2
    connections = 4

Files holding secrets (this file when it has ``password``, the password and
token files) must not be readable by group or others.
"""

from __future__ import annotations

import os
import stat
import tomllib
from typing import Any

import attrs

from sendense_nbd.errors import SendenseError


class ConfigError(SendenseError):
    """The node configuration is missing, malformed or unsafe."""


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
    max_jobs: int = 2
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
        max_jobs=int(node.get("max_jobs", 2)),
        connections=int(node.get("connections", 4)),
    )
