"""Client side of NBD, as sans-IO code: the handshake.

The replies of the transmission phase are parsed by
:class:`~sendense_nbd.protocol.replies.ReplyParser`.

Theory of operation (doc/proto.md of NetworkBlockDevice/nbd):

* :class:`ClientHandshake` drives "Fixed newstyle negotiation". The server
  speaks first (NBDMAGIC, IHAVEOPT, handshake flags); the client answers with
  its flags, then sends one option at a time and waits for its final reply
  (``NBD_REP_ACK`` or an ``NBD_REP_ERR_*``). The options sent are a plan,
  fixed by the goal: to enter transmission (:attr:`Goal.GO`) the plan is
  ``STRUCTURED_REPLY``, ``SET_META_CONTEXT``, ``GO``; to describe an export
  (:attr:`Goal.INFO`) ``STRUCTURED_REPLY``, ``INFO``, ``LIST_META_CONTEXT``,
  ``ABORT``; to list exports (:attr:`Goal.LIST`) ``LIST``, ``ABORT``. Each
  option's replies go to a handler from a table keyed by option. Refusals of
  optional extras (structured replies, meta contexts) are tolerated; a
  refusal of ``GO`` with ``NBD_REP_ERR_UNSUP`` falls back to
  ``NBD_OPT_EXPORT_NAME``, as "Option types" tells clients to do; any other
  refusal raises :class:`OptionError` with the reply code and the server's
  message. The handshake ends with :class:`Ready` (or :class:`Informed`,
  :class:`Listed`).
* TLS (doc/proto.md, "TLS support"): with ``tls`` ALLOW or REQUIRE the plan
  starts with ``NBD_OPT_STARTTLS``. Its ACK yields :class:`StartTLS`: the IO
  layer runs the TLS handshake and calls :meth:`ClientHandshake.tls_started`,
  and the plan goes on over TLS with nothing kept from before. A refusal is
  an :class:`OptionError` under REQUIRE; ALLOW goes on in plaintext after
  ``NBD_REP_ERR_POLICY`` or ``NBD_REP_ERR_UNSUP``. ``NBD_REP_ERR_TLS_REQD``
  to a client without TLS is an :class:`OptionError` that says so. Bytes
  from the server between the ACK and the TLS handshake are a protocol error.
* What a server may make the client keep is bounded: each option reply is at
  most :data:`MAX_OPTION_REPLY` bytes, a handshake at most
  :data:`MAX_HANDSHAKE_REPLIES` replies and :data:`MAX_HANDSHAKE_BYTES`
  bytes, an option at most :data:`MAX_META_CONTEXTS` meta contexts. Export
  sizes over 2^63 - 1 and block sizes the spec forbids ("Block size
  constraints") are protocol errors, as are meta contexts the client did not
  ask for or that reuse a name or an id.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import attrs

from sendense_nbd.errors import LocalProtocolError, OptionError, ProtocolError, TLSError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TLSMode,
    TransmissionFlag,
)
from sendense_nbd.protocol.sansio import NeedData, SansIOMachine, StartTLS

#: Longest option reply payload the client buffers (strings are at most 4 KiB).
MAX_OPTION_REPLY = 64 * 1024
#: Most option replies one handshake may send.
MAX_HANDSHAKE_REPLIES = 1024
#: Most option reply bytes (headers included) one handshake may send.
MAX_HANDSHAKE_BYTES = 512 * 1024
#: Most meta contexts one SET_ or LIST_META_CONTEXT may return.
MAX_META_CONTEXTS = 256
#: Largest export size accepted: offsets are signed 64-bit in most peers.
MAX_EXPORT_SIZE = (1 << 63) - 1
#: Magic of the oldstyle greeting, which this client does not speak.
OLDSTYLE_MAGIC = 0x00420281861253

_GREETING_SIZE = wire.GREETING.size


_REPLIES = frozenset(int(r) for r in OptionReply)


def _reply_name(reply: int) -> str:
    return f"NBD_REP_{OptionReply(reply).name}" if reply in _REPLIES else f"reply {reply:#x}"


class Goal(enum.Enum):
    """What a :class:`ClientHandshake` is for."""

    GO = "go"  #: enter transmission with one export
    INFO = "info"  #: describe one export, then abort
    LIST = "list"  #: list the server's exports, then abort


@attrs.frozen(slots=True)
class ExportDetails:
    """What the server told about an export."""

    name: str
    size: int
    flags: TransmissionFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    description: str = ""
    #: The server sent ``NBD_INFO_BLOCK_SIZE`` (else the values are defaults).
    block_sizes_advertised: bool = False


def _frozen_mapping(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


@attrs.frozen(slots=True)
class Ready:
    """The handshake is over: transmission starts with these settings."""

    export: ExportDetails
    structured_replies: bool
    #: Selected meta contexts, name to context id.
    meta_contexts: Mapping[str, int] = attrs.field(converter=_frozen_mapping, factory=dict)
    #: False when an old server needed the ``NBD_OPT_EXPORT_NAME`` fallback.
    used_go: bool = True


@attrs.frozen(slots=True)
class Informed:
    """Result of :attr:`Goal.INFO`; ``NBD_OPT_ABORT`` has been queued."""

    export: ExportDetails
    structured_replies: bool
    #: Every meta context the server offers for the export.
    meta_contexts: tuple[str, ...]


@attrs.frozen(slots=True)
class ListedExport:
    """One ``NBD_REP_SERVER`` entry."""

    name: str
    description: str = ""


@attrs.frozen(slots=True)
class Listed:
    """Result of :attr:`Goal.LIST`; ``NBD_OPT_ABORT`` has been queued."""

    exports: tuple[ListedExport, ...]


ClientHandshakeEvent = NeedData | Ready | Informed | Listed | StartTLS


class _State(enum.Enum):
    GREETING = enum.auto()
    REPLY = enum.auto()
    EXPORT_NAME_REPLY = enum.auto()
    TLS_PENDING = enum.auto()
    DONE = enum.auto()


_INFO_REQUESTS = (Info.NAME, Info.DESCRIPTION)


class ClientHandshake(SansIOMachine[Ready | Informed | Listed | StartTLS]):
    """Negotiates one connection; see the module docstring.

    Feed the server's bytes to :meth:`receive_data`, write what
    :meth:`data_to_send` returns, and read events with :meth:`next_event`.
    Tell it about end-of-file with :meth:`receive_eof`. On :class:`StartTLS`,
    upgrade the stream and call :meth:`tls_started`.
    """

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
        request_block_size: bool = True,
        goal: Goal = Goal.GO,
        tls: TLSMode = TLSMode.OFF,
    ) -> None:
        super().__init__()
        self._export = export_name
        self._export_raw = export_name.encode()
        if len(self._export_raw) > MAX_STRING or "\0" in export_name:
            raise ValueError("export names are at most 4096 bytes of UTF-8 without NUL")
        self._want_structured = structured_replies
        self._queries = tuple(meta_contexts)
        if any(len(q.encode()) > MAX_STRING for q in self._queries):
            raise ValueError("meta context names are at most 4096 bytes")
        self._request_block_size = request_block_size
        self._goal = goal
        self._tls = tls
        self._tls_active = False
        self._heard_over_tls = False  # the server sent something after the TLS handshake
        self._state = _State.GREETING
        self._plan: deque[Option] = deque()
        self._option: Option | None = None
        self._reply_header: wire.OptionReplyHeader | None = None
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._offered: list[str] = []
        self._replies = 0  # option replies received, and their bytes
        self._reply_bytes = 0
        self._listed: list[ListedExport] = []
        self._informed: ExportDetails | None = None
        # NBD_REP_INFO items of the current GO/INFO:
        self._size_flags: tuple[int, int] | None = None
        self._name: str | None = None
        self._description = ""
        self._block_sizes: tuple[int, int, int] | None = None

    # -- the sans-IO surface ------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the server; may raise ProtocolError."""
        if self._state is _State.DONE:
            self._buffer += data  # belongs to the transmission phase
            return
        if self._state is _State.TLS_PENDING and data:
            raise ProtocolError("the server sent plaintext after acknowledging NBD_OPT_STARTTLS")
        self._heard_over_tls = self._heard_over_tls or (self._tls_active and bool(data))
        self._buffer += data
        self._process()

    def tls_started(self) -> None:
        """The TLS handshake that :class:`StartTLS` asked for succeeded: go on with the plan."""
        if self._state is not _State.TLS_PENDING:
            raise LocalProtocolError("no NBD_OPT_STARTTLS is waiting for TLS")
        self._tls_active = True
        self._structured = False
        self._contexts.clear()
        self._state = _State.REPLY
        self._send_next()

    @property
    def tls_active(self) -> bool:
        """The connection was upgraded to TLS."""
        return self._tls_active

    def receive_eof(self) -> None:
        """The server closed the connection; raises unless the handshake ended (:class:`TLSError` when
        it closed right after the TLS handshake, before sending anything over TLS)."""
        if self._state is _State.DONE:
            return
        if self._state is _State.EXPORT_NAME_REPLY:
            raise OptionError(Option.EXPORT_NAME, None, "the server closed the connection", self._export)
        if self._tls_active and not self._heard_over_tls:
            raise TLSError(
                "the server closed the connection right after the TLS handshake: it may want a client "
                "certificate (mutual TLS: client-cert.pem and client-key.pem) or have refused ours"
            )
        raise ProtocolError("the server closed the connection during the handshake")

    @property
    def finished(self) -> bool:
        return self._state is _State.DONE

    # -- state machine -------------------------------------------------------

    def _process(self) -> None:
        while True:
            if self._state is _State.GREETING:
                if not self._take_greeting():
                    return
            elif self._state is _State.REPLY:
                if not self._take_reply():
                    return
            elif self._state is _State.EXPORT_NAME_REPLY:
                self._take_export_name_reply()
                return
            else:
                return

    def _take_greeting(self) -> bool:
        if len(self._buffer) >= 16:
            magic, second = wire.U64.unpack_from(self._buffer)[0], wire.U64.unpack_from(self._buffer, 8)[0]
            if magic != NBDMAGIC:
                raise ProtocolError("the server is not an NBD server (no NBDMAGIC)")
            if second == OLDSTYLE_MAGIC:
                raise ProtocolError("the server speaks oldstyle negotiation, which is not supported")
            if second != IHAVEOPT:
                raise ProtocolError(f"unknown greeting magic {second:#x}")
        if len(self._buffer) < _GREETING_SIZE:
            return False
        flags = wire.decode_greeting(bytes(self._buffer[:_GREETING_SIZE]))
        del self._buffer[:_GREETING_SIZE]
        fixed = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        if not fixed and self._tls is TLSMode.REQUIRE:
            raise ProtocolError("the server does not speak fixed newstyle negotiation, so it cannot do TLS")
        self._no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        client = ClientFlag(0)
        if fixed:
            client |= ClientFlag.FIXED_NEWSTYLE
        if self._no_zeroes:
            client |= ClientFlag.NO_ZEROES
        self._out += wire.CLIENT_FLAGS.pack(client)
        if not fixed:
            if self._goal is not Goal.GO:
                raise ProtocolError("the server does not speak fixed newstyle; it cannot list or describe exports")
            self._send_export_name()
            return True
        self._plan.extend(self._make_plan())
        self._send_next()
        return True

    def _make_plan(self) -> list[Option]:
        tls = [Option.STARTTLS] if self._tls is not TLSMode.OFF else []
        if self._goal is Goal.LIST:
            return tls + [Option.LIST, Option.ABORT]
        plan = tls + ([Option.STRUCTURED_REPLY] if self._want_structured else [])
        if self._goal is Goal.GO:
            return plan + ([Option.SET_META_CONTEXT] if self._queries else []) + [Option.GO]
        return plan + [Option.INFO, Option.LIST_META_CONTEXT, Option.ABORT]

    def _send_next(self) -> None:
        while self._plan:
            option = self._plan.popleft()
            if option in (Option.SET_META_CONTEXT, Option.LIST_META_CONTEXT) and not self._structured:
                continue  # meta contexts need structured replies
            self._out += wire.encode_option(option, self._option_data(option))
            if option == Option.ABORT:
                self._finish_abort()
                return
            self._option = option
            self._state = _State.REPLY
            return
        raise LocalProtocolError("option plan ran out")  # pragma: no cover - GO/ABORT end every plan

    def _option_data(self, option: Option) -> bytes:
        name = wire.encode_string(self._export)
        if option in (Option.GO, Option.INFO):
            requests = ((Info.BLOCK_SIZE,) if self._request_block_size else ()) + _INFO_REQUESTS
            return name + wire.U16.pack(len(requests)) + b"".join(wire.U16.pack(r) for r in requests)
        if option == Option.SET_META_CONTEXT:
            return name + wire.U32.pack(len(self._queries)) + b"".join(wire.encode_string(q) for q in self._queries)
        if option == Option.LIST_META_CONTEXT:
            return name + wire.U32.pack(0)
        return b""

    def _send_export_name(self) -> None:
        self._out += wire.encode_option(Option.EXPORT_NAME, self._export_raw)
        self._option = Option.EXPORT_NAME
        self._state = _State.EXPORT_NAME_REPLY

    def _take_reply(self) -> bool:
        if self._reply_header is None:
            size = wire.OPTION_REPLY_HEADER.size
            if len(self._buffer) < size:
                return False
            header = wire.decode_option_reply_header(bytes(self._buffer[:size]))
            del self._buffer[:size]
            if header.option != self._option:
                raise ProtocolError(f"reply to option {header.option} while waiting for {self._option}")
            if header.length > MAX_OPTION_REPLY:
                raise ProtocolError(f"option reply of {header.length} bytes is too long")
            self._count_reply(header.length)
            self._reply_header = header
        header = self._reply_header
        if len(self._buffer) < header.length:
            return False
        payload = bytes(self._buffer[: header.length])
        del self._buffer[: header.length]
        self._reply_header = None
        option = self._option
        assert option is not None
        if header.reply == OptionReply.ERR_TLS_REQD and self._tls is TLSMode.OFF:
            self._refused(header.reply, f"{_text(payload)} [the server requires TLS: use an nbds:// URI]")
        if header.reply & (1 << 31):
            self._ERROR_HANDLERS[option](self, header.reply, _text(payload))
        elif self._HANDLERS[option](self, header.reply, payload):
            self._option = None
            if self._state is _State.REPLY:
                self._send_next()
        return self._state is not _State.DONE

    def _count_reply(self, length: int) -> None:
        self._replies += 1
        self._reply_bytes += wire.OPTION_REPLY_HEADER.size + length
        if self._replies > MAX_HANDSHAKE_REPLIES:
            raise ProtocolError(f"the server sent over {MAX_HANDSHAKE_REPLIES} option replies")
        if self._reply_bytes > MAX_HANDSHAKE_BYTES:
            raise ProtocolError(f"the server sent over {MAX_HANDSHAKE_BYTES} bytes of option replies")

    def _take_export_name_reply(self) -> None:
        need = wire.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else wire.EXPORT_NAME_PADDING)
        if len(self._buffer) < need:
            return
        size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._buffer)
        del self._buffer[:need]
        _check_size(size)
        export = ExportDetails(self._export, size, TransmissionFlag(flags))
        self._finish(Ready(export, self._structured, self._contexts, used_go=False))

    # -- per-option reply handlers: return True when the option is finished --

    def _unexpected(self, reply: int) -> bool:
        raise ProtocolError(f"unexpected {_reply_name(reply)} to NBD_OPT_{self._option_name}")

    @property
    def _option_name(self) -> str:
        return self._option.name if self._option is not None else "?"

    def _on_starttls(self, reply: int, payload: bytes) -> bool:
        if reply != OptionReply.ACK:
            return self._unexpected(reply)
        if self._buffer:
            raise ProtocolError("the server sent data after acknowledging NBD_OPT_STARTTLS (plaintext injection)")
        self._state = _State.TLS_PENDING
        self._option = None
        self._events.append(StartTLS())
        return False

    def _on_structured(self, reply: int, payload: bytes) -> bool:
        if reply != OptionReply.ACK:
            return self._unexpected(reply)
        self._structured = True
        return True

    def _on_set_meta(self, reply: int, payload: bytes) -> bool:
        if reply == OptionReply.ACK:
            return True
        context_id, name = self._meta_context(reply, payload, len(self._contexts))
        if not any(_answers(name, query) for query in self._queries):
            raise ProtocolError(f"meta context {_shown(name)} was not asked for")
        if name in self._contexts or context_id in self._contexts.values():
            raise ProtocolError(f"meta context {_shown(name)} (id {context_id}) repeats a name or an id")
        self._contexts[name] = context_id
        return False

    def _on_list_meta(self, reply: int, payload: bytes) -> bool:
        if reply == OptionReply.ACK:
            return True
        _, name = self._meta_context(reply, payload, len(self._offered))
        self._offered.append(name)
        return False

    def _meta_context(self, reply: int, payload: bytes, count: int) -> tuple[int, str]:
        """Decode one ``NBD_REP_META_CONTEXT``: ``(context id, name)``."""
        if reply != OptionReply.META_CONTEXT or len(payload) < 5:
            self._unexpected(reply)
        if count >= MAX_META_CONTEXTS:
            raise ProtocolError(f"the server sent over {MAX_META_CONTEXTS} meta contexts")
        if len(payload) - 4 > MAX_STRING:
            raise ProtocolError(f"meta context name of {len(payload) - 4} bytes (the limit is {MAX_STRING})")
        (context_id,) = wire.U32.unpack_from(payload)
        return int(context_id), _text(payload[4:])

    def _on_info(self, reply: int, payload: bytes) -> bool:
        if reply == OptionReply.INFO:
            self._take_info(payload)
            return False
        if reply != OptionReply.ACK:
            return self._unexpected(reply)
        export = self._details()
        if self._option == Option.GO:
            self._finish(Ready(export, self._structured, self._contexts))
        else:
            self._informed = export
        return True

    def _take_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise ProtocolError("NBD_REP_INFO without an information type")
        (kind,) = wire.U16.unpack_from(payload)
        if kind == Info.EXPORT:
            if len(payload) != wire.INFO_EXPORT.size:
                raise ProtocolError("NBD_INFO_EXPORT has the wrong length")
            _, size, flags = wire.INFO_EXPORT.unpack(payload)
            _check_size(size)
            self._size_flags = (int(size), int(flags))
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != wire.INFO_BLOCK_SIZE.size:
                raise ProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
            _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(payload)
            _check_block_sizes(minimum, preferred, maximum)
            self._block_sizes = (int(minimum), int(preferred), int(maximum))
        elif kind == Info.NAME:
            self._name = _text(payload[2:])
        elif kind == Info.DESCRIPTION:
            self._description = _text(payload[2:])
        # Unknown information types are ignored, as the spec requires.

    def _details(self) -> ExportDetails:
        if self._size_flags is None:
            raise ProtocolError("NBD_REP_ACK without NBD_INFO_EXPORT")
        size, flags = self._size_flags
        name = self._export if self._name is None else self._name
        details = ExportDetails(name, size, TransmissionFlag(flags), description=self._description)
        if self._block_sizes is not None:
            minimum, preferred, maximum = self._block_sizes
            details = attrs.evolve(
                details, min_block=minimum, preferred_block=preferred, max_block=maximum, block_sizes_advertised=True
            )
        self._forget_info()
        return details

    def _forget_info(self) -> None:
        self._size_flags, self._name, self._description, self._block_sizes = None, None, "", None

    def _on_list(self, reply: int, payload: bytes) -> bool:
        if reply == OptionReply.ACK:
            return True
        if reply != OptionReply.SERVER or len(payload) < 4:
            return self._unexpected(reply)
        (length,) = wire.U32.unpack_from(payload)
        if length > len(payload) - 4:
            raise ProtocolError("NBD_REP_SERVER name is longer than the reply")
        self._listed.append(ListedExport(_text(payload[4 : 4 + length]), _text(payload[4 + length :])))
        return False

    _HANDLERS: dict[Option, Callable[[ClientHandshake, int, bytes], bool]] = {
        Option.STARTTLS: _on_starttls,
        Option.STRUCTURED_REPLY: _on_structured,
        Option.SET_META_CONTEXT: _on_set_meta,
        Option.LIST_META_CONTEXT: _on_list_meta,
        Option.GO: _on_info,
        Option.INFO: _on_info,
        Option.LIST: _on_list,
    }

    # -- refusals --------------------------------------------------------------

    def _refused_optional(self, reply: int, message: str) -> None:
        """A refused extra (structured replies, meta contexts): carry on without."""
        if self._option == Option.SET_META_CONTEXT:
            self._contexts.clear()
        elif self._option == Option.LIST_META_CONTEXT:
            self._offered.clear()
        self._option = None
        self._send_next()

    def _refused_starttls(self, reply: int, message: str) -> None:
        if self._tls is TLSMode.ALLOW and reply in (OptionReply.ERR_POLICY, OptionReply.ERR_UNSUP):
            self._option = None
            self._send_next()  # TLS if offered: go on in plaintext
            return
        self._refused(reply, f"{message} [TLS is required, and the server does not offer it]")

    def _refused_go(self, reply: int, message: str) -> None:
        if reply == OptionReply.ERR_UNSUP:
            self._forget_info()
            self._send_export_name()
            return
        self._refused(reply, message)

    def _refused(self, reply: int, message: str) -> None:
        option = self._option
        assert option is not None
        self._out += wire.encode_option(Option.ABORT)  # a polite caller sends it before closing
        self._state = _State.DONE
        raise OptionError(option, reply, message, self._export)

    _ERROR_HANDLERS: dict[Option, Callable[[ClientHandshake, int, str], None]] = {
        Option.STARTTLS: _refused_starttls,
        Option.STRUCTURED_REPLY: _refused_optional,
        Option.SET_META_CONTEXT: _refused_optional,
        Option.LIST_META_CONTEXT: _refused_optional,
        Option.GO: _refused_go,
        Option.INFO: _refused,
        Option.LIST: _refused,
    }

    # -- endings ----------------------------------------------------------------

    def _finish_abort(self) -> None:
        if self._goal is Goal.LIST:
            self._finish(Listed(tuple(self._listed)))
        else:
            assert self._informed is not None
            self._finish(Informed(self._informed, self._structured, tuple(self._offered)))

    def _finish(self, event: Ready | Informed | Listed) -> None:
        self._state = _State.DONE
        self._option = None
        self._events.append(event)


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace")


def _shown(name: str) -> str:
    """A server-chosen name for an error message: quoted, at most 80 characters."""
    return repr(name) if len(name) <= 80 else repr(name[:77]) + "..."


def _answers(name: str, query: str) -> bool:
    """``name`` is a context that ``query`` selects: the same name, or under a
    query that ends in ``:`` (a namespace or a prefix such as ``qemu:dirty-bitmap:``)."""
    return name == query or (query.endswith(":") and name.startswith(query))


def _check_size(size: int) -> None:
    if size > MAX_EXPORT_SIZE:
        raise ProtocolError(f"export size {size} is over 2^63 - 1 bytes")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """The constraints of "Size constraints" that a client relies on."""
    if not _is_power_of_two(minimum) or minimum > 64 * 1024:
        raise ProtocolError(f"minimum block size {minimum} is not a power of 2 up to 64 KiB")
    if not _is_power_of_two(preferred) or preferred < minimum:
        raise ProtocolError(f"preferred block size {preferred} is invalid for minimum {minimum}")
    if maximum < preferred:
        raise ProtocolError(f"maximum payload {maximum} is below the preferred block size {preferred}")
