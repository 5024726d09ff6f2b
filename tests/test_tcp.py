"""sendense_nbd.tcp on real kernel sockets: congestion control, buffers below and above the kernel's limits."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import attrs
import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.client import connect
from sendense_nbd.errors import TunnelError
from sendense_nbd.tcp import DEFAULT_LINK, LinkProfile, kernel_limits, socket_buffers, tune_socket
from tests.conftest import require

MiB = 1 << 20


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on 127.0.0.1 (client, accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            accepted, _ = listener.accept()
            with accepted:
                yield client, accepted


def congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def test_link_profile_bdp_and_validation() -> None:
    assert DEFAULT_LINK.bdp == 12_500_000  # 1 Gbit/s x 100 ms
    assert LinkProfile.parse(rtt_ms=50, rate_mbit=100).bdp == 625_000
    assert socket_buffers(DEFAULT_LINK) == 25_000_000
    with pytest.raises(TunnelError, match="rtt must be positive"):
        LinkProfile(rate_bps=1_000_000, rtt=0)
    with pytest.raises(TunnelError, match="rate_bps must be positive"):
        LinkProfile.parse(rtt_ms=10, rate_mbit=-1)


def test_bbr_is_set_and_reported() -> None:
    assert {"bbr", "cubic"} <= kernel_limits().congestion, "this test needs a kernel offering bbr and cubic"
    with tcp_pair() as (client, _):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
        tuning = tune_socket(client)
        assert (tuning.congestion, tuning.congestion_error) == ("bbr", None)
        assert congestion(client) == "bbr"
        assert tune_socket(client, congestion="cubic").congestion == congestion(client) == "cubic"
        assert tune_socket(client, congestion=None).congestion == "cubic"  # None: leave it


def test_unavailable_algorithm_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with tcp_pair() as (client, _):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
        for _ in range(3):
            tuning = tune_socket(client, congestion="no-such-cc")
        assert tuning.congestion == "cubic" and congestion(client) == "cubic"
        assert tuning.congestion_error is not None and "'no-such-cc' unavailable" in tuning.congestion_error
        assert "bbr" in tuning.congestion_error  # names what the kernel offers
    assert sum("no-such-cc" in r.getMessage() for r in caplog.records) <= 1  # logged once per process


def test_buffer_within_autotuning_is_left_alone() -> None:
    limits = kernel_limits()
    with tcp_pair() as (client, _):
        before = (
            client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )
        tuning = tune_socket(client, sndbuf=limits.tcp_wmem_max, rcvbuf=limits.tcp_rmem_max)
        assert not tuning.sndbuf_set and not tuning.rcvbuf_set
        assert (tuning.sndbuf, tuning.rcvbuf) == before


def test_buffer_above_autotuning_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above tcp_wmem[2] but within net.core.wmem_max: plain SO_SNDBUF, reported as the kernel holds it."""
    real = kernel_limits()
    low = attrs.evolve(real, tcp_wmem_max=256 * 1024, tcp_rmem_max=256 * 1024)
    monkeypatch.setattr("sendense_nbd.tcp.kernel_limits", lambda: low)
    wanted = 2 * MiB
    assert wanted // 2 <= min(real.wmem_max, real.rmem_max)
    with tcp_pair() as (client, _):
        tuning = tune_socket(client, sndbuf=wanted, rcvbuf=wanted)
        assert tuning.sndbuf_set and tuning.rcvbuf_set
        assert tuning.sndbuf == client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == wanted
        assert tuning.rcvbuf == client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == wanted


def test_buffer_above_the_core_maximum_is_forced_when_allowed() -> None:
    limits = kernel_limits()
    wanted = 4 * max(limits.wmem_max, limits.tcp_wmem_max)
    with tcp_pair() as (client, _):
        tuning = tune_socket(client, sndbuf=wanted)
    assert tuning.sndbuf_set
    assert tuning.sndbuf == wanted, "SO_SNDBUFFORCE needs CAP_NET_ADMIN: run this test as root"


_UNPRIVILEGED = """
import socket
from sendense_nbd.tcp import kernel_limits, tune_socket
limits = kernel_limits()
wanted = 4 * max(limits.wmem_max, limits.tcp_wmem_max)
with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()) as c:
    tuning = tune_socket(c, sndbuf=wanted)
    assert tuning.sndbuf_set, tuning
    assert tuning.sndbuf == 2 * limits.wmem_max, (tuning, limits)
print("capped", tuning.sndbuf)
"""


def test_buffer_above_the_core_maximum_without_privilege_is_capped() -> None:
    """Without CAP_NET_ADMIN SO_SNDBUFFORCE fails (EPERM): the capped SO_SNDBUF stays, nothing raises."""
    setpriv = require("setpriv")
    result = subprocess.run(
        [setpriv, "--inh-caps=-all", "--bounding-set=-net_admin", sys.executable, "-c", _UNPRIVILEGED],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "capped" in result.stdout and "net.core.wmem_max" in result.stderr


def _server_congestion(port: int) -> set[str]:
    """The congestion control of our server's accepted sockets on ``port``, as ``ss`` sees them."""
    out = subprocess.run(
        [require("ss"), "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {word for word in out.split() if word in kernel_limits().congestion}


@pytest.mark.parametrize("algorithm", ["bbr", "cubic"])
async def test_nbd_client_and_server_sockets_get_the_congestion_control(
    algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both NBD ends set it at connect/accept; cubic proves the call is ours, not the system default."""
    monkeypatch.setattr("sendense_nbd.tcp.DEFAULT_CONGESTION", algorithm)
    async with NBDServer([Export("disk", memory_device(MiB))], port=0, shared=2, persistent=True) as server:
        async with connect("127.0.0.1", server.port, "disk") as nbd:
            sock = nbd._link.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert congestion(sock) == algorithm
            assert _server_congestion(server.port) == {algorithm}
            await nbd.pwrite(b"bbr!", offset=0)
            assert await nbd.pread(offset=0, length=4) == b"bbr!"
