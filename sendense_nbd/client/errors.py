"""The client's exceptions; all are :class:`~sendense_nbd.errors.SendenseError`."""

from __future__ import annotations

from sendense_nbd.errors import SendenseError
from sendense_nbd.protocol.constants import Command, Errno

_ERRNOS = frozenset(int(e) for e in Errno)


class NBDRequestError(SendenseError):
    """A request failed: the server's error reply, or a check that would fail
    on the server too. ``errno`` is the NBD error (an unknown value counts as
    ``EINVAL``, as the spec says; ``raw_errno`` keeps what was sent)."""

    def __init__(self, errno: int, message: str = "", *, command: int | None = None, offset: int | None = None) -> None:
        self.raw_errno = errno
        self.errno = Errno(errno) if errno in _ERRNOS else Errno.EINVAL
        self.server_message = message
        self.command = command
        self.offset = offset
        what = Command(command).name if command is not None else "request"
        text = f"{what} failed: {errno_name(errno)}"
        super().__init__(f"{text}: {message}" if message else text)


def errno_name(errno: int) -> str:
    """``EIO`` for 5; unknown values are named as numbers."""
    return Errno(errno).name if errno in _ERRNOS else f"errno {errno}"


class NBDConnectionError(SendenseError, ConnectionError):
    """The connection to the server could not be made or is gone."""


class ConnectionLostError(NBDConnectionError):
    """The connection dropped (or broke the protocol) with requests in flight."""


class NBDTimeoutError(SendenseError, TimeoutError):
    """Connecting, negotiating or a request took longer than allowed."""
