"""asyncio NBD client: connect to an export, read, write, query allocation.

::

    async with connect("nbd://host/disk") as nbd:
        data = await nbd.pread(4096, 0)
        await nbd.pwrite(data, 8192, fua=True)
        extents = await nbd.block_status(nbd.size, 0)

Errors: :class:`NBDRequestError` (the server's errno), :class:`NBDTimeoutError`,
:class:`NBDConnectionError` / :class:`ConnectionLostError`,
:class:`~sendense_nbd.protocol.client.OptionError` (the handshake was refused,
e.g. an unknown export) and :class:`URIError`; all are ``SendenseError``.
"""

from sendense_nbd.client.connection import (
    ClientOptions,
    NBDClient,
    connect,
    export_info,
    list_exports,
    open_client,
)
from sendense_nbd.client.errors import ConnectionLostError, NBDConnectionError, NBDRequestError, NBDTimeoutError
from sendense_nbd.client.pool import ConnectionPool
from sendense_nbd.client.uri import NBDAddress, URIError, parse_uri
from sendense_nbd.protocol.client import ExportDetails, Informed, ListedExport, OptionError

__all__ = [
    "ClientOptions",
    "ConnectionLostError",
    "ConnectionPool",
    "ExportDetails",
    "Informed",
    "ListedExport",
    "NBDAddress",
    "NBDClient",
    "NBDConnectionError",
    "NBDRequestError",
    "NBDTimeoutError",
    "OptionError",
    "URIError",
    "connect",
    "export_info",
    "list_exports",
    "open_client",
    "parse_uri",
]
