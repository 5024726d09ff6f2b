"""asyncio NBD client: connect to an export, read, write, query allocation.

::

    async with connect("nbd://host/disk") as nbd:
        data = await nbd.pread(offset=0, length=4096)
        await nbd.pwrite(data, offset=8192, fua=True)
        extents = await nbd.extents()  # [Extent(offset, length, status), ...]

Errors: :class:`NBDRequestError` (the server's errno), :class:`NBDTimeoutError`,
:class:`NBDConnectionError` / :class:`ConnectionLostError`,
:class:`OptionError` (the handshake was refused, e.g. an unknown export) and
:class:`URIError`; all are defined in :mod:`sendense_nbd.errors` and re-exported here.
"""

from sendense_nbd.client.connection import (
    ClientOptions,
    NBDClient,
    connect,
    export_info,
    list_exports,
    open_client,
)
from sendense_nbd.client.pool import ConnectionPool
from sendense_nbd.client.uri import NBDAddress, parse_uri
from sendense_nbd.errors import (
    ConnectionLostError,
    NBDConnectionError,
    NBDRequestError,
    NBDTimeoutError,
    OptionError,
    URIError,
)
from sendense_nbd.protocol.client import ExportDetails, Informed, ListedExport

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
