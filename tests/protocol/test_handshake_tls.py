"""NBD_OPT_STARTTLS in the sans-IO handshakes of both roles, on byte strings.

Server side: the ordering rules of doc/proto.md "TLS support" (what a
server that requires TLS answers before the upgrade, STARTTLS twice or with
data), downgrade attempts (a client that never sends STARTTLS, option state
negotiated in plaintext) and plaintext injected after STARTTLS. Client side:
the plan with STARTTLS first, the refusals under REQUIRE and ALLOW, and a
plaintext client meeting a server that requires TLS. The bytes are built
with ``struct`` here, not with the package's wire codec.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense_nbd.errors import LocalProtocolError, OptionError, ProtocolError, TLSError
from sendense_nbd.protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    Aborted,
    ExportInfo,
    Negotiated,
    ServerHandshake,
    StartTLS,
    TLSMode,
    TransmissionFlag,
)
from sendense_nbd.protocol.client import ClientHandshake, Goal, Listed, Ready

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_TLS_REQD = ERR | 1, ERR | 2, ERR | 3, ERR | 5
REPLY_MAGIC = 0x3E889045565A9

T = TransmissionFlag
DISK = ExportInfo(
    name="disk",
    size=1 << 20,
    flags=T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_DF,
    meta_contexts=(BASE_ALLOCATION,),
)
EXPORTS = {"disk": DISK, "": DISK}


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def nbd_string(text: str) -> bytes:
    return struct.pack(">I", len(text.encode())) + text.encode()


def go_data(name: str = "disk") -> bytes:
    return nbd_string(name) + struct.pack(">H", 0)


def meta_data(name: str = "disk") -> bytes:
    return nbd_string(name) + struct.pack(">I", 1) + nbd_string(BASE_ALLOCATION)


def replies(data: bytes) -> list[tuple[int, int]]:
    """``(option, reply type)`` of each option reply; every byte must be consumed."""
    out, pos = [], 0
    while pos < len(data):
        magic, option, reply, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC
        out.append((option, reply))
        pos += 20 + length
    assert pos == len(data)
    return out


def events(machine: ServerHandshake | ClientHandshake) -> list[object]:
    out = []
    while (event := machine.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def server(tls: TLSMode) -> ServerHandshake:
    """A server handshake past the greeting and the client's flags."""
    hs = ServerHandshake(EXPORTS, tls=tls)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3))
    return hs


def exchange(hs: ServerHandshake, data: bytes) -> list[tuple[int, int]]:
    hs.receive_data(data)
    return replies(hs.data_to_send())


def upgraded(tls: TLSMode = TLSMode.REQUIRE) -> ServerHandshake:
    hs = server(tls)
    assert exchange(hs, opt(OPT_STARTTLS)) == [(OPT_STARTTLS, REP_ACK)]
    assert events(hs) == [StartTLS()]
    hs.tls_started()
    assert hs.tls_active
    return hs


# -- server: ordering ------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, data",
    [
        (OPT_LIST, b""),
        (OPT_INFO, go_data()),
        (OPT_GO, go_data()),
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_SET_META, meta_data()),
        (OPT_LIST_META, meta_data()),
        (4242, b"whatever"),  # unknown options too
    ],
)
def test_require_refuses_every_option_before_starttls(option: int, data: bytes) -> None:
    hs = server(TLSMode.REQUIRE)
    assert exchange(hs, opt(option, data)) == [(option, REP_ERR_TLS_REQD)]
    assert not hs.finished and events(hs) == []


def test_require_refuses_oversized_options_with_tls_reqd() -> None:
    hs = server(TLSMode.REQUIRE)
    assert exchange(hs, opt(OPT_LIST, bytes(70_000))) == [(OPT_LIST, REP_ERR_TLS_REQD)]


def test_require_export_name_before_tls_closes() -> None:
    hs = server(TLSMode.REQUIRE)
    with pytest.raises(ProtocolError, match="requires TLS"):
        hs.receive_data(opt(OPT_EXPORT_NAME, b"disk"))


def test_require_allows_abort_before_tls() -> None:
    hs = server(TLSMode.REQUIRE)
    assert exchange(hs, opt(OPT_ABORT)) == [(OPT_ABORT, REP_ACK)]
    assert events(hs) == [Aborted()]


def test_refusals_then_starttls_then_go() -> None:
    hs = server(TLSMode.REQUIRE)
    assert exchange(hs, opt(OPT_GO, go_data())) == [(OPT_GO, REP_ERR_TLS_REQD)]
    assert exchange(hs, opt(OPT_STARTTLS)) == [(OPT_STARTTLS, REP_ACK)]
    assert events(hs) == [StartTLS()]
    hs.tls_started()
    assert exchange(hs, opt(OPT_GO, go_data()))[-1] == (OPT_GO, REP_ACK)
    [event] = events(hs)
    assert isinstance(event, Negotiated) and event.export.name == "disk"


def test_export_name_after_tls_works_under_require() -> None:
    hs = upgraded()
    hs.receive_data(opt(OPT_EXPORT_NAME, b"disk"))
    [event] = events(hs)
    assert isinstance(event, Negotiated)


def test_off_refuses_starttls_with_policy() -> None:
    hs = server(TLSMode.OFF)
    assert exchange(hs, opt(OPT_STARTTLS)) == [(OPT_STARTTLS, REP_ERR_POLICY)]
    assert events(hs) == []


def test_allow_serves_plaintext_and_tls() -> None:
    hs = server(TLSMode.ALLOW)
    assert exchange(hs, opt(OPT_GO, go_data()))[-1] == (OPT_GO, REP_ACK)
    assert isinstance(events(hs)[0], Negotiated)
    hs = upgraded(TLSMode.ALLOW)
    assert exchange(hs, opt(OPT_GO, go_data()))[-1] == (OPT_GO, REP_ACK)


@pytest.mark.parametrize("tls", [TLSMode.ALLOW, TLSMode.REQUIRE])
def test_starttls_twice_is_invalid(tls: TLSMode) -> None:
    hs = upgraded(tls)
    assert exchange(hs, opt(OPT_STARTTLS)) == [(OPT_STARTTLS, REP_ERR_INVALID)]
    assert events(hs) == []


@pytest.mark.parametrize("tls", [TLSMode.OFF, TLSMode.ALLOW, TLSMode.REQUIRE])
def test_starttls_with_data_is_invalid(tls: TLSMode) -> None:
    hs = server(tls)
    assert exchange(hs, opt(OPT_STARTTLS, b"x")) == [(OPT_STARTTLS, REP_ERR_INVALID)]
    assert events(hs) == []


@pytest.mark.parametrize("tls", [TLSMode.OFF, TLSMode.ALLOW, TLSMode.REQUIRE])
def test_starttls_with_oversized_data_is_invalid_not_tls_reqd(tls: TLSMode) -> None:
    """STARTTLS is exempt from ERR_TLS_REQD, even when its data is drained unread."""
    hs = server(tls)
    assert exchange(hs, opt(OPT_STARTTLS, bytes(70_000))) == [(OPT_STARTTLS, REP_ERR_INVALID)]
    assert events(hs) == [] and not hs.tls_active
    if tls is not TLSMode.OFF:
        assert exchange(hs, opt(OPT_STARTTLS)) == [(OPT_STARTTLS, REP_ACK)]  # still in sync


def test_tls_started_without_starttls_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        server(TLSMode.REQUIRE).tls_started()


# -- server: downgrades and injection -----------------------------------------------------


def test_a_client_that_skips_starttls_gets_only_refusals() -> None:
    hs = server(TLSMode.REQUIRE)
    script = [
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_SET_META, meta_data()),
        (OPT_LIST, b""),
        (OPT_INFO, go_data()),
        (OPT_GO, go_data()),
        (OPT_GO, go_data("")),
    ]
    for option, data in script:
        assert exchange(hs, opt(option, data)) == [(option, REP_ERR_TLS_REQD)]
    assert not hs.finished and events(hs) == []
    with pytest.raises(ProtocolError):
        hs.receive_data(opt(OPT_EXPORT_NAME))


def test_state_negotiated_before_tls_is_forgotten() -> None:
    hs = server(TLSMode.ALLOW)
    assert exchange(hs, opt(OPT_STRUCTURED_REPLY)) == [(OPT_STRUCTURED_REPLY, REP_ACK)]
    assert exchange(hs, opt(OPT_SET_META, meta_data()))[-1] == (OPT_SET_META, REP_ACK)
    assert exchange(hs, opt(OPT_STARTTLS)) == [(OPT_STARTTLS, REP_ACK)]
    assert events(hs) == [StartTLS()]
    hs.tls_started()
    # Meta contexts now need structured replies again: they were forgotten.
    assert exchange(hs, opt(OPT_SET_META, meta_data())) == [(OPT_SET_META, REP_ERR_INVALID)]
    assert exchange(hs, opt(OPT_GO, go_data()))[-1] == (OPT_GO, REP_ACK)
    [event] = events(hs)
    assert isinstance(event, Negotiated)
    assert not event.structured_replies and event.meta_contexts == ()
    assert not event.export.flags & T.SEND_DF


@pytest.mark.parametrize("tls", [TLSMode.ALLOW, TLSMode.REQUIRE])
def test_plaintext_pipelined_after_starttls_closes(tls: TLSMode) -> None:
    hs = server(tls)
    with pytest.raises(ProtocolError, match="injection"):
        hs.receive_data(opt(OPT_STARTTLS) + opt(OPT_STRUCTURED_REPLY))
    assert hs.data_to_send() == b""  # not even the ACK


def test_plaintext_after_the_ack_closes() -> None:
    hs = server(TLSMode.REQUIRE)
    exchange(hs, opt(OPT_STARTTLS))
    assert events(hs) == [StartTLS()]
    with pytest.raises(ProtocolError, match="plaintext"):
        hs.receive_data(b"\x16")


# -- client ------------------------------------------------------------------------------


def greeting() -> bytes:
    return b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(data)) + data


def sent(data: bytes, skip_flags: bool = False) -> list[int]:
    options, pos = [], 4 if skip_flags else 0
    while pos < len(data):
        magic, option, length = struct.unpack_from(">8sII", data, pos)
        assert magic == b"IHAVEOPT"
        options.append(option)
        pos += 16 + length
    return options


def greeted_client(tls: TLSMode, goal: Goal = Goal.GO) -> ClientHandshake:
    client = ClientHandshake("disk", tls=tls, goal=goal)
    client.receive_data(greeting())
    return client


@pytest.mark.parametrize("tls", [TLSMode.ALLOW, TLSMode.REQUIRE])
def test_client_sends_starttls_first_then_its_plan_over_tls(tls: TLSMode) -> None:
    client = greeted_client(tls)
    assert sent(client.data_to_send(), skip_flags=True) == [OPT_STARTTLS]
    client.receive_data(option_reply(OPT_STARTTLS, REP_ACK))
    assert events(client) == [StartTLS()]
    assert client.data_to_send() == b""
    with pytest.raises(ProtocolError, match="plaintext"):
        client.receive_data(b"x")


def test_client_and_server_negotiate_over_the_upgrade() -> None:
    client = ClientHandshake("disk", tls=TLSMode.REQUIRE)
    hs = ServerHandshake(EXPORTS, tls=TLSMode.REQUIRE)
    for _ in range(20):
        client.receive_data(hs.data_to_send())
        for event in events(client):
            if isinstance(event, StartTLS):
                assert events(hs) == [StartTLS()]
                hs.tls_started()
                client.tls_started()
            else:
                assert isinstance(event, Ready)
                assert event.structured_replies and event.meta_contexts == {BASE_ALLOCATION: 1}
                assert client.tls_active and hs.tls_active
                assert isinstance(events(hs)[0], Negotiated)
                return
        out = client.data_to_send()
        if out:
            hs.receive_data(out)
    raise AssertionError("no Ready")


def test_client_require_refused_is_a_clear_option_error() -> None:
    client = greeted_client(TLSMode.REQUIRE)
    client.data_to_send()
    with pytest.raises(OptionError, match="STARTTLS.*ERR_POLICY.*not configured.*TLS is required") as caught:
        client.receive_data(option_reply(OPT_STARTTLS, REP_ERR_POLICY, b"TLS is not configured"))
    assert caught.value.reply == REP_ERR_POLICY
    assert sent(client.data_to_send()) == [OPT_ABORT]


@pytest.mark.parametrize("refusal", [REP_ERR_POLICY, REP_ERR_UNSUP])
def test_client_allow_falls_back_to_plaintext(refusal: int) -> None:
    client = greeted_client(TLSMode.ALLOW)
    client.data_to_send()
    client.receive_data(option_reply(OPT_STARTTLS, refusal))
    assert sent(client.data_to_send()) == [OPT_STRUCTURED_REPLY]
    assert not client.tls_active


def test_client_allow_does_not_fall_back_on_other_errors() -> None:
    client = greeted_client(TLSMode.ALLOW)
    client.data_to_send()
    with pytest.raises(OptionError):
        client.receive_data(option_reply(OPT_STARTTLS, REP_ERR_INVALID))


def test_client_off_never_sends_starttls() -> None:
    client = greeted_client(TLSMode.OFF)
    assert OPT_STARTTLS not in sent(client.data_to_send(), skip_flags=True)


@pytest.mark.parametrize("option", [OPT_STRUCTURED_REPLY, OPT_GO])
def test_client_off_against_a_tls_server_says_tls_is_required(option: int) -> None:
    client = ClientHandshake("disk", tls=TLSMode.OFF, structured_replies=option == OPT_STRUCTURED_REPLY)
    client.receive_data(greeting())
    assert sent(client.data_to_send(), skip_flags=True)[0] == option
    with pytest.raises(OptionError, match="requires TLS.*nbds://") as caught:
        client.receive_data(option_reply(option, REP_ERR_TLS_REQD, b"TLS required"))
    assert caught.value.reply == REP_ERR_TLS_REQD


def test_client_off_against_our_require_server() -> None:
    client = ClientHandshake("disk")
    hs = ServerHandshake(EXPORTS, tls=TLSMode.REQUIRE)
    client.receive_data(hs.data_to_send())
    hs.receive_data(client.data_to_send())
    with pytest.raises(OptionError, match="requires TLS"):
        client.receive_data(hs.data_to_send())


@pytest.mark.parametrize("tls", [TLSMode.ALLOW, TLSMode.REQUIRE])
def test_a_tls_client_refused_with_tls_reqd_is_not_told_to_use_nbds(tls: TLSMode) -> None:
    client = greeted_client(tls)
    client.data_to_send()
    with pytest.raises(OptionError) as caught:
        client.receive_data(option_reply(OPT_STARTTLS, REP_ERR_TLS_REQD, b"TLS required"))
    assert caught.value.reply == REP_ERR_TLS_REQD and "nbds://" not in str(caught.value)


def upgraded_client() -> ClientHandshake:
    client = greeted_client(TLSMode.REQUIRE)
    client.data_to_send()
    client.receive_data(option_reply(OPT_STARTTLS, REP_ACK))
    assert events(client) == [StartTLS()]
    client.tls_started()
    assert sent(client.data_to_send()) == [OPT_STRUCTURED_REPLY]
    return client


def test_a_close_right_after_tls_may_mean_a_client_certificate() -> None:
    with pytest.raises(TLSError, match="may want a client certificate"):
        upgraded_client().receive_eof()


def test_a_close_after_an_option_reply_over_tls_is_no_certificate_matter() -> None:
    client = upgraded_client()
    client.receive_data(option_reply(OPT_STRUCTURED_REPLY, REP_ACK))
    with pytest.raises(ProtocolError, match="during the handshake") as caught:
        client.receive_eof()
    assert "certificate" not in str(caught.value)
    client = upgraded_client()
    client.receive_data(option_reply(OPT_STRUCTURED_REPLY, REP_ACK)[:10])  # a reply started
    with pytest.raises(ProtocolError, match="during the handshake"):
        client.receive_eof()


def test_client_injection_after_the_ack_is_refused() -> None:
    client = greeted_client(TLSMode.REQUIRE)
    client.data_to_send()
    with pytest.raises(ProtocolError, match="injection"):
        client.receive_data(option_reply(OPT_STARTTLS, REP_ACK) + option_reply(OPT_STRUCTURED_REPLY, REP_ACK))


def test_client_forgets_nothing_it_needs_and_lists_over_tls() -> None:
    client = greeted_client(TLSMode.REQUIRE, Goal.LIST)
    assert sent(client.data_to_send(), skip_flags=True) == [OPT_STARTTLS]
    client.receive_data(option_reply(OPT_STARTTLS, REP_ACK))
    assert events(client) == [StartTLS()]
    client.tls_started()
    assert sent(client.data_to_send()) == [OPT_LIST]
    client.receive_data(option_reply(OPT_LIST, REP_SERVER, nbd_string("disk")) + option_reply(OPT_LIST, REP_ACK))
    assert sent(client.data_to_send()) == [OPT_ABORT]
    [event] = events(client)
    assert isinstance(event, Listed) and [e.name for e in event.exports] == ["disk"]


def test_client_require_against_an_old_style_server() -> None:
    client = ClientHandshake("disk", tls=TLSMode.REQUIRE)
    with pytest.raises(ProtocolError, match="cannot do TLS"):
        client.receive_data(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 0))


# -- fuzz ----------------------------------------------------------------------------------

_OPTIONS = st.sampled_from([OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY])


@settings(max_examples=300, deadline=None)
@given(
    tls=st.sampled_from(list(TLSMode)),
    script=st.lists(st.tuples(_OPTIONS, st.binary(max_size=12), st.booleans()), max_size=8),
)
def test_server_fuzz_raises_only_protocol_errors(tls: TLSMode, script: list[tuple[int, bytes, bool]]) -> None:
    """Any option sequence, with the TLS upgrade done whenever asked: replies, events or ProtocolError."""
    hs = server(tls)
    try:
        for option, data, together in script:
            hs.receive_data(opt(option, data) + (opt(OPT_LIST) if together else b""))
            out = hs.data_to_send()
            if not hs.finished:
                replies(out)  # well-formed option replies
            for event in events(hs):
                if isinstance(event, StartTLS):
                    hs.tls_started()
                else:
                    return
            if tls is TLSMode.REQUIRE and not hs.tls_active:
                assert option in (OPT_STARTTLS, OPT_ABORT) or not hs.finished
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    tls=st.sampled_from(list(TLSMode)),
    replies_=st.lists(st.tuples(_OPTIONS, st.sampled_from([REP_ACK, REP_ERR_POLICY, REP_ERR_TLS_REQD])), max_size=6),
)
def test_client_fuzz_raises_only_handshake_errors(tls: TLSMode, replies_: list[tuple[int, int]]) -> None:
    client = greeted_client(tls)
    try:
        for option, reply in replies_:
            client.receive_data(option_reply(option, reply))
            for event in events(client):
                if isinstance(event, StartTLS):
                    client.tls_started()
    except (ProtocolError, OptionError):
        pass
