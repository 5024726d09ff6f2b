"""A first interop check of the server over TLS: libnbd's nbdinfo with an nbds:// URI
(tests/tls/ has the full peer matrix)."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from sendense_nbd import Export, NBDServer, memory_device
from sendense_nbd.protocol.constants import TLSMode
from sendense_nbd.tls import server_context
from sendense_nbd.tls.pki import Layout, init_pki

pytestmark = pytest.mark.peer

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return init_pki(tmp_path_factory.mktemp("pki"))


def test_nbdinfo_over_nbds(pki: Layout) -> None:
    """A first interop check: libnbd's nbdinfo reads our server's export over TLS."""

    async def run() -> str:
        async with NBDServer(
            [Export("disk", memory_device(MiB))],
            port=0,
            persistent=True,
            tls=TLSMode.REQUIRE,
            tls_context=server_context(pki.hub),
        ) as nbd:
            uri = f"nbds://localhost:{nbd.port}/disk?tls-certificates={pki.hub}"
            process = await asyncio.create_subprocess_exec(
                "nbdinfo", "--json", uri, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0, err.decode()
            plain = await asyncio.create_subprocess_exec(
                "nbdinfo", f"nbd://localhost:{nbd.port}/disk", stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            _, refused = await asyncio.wait_for(plain.communicate(), 30)
            # libnbd words NBD_REP_ERR_TLS_REQD to GO as "Operation not supported".
            assert plain.returncode != 0, refused.decode()
            return out.decode()

    out = asyncio.run(run())
    assert '"export-size": 1048576' in out
    assert '"export-name": "disk"' in out
