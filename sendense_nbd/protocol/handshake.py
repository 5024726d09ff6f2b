"""Server side of the fixed-newstyle handshake, as a sans-IO state machine.

Theory of operation (doc/proto.md, "Handshake" and "Option types"):

1. On construction the greeting (NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE |
   NO_ZEROES) is queued in :meth:`ServerHandshake.data_to_send`.
2. The client answers with 32 bits of flags. Unknown bits are a protocol
   violation: the spec says the server MUST close the connection.
3. Then options arrive, each ``IHAVEOPT, option, length, data``. Each one is
   answered with one or more option replies. Options longer than
   :data:`MAX_OPTION_LENGTH` are drained without buffering and answered
   ``NBD_REP_ERR_TOO_BIG``, so the stream stays in sync; absurd lengths
   (over 32 MiB) end the connection, as the spec permits for a denial of
   service.
4. ``NBD_OPT_STARTTLS`` (doc/proto.md, "TLS support"), when ``tls`` is
   not OFF: the ACK is queued and a :class:`StartTLS` event tells the IO
   layer to run the TLS handshake and then call
   :meth:`ServerHandshake.tls_started`. Bytes the client pipelined after
   STARTTLS are plaintext injected before TLS: the connection is closed.
   With ``TLSMode.REQUIRE`` every option but STARTTLS and ABORT is answered
   ``NBD_REP_ERR_TLS_REQD`` until then (``NBD_OPT_EXPORT_NAME``, which
   cannot carry an error, closes). Nothing negotiated before TLS
   (structured replies, meta contexts) survives the upgrade.
5. ``NBD_OPT_GO`` answered with ``NBD_REP_ACK``, or ``NBD_OPT_EXPORT_NAME``,
   ends the handshake with a :class:`Negotiated` event. Any bytes the
   client pipelined past that point are in :meth:`trailing_data` and belong
   to the transmission phase.

The caller feeds bytes with :meth:`receive_data`, pulls events with
:meth:`next_event` and writes whatever :meth:`data_to_send` returns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

import attrs

from sendense_nbd.errors import LocalProtocolError, ProtocolError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    MAX_PAYLOAD,
    MAX_STRING,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TLSMode,
    TransmissionFlag,
)
from sendense_nbd.protocol.sansio import NeedData, SansIOMachine, StartTLS

#: Longest option payload the server buffers and parses.
MAX_OPTION_LENGTH = 64 * 1024


@attrs.frozen(slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int = attrs.field(validator=attrs.validators.ge(0))
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    #: Meta contexts this export offers; context ids are position + 1.
    meta_contexts: tuple[str, ...] = ()


@attrs.frozen(slots=True)
class Negotiated:
    """The handshake finished; transmission starts with these settings."""

    export: ExportInfo
    structured_replies: bool
    #: Selected meta contexts as ``(context id, name)``.
    meta_contexts: tuple[tuple[int, str], ...]


@attrs.frozen(slots=True)
class Aborted:
    """The client ended the handshake with ``NBD_OPT_ABORT``."""


HandshakeEvent = NeedData | Negotiated | Aborted | StartTLS


class _State(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTION_HEADER = enum.auto()
    OPTION_DATA = enum.auto()
    DRAIN_OPTION = enum.auto()
    TLS_PENDING = enum.auto()
    DONE = enum.auto()


class _OptionRefused(Exception):
    def __init__(self, reply: OptionReply, message: str) -> None:
        super().__init__(message)
        self.reply = reply


_KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
_OPTION_CODES = frozenset(int(o) for o in Option)


class ServerHandshake(SansIOMachine[Negotiated | Aborted | StartTLS]):
    """Drives one client through option haggling.

    ``exports`` maps export names to what may be told about them; the empty
    name is the default export. When ``refuse`` is a message, every option
    is refused with ``NBD_REP_ERR_POLICY`` and that message. ``admit`` is
    asked, with the export's name, at the moment a client picks an export
    (``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME``): None lets it in, a message
    refuses that option with ``NBD_REP_ERR_POLICY`` (``EXPORT_NAME`` cannot
    carry an error, so it hangs up). That is how a server over its client
    limit turns a client away cleanly. ``tls`` is the STARTTLS policy (see
    the module docstring).
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        refuse: str | None = None,
        admit: Callable[[str], str | None] | None = None,
        tls: TLSMode = TLSMode.OFF,
    ) -> None:
        super().__init__()
        self._exports = exports
        self._refuse = refuse
        self._admit = admit
        self._tls = tls
        self._tls_active = False
        self._state = _State.CLIENT_FLAGS
        self._out += wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        self._client_flags = ClientFlag(0)
        self._option = 0
        self._option_length = 0
        self._structured = False
        self._meta_export: str | None = None
        self._meta: tuple[tuple[int, str], ...] = ()

    # -- the sans-IO surface ------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client."""
        if self._state is _State.DONE:
            raise LocalProtocolError("handshake already finished")
        if self._state is _State.TLS_PENDING and data:
            raise ProtocolError("plaintext data after NBD_OPT_STARTTLS, before the TLS handshake")
        self._buffer += data
        self._process()

    def tls_started(self) -> None:
        """The TLS handshake that :class:`StartTLS` asked for succeeded: read options again.

        Option state from before TLS is forgotten, as if the client had just connected.
        """
        if self._state is not _State.TLS_PENDING:
            raise LocalProtocolError("no NBD_OPT_STARTTLS is waiting for TLS")
        self._tls_active = True
        self._structured = False
        self._meta_export, self._meta = None, ()
        self._state = _State.OPTION_HEADER

    @property
    def tls_active(self) -> bool:
        """The connection was upgraded to TLS."""
        return self._tls_active

    @property
    def finished(self) -> bool:
        return self._state is _State.DONE

    @property
    def wanted(self) -> int:
        """How many more bytes the current state needs (a read-size hint)."""
        need = {
            _State.CLIENT_FLAGS: wire.CLIENT_FLAGS.size,
            _State.OPTION_HEADER: wire.OPTION_HEADER.size,
            _State.OPTION_DATA: self._option_length,
            _State.DRAIN_OPTION: self._option_length,
        }.get(self._state, 0)
        return max(need - len(self._buffer), 1)

    # -- state machine -------------------------------------------------------

    def _process(self) -> None:
        while self._state not in (_State.DONE, _State.TLS_PENDING):
            if self._state is _State.CLIENT_FLAGS:
                if not self._take_client_flags():
                    return
            elif self._state is _State.OPTION_HEADER:
                if not self._take_option_header():
                    return
            elif self._state is _State.DRAIN_OPTION:
                take = min(self._option_length, len(self._buffer))
                del self._buffer[:take]
                self._option_length -= take
                if self._option_length:
                    return
                self._state = _State.OPTION_HEADER
                if self._option == Option.ABORT:
                    self._handle_option(Option.ABORT, b"")
                elif self._option == Option.STARTTLS:  # exempt from TLS_REQD; data makes it invalid
                    self._reply(self._option, OptionReply.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
                elif self._tls_required:
                    self._reply(self._option, OptionReply.ERR_TLS_REQD, _TLS_REQUIRED)
                else:
                    self._reply(self._option, OptionReply.ERR_TOO_BIG, b"option data too long")
            elif self._state is _State.OPTION_DATA:
                if len(self._buffer) < self._option_length:
                    return
                data = bytes(self._buffer[: self._option_length])
                del self._buffer[: self._option_length]
                self._state = _State.OPTION_HEADER
                self._handle_option(self._option, data)

    def _take_client_flags(self) -> bool:
        size = wire.CLIENT_FLAGS.size
        if len(self._buffer) < size:
            return False
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._buffer)
        del self._buffer[:size]
        if flags & ~int(_KNOWN_CLIENT_FLAGS):
            raise ProtocolError(f"unknown client flags {flags:#x}")
        self._client_flags = ClientFlag(flags)
        self._state = _State.OPTION_HEADER
        return True

    def _take_option_header(self) -> bool:
        size = wire.OPTION_HEADER.size
        if len(self._buffer) < size:
            return False
        option, length = wire.decode_option_header(self._buffer[:size])
        del self._buffer[:size]
        fixed = bool(self._client_flags & ClientFlag.FIXED_NEWSTYLE)
        if not fixed and option != Option.EXPORT_NAME:
            raise ProtocolError(f"option {option} from a non-fixed-newstyle client")
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"option {option} length {length} is a denial of service")
        self._option, self._option_length = option, length
        if length > MAX_OPTION_LENGTH and option != Option.EXPORT_NAME:
            self._state = _State.DRAIN_OPTION
        elif length > MAX_STRING and option == Option.EXPORT_NAME:
            raise ProtocolError("NBD_OPT_EXPORT_NAME name is longer than 4096 bytes")
        else:
            self._state = _State.OPTION_DATA
        return True

    # -- options -------------------------------------------------------------

    @property
    def _tls_required(self) -> bool:
        return self._tls is TLSMode.REQUIRE and not self._tls_active

    def _handle_option(self, option: int, data: bytes) -> None:
        if option == Option.EXPORT_NAME:
            if self._tls_required:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS")
            self._export_name(data)
            return
        if option == Option.ABORT:
            self._reply(option, OptionReply.ACK)
            self._finish(Aborted())
            return
        try:
            if self._refuse is not None:
                raise _OptionRefused(OptionReply.ERR_POLICY, self._refuse)
            if self._tls_required and option != Option.STARTTLS:
                raise _OptionRefused(OptionReply.ERR_TLS_REQD, _TLS_REQUIRED.decode())
            handler = self._HANDLERS.get(Option(option)) if option in _OPTION_CODES else None
            if handler is None:
                raise _OptionRefused(OptionReply.ERR_UNSUP, f"option {option} is not supported")
            handler(self, option, data)
        except _OptionRefused as refused:
            self._reply(option, refused.reply, wire.encode_text(str(refused)))

    def _export_name(self, data: bytes) -> None:
        if self._refuse is not None:
            raise ProtocolError(f"refused: {self._refuse}")
        try:
            name = _decode_name(data)
        except _OptionRefused:
            raise ProtocolError("NBD_OPT_EXPORT_NAME name is not UTF-8") from None
        export = self._exports.get(name)
        if export is None:
            # No way to report an error to NBD_OPT_EXPORT_NAME: hang up.
            raise ProtocolError(f"unknown export {data[:64]!r}")
        refusal = self._admit(export.name) if self._admit is not None else None
        if refusal is not None:
            raise ProtocolError(f"refused: {refusal}")
        flags = self._flags(export)
        reply = wire.EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self._client_flags & ClientFlag.NO_ZEROES:
            reply += bytes(wire.EXPORT_NAME_PADDING)
        self._out += reply
        self._finish(self._negotiated(export))

    def _list(self, option: int, data: bytes) -> None:
        if data:
            raise _OptionRefused(OptionReply.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name, export in self._exports.items():
            if name == "" and export.name != "":
                continue  # the default alias; the real name is listed too
            self._reply(option, OptionReply.SERVER, wire.encode_string(export.name) + export.description.encode())
        self._reply(option, OptionReply.ACK)

    def _starttls(self, option: int, data: bytes) -> None:
        if data:
            raise _OptionRefused(OptionReply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self._tls is TLSMode.OFF:
            raise _OptionRefused(OptionReply.ERR_POLICY, "TLS is not configured on this server")
        if self._tls_active:
            raise _OptionRefused(OptionReply.ERR_INVALID, "TLS is already on")
        if self._buffer:
            # Bytes sent before the TLS handshake would be taken as if they came over TLS.
            raise ProtocolError("data pipelined after NBD_OPT_STARTTLS (plaintext injection)")
        self._reply(option, OptionReply.ACK)
        self._state = _State.TLS_PENDING
        self._events.append(StartTLS())

    def _structured_reply(self, option: int, data: bytes) -> None:
        if data:
            raise _OptionRefused(OptionReply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self._structured:
            raise _OptionRefused(OptionReply.ERR_INVALID, "structured replies already negotiated")
        self._structured = True
        self._reply(option, OptionReply.ACK)

    def _info_or_go(self, option: int, data: bytes) -> None:
        reader = _Reader(data)
        name = reader.string()
        count = reader.u16()
        requests = {reader.u16() for _ in range(count)}
        reader.end()
        export = self._exports.get(name)
        if export is None:
            raise _OptionRefused(OptionReply.ERR_UNKNOWN, f"export {name[:256]!r} not found")
        if option == Option.GO and self._admit is not None:
            refusal = self._admit(export.name)
            if refusal is not None:
                raise _OptionRefused(OptionReply.ERR_POLICY, refusal)
        flags = self._flags(export)
        self._reply(option, OptionReply.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._reply(option, OptionReply.INFO, wire.U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._reply(option, OptionReply.INFO, wire.U16.pack(Info.DESCRIPTION) + export.description.encode())
        self._reply(
            option,
            OptionReply.INFO,
            wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block),
        )
        self._reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._finish(self._negotiated(export))

    def _meta_context(self, option: int, data: bytes) -> None:
        listing = option == Option.LIST_META_CONTEXT
        if not listing:
            # SET replaces the selection, even when it fails.
            self._meta_export, self._meta = None, ()
        if not self._structured:
            raise _OptionRefused(OptionReply.ERR_INVALID, "negotiate structured replies first")
        reader = _Reader(data)
        name = reader.string()
        count = reader.u32()
        queries = [reader.string() for _ in range(count)]
        reader.end()
        export = self._exports.get(name)
        if export is None:
            raise _OptionRefused(OptionReply.ERR_UNKNOWN, f"export {name[:256]!r} not found")
        matched: list[tuple[int, str]] = []
        for context_id, context in enumerate(export.meta_contexts, start=1):
            if listing and not queries:
                matched.append((context_id, context))
            elif any(_context_matches(context, query, listing) for query in queries):
                matched.append((context_id, context))
        for context_id, context in matched:
            self._reply(
                option, OptionReply.META_CONTEXT, wire.U32.pack(0 if listing else context_id) + context.encode()
            )
        if not listing:
            self._meta_export, self._meta = export.name, tuple(matched)
        self._reply(option, OptionReply.ACK)

    _HANDLERS = {
        Option.LIST: _list,
        Option.STARTTLS: _starttls,
        Option.INFO: _info_or_go,
        Option.GO: _info_or_go,
        Option.STRUCTURED_REPLY: _structured_reply,
        Option.LIST_META_CONTEXT: _meta_context,
        Option.SET_META_CONTEXT: _meta_context,
    }

    # -- helpers -------------------------------------------------------------

    def _reply(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        self._out += wire.encode_option_reply(option, reply, data)

    def _negotiated(self, export: ExportInfo) -> Negotiated:
        meta = self._meta if self._meta_export == export.name else ()
        return Negotiated(attrs.evolve(export, flags=self._flags(export)), self._structured, meta)

    def _flags(self, export: ExportInfo) -> TransmissionFlag:
        if self._structured:
            return export.flags
        # DF only means something with structured replies.
        return TransmissionFlag(int(export.flags) & ~int(TransmissionFlag.SEND_DF))

    def _finish(self, event: Negotiated | Aborted) -> None:
        self._state = _State.DONE
        self._events.append(event)


_TLS_REQUIRED = b"this server requires TLS: send NBD_OPT_STARTTLS first"


def _context_matches(context: str, query: str, listing: bool) -> bool:
    if query == context:
        return True
    # "namespace:" lists every context of a namespace, but selects nothing.
    return listing and query.endswith(":") and context.startswith(query)


def _decode_name(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise _OptionRefused(OptionReply.ERR_INVALID, "name is not UTF-8") from None


class _Reader:
    """Bounds-checked reader over one option payload."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise _OptionRefused(OptionReply.ERR_INVALID, "option data is truncated")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u16(self) -> int:
        return int(wire.U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(wire.U32.unpack(self._take(4))[0])

    def string(self) -> str:
        length = self.u32()
        if length > MAX_STRING:
            raise _OptionRefused(OptionReply.ERR_TOO_BIG, "string longer than 4096 bytes")
        return _decode_name(self._take(length))

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _OptionRefused(OptionReply.ERR_INVALID, "option has trailing data")
