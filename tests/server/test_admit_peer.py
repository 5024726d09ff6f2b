"""The server's ``admit_peer`` check (``NBDServer(admit_peer=)``): when a client picks an export it sees the
export's name and the client's verified certificate (None without TLS) and may refuse it. A refusal at
NBD_OPT_GO is NBD_REP_ERR_POLICY with the reason, then the connection closes (one refusal, one log line per
connection, whatever the client pipelines); at NBD_OPT_EXPORT_NAME the connection closes. A check that raises
refuses that client, is logged with its traceback, and the server serves the others.

Real peers: our client (``connect``), libnbd's ``nbdinfo`` and its Python binding forced to the old
NBD_OPT_EXPORT_NAME handshake, and a raw socket where the wire itself is the point.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from sendense_nbd import Export, NBDServer, connect, memory_device
from sendense_nbd.errors import OptionError
from sendense_nbd.protocol import wire
from sendense_nbd.protocol.constants import Option, OptionReply, TLSMode
from sendense_nbd.tls import init_pki, server_context
from tests.conftest import require, run
from tests.peers import nbd

pytestmark = pytest.mark.peer

MIB = 1 << 20
REFUSED = "export 'closed' is not for this client"


class Check:
    """An ``admit_peer`` that records what it was asked and admits only export ``open`` (``boom`` raises)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Mapping[str, Any] | None]] = []

    def __call__(self, export: str, certificate: Mapping[str, Any] | None) -> str | None:
        self.calls.append((export, certificate))
        if export == "boom":
            raise RuntimeError("the check itself failed")
        return None if export == "open" else REFUSED


def _exports() -> list[Export]:
    return [Export(name, memory_device(MIB)) for name in ("open", "closed", "boom")]


@pytest.fixture
async def plain() -> AsyncIterator[tuple[NBDServer, Check]]:
    check = Check()
    async with NBDServer(_exports(), port=0, shared=8, persistent=True, admit_peer=check) as server:
        yield server, check


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("refusing client")]


async def _greeted(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(reader.readexactly(wire.GREETING.size), 10)
    writer.write(wire.CLIENT_FLAGS.pack(3))
    return reader, writer


def _go(name: str) -> bytes:
    return wire.encode_option(Option.GO, wire.encode_string(name) + wire.U16.pack(0))


async def test_a_refused_go_is_err_policy_then_the_connection_closes(
    plain: tuple[NBDServer, Check], caplog: pytest.LogCaptureFixture
) -> None:
    """A client pipelining GOs to a refused export, then to an admitted one, gets NBD_REP_ERR_POLICY with the
    reason for the options already read (never a later admission), then EOF: the check ran once and logged
    once for the connection, so no client floods the log."""
    server, check = plain
    assert server.port is not None
    caplog.set_level(logging.WARNING, logger="sendense_nbd.server.connection")
    reader, writer = await _greeted(server.port)
    writer.write(_go("closed") * 50 + _go("open"))
    replies = []
    while raw := await asyncio.wait_for(reader.read(20), 10):
        raw += await reader.readexactly(20 - len(raw))
        _, option, reply, length = struct.unpack(">QIII", raw)
        replies.append((option, reply, (await reader.readexactly(length)).decode()))
    writer.close()
    assert 1 <= len(replies) <= 51 and set(replies) == {(Option.GO, OptionReply.ERR_POLICY, REFUSED)}
    assert check.calls == [("closed", None)]  # no TLS: no certificate
    assert [r.getMessage().endswith(REFUSED) for r in _refusals(caplog)] == [True]
    assert server.client_count == 0 and server.clients_served == 0


async def test_our_client_and_nbdinfo_are_refused_at_go_and_served_elsewhere(plain: tuple[NBDServer, Check]) -> None:
    server, check = plain
    base = f"nbd://127.0.0.1:{server.port}"
    with pytest.raises(OptionError, match=REFUSED) as refused:
        async with connect(f"{base}/closed"):
            pass
    assert refused.value.reply == OptionReply.ERR_POLICY
    info = await asyncio.to_thread(run, require("nbdinfo"), "--size", f"{base}/closed", check=False)
    assert info.returncode != 0 and "server policy prevents NBD_OPT_GO" in info.stderr, info.stderr
    info = await asyncio.to_thread(run, require("nbdinfo"), "--size", f"{base}/open")
    assert int(info.stdout) == MIB
    async with connect(f"{base}/open") as client:
        await client.pwrite(b"x" * 4096, offset=0)
        assert await client.pread(offset=0, length=4096) == b"x" * 4096
    assert {export for export, _ in check.calls} == {"closed", "open"}
    assert all(certificate is None for _, certificate in check.calls)


def _export_name(port: int, export: str) -> int:
    """libnbd as an old client (no fixed newstyle: NBD_OPT_EXPORT_NAME only); the export's size."""
    handle = nbd.NBD()
    handle.set_handshake_flags(0)
    handle.set_export_name(export)
    handle.connect_tcp("127.0.0.1", str(port))  # a refusal raises; the handle closes when dropped
    size = int(handle.get_size())
    handle.shutdown()
    return size


async def test_a_refused_export_name_closes_the_connection(
    plain: tuple[NBDServer, Check], caplog: pytest.LogCaptureFixture
) -> None:
    server, check = plain
    assert server.port is not None
    caplog.set_level(logging.WARNING, logger="sendense_nbd.server.connection")
    with pytest.raises(nbd.Error):
        await asyncio.to_thread(_export_name, server.port, "closed")
    assert await asyncio.to_thread(_export_name, server.port, "open") == MIB
    reader, writer = await _greeted(server.port)  # the wire: no reply at all, the connection just ends
    writer.write(wire.encode_option(Option.EXPORT_NAME, b"closed"))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert [export for export, _ in check.calls] == ["closed", "open", "closed"]
    assert len([r for r in _refusals(caplog) if REFUSED in r.getMessage()]) == 2


async def test_a_check_that_raises_refuses_that_client_and_the_server_serves_on(
    plain: tuple[NBDServer, Check], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = plain
    caplog.set_level(logging.WARNING, logger="sendense_nbd.server.connection")
    base = f"nbd://127.0.0.1:{server.port}"
    with pytest.raises(OptionError, match="could not check this client's certificate") as refused:
        async with connect(f"{base}/boom"):
            pass
    assert refused.value.reply == OptionReply.ERR_POLICY
    [failed] = [r for r in _refusals(caplog) if "checking its certificate for export 'boom' failed" in r.getMessage()]
    assert failed.levelno == logging.ERROR and failed.exc_info is not None
    assert "the check itself failed" in str(failed.exc_info[1])
    async with connect(f"{base}/open") as client:  # the server is still serving
        assert client.size == MIB
    info = await asyncio.to_thread(run, require("nbdinfo"), "--size", f"{base}/open")
    assert int(info.stdout) == MIB


async def test_over_tls_the_check_sees_the_verified_certificate(tmp_path: Path) -> None:
    """With mutual TLS the check gets the client's certificate as ssl decodes it (its subject), for our
    client and for nbdinfo over nbds://."""
    layout = init_pki(tmp_path / "pki", nodes=["site1"])
    check = Check()
    context = server_context(layout.hub, verify_client=True)
    async with NBDServer(
        _exports(), port=0, shared=8, persistent=True, tls=TLSMode.REQUIRE, tls_context=context, admit_peer=check
    ) as server:
        query = f"tls-certificates={layout.nodes['site1']}"
        base = f"nbds://localhost:{server.port}"
        async with connect(f"{base}/open?{query}") as client:
            assert client.size == MIB
        info = await asyncio.to_thread(run, require("nbdinfo"), "--size", f"{base}/closed?{query}", check=False)
        assert info.returncode != 0 and "server policy prevents NBD_OPT_GO" in info.stderr, info.stderr
    assert [export for export, _ in check.calls] == ["open", "closed"]
    for _, certificate in check.calls:
        assert certificate is not None
        assert (("commonName", "site1"),) in certificate["subject"]
