"""The asyncio NBD server: exports, connections, lifecycle."""

from sendense_nbd.server.export import Export
from sendense_nbd.server.listen import systemd_sockets, tcp_socket, unix_socket
from sendense_nbd.server.server import NBDServer

__all__ = ["Export", "NBDServer", "systemd_sockets", "tcp_socket", "unix_socket"]
