"""What the API fuzzers share: an aiohttp app in a thread spoken to over raw HTTP, the check of every
answer, and hypothesis strategies for hostile JSON values, raw bodies and content types."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from hypothesis import strategies as st

#: Builds the app under test on the thread's loop; returns it and what closes its service.
AppFactory = Callable[[], Awaitable[tuple[web.Application, Callable[[], Awaitable[None]]]]]

MIB = 1 << 20
VM = "/DC/vm/fuzz"

NASTY_TEXT = st.sampled_from([
    "", "\ud800", "a\udfffb", "\x00", "/DC/vm/a\x01b", "/DC/vm/a\nb", "/DC/vm/\u202e", "../x", "/etc/passwd",
    "x" * 5000, "\u00b2", " 2000", "full ", "é", "/", "//", "/DC/vm/", VM,
])  # fmt: skip
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40), st.text(st.characters(categories=["Cs", "Cc", "Zl"]), max_size=5))
INTEGERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 511, 512, MIB, 2**31, 2**46, 2**52, 2**63 - 1, 2**63, 2**64, -1, 10**30]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([
        b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"vm_path": "/DC/vm/a", "disks": [{"key": ' + b"9" * 5000 + b"}]}",
        b'{"vm_path": "\\ud800"}', b'{"point_id": NaN}', b'{"x": 1e999}', b"\xff\xfe{", b"null", b"[]", b'"s"',
    ]),
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "application/json; charset=x-unknown",
     "application/json; charset=latin-1", "text/plain", None]
)  # fmt: skip


class AppThread:
    """An API (hub or node) on an event loop in a thread; ``call`` speaks raw HTTP to it."""

    def __init__(self, make: AppFactory, prefix: str) -> None:
        self.prefix = prefix
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._make = make
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        app, close = await self._make()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await close()

    def start(self) -> AppThread:
        self._thread.start()
        assert self._ready.wait(30) and self.error is None, f"the API did not start: {self.error!r}"
        return self

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the API did not stop"
        self.loop.close()

    def call(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = "application/json"
    ) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            connection.request(method, self.prefix + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data

    def json(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        return self.call(method, path, None if body is None else json.dumps(body).encode())


def check_answer(
    answer: tuple[int, Any], request: tuple[str, str, bytes | None, Any], upstream: frozenset[int] = frozenset()
) -> None:
    """Below 500 (or one of the ``upstream`` statuses, a peer's failure), and a 4xx/5xx is a JSON error."""
    status, body = answer
    shown = (request[0], request[1][:200], (request[2] or b"")[:200], request[3])
    assert status < 500 or status in upstream, (status, body, shown)
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, (status, body, shown)
        assert set(body["error"]) == {"code", "message"}, (status, body, shown)
        assert all(isinstance(v, str) and v for v in body["error"].values()), (status, body, shown)
