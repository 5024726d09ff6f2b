"""Unit tests for ServerHandshake, driven with bytes from a tiny test-local client.

The client encoder and reply decoder below use ``struct`` directly, not
``sendense_nbd.protocol.wire``, so the wire layout is checked independently.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import LocalProtocolError, ProtocolError
from sendense_nbd.protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    Aborted,
    ExportInfo,
    Negotiated,
    ServerHandshake,
    TransmissionFlag,
)
from sendense_nbd.protocol.handshake import MAX_OPTION_LENGTH

IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9

# Option codes, reply types and info types, spelled out from the spec.
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR | 1, ERR | 2, ERR | 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = ERR | 6, ERR | 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
C_FIXED_NEWSTYLE, C_NO_ZEROES = 1, 2
MIB32 = 32 * 1024 * 1024

T = TransmissionFlag
DISK = ExportInfo(
    name="disk",
    size=1 << 20,
    flags=T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.SEND_DF | T.SEND_TRIM | T.SEND_WRITE_ZEROES,
    description="the disk",
    min_block=512,
    preferred_block=4096,
    max_block=MIB32,
    meta_contexts=(BASE_ALLOCATION,),
)
OTHER = ExportInfo(name="other", size=4096, flags=T.HAS_FLAGS | T.READ_ONLY)
# The server's catalog maps the empty name to its first export.
EXPORTS = {"disk": DISK, "other": OTHER, "": DISK}

DISK_FLAGS_NO_DF = int(DISK.flags & ~T.SEND_DF)
DISK_NO_DF = attrs.evolve(DISK, flags=DISK.flags & ~T.SEND_DF)


# -- the test-local client ----------------------------------------------------------


def client_flags(flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def nbd_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    return nbd_string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name: str, queries: Sequence[str]) -> bytes:
    return nbd_string(name) + struct.pack(">I", len(queries)) + b"".join(nbd_string(q) for q in queries)


def request(command: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, handle, offset, length)


Reply = tuple[int, int, bytes]  # option, reply type, data


def parse_replies(data: bytes) -> list[Reply]:
    """Split server bytes into option replies; every byte must be consumed."""
    replies = []
    pos = 0
    while pos < len(data):
        magic, option, reply, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC, f"bad option reply magic at {pos}"
        pos += 20
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated option reply"
        pos += length
        replies.append((option, reply, payload))
    return replies


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def greeted(exports: dict[str, ExportInfo] = EXPORTS, **kwargs: object) -> ServerHandshake:
    """A handshake whose greeting has already been taken."""
    hs = ServerHandshake(exports, **kwargs)  # type: ignore[arg-type]
    hs.data_to_send()
    return hs


def events(hs: ServerHandshake) -> list[object]:
    out = []
    while (event := hs.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def exchange(hs: ServerHandshake, data: bytes) -> list[Reply]:
    hs.receive_data(data)
    return parse_replies(hs.data_to_send())


def started(**kwargs: object) -> ServerHandshake:
    """Greeted, with fixed-newstyle + no-zeroes client flags accepted."""
    hs = greeted(**kwargs)  # type: ignore[arg-type]
    hs.receive_data(client_flags())
    assert hs.data_to_send() == b""
    return hs


def structured() -> ServerHandshake:
    hs = started()
    assert exchange(hs, opt(OPT_STRUCTURED_REPLY)) == [(OPT_STRUCTURED_REPLY, REP_ACK, b"")]
    return hs


def go(hs: ServerHandshake, name: str = "disk", infos: Sequence[int] = ()) -> Negotiated:
    replies = exchange(hs, opt(OPT_GO, info_data(name, infos)))
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    assert hs.finished
    (event,) = events(hs)
    assert isinstance(event, Negotiated)
    return event


# -- greeting and client flags -------------------------------------------------------


def test_greeting() -> None:
    hs = ServerHandshake(EXPORTS)
    assert hs.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert hs.data_to_send() == b""
    assert hs.next_event() is NEED_DATA
    assert not hs.finished
    with pytest.raises(LocalProtocolError):
        hs.trailing_data()


def test_client_flags_alone_produce_nothing() -> None:
    hs = greeted()
    hs.receive_data(client_flags()[:3])
    hs.receive_data(client_flags()[3:])
    assert hs.data_to_send() == b""
    assert hs.next_event() is NEED_DATA
    assert not hs.finished


@given(bit=st.integers(2, 31), known=st.integers(0, 3))
def test_unknown_client_flags(bit: int, known: int) -> None:
    hs = greeted()
    with pytest.raises(ProtocolError):
        hs.receive_data(client_flags(known | (1 << bit)))


def test_bad_option_magic() -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(b"IHAVEOPX" + struct.pack(">II", OPT_LIST, 0))


# -- NBD_OPT_EXPORT_NAME ----------------------------------------------------------------


def test_export_name_no_zeroes() -> None:
    hs = started()
    hs.receive_data(opt(OPT_EXPORT_NAME, b"disk"))
    assert hs.data_to_send() == struct.pack(">QH", 1 << 20, DISK_FLAGS_NO_DF)
    assert events(hs) == [Negotiated(DISK_NO_DF, False, ())]
    assert hs.finished
    assert hs.trailing_data() == b""


@pytest.mark.parametrize("flags", [C_FIXED_NEWSTYLE, 0])
def test_export_name_padding_without_no_zeroes(flags: int) -> None:
    hs = greeted()
    hs.receive_data(client_flags(flags) + opt(OPT_EXPORT_NAME, b"other"))
    assert hs.data_to_send() == struct.pack(">QH", 4096, int(OTHER.flags)) + bytes(124)
    assert events(hs) == [Negotiated(OTHER, False, ())]


def test_export_name_default_export() -> None:
    hs = started()
    hs.receive_data(opt(OPT_EXPORT_NAME))
    assert hs.data_to_send() == struct.pack(">QH", 1 << 20, DISK_FLAGS_NO_DF)
    (event,) = events(hs)
    assert event.export.name == "disk"


def test_export_name_unknown_export_hangs_up() -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(opt(OPT_EXPORT_NAME, b"nosuch"))


def test_export_name_too_long_hangs_up() -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(IHAVEOPT + struct.pack(">II", OPT_EXPORT_NAME, 4097))


def test_export_name_not_utf8_hangs_up() -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(opt(OPT_EXPORT_NAME, b"\xff\xfe"))


@pytest.mark.parametrize("option", [OPT_LIST, OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY, OPT_ABORT, 0x4242])
def test_non_fixed_newstyle_client_may_only_send_export_name(option: int) -> None:
    hs = greeted()
    hs.receive_data(client_flags(0))
    with pytest.raises(ProtocolError):
        hs.receive_data(opt(option))
    assert hs.data_to_send() == b""


# -- NBD_OPT_LIST ------------------------------------------------------------------------


def test_list() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_LIST))
    assert replies == [
        (OPT_LIST, REP_SERVER, b"\x00\x00\x00\x04disk" + b"the disk"),
        (OPT_LIST, REP_SERVER, b"\x00\x00\x00\x05other"),
        (OPT_LIST, REP_ACK, b""),
    ]
    assert events(hs) == []
    assert not hs.finished


def test_list_with_data_is_invalid() -> None:
    hs = started()
    [(option, reply, _)] = exchange(hs, opt(OPT_LIST, b"x"))
    assert (option, reply) == (OPT_LIST, REP_ERR_INVALID)


# -- NBD_OPT_INFO and NBD_OPT_GO ---------------------------------------------------------


def test_info_then_go() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_INFO, info_data("disk", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])))
    assert sorted(replies[:-1]) == sorted(
        [
            (OPT_INFO, REP_INFO, info_export(1 << 20, DISK_FLAGS_NO_DF)),
            (OPT_INFO, REP_INFO, struct.pack(">H", INFO_NAME) + b"disk"),
            (OPT_INFO, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + b"the disk"),
            (OPT_INFO, REP_INFO, info_block_size(512, 4096, MIB32)),
        ]
    )
    assert replies[-1] == (OPT_INFO, REP_ACK, b"")
    # INFO does not end the handshake.
    assert events(hs) == []
    assert not hs.finished

    replies = exchange(hs, opt(OPT_GO, info_data("disk", [INFO_BLOCK_SIZE])))
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    infos = {payload[:2]: payload for _, kind, payload in replies[:-1] if kind == REP_INFO}
    assert len(infos) == len(replies) - 1
    assert infos[b"\x00\x00"] == info_export(1 << 20, DISK_FLAGS_NO_DF)
    assert infos[b"\x00\x03"] == info_block_size(512, 4096, MIB32)
    assert events(hs) == [Negotiated(DISK_NO_DF, False, ())]
    assert hs.finished
    # No zero padding after GO's ACK.
    assert hs.data_to_send() == b""


def test_go_without_info_requests() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_GO, info_data("other")))
    assert (OPT_GO, REP_INFO, info_export(4096, int(OTHER.flags))) in replies
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    # Every reply belongs to GO and is INFO or the final ACK.
    assert all(option == OPT_GO and kind == REP_INFO for option, kind, _ in replies[:-1])
    assert events(hs) == [Negotiated(OTHER, False, ())]


def test_go_default_export() -> None:
    hs = started()
    negotiated = go(hs, "", [INFO_NAME])
    assert negotiated.export == DISK_NO_DF


def test_info_name_is_canonical_for_default_export() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_INFO, info_data("", [INFO_NAME])))
    assert (OPT_INFO, REP_INFO, b"\x00\x01disk") in replies


def test_info_description_alone() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_INFO, info_data("disk", [INFO_DESCRIPTION])))
    assert (OPT_INFO, REP_INFO, b"\x00\x02the disk") in replies
    assert replies[-1] == (OPT_INFO, REP_ACK, b"")


def test_info_ignores_unknown_info_requests() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_INFO, info_data("disk", [0x1234, 0xFFFF])))
    assert replies[-1] == (OPT_INFO, REP_ACK, b"")
    assert (OPT_INFO, REP_INFO, info_export(1 << 20, DISK_FLAGS_NO_DF)) in replies


@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_unknown_export(option: int) -> None:
    hs = started()
    replies = exchange(hs, opt(option, info_data("nosuch", [INFO_NAME])))
    assert [(o, r) for o, r, _ in replies] == [(option, REP_ERR_UNKNOWN)]
    assert not hs.finished
    assert events(hs) == []
    # Still in sync: the next option works.
    assert go(hs).export == DISK_NO_DF


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing at all
        b"\x00\x00\x00\x04dis",  # truncated name
        b"\x00\x00\x00\x04disk",  # missing the count
        b"\x00\x00\x00\x04disk\x00\x02\x00\x01",  # count says 2, one given
        info_data("disk", [INFO_NAME]) + b"x",  # trailing data
        info_data(b"\xff\xfe"),  # not UTF-8
    ],
)
@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_malformed_info_is_invalid(option: int, data: bytes) -> None:
    hs = started()
    replies = exchange(hs, opt(option, data))
    assert [(o, r) for o, r, _ in replies] == [(option, REP_ERR_INVALID)]
    assert not hs.finished
    assert go(hs).export == DISK_NO_DF


def test_info_name_longer_than_4096_is_too_big() -> None:
    hs = started()
    replies = exchange(hs, opt(OPT_INFO, info_data("a" * 4097)))
    assert [(o, r) for o, r, _ in replies] == [(OPT_INFO, REP_ERR_TOO_BIG)]


def test_option_error_messages_are_short_utf8_strings() -> None:
    """Option error data is a string: UTF-8, at most 4096 bytes (spec: Conventions)."""
    hs = started()
    for name in ("a" * 4096, "\x01" * 4096, "é" * 2048):
        replies = exchange(hs, opt(OPT_GO, info_data(name)))
        [(option, reply, message)] = replies
        assert (option, reply) == (OPT_GO, REP_ERR_UNKNOWN)
        message.decode()
        assert len(message) <= 4096, f"error message of {len(message)} bytes"


# -- structured replies, SEND_DF ---------------------------------------------------------


def test_structured_reply() -> None:
    hs = structured()
    negotiated = go(hs)
    assert negotiated == Negotiated(DISK, True, ())
    assert negotiated.export.flags & T.SEND_DF


def test_structured_reply_twice_is_invalid() -> None:
    hs = structured()
    [(option, reply, _)] = exchange(hs, opt(OPT_STRUCTURED_REPLY))
    assert (option, reply) == (OPT_STRUCTURED_REPLY, REP_ERR_INVALID)
    assert go(hs).structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    hs = started()
    [(option, reply, _)] = exchange(hs, opt(OPT_STRUCTURED_REPLY, b"\x00"))
    assert (option, reply) == (OPT_STRUCTURED_REPLY, REP_ERR_INVALID)
    assert not go(hs).structured_replies


def test_send_df_depends_on_structured_replies() -> None:
    plain = started()
    info = exchange(plain, opt(OPT_INFO, info_data("disk")))
    assert (OPT_INFO, REP_INFO, info_export(1 << 20, DISK_FLAGS_NO_DF)) in info
    assert not go(plain).export.flags & T.SEND_DF

    sr = structured()
    info = exchange(sr, opt(OPT_INFO, info_data("disk")))
    assert (OPT_INFO, REP_INFO, info_export(1 << 20, int(DISK.flags))) in info
    assert go(sr).export.flags & T.SEND_DF

    sr = structured()
    sr.receive_data(opt(OPT_EXPORT_NAME, b"disk"))
    assert sr.data_to_send() == struct.pack(">QH", 1 << 20, int(DISK.flags))
    assert events(sr) == [Negotiated(DISK, True, ())]


# -- meta contexts -------------------------------------------------------------------------


@pytest.mark.parametrize("option", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_needs_structured_replies(option: int) -> None:
    hs = started()
    replies = exchange(hs, opt(option, meta_data("disk", [BASE_ALLOCATION])))
    assert [(o, r) for o, r, _ in replies] == [(option, REP_ERR_INVALID)]
    assert go(hs).meta_contexts == ()


@pytest.mark.parametrize("queries", [[], ["base:"], [BASE_ALLOCATION], ["x-other:thing", BASE_ALLOCATION]])
def test_list_meta_context(queries: list[str]) -> None:
    hs = structured()
    replies = exchange(hs, opt(OPT_LIST_META_CONTEXT, meta_data("disk", queries)))
    assert replies == [
        (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, b"\x00\x00\x00\x00" + b"base:allocation"),
        (OPT_LIST_META_CONTEXT, REP_ACK, b""),
    ]
    # Listing selects nothing.
    assert go(hs).meta_contexts == ()


@pytest.mark.parametrize("queries", [["x-other:"], ["base:nothing"], ["qemu:dirty-bitmap:a"]])
def test_list_meta_context_no_match(queries: list[str]) -> None:
    hs = structured()
    assert exchange(hs, opt(OPT_LIST_META_CONTEXT, meta_data("disk", queries))) == [
        (OPT_LIST_META_CONTEXT, REP_ACK, b"")
    ]


def test_list_meta_context_export_without_contexts() -> None:
    hs = structured()
    assert exchange(hs, opt(OPT_LIST_META_CONTEXT, meta_data("other", []))) == [(OPT_LIST_META_CONTEXT, REP_ACK, b"")]


def test_set_meta_context_then_go_same_export() -> None:
    hs = structured()
    replies = exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    assert len(replies) == 2
    (option, kind, payload), ack = replies
    assert (option, kind) == (OPT_SET_META_CONTEXT, REP_META_CONTEXT)
    context_id = struct.unpack(">I", payload[:4])[0]
    assert payload[4:] == b"base:allocation"
    assert ack == (OPT_SET_META_CONTEXT, REP_ACK, b"")
    assert go(hs).meta_contexts == ((context_id, BASE_ALLOCATION),)


def test_set_meta_context_namespace_query_selects_nothing() -> None:
    hs = structured()
    assert exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", ["base:"]))) == [
        (OPT_SET_META_CONTEXT, REP_ACK, b"")
    ]
    assert go(hs).meta_contexts == ()


def test_set_meta_context_ignores_unknown_namespace() -> None:
    hs = structured()
    replies = exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", ["x-foo:bar", BASE_ALLOCATION])))
    assert [(o, r, p[4:]) for o, r, p in replies[:-1]] == [(OPT_SET_META_CONTEXT, REP_META_CONTEXT, b"base:allocation")]
    assert len(go(hs).meta_contexts) == 1


def test_set_meta_context_for_another_export_does_not_apply() -> None:
    hs = structured()
    exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    assert go(hs, "other").meta_contexts == ()


def test_set_meta_context_is_replaced_by_later_set() -> None:
    hs = structured()
    exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    assert exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", []))) == [(OPT_SET_META_CONTEXT, REP_ACK, b"")]
    assert go(hs).meta_contexts == ()


def test_set_meta_context_replaced_even_when_a_later_set_fails() -> None:
    """Spec, NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all
    previously-set metadata contexts (including when this command fails)"."""
    hs = structured()
    exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])))
    replies = exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("nosuch", [BASE_ALLOCATION])))
    assert [(o, r) for o, r, _ in replies] == [(OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN)]
    assert go(hs).meta_contexts == ()


def test_set_meta_context_on_default_name_applies_to_export_name_of_default() -> None:
    """SET_META_CONTEXT on "" then NBD_OPT_EXPORT_NAME "": the same export name
    was "ultimately selected", so the client may send NBD_CMD_BLOCK_STATUS."""
    hs = structured()
    replies = exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("", [BASE_ALLOCATION])))
    context_id = struct.unpack(">I", replies[0][2][:4])[0]
    hs.receive_data(opt(OPT_EXPORT_NAME, b""))
    (event,) = events(hs)
    assert event.meta_contexts == ((context_id, BASE_ALLOCATION),)


def test_set_meta_context_on_default_name_applies_to_go_of_default() -> None:
    hs = structured()
    replies = exchange(hs, opt(OPT_SET_META_CONTEXT, meta_data("", [BASE_ALLOCATION])))
    context_id = struct.unpack(">I", replies[0][2][:4])[0]
    assert go(hs, "").meta_contexts == ((context_id, BASE_ALLOCATION),)


@pytest.mark.parametrize("option", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_unknown_export(option: int) -> None:
    hs = structured()
    replies = exchange(hs, opt(option, meta_data("nosuch", [])))
    assert [(o, r) for o, r, _ in replies] == [(option, REP_ERR_UNKNOWN)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        nbd_string("disk"),  # no count
        nbd_string("disk") + b"\x00\x00\x00\x02" + nbd_string(BASE_ALLOCATION),  # one query short
        nbd_string("disk") + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x10base",  # truncated query
        meta_data("disk", [BASE_ALLOCATION]) + b"\x00",  # trailing byte
    ],
)
@pytest.mark.parametrize("option", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_malformed_meta_context_is_invalid(option: int, data: bytes) -> None:
    hs = structured()
    replies = exchange(hs, opt(option, data))
    assert [(o, r) for o, r, _ in replies] == [(option, REP_ERR_INVALID)]
    assert go(hs).meta_contexts == ()


# -- refused and unsupported options -----------------------------------------------------


def test_starttls_is_policy() -> None:
    hs = started()
    [(option, reply, message)] = exchange(hs, opt(OPT_STARTTLS))
    assert (option, reply) == (OPT_STARTTLS, REP_ERR_POLICY)
    message.decode()
    [(option, reply, _)] = exchange(hs, opt(OPT_STARTTLS, b"junk"))
    assert (option, reply) == (OPT_STARTTLS, REP_ERR_INVALID)


@pytest.mark.parametrize("option", [0, OPT_PEEK_EXPORT, OPT_EXTENDED_HEADERS, 12, 0x4242, 0xFFFFFFFF])
def test_unknown_option_then_still_in_sync(option: int) -> None:
    hs = started()
    # The payload looks like another option: it must be skipped, not parsed.
    [(got_option, reply, _)] = exchange(hs, opt(option, opt(OPT_ABORT)))
    assert (got_option, reply) == (option, REP_ERR_UNSUP)
    assert events(hs) == []
    assert exchange(hs, opt(OPT_LIST))[-1] == (OPT_LIST, REP_ACK, b"")


@pytest.mark.parametrize("option", [OPT_LIST, OPT_INFO, 0x4242])
def test_oversized_option_is_drained(option: int) -> None:
    hs = started()
    payload = opt(OPT_ABORT) * ((MAX_OPTION_LENGTH + 100) // 16)
    assert len(payload) > MAX_OPTION_LENGTH
    hs.receive_data(IHAVEOPT + struct.pack(">II", option, len(payload)))
    for i in range(0, len(payload) - 1, 4096):
        hs.receive_data(payload[i : min(i + 4096, len(payload) - 1)])
        assert hs.data_to_send() == b""
    replies = exchange(hs, payload[-1:] + opt(OPT_LIST))
    assert [(o, r) for o, r, _ in replies] == [
        (option, REP_ERR_TOO_BIG),
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_ACK),
    ]
    assert events(hs) == []


def test_option_of_exactly_max_length_is_buffered() -> None:
    hs = started()
    [(option, reply, _)] = exchange(hs, opt(0x4242, bytes(MAX_OPTION_LENGTH)))
    assert (option, reply) == (0x4242, REP_ERR_UNSUP)


def test_option_of_32_mib_is_drained_not_fatal() -> None:
    hs = started()
    hs.receive_data(IHAVEOPT + struct.pack(">II", OPT_LIST, MIB32))
    assert hs.wanted == MIB32
    assert hs.data_to_send() == b""


@pytest.mark.parametrize("length", [MIB32 + 1, 0xFFFFFFFF])
@pytest.mark.parametrize("option", [OPT_LIST, OPT_GO, 0x4242])
def test_option_over_32_mib_is_fatal(option: int, length: int) -> None:
    hs = started()
    with pytest.raises(ProtocolError):
        hs.receive_data(IHAVEOPT + struct.pack(">II", option, length))


def test_refuse_makes_every_option_policy() -> None:
    hs = started(refuse="server is full")
    for option, data in [
        (OPT_LIST, b""),
        (OPT_INFO, info_data("disk")),
        (OPT_GO, info_data("disk")),
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_LIST_META_CONTEXT, meta_data("disk", [])),
        (OPT_SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION])),
        (OPT_STARTTLS, b""),
        (0x4242, b"xyz"),
    ]:
        assert exchange(hs, opt(option, data)) == [(option, REP_ERR_POLICY, b"server is full")]
        assert not hs.finished
    assert events(hs) == []
    # The client can still leave cleanly.
    assert exchange(hs, opt(OPT_ABORT)) == [(OPT_ABORT, REP_ACK, b"")]
    assert events(hs) == [Aborted()]


def test_refuse_export_name_hangs_up() -> None:
    hs = started(refuse="server is full")
    with pytest.raises(ProtocolError):
        hs.receive_data(opt(OPT_EXPORT_NAME, b"disk"))


class Gate:
    """An ``admit`` callback that lets ``slots`` clients in and records who asked."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.asked: list[str] = []

    def __call__(self, name: str) -> str | None:
        self.asked.append(name)
        if self.slots <= 0:
            return "server is full"
        self.slots -= 1
        return None


def test_admit_is_asked_only_when_an_export_is_picked() -> None:
    gate = Gate(0)
    hs = started(admit=gate)
    assert exchange(hs, opt(OPT_LIST))[-1][1] == REP_ACK
    assert exchange(hs, opt(OPT_INFO, info_data("disk")))[-1][1] == REP_ACK
    assert exchange(hs, opt(OPT_GO, info_data("nosuch")))[-1][1] == REP_ERR_UNKNOWN
    assert gate.asked == []
    # Refused: nothing about the export, just POLICY with the message; the client may try again.
    assert exchange(hs, opt(OPT_GO, info_data("disk"))) == [(OPT_GO, REP_ERR_POLICY, b"server is full")]
    assert gate.asked == ["disk"] and not hs.finished and events(hs) == []
    gate.slots = 1
    assert exchange(hs, opt(OPT_GO, info_data("disk")))[-1] == (OPT_GO, REP_ACK, b"")
    assert gate.asked == ["disk", "disk"]
    assert [type(e) for e in events(hs)] == [Negotiated]


def test_admit_sees_the_real_name_of_the_default_export() -> None:
    gate = Gate(1)
    hs = started(admit=gate)
    hs.receive_data(opt(OPT_EXPORT_NAME, b""))
    assert gate.asked == ["disk"]
    assert [type(e) for e in events(hs)] == [Negotiated]


def test_admit_refusing_export_name_hangs_up() -> None:
    hs = started(admit=Gate(0))
    with pytest.raises(ProtocolError, match="server is full"):
        hs.receive_data(opt(OPT_EXPORT_NAME, b"disk"))
    assert hs.data_to_send() == b""  # no export reply


# -- ABORT -----------------------------------------------------------------------------------


def test_abort() -> None:
    hs = started()
    hs.receive_data(opt(OPT_ABORT))
    assert hs.data_to_send() == struct.pack(">QIII", REPLY_MAGIC, OPT_ABORT, REP_ACK, 0)
    assert events(hs) == [Aborted()]
    assert hs.finished
    assert hs.trailing_data() == b""


def test_abort_ignores_data() -> None:
    hs = started()
    assert exchange(hs, opt(OPT_ABORT, b"ignored")) == [(OPT_ABORT, REP_ACK, b"")]
    assert events(hs) == [Aborted()]


# -- pipelining and the end of the handshake ----------------------------------------------


def test_pipelined_requests_after_go_are_trailing_data() -> None:
    pipelined = request(0, 1, 0, 512) + request(1, 2, 512, 4) + b"abcd" + request(2, 3)
    hs = greeted()
    hs.receive_data(client_flags() + opt(OPT_STRUCTURED_REPLY) + opt(OPT_GO, info_data("disk")) + pipelined)
    replies = parse_replies(hs.data_to_send())
    assert replies[0] == (OPT_STRUCTURED_REPLY, REP_ACK, b"")
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    assert events(hs) == [Negotiated(DISK, True, ())]
    assert hs.trailing_data() == pipelined
    assert hs.trailing_data() == b""
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"more")


def test_pipelined_requests_after_export_name_are_trailing_data() -> None:
    pipelined = request(3, 9)[:20]
    hs = greeted()
    hs.receive_data(client_flags(C_FIXED_NEWSTYLE) + opt(OPT_EXPORT_NAME, b"other") + pipelined)
    assert hs.data_to_send() == struct.pack(">QH", 4096, int(OTHER.flags)) + bytes(124)
    assert hs.trailing_data() == pipelined


def test_options_after_failed_go_continue() -> None:
    hs = started()
    hs.receive_data(opt(OPT_GO, info_data("nosuch")) + opt(OPT_GO, info_data("other")) + b"tail")
    replies = parse_replies(hs.data_to_send())
    assert replies[0][:2] == (OPT_GO, REP_ERR_UNKNOWN)
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    assert events(hs) == [Negotiated(OTHER, False, ())]
    assert hs.trailing_data() == b"tail"


def test_wanted_hint() -> None:
    hs = greeted()
    assert hs.wanted == 4
    hs.receive_data(b"\x00")
    assert hs.wanted == 3
    hs.receive_data(b"\x00\x00\x03")
    assert hs.wanted == 16
    hs.receive_data(IHAVEOPT + struct.pack(">II", 0x4242, 100))
    assert hs.wanted == 100
    hs.receive_data(bytes(40))
    assert hs.wanted == 60


# -- splitting the stream -----------------------------------------------------------------------

CONVERSATION = (
    client_flags()
    + opt(0x4242, b"unknown")
    + opt(OPT_LIST)
    + opt(OPT_STARTTLS)
    + opt(OPT_STRUCTURED_REPLY)
    + opt(OPT_LIST_META_CONTEXT, meta_data("disk", []))
    + opt(OPT_SET_META_CONTEXT, meta_data("disk", [BASE_ALLOCATION]))
    + opt(OPT_INFO, info_data("nosuch"))
    + opt(OPT_INFO, info_data("disk", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]))
    + IHAVEOPT
    + struct.pack(">II", OPT_LIST, MAX_OPTION_LENGTH + 1)
    + bytes(MAX_OPTION_LENGTH + 1)
    + opt(OPT_GO, info_data("disk", [INFO_BLOCK_SIZE]))
    + request(0, 1, 0, 512)
    + request(1, 2, 512, 3)
    + b"xyz"
)


def run_conversation(chunks: list[bytes]) -> tuple[bytes, list[object], bytes]:
    hs = greeted()
    out = bytearray()
    seen: list[object] = []
    fed = 0
    for chunk in chunks:
        if hs.finished:
            break
        hs.receive_data(chunk)
        fed += len(chunk)
        out += hs.data_to_send()
        seen += events(hs)
    tail = hs.trailing_data() + b"".join(chunks)[fed:]
    return bytes(out), seen, tail


def whole_conversation() -> tuple[bytes, list[object], bytes]:
    return run_conversation([CONVERSATION])


def test_whole_conversation() -> None:
    out, seen, tail = whole_conversation()
    replies = parse_replies(out)
    assert [(o, r) for o, r, _ in replies][:6] == [
        (0x4242, REP_ERR_UNSUP),
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_SERVER),
        (OPT_LIST, REP_ACK),
        (OPT_STARTTLS, REP_ERR_POLICY),
        (OPT_STRUCTURED_REPLY, REP_ACK),
    ]
    assert (OPT_LIST, REP_ERR_TOO_BIG) in [(o, r) for o, r, _ in replies]
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    assert len(seen) == 1
    negotiated = seen[0]
    assert isinstance(negotiated, Negotiated)
    assert negotiated.export == DISK
    assert negotiated.structured_replies
    assert [name for _, name in negotiated.meta_contexts] == [BASE_ALLOCATION]
    assert tail == request(0, 1, 0, 512) + request(1, 2, 512, 3) + b"xyz"


def test_one_byte_at_a_time() -> None:
    # The 64 KiB oversized option makes this the slow path; do it once.
    expected = whole_conversation()
    assert run_conversation([CONVERSATION[i : i + 1] for i in range(len(CONVERSATION))]) == expected


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(CONVERSATION)), max_size=40))
def test_arbitrary_split_points(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(CONVERSATION)]
    chunks = [CONVERSATION[a:b] for a, b in zip(points, points[1:])]
    assert run_conversation(chunks) == whole_conversation()
