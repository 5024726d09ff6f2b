"""The hub API as the operator commands (``node``, ``policy``, ``status``) call it: sync, JSON, one-line errors.

``--hub URL`` (default ``$SENDENSE_HUB_URL``, else ``http://127.0.0.1:8082``) and ``--token-file F``
(default ``$SENDENSE_HUB_TOKEN_FILE``) come from :func:`hub_options`, which hands the command a
:class:`HubClient` and turns a refused call into ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import click

from sendense_nbd.errors import HubApiError

if TYPE_CHECKING:
    import urllib.error

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_HUB = "http://127.0.0.1:8082"
HUB_ENV, TOKEN_ENV = "SENDENSE_HUB_URL", "SENDENSE_HUB_TOKEN_FILE"
#: Largest answer read, and how long a call may take.
MAX_ANSWER = 64 << 20
TIMEOUT = 60.0


class HubClient:
    """``HubClient(url, token).call(method, path, body=None)``: a JSON call to ``URL/api/v1/PATH``.

    A refusal or no answer is a :class:`HubApiError` with the API's code and message on one line.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise HubApiError(f"{url!r} is not the hub's http:// or https:// URL")
        base = url.rstrip("/")
        self.base = base if base.endswith("/api/v1") else base + "/api/v1"
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: object = None) -> Any:
        """The answer's JSON (None for an empty answer)."""
        import urllib.error
        import urllib.request  # here: every command of the CLI imports this module

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return _json(response.read(MAX_ANSWER + 1), method, path)
        except urllib.error.HTTPError as exc:
            raise HubApiError(_refusal(exc, method, path), exc.code) from None
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise HubApiError(f"the hub at {self.base} did not answer {method} {path}: {reason}") from exc


def _json(raw: bytes, method: str, path: str) -> Any:
    if len(raw) > MAX_ANSWER:
        raise HubApiError(f"{method} {path}: the hub's answer is larger than {MAX_ANSWER} bytes")
    try:
        return json.loads(raw) if raw else None
    except ValueError as exc:
        raise HubApiError(f"{method} {path}: the hub's answer is not JSON: {exc}") from exc


def _refusal(exc: urllib.error.HTTPError, method: str, path: str) -> str:
    """``HTTP 404 not_found: no node 'x'`` from the API's error body (or its status line)."""
    try:
        error = json.loads(exc.read(65536))["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError, OSError):
        code, message = "error", f"{method} {path}: {exc.reason}"
    return " ".join(f"HTTP {exc.code} {code}: {message}".split())


def read_token(path: str | None, option: str = "--token-file") -> str | None:
    """A bearer token file's token (first 64 KiB, stripped); an empty or unusable one is an error naming
    ``option`` (it must never turn auth off)."""
    from sendense_nbd.http_api import check_token

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(65536).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=option) from exc
    if not check_token(token):
        problem = "is empty" if not token else "holds characters a bearer token cannot have (spaces, controls)"
        raise click.BadParameter(f"{path} {problem}", param_hint=option)
    return token


def hub_options(command: F) -> F:
    """Add ``--hub`` and ``--token-file``; the command gets ``hub`` (a :class:`HubClient`) in their place."""

    @click.option("--hub", "hub_url", default=lambda: os.environ.get(HUB_ENV, DEFAULT_HUB), show_default=DEFAULT_HUB,
                  help=f"The hub API (default ${HUB_ENV}).")  # fmt: skip
    @click.option("--token-file", "hub_token_file", default=lambda: os.environ.get(TOKEN_ENV),
                  type=click.Path(dir_okay=False), help=f"The hub's bearer token (default ${TOKEN_ENV}).")  # fmt: skip
    @functools.wraps(command)
    def wrapper(hub_url: str, hub_token_file: str | None, **kwargs: Any) -> Any:
        try:
            return command(hub=HubClient(hub_url, read_token(hub_token_file)), **kwargs)
        except HubApiError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
