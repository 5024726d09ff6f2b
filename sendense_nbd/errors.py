"""The one exception tree of sendense-nbd.

::

    SendenseError
    ├── ProtocolError          the peer broke the NBD protocol: drop that connection
    ├── LocalProtocolError     our own code misused a protocol object (a bug)
    ├── DeviceError            a block-device operation failed; carries the NBD errno
    ├── ImageError             an image cannot be opened or created as asked
    ├── ServerError            a server cannot start (address in use, bad export set-up)
    ├── VSphereError           vCenter/ESXi refused or failed a call (login, inventory, task)
    │   └── ChangeIdError      a CBT change ID is no longer valid (a CBT reset)
    ├── DiskSourceError        nbdkit could not serve a VMware disk
    ├── HubApiError            the hub API (OMA_API_URL) failed or refused a call
    ├── BackupError            a backup job failed; names its stage
    └── TunnelError            the SSH tunnel cannot start or run (key, host key, login, option)

Foreign exceptions (``OSError``) are translated at the boundary with
``raise ... from exc`` so callers only need to catch ``SendenseError``.
"""

from __future__ import annotations


class SendenseError(Exception):
    """Base class of every error this package raises on purpose."""


class ProtocolError(SendenseError):
    """The remote peer sent something the NBD protocol forbids.

    The only safe reaction is to drop that one connection.
    """


class LocalProtocolError(SendenseError):
    """A protocol object was driven in a way its state does not allow."""


class DeviceError(SendenseError):
    """A block-device request failed; ``errno`` is what goes on the wire."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        #: An NBD errno (``sendense_nbd.protocol.Errno``), not an OS one.
        self.errno = errno


class ImageError(SendenseError):
    """An image file cannot be opened or created the way it was asked."""


class ServerError(SendenseError):
    """The server cannot start or serve as configured."""


class VSphereError(SendenseError):
    """vCenter or ESXi refused or failed a call (login, inventory lookup, a task)."""


class ChangeIdError(VSphereError):
    """A CBT change ID is no longer valid (CBT was reset): a full copy is needed."""


class DiskSourceError(SendenseError):
    """nbdkit could not start or serve a VMware disk."""


class HubApiError(SendenseError):
    """The hub API failed or refused a call; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BackupError(SendenseError):
    """A backup job failed; ``stage`` is where (e.g. ``"transferring"``)."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class TunnelError(SendenseError):
    """The SSH tunnel cannot start or run as configured (bad option, key, host key, refused login)."""
