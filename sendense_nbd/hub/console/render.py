"""What every console page shares: rendering, the template filters, and errors as sentences.

Templates are Jinja2 with autoescape on: whatever a page shows (VM names come from vCenter and may
hold anything) is escaped. The filters here return :class:`markupsafe.Markup` only around values
they escaped themselves.
"""

from __future__ import annotations

import datetime
import functools
import math
from collections.abc import Mapping
from typing import Any

import aiohttp_jinja2
import jinja2
import jinja2.runtime
from aiohttp import web
from markupsafe import Markup, escape

from sendense_nbd.errors import SendenseError
from sendense_nbd.http_api import ErrorMap, domain_error
from sendense_nbd.hub.clock import Clock

from . import auth

#: The hub's clock (pages show its time as "now") and the API's error map (statuses for errors).
CLOCK: web.AppKey[Clock] = web.AppKey("console_clock", Clock)
ERRORS: web.AppKey[ErrorMap] = web.AppKey("console_errors", tuple)

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def render(request: web.Request, template: str, context: Mapping[str, Any], *, status: int = 200) -> web.Response:
    """``template`` filled with ``context`` (plus what every page gets: see :func:`page_context`)."""
    if aiohttp_jinja2.REQUEST_CONTEXT_KEY not in request:  # refused before the context processors ran
        context = {**base_context(request), **context}
    return aiohttp_jinja2.render_template(template, request, dict(context), status=status)


async def page_context(request: web.Request) -> dict[str, Any]:
    """The context processor: :func:`base_context` for every page."""
    return base_context(request)


def base_context(request: web.Request) -> dict[str, Any]:
    """What every template gets: the CSRF token, ``take_flashes()`` (the messages to show, taken when the page
    is drawn, so a handler's own flash shows too), the hub's time, the current path."""
    session = request.get(auth.SESSION)
    return {
        "csrf_token": "" if session is None else session.csrf,
        "take_flashes": functools.partial(auth.take_flashes, request),
        "now": request.app[CLOCK].now(),
        "path": request.path,
        "logged_in": session is not None,
    }


def message_for(exc: BaseException) -> str:
    """An error as an operator reads it: the hub's own sentence, never JSON."""
    if isinstance(exc, web.HTTPException):
        return exc.reason
    return str(exc).strip() or type(exc).__name__


def status_for(exc: BaseException, errors: ErrorMap) -> int:
    """The HTTP status the REST API answers ``exc`` with (500 for what it does not know)."""
    if isinstance(exc, web.HTTPException):
        return exc.status
    if isinstance(exc, SendenseError):
        answer = domain_error(exc, errors)
        if answer is not None:
            return answer.status
    return 500


def human_bytes(value: object) -> str:
    """``1.5 GiB``; an unknown size is ``-``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    size, unit = float(value), 0
    while abs(size) >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f} {_UNITS[unit]}" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def human_rate(value: object) -> str:
    """Bytes per second as ``120.5 MiB/s``."""
    text = human_bytes(value)
    return text if text == "-" else text + "/s"


def human_duration(value: object) -> str:
    """Seconds as ``2 h 05 min``, ``3 min 20 s`` or ``4.2 s``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return "-"
    if value < 10:
        return f"{value:.1f} s"
    seconds = int(value)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def time_element(value: object) -> Markup:
    """An epoch time as ``<time>``: UTC in the page, the browser's own time zone once console.js ran."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return Markup("-")
    moment = datetime.datetime.fromtimestamp(value, datetime.UTC)
    iso = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return Markup('<time datetime="{}">{}</time>').format(iso, moment.strftime("%Y-%m-%d %H:%M:%S UTC"))


def human_age(value: object, now: float) -> str:
    """How long ago an epoch time was: ``3 h ago``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return human_duration(max(0.0, now - value)) + " ago"


def filters() -> dict[str, Any]:
    """The filters every template may use (see the contract in the package doc)."""
    return {
        "bytes": human_bytes,
        "rate": human_rate,
        "duration": human_duration,
        "time": time_element,
        "age": human_age,
    }


@jinja2.pass_context
def csrf_field(context: jinja2.runtime.Context) -> Markup:
    """The hidden input that carries the session's CSRF token in a form: ``{{ csrf_field() }}``."""
    return Markup('<input type="hidden" name="csrf" value="{}">').format(escape(context.get("csrf_token", "")))
