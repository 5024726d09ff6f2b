"""sendense_nbd.tcp on real kernel sockets: congestion control, buffers below and above the kernel's limits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.client import connect
from sendense_nbd.tcp import DEFAULT_LINK, LinkProfile, kernel_limits, socket_buffers, tune_socket
from tests.conftest import require

pytestmark = pytest.mark.peer

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
    with pytest.raises(ValueError, match="rtt must be positive"):
        LinkProfile(rate_bps=1_000_000, rtt=0)
    with pytest.raises(ValueError, match="rate_bps must be positive"):
        LinkProfile.parse(rtt_ms=10, rate_mbit=-1)


def test_bbr_is_set_and_reported() -> None:
    assert {"bbr", "cubic"} <= kernel_limits().congestion, "this test needs a kernel offering bbr and cubic"
    with tcp_pair() as (client, _):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
        tuning = tune_socket(client)  # the default: bbr
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
import socket, sys
from sendense_nbd.tcp import kernel_limits, tune_socket
limits = kernel_limits()
assert (limits.wmem_max, limits.tcp_wmem_max) == (4 << 20, int(sys.argv[1])), limits
with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()) as c:
    before = c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    tuning = tune_socket(c, sndbuf=64 << 20)
print(tuning.sndbuf_set, tuning.sndbuf, before)
"""


def _unprivileged_in_netns(tcp_wmem_max: int) -> tuple[bool, int, int]:
    """Tune a socket without CAP_NET_ADMIN in a fresh network namespace whose tcp_wmem[2] is ``tcp_wmem_max``.

    ``net.core.wmem_max`` is global (set to 4 MiB for the test's duration by the suite's machine, asserted in
    the child); ``tcp_wmem`` is per namespace. Returns (sndbuf_set, sndbuf, sndbuf before).
    """
    unshare, setpriv = require("unshare"), require("setpriv")
    script = (
        f"ip link set lo up && echo '4096 16384 {tcp_wmem_max}' > /proc/sys/net/ipv4/tcp_wmem && "
        f'exec {setpriv} --inh-caps=-all --bounding-set=-net_admin "$@"'
    )
    result = subprocess.run(
        [unshare, "-n", "sh", "-c", script, "sh", sys.executable, "-c", _UNPRIVILEGED, str(tcp_wmem_max)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    was_set, size, before = result.stdout.split()
    return was_set == "True", int(size), int(before)


def test_capped_buffer_is_set_only_where_it_beats_autotuning() -> None:
    """Without CAP_NET_ADMIN FORCE fails (EPERM): the capped buffer (2 x wmem_max) is set only if autotuning
    reaches less; otherwise the socket is left to autotuning (setting it would lock it smaller)."""
    assert kernel_limits().wmem_max == 4 * MiB, "this test expects net.core.wmem_max = 4 MiB"
    assert _unprivileged_in_netns(4 * MiB)[:2] == (True, 8 * MiB)  # 8 MiB capped > 4 MiB autotuned
    was_set, size, before = _unprivileged_in_netns(16 * MiB)
    assert not was_set and size == before  # 8 MiB capped < 16 MiB autotuned: left alone


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
async def test_nbd_client_and_server_sockets_get_the_congestion_control(algorithm: str) -> None:
    """Both NBD ends set their option at connect/accept; cubic proves the call is ours, not the system default."""
    device = memory_device(MiB)
    async with NBDServer([Export("disk", device)], port=0, shared=2, persistent=True, congestion=algorithm) as server:
        async with connect("127.0.0.1", server.port, "disk", congestion=algorithm) as nbd:
            sock = nbd._link.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert congestion(sock) == algorithm
            assert _server_congestion(server.port) == {algorithm}
            await nbd.pwrite(b"bbr!", offset=0)
            assert await nbd.pread(offset=0, length=4) == b"bbr!"


async def test_nbd_defaults_are_bbr() -> None:
    async with NBDServer([Export("disk", memory_device(MiB))], port=0, shared=2, persistent=True) as server:
        async with connect("127.0.0.1", server.port, "disk") as nbd:
            assert congestion(nbd._link.transport.get_extra_info("socket")) == "bbr"  # type: ignore[union-attr]
            assert _server_congestion(server.port) == {"bbr"}


def test_serve_congestion_flag(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``serve --congestion cubic`` reaches the accepted sockets (the client asks for bbr)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    server = serve("--congestion", "cubic", "-t", "-f", "raw", str(disk))

    async def check() -> set[str]:
        async with connect("127.0.0.1", server.port, congestion="bbr"):
            return _server_congestion(server.port)

    assert asyncio.run(check()) == {"cubic"}
