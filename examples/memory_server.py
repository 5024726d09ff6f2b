"""Serve an in-memory disk from asyncio code, and use it with nbdsh.

    .venv/bin/python examples/memory_server.py

The server lives inside this program's event loop (``async with
NBDServer(...)``); a real client, libnbd's ``nbdsh``, writes and reads back a
pattern, and the server stops when the client leaves (not persistent).
"""

from __future__ import annotations

import asyncio
import sys

from sendense_nbd import Export, NBDServer, memory_device

NBDSH_SCRIPT = """
h.pwrite(b"sendense" * 512, 1 << 20)
assert h.pread(4096, 1 << 20) == b"sendense" * 512
print("nbdsh: wrote and read back 4 KiB at 1 MiB; size", h.get_size())
"""


async def main() -> None:
    disk = memory_device(64 << 20)
    async with NBDServer([Export("scratch", disk, description="64 MiB in RAM")], port=0) as server:
        uri = f"nbd://127.0.0.1:{server.port}/scratch"
        print(f"serving {uri}")
        # nbdsh is "python3 -m nbd"; run it with this interpreter, which sees python3-libnbd.
        client = await asyncio.create_subprocess_exec(sys.executable, "-m", "nbd", "-u", uri, "-c", NBDSH_SCRIPT)
        if await client.wait():
            raise SystemExit("nbdsh failed")
        await server.wait_closed()  # the only client left, so the server stopped
    check = bytearray(8)
    disk.read_into(offset=1 << 20, buffer=memoryview(check))
    print("server stopped; the device holds", bytes(check))


if __name__ == "__main__":
    asyncio.run(main())
