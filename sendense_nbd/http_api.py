"""What the hub's and the node's aiohttp APIs share: JSON errors, bearer auth, JSON bodies."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sendense_nbd.errors import SendenseError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (exception type, HTTP status, error code), the first match wins.
ErrorMap = list[tuple[type[Exception], int, str]]


class BadRequest(SendenseError):
    """A caller's request is invalid; ``code`` names why (``bad_request`` answers 400, others 409)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def error_middleware(token: str | None, errors: ErrorMap) -> Any:
    """Bearer auth (when ``token``) and every failure as a JSON error with a code."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return error(401, "unauthorized", "a valid bearer token is required")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return error(exc.status, "not_found" if exc.status == 404 else "http", exc.reason)
        except BadRequest as exc:
            status = {"bad_request": 400, "not_found": 404}.get(exc.code, 409)
            return error(status, exc.code, str(exc))
        except SendenseError as exc:
            for kind, status, code in errors:
                if isinstance(exc, kind):
                    return error(status, code, str(exc))
            return error(500, "internal", str(exc))
        except Exception as exc:  # noqa: BLE001 - a defect: answer JSON, log the trace
            log.exception("API error on %s %s", request.method, request.path)
            return error(500, "internal", f"{type(exc).__name__}: {exc}")

    return middleware


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body is a JSON object")
    return body
