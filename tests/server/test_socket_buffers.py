"""The NBD server's and client's TCP buffers: sized for a long fat link where autotuning stops short.

Read back from the kernel with ``ss -tm`` (``tb``: the socket's send buffer), on both ends of a real
connection between our server and our client.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from sendense_nbd import Export, NBDServer, connect, memory_device
from sendense_nbd.tcp import DEFAULT_SOCKET_BUFFER, kernel_limits
from tests.conftest import require

pytestmark = pytest.mark.peer

MiB = 1 << 20


def send_buffers(port_filter: str) -> list[int]:
    """The send buffers (kernel units) of the established sockets ``ss`` finds with ``port_filter``."""
    shown = subprocess.run(
        [require("ss"), "-tmnH", "state", "established", f"( {port_filter} )"],
        check=True, capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    return [int(found) for found in re.findall(r"\btb(\d+)", shown)]


async def buffers_of_a_connection(server_buffer: int | None, client_buffer: int | None) -> tuple[int, int]:
    """(server's, client's) send buffer of one connection between our server and our client."""
    device = memory_device(MiB)
    async with NBDServer([Export("disk", device)], port=0, socket_buffer=server_buffer) as server:
        async with connect(f"nbd://127.0.0.1:{server.port}/disk", socket_buffer=client_buffer) as client:
            await client.pread(offset=0, length=4096)
            (served,) = send_buffers(f"sport = :{server.port}")
            (dialled,) = send_buffers(f"dport = :{server.port}")
    return served, dialled


async def test_both_ends_get_the_tunnels_buffers_where_autotuning_stops_short() -> None:
    served, dialled = await buffers_of_a_connection(DEFAULT_SOCKET_BUFFER, DEFAULT_SOCKET_BUFFER)
    if kernel_limits().tcp_wmem_max < DEFAULT_SOCKET_BUFFER:  # this machine: 4 MiB, so set (as root: forced)
        assert served >= DEFAULT_SOCKET_BUFFER and dialled >= DEFAULT_SOCKET_BUFFER, (served, dialled)
    else:  # autotuning reaches as far: left to it
        assert served <= kernel_limits().tcp_wmem_max and dialled <= kernel_limits().tcp_wmem_max


async def test_none_leaves_the_buffers_to_autotuning() -> None:
    served, dialled = await buffers_of_a_connection(None, None)
    assert served <= kernel_limits().tcp_wmem_max and dialled <= kernel_limits().tcp_wmem_max
    assert served < DEFAULT_SOCKET_BUFFER
