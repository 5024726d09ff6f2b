"""sendense-nbd: move VM disks into a backup repository over NBD.

The public API is re-exported here; everything else is internal.
"""

from sendense_nbd.client import (
    ConnectionLostError,
    ConnectionPool,
    NBDClient,
    NBDConnectionError,
    NBDRequestError,
    NBDTimeoutError,
    connect,
)
from sendense_nbd.errors import (
    DeviceError,
    ImageError,
    LocalProtocolError,
    ProtocolError,
    SendenseError,
    ServerError,
)
from sendense_nbd.server import Export, NBDServer
from sendense_nbd.storage import (
    BlockDevice,
    CacheMode,
    ImageFormat,
    MemoryDevice,
    RawDevice,
    create_image,
    open_image,
)

__version__ = "0.1.0"

__all__ = [
    "BlockDevice",
    "CacheMode",
    "ConnectionLostError",
    "ConnectionPool",
    "DeviceError",
    "Export",
    "ImageError",
    "ImageFormat",
    "LocalProtocolError",
    "MemoryDevice",
    "NBDClient",
    "NBDConnectionError",
    "NBDRequestError",
    "NBDServer",
    "NBDTimeoutError",
    "ProtocolError",
    "RawDevice",
    "SendenseError",
    "ServerError",
    "connect",
    "create_image",
    "open_image",
]
