"""A small HTTP server that answers the S3 calls offsite copies make, and can misbehave as a hostile or broken
S3 service would: ranges ignored or wrong, bodies short, long, endless or dribbled, part listings that never end,
deletes refused without a lock. Real RGW cannot be made to lie, so tests of those answers talk to this stand-in
for the peer (started by the test, on 127.0.0.1); it is not a model of S3, only of the answers asked of it."""

from __future__ import annotations

import datetime
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


@attrs.define
class Behaviour:
    """What the stand-in answers.

    ``objects``: key -> bytes. ``ranged``: how a ranged GET starting at one of the ``hostile`` offsets (None:
    any) is answered (``honest``,
    ``ignore-range``, ``wrong-range``, ``short``, ``long``, ``dribble``); ``whole``: how a plain GET is
    (``honest``, ``endless``, ``long``). ``parts``: marker -> (part numbers, truncated, next marker) for
    ListParts. ``retention``: key -> (mode, epoch) or None. ``deny_delete``: DELETE answers 403 AccessDenied.
    """

    objects: dict[str, bytes] = attrs.field(factory=dict)
    ranged: str = "honest"
    hostile: frozenset[int] | None = None
    whole: str = "honest"
    parts: Callable[[int], tuple[list[int], bool, str]] | None = None
    retention: dict[str, tuple[str, float]] = attrs.field(factory=dict)
    deny_delete: bool = False
    #: Requests seen: (method, path with query).
    seen: list[tuple[str, str]] = attrs.field(factory=list)
    #: Body bytes sent by endless or long answers (how much a client let through).
    streamed: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet."""

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        url = urllib.parse.urlsplit(self.path)
        self.server.behaviour.seen.append((self.command, self.path))
        key = urllib.parse.unquote(url.path).split("/", 2)[2] if url.path.count("/") >= 2 else ""
        return key, urllib.parse.parse_qs(url.query, keep_blank_values=True)

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        self._answer(status, f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode())

    def do_GET(self) -> None:
        """Objects, ranges, retention, part listings, the bucket's lock configuration."""
        key, query = self._route()
        behaviour = self.server.behaviour
        if "object-lock" in query:
            enabled = "<ObjectLockEnabled>Enabled</ObjectLockEnabled>"
            return self._answer(200, f"<ObjectLockConfiguration {NS}>{enabled}</ObjectLockConfiguration>".encode())
        if "retention" in query:
            return self._retention(key)
        if "uploadId" in query:
            return self._parts(key, int(query.get("part-number-marker", ["0"])[0] or 0))
        if key not in behaviour.objects:
            return self._error(404, "NoSuchKey")
        data = behaviour.objects[key]
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if ranged is None:
            return self._whole(data)
        return self._range(data, int(ranged[1]), int(ranged[2]))

    def _retention(self, key: str) -> None:
        found = self.server.behaviour.retention.get(key)
        if found is None:
            return self._error(404, "NoSuchObjectLockConfiguration")
        date = datetime.datetime.fromtimestamp(found[1], tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        body = f"<Retention {NS}><Mode>{found[0]}</Mode><RetainUntilDate>{date}</RetainUntilDate></Retention>"
        self._answer(200, body.encode())

    def _parts(self, key: str, marker: int) -> None:
        assert self.server.behaviour.parts is not None
        numbers, truncated, following = self.server.behaviour.parts(marker)
        items = "".join(
            f'<Part><PartNumber>{n}</PartNumber><ETag>"{n:032x}"</ETag><Size>{5 << 20}</Size></Part>' for n in numbers
        )
        body = (
            f"<ListPartsResult {NS}><Bucket>b</Bucket><Key>{key}</Key><UploadId>u</UploadId>"
            f"<PartNumberMarker>{marker}</PartNumberMarker><NextPartNumberMarker>{following}</NextPartNumberMarker>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{items}</ListPartsResult>"
        )
        self._answer(200, body.encode())

    def _whole(self, data: bytes) -> None:
        mode = self.server.behaviour.whole
        if mode == "honest":
            return self._answer(200, data)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunks(data + b"x" * (1 << 20) if mode == "long" else None)

    def _chunks(self, data: bytes | None) -> None:
        """A chunked body: ``data`` (None: endless zeroes until the client goes away)."""
        piece = 64 << 10
        offset = 0
        try:
            while data is None or offset < len(data):
                chunk = bytes(piece) if data is None else data[offset : offset + piece]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.server.behaviour.streamed += len(chunk)
                offset += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up: what a bounded reader does
        self.close_connection = True

    def _range(self, data: bytes, first: int, last: int) -> None:
        behaviour = self.server.behaviour
        asked = data[first : last + 1]
        honest = {"Content-Range": f"bytes {first}-{first + len(asked) - 1}/{len(data)}"}
        mode = behaviour.ranged if behaviour.hostile is None or first in behaviour.hostile else "honest"
        if mode == "honest":
            return self._answer(206, asked, honest)
        if mode == "ignore-range":
            return self._answer(200, data)
        if mode == "wrong-range":
            return self._answer(206, data[: len(asked)], {"Content-Range": f"bytes 0-{len(asked) - 1}/{len(data)}"})
        self.send_response(206)
        for name, value in honest.items():
            self.send_header(name, value)
        if mode == "long":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            return self._chunks(asked + b"y" * 4096)
        self.send_header("Content-Length", str(len(asked)))
        self.end_headers()
        self._partial(asked, mode)

    def _partial(self, asked: bytes, mode: str) -> None:
        """``short``: half the body, then the connection closes; ``dribble``: a byte every 0.2 s."""
        try:
            if mode == "short":
                self.wfile.write(asked[: len(asked) // 2])
            else:
                for offset in range(len(asked)):
                    self.wfile.write(asked[offset : offset + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
        except OSError:
            pass
        self.close_connection = True

    def do_DELETE(self) -> None:
        """403 AccessDenied when told so, else gone."""
        self._route()
        if self.server.behaviour.deny_delete:
            return self._error(403, "AccessDenied")
        self._answer(204)

    def do_PUT(self) -> None:
        """Taken (retention)."""
        self._route()
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        self._answer(200)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up on a hostile answer is what the test wants; anything else is reported."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@contextmanager
def standin(behaviour: Behaviour) -> Iterator[str]:
    """The stand-in serving ``behaviour`` on 127.0.0.1 while the block runs; its endpoint URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.behaviour = behaviour
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def free_port() -> int:
    """A port nothing listens on (for an endpoint that refuses connections)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
