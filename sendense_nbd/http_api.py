"""What the hub's and the node's aiohttp APIs share: JSON errors, bearer auth, JSON bodies.

Bodies are parsed strictly at the edge: UTF-8 only, at most :data:`MAX_BODY`
bytes, :data:`MAX_DEPTH` levels, integers of at most 20 digits, no NaN or
infinities, no lone surrogates. Every failure is a 4xx JSON error.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from sendense_nbd.errors import BadRequest, Conflict, SendenseError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: How an API answers its domain errors: (exception type, HTTP status, error code), the first match
#: wins; a None code answers the error's own ``code`` (a :class:`Conflict` names its clash).
ErrorMap = Sequence[tuple[type[SendenseError], int, str | None]]
#: The domain errors every API answers alike, looked up after the API's own map.
COMMON_ERRORS: ErrorMap = ((BadRequest, 400, "bad_request"), (Conflict, 409, None))

#: Largest request body (bytes); give it to ``web.Application(client_max_size=...)``.
MAX_BODY = 1 << 20
#: Deepest nesting of arrays and objects in a body.
MAX_DEPTH = 16
#: Longest integer literal (digits and sign): 64-bit values fit, 5000-digit ones never reach int().
MAX_INT_DIGITS = 20
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error(status: int, code: str, message: str) -> web.Response:
    """A JSON error answer: ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def is_loopback(host: str) -> bool:
    """Whether an API listening on ``host`` is reachable only from this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def error_middleware(token: str | None, errors: ErrorMap, *, scope: Callable[[web.Request], bool] | None = None) -> Any:
    """Bearer auth (when ``token``) and every failure as a JSON error with a code.

    With ``scope``, only the requests it picks are the API's; the others pass by untouched.
    """
    if token is not None and not check_token(token):
        raise ValueError("a bearer token is visible ASCII without spaces; an empty one would turn auth off")
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if scope is not None and not scope(request):
            return await handler(request)
        refused = browser_refusal(request, open_api=token is None)
        if refused is not None:
            return error(403, "forbidden", refused)
        if token is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                return error(401, "unauthorized", "a valid bearer token is required")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status = exc.status if exc.status < 500 else 500
            return error(status, _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal"), exc.reason)
        except SendenseError as exc:
            answer = domain_error(exc, errors)
            if answer is None:
                log.error("API error on %s %s: %s", request.method, request.path, exc)
                return error(500, "internal", str(exc))
            return answer
        except Exception as exc:  # noqa: BLE001 - a defect: answer JSON, log the trace
            log.exception("API error on %s %s", request.method, request.path)
            return error(500, "internal", f"{type(exc).__name__}: {exc}")

    return middleware


def browser_refusal(request: web.Request, *, open_api: bool) -> str | None:
    """Why a request a web browser sent on another site's behalf is refused; None for any other request.

    A browser marks such a request (``Origin`` of another host, ``Sec-Fetch-Site: cross-site``);
    an API without a token (loopback only) also refuses a ``Host`` that is not loopback, which is what a
    DNS-rebinding page sends.
    """
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return "this request came from another site"
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():  # "null" too
        return "this request came from another site"
    if open_api and foreign_host(request):
        return f"this API has no token and answers only loopback host names, not {request.host[:80]!r}"
    return None


def foreign_host(request: web.Request) -> bool:
    """Whether the request names a ``Host`` that is not loopback (a service without a token listens on loopback
    only, so such a name is a DNS-rebinding page's)."""
    return not is_loopback(urlsplit("//" + request.host).hostname or "")


def domain_error(exc: SendenseError, errors: ErrorMap) -> web.Response | None:
    """The answer ``errors`` (then :data:`COMMON_ERRORS`) give ``exc``; None if neither names its type."""
    for kind, status, code in (*errors, *COMMON_ERRORS):
        if isinstance(exc, kind):
            return error(status, code if code is not None else str(getattr(exc, "code", "conflict")), str(exc))
    return None


def check_token(token: str) -> bool:
    """Whether ``token`` can be a bearer token: non-empty visible ASCII (no spaces, no controls)."""
    return bool(token) and all("!" <= c <= "~" for c in token)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object, parsed strictly; :class:`BadRequest` otherwise.

    A body over the app's ``client_max_size`` answers 413 (aiohttp raises it).
    """
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise BadRequest(f"charset {charset[:40]!r} is not supported: send UTF-8 JSON")
    return parse_json_object(await request.read())


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Strict JSON (see the module doc) that must be an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 (byte {exc.start})") from exc
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and our parse_* refusals
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    _check_tree(value)
    if not isinstance(value, dict):
        raise BadRequest("the body is a JSON object")
    return value


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} characters (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _check_tree(value: object) -> None:
    """Depth within :data:`MAX_DEPTH`; every string and key encodable as UTF-8 (no lone surrogates)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_utf8(item)
        elif isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_utf8(key)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"a string holds a lone surrogate (U+{ord(text[exc.start]):04X})") from None
