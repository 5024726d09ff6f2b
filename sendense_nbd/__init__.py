"""sendense-nbd: move VM disks into a backup repository over NBD.

The public API is re-exported here (imported on first use); everything else is internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sendense_nbd.errors import (
    ConnectionLostError,
    DeviceError,
    ImageError,
    LocalProtocolError,
    NBDConnectionError,
    NBDRequestError,
    NBDTimeoutError,
    ProtocolError,
    SendenseError,
    ServerError,
)
from sendense_nbd.lazy import lazy_getattr

if TYPE_CHECKING:
    from sendense_nbd.client import ConnectionPool, NBDClient, connect
    from sendense_nbd.server import Export, NBDServer
    from sendense_nbd.storage import (
        Backend,
        BlockDevice,
        CacheMode,
        CheckedDevice,
        ImageFormat,
        create_image,
        memory_device,
        open_image,
    )

_LAZY = {
    **dict.fromkeys(
        ["ConnectionPool", "NBDClient", "connect"],
        "sendense_nbd.client",
    ),
    **dict.fromkeys(["Export", "NBDServer"], "sendense_nbd.server"),
    **dict.fromkeys(
        [
            "Backend",
            "BlockDevice",
            "CacheMode",
            "CheckedDevice",
            "ImageFormat",
            "create_image",
            "memory_device",
            "open_image",
        ],
        "sendense_nbd.storage",
    ),
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BlockDevice",
    "CacheMode",
    "CheckedDevice",
    "ConnectionLostError",
    "ConnectionPool",
    "DeviceError",
    "Export",
    "ImageError",
    "ImageFormat",
    "LocalProtocolError",
    "NBDClient",
    "NBDConnectionError",
    "NBDRequestError",
    "NBDServer",
    "NBDTimeoutError",
    "ProtocolError",
    "SendenseError",
    "ServerError",
    "connect",
    "create_image",
    "memory_device",
    "open_image",
]
