"""Fuzz entry point for the sans-IO server side of the protocol.

``fuzz_one_input`` pushes arbitrary client bytes through a ServerHandshake
and, once the handshake reaches transmission, through a RequestParser and
check_request. The only exception allowed to escape the protocol objects is
``sendense_nbd.errors.ProtocolError`` (the caller would drop the
connection); anything else propagates and is a finding.

Run under atheris (not a test dependency)::

    python tests/protocol/fuzz_server.py [corpus_dir] [-max_len=4096]
"""

from __future__ import annotations

import sys

from sendense_nbd.errors import ProtocolError
from sendense_nbd.protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    Aborted,
    Disconnect,
    ExportInfo,
    Negotiated,
    Rejection,
    Request,
    RequestParser,
    ServerHandshake,
    TransmissionFlag,
    check_request,
)
from sendense_nbd.protocol.transmission import Data, Hole, error_reply, ok_reply, read_reply

_T = TransmissionFlag
_DISK = ExportInfo(
    name="disk",
    size=1 << 20,
    flags=_T.HAS_FLAGS
    | _T.SEND_FLUSH
    | _T.SEND_FUA
    | _T.SEND_TRIM
    | _T.SEND_WRITE_ZEROES
    | _T.SEND_DF
    | _T.SEND_CACHE
    | _T.SEND_FAST_ZERO,
    description="fuzz disk",
    min_block=512,
    meta_contexts=(BASE_ALLOCATION,),
)
_RO = ExportInfo(name="ro", size=12345, flags=_T.HAS_FLAGS | _T.READ_ONLY)
EXPORTS = {"disk": _DISK, "ro": _RO, "": _DISK}

#: The handshake is fed in pieces of this size too, to exercise partial reads.
_SPLIT = 7


class _Alternate:
    """An admission callback refusing every other client, as a full server does."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, name: str) -> str | None:
        assert name in ("disk", "ro"), name
        self.calls += 1
        return "server is full" if self.calls % 2 else None


def _run(data: bytes, piece: int, *, admit: _Alternate | None = None) -> None:
    handshake = ServerHandshake(EXPORTS, admit=admit)
    out = handshake.data_to_send()
    assert out.startswith(b"NBDMAGICIHAVEOPT")
    pos = 0
    negotiated: Negotiated | None = None
    try:
        while pos < len(data) and not handshake.finished:
            handshake.receive_data(data[pos : pos + piece])
            pos += piece
            assert isinstance(handshake.data_to_send(), bytes)
            while (event := handshake.next_event()) is not NEED_DATA:
                assert isinstance(event, (Negotiated, Aborted)), event
                assert handshake.finished
                if isinstance(event, Negotiated):
                    negotiated = event
    except ProtocolError:
        return
    if negotiated is None:
        return
    trailing = handshake.trailing_data() + data[pos:]

    export = negotiated.export
    assert export.name in ("disk", "ro")
    if not negotiated.structured_replies:
        assert not export.flags & _T.SEND_DF
        assert negotiated.meta_contexts == ()

    parser = RequestParser()
    try:
        parser.receive_data(trailing)
    except ProtocolError:
        pass
    while (event := parser.next_event()) is not NEED_DATA:
        if isinstance(event, Disconnect):
            continue
        assert isinstance(event, Request), event
        if event.payload is not None:
            assert len(event.payload) == event.length
        rejection = check_request(event, negotiated)
        structured = negotiated.structured_replies
        if rejection is not None:
            assert isinstance(rejection, Rejection)
            error_reply(event.handle, rejection.errno, rejection.message, structured)
            continue
        # An accepted ranged request lies inside the export (FLUSH's range is reserved).
        if event.command != 3:
            assert event.offset + event.length <= export.size
        if event.command == 0 and event.length:
            half = event.length // 2
            segments: list[Data | Hole] = []
            if half:
                segments.append(Data(event.offset, bytes(half)))
            segments.append(Hole(event.offset + half, event.length - half))
            read_reply(event.handle, segments, structured)
        else:
            ok_reply(event.handle, structured)


def fuzz_one_input(data: bytes) -> None:
    """Feed ``data`` as a client's byte stream; only ProtocolError may escape the protocol code."""
    _run(data, max(len(data), 1))
    _run(data, _SPLIT, admit=_Alternate())


if __name__ == "__main__":
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("atheris is not installed (pip install atheris); the tests run this harness through hypothesis")

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()
