"""The plumbing both handshake roles share: bytes in, events and bytes out."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import attrs

from sendense_nbd.errors import LocalProtocolError

E = TypeVar("E")


@attrs.frozen(slots=True)
class NeedData:
    """More bytes are needed before anything else can happen."""


NEED_DATA = NeedData()


@attrs.frozen(slots=True)
class StartTLS:
    """``NBD_OPT_STARTTLS`` was acknowledged: upgrade the stream to TLS now.

    The IO layer writes :meth:`SansIOMachine.data_to_send` first, then runs
    the TLS handshake and calls the machine's ``tls_started()``. Until then
    the machine takes no bytes: plaintext at this point is an injection.
    """


class SansIOMachine(Generic[E]):
    """Buffers for a sans-IO state machine; subclasses parse ``_buffer``,
    append replies to ``_out`` and events to ``_events``."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._out = bytearray()
        self._events: deque[E] = deque()

    @property
    def finished(self) -> bool:
        raise NotImplementedError

    def next_event(self) -> E | NeedData:
        """The next event, or :data:`NEED_DATA`."""
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended: they belong to transmission."""
        if not self.finished:
            raise LocalProtocolError("handshake has not finished")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data
