"""The SSH tunnel between a node and the hub: the hub's NBD ports on the node, the node API on the hub.

:mod:`~sendense_nbd.tunnel.client` is the node's :class:`Tunnel` (reconnecting
SSH connections carrying local and remote forwards, built on
:mod:`~sendense_nbd.tunnel.forward`); :mod:`~sendense_nbd.tunnel.server` is the
hub's embedded SSH endpoint, which allows those forwards and nothing else.
See ``docs/TUNNEL.md``. Names are imported on first use (asyncssh is heavy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sendense_nbd.errors import TunnelError
from sendense_nbd.lazy import lazy_getattr
from sendense_nbd.tunnel.config import Forward

if TYPE_CHECKING:
    from sendense_nbd.tunnel.client import LinkState, LinkStatus, Tunnel, TunnelConfig, TunnelStatus, port_forwards
    from sendense_nbd.tunnel.server import TunnelServer, TunnelServerConfig, start_tunnel_server

_LAZY = {
    "LinkState": "sendense_nbd.tunnel.client",
    "LinkStatus": "sendense_nbd.tunnel.client",
    "Tunnel": "sendense_nbd.tunnel.client",
    "TunnelConfig": "sendense_nbd.tunnel.client",
    "TunnelStatus": "sendense_nbd.tunnel.client",
    "port_forwards": "sendense_nbd.tunnel.client",
    "TunnelServer": "sendense_nbd.tunnel.server",
    "TunnelServerConfig": "sendense_nbd.tunnel.server",
    "start_tunnel_server": "sendense_nbd.tunnel.server",
}

__all__ = [
    "Forward",
    "LinkState",
    "LinkStatus",
    "Tunnel",
    "TunnelConfig",
    "TunnelError",
    "TunnelServer",
    "TunnelServerConfig",
    "TunnelStatus",
    "port_forwards",
    "start_tunnel_server",
]

__getattr__ = lazy_getattr(__name__, _LAZY)
