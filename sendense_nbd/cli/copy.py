"""``sendense-nbd copy SRC DST``: copy a disk between NBD URIs and local images.

A thin edge: parse the flags into :class:`~sendense_nbd.copy.CopyOptions`,
call :func:`sendense_nbd.copy.copy_between` (which opens both ends), print
progress and one line on error (exit 1). The lead registers
:data:`copy_command` on the ``sendense-nbd`` group.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from sendense_nbd.copy import CopyOptions, CopyResult, OverlayZeroes, Progress, TargetMode, copy_between
from sendense_nbd.copy.endpoints import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
from sendense_nbd.errors import SendenseError
from sendense_nbd.storage import ImageFormat

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(ctx: click.Context, param: click.Parameter, text: str) -> int:
    match = _SIZE.match(text)
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a size such as 4M or 65536")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _changed_areas(path: str | None) -> list[tuple[int, int]] | None:
    """A JSON list of ``[offset, length]`` pairs (or of ``{"offset", "length"}`` objects)."""
    if path is None:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        areas = [(int(a["offset"]), int(a["length"])) if isinstance(a, dict) else (int(a[0]), int(a[1])) for a in data]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise click.BadParameter(f"{path}: not a JSON list of [offset, length] areas ({exc})") from exc
    return areas


class _Printer:
    """Progress to a click bar on a stderr TTY and/or JSON lines on stdout."""

    def __init__(self, *, bar: bool, json_lines: bool) -> None:
        self.bar_wanted = bar and sys.stderr.isatty()
        self.json_lines = json_lines
        self._bar: Any = None
        self._shown = 0

    def __call__(self, event: Progress) -> None:
        if self.json_lines:
            record: dict[str, object] = {
                "copied": event.copied,
                "zeroed": event.zeroed,
                "skipped": event.skipped,
                "total": event.total,
                "percent": round(event.percent, 2),
                "rate": round(event.rate),
                "eta": None if event.eta is None else round(event.eta, 1),
                "elapsed": round(event.elapsed, 3),
                "done": event.done,
            }
            if event.error is not None:
                record["error"] = event.error
            click.echo(json.dumps(record))
        if self.bar_wanted:
            if self._bar is None:
                self._bar = click.progressbar(length=event.total, file=sys.stderr, label="copying")
                self._bar.__enter__()
            self._bar.update(event.processed - self._shown)
            self._shown = event.processed
            if event.done:
                self._bar.__exit__(None, None, None)
                self._bar = None


@click.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("-C", "--connections", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("-R", "--requests", type=click.IntRange(1, 1024), default=16, show_default=True, help="Per connection.")
@click.option("--request-size", default="256K", show_default=True, callback=_size, help="Largest request (e.g. 1M).")
@click.option(
    "-f",
    "--target-format",
    type=click.Choice([f.value for f in ImageFormat]),
    help="Format of a local DST (created with SRC's size when missing); an RBD DST is raw.",
)
@click.option(
    "--target-mode",
    type=click.Choice([m.value for m in TargetMode]),
    default="auto",
    show_default=True,
    help="fresh: DST reads zeroes; raw: may punch holes; overlay: has a backing chain (zeroes are written).",
)
@click.option(
    "--overlay-zeroes",
    type=click.Choice([z.value for z in OverlayZeroes]),
    default="write-zeroes",
    show_default=True,
    help="How zero areas reach an overlay: WRITE_ZEROES with NO_HOLE, or zero data.",
)
@click.option("--changed-areas", type=click.Path(dir_okay=False), help="JSON [[offset, length], ...]: copy only these.")
@click.option(
    "--verify",
    is_flag=True,
    help="After the copy, read every byte again (the source through new connections) and compare.",
)
@click.option("--flush/--no-flush", default=True, show_default=True, help="FLUSH the target before reporting success.")
@click.option(
    "--retries",
    type=click.IntRange(0, 100),
    default=5,
    show_default=True,
    help="Attempts after a transient failure (EIO, a lost connection, a timeout), with backoff up to 8 s.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0, min_open=True),
    default=DEFAULT_CONNECT_TIMEOUT,
    show_default=True,
    help="Seconds to connect to an NBD server and negotiate.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0, min_open=True),
    default=DEFAULT_REQUEST_TIMEOUT,
    show_default=True,
    help="Seconds one NBD request may take; a stalled server fails the copy after about (retries + 1) x this.",
)
@click.option(
    "--tls-creds",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="For nbds:// URIs without tls-certificates=: credentials in qemu's layout (ca-cert.pem; "
    "client-cert.pem and client-key.pem for mutual TLS).",
)
@click.option(
    "--tls-fingerprint",
    metavar="sha256:HEX",
    help="For nbds:// URIs without tls-fingerprint=: trust exactly the server certificate with this SHA-256 pin.",
)
@click.option("--progress", "show_progress", is_flag=True, help="A progress bar on stderr (when it is a TTY).")
@click.option("--json", "json_lines", is_flag=True, help="JSON lines of progress on stdout.")
def copy_command(
    src: str,
    dst: str,
    connections: int,
    requests: int,
    request_size: int,
    target_format: str | None,
    target_mode: str,
    overlay_zeroes: str,
    changed_areas: str | None,
    verify: bool,
    flush: bool,
    retries: int,
    connect_timeout: float,
    request_timeout: float,
    tls_creds: str | None,
    tls_fingerprint: str | None,
    show_progress: bool,
    json_lines: bool,
) -> None:
    """Copy SRC to DST: NBD URIs (nbd://, nbd+unix://, and nbds://, nbds+unix:// over TLS), local image files,
    or RBD images (qemu's rbd:POOL/IMAGE[@SNAP][:conf=...:id=...], or its json: form). A missing DST is
    created with SRC's size (an RBD one raw, as qemu-img convert); an existing one is written as it is (-n).

    Holes are never read; zeroes are detected in every byte. With --verify
    the copy is compared afterwards. Exit 0 on success, 1 on failure (one
    line on stderr).
    """
    if tls_creds or tls_fingerprint:
        src, dst = _with_tls(src, dst, tls_creds, tls_fingerprint)
    printer = _Printer(bar=show_progress, json_lines=json_lines)
    callback: Callable[[Progress], None] | None = printer if (printer.bar_wanted or json_lines) else None
    options = CopyOptions(
        connections=connections,
        requests=requests,
        request_size=request_size,
        target_mode=TargetMode(target_mode),
        overlay_zeroes=OverlayZeroes(overlay_zeroes),
        verify=verify,
        flush=flush,
        retries=retries,
    )
    copying = copy_between(
        src,
        dst,
        options,
        fmt=ImageFormat(target_format) if target_format else None,
        changed_areas=_changed_areas(changed_areas),
        progress=callback,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        trusted=True,  # the operator's own names
    )
    result = _execute(copying)
    if not json_lines:
        click.echo(_summary(result), err=True)


def _summary(result: CopyResult) -> str:
    """The line ``copy`` ends with on stderr."""
    return (
        f"copied {result.copied} bytes, zeroed {result.zeroed}, skipped {result.skipped} "
        f"of {result.size} in {result.elapsed:.2f} s ({result.target_mode.value} target"
        f"{', verified' if result.verified else ''})"
    )


def _with_tls(src: str, dst: str, creds: str | None, pin: str | None) -> tuple[str, str]:
    """SRC and DST with --tls-creds and --tls-fingerprint added to the nbds URIs that do not say them."""
    import attrs

    from sendense_nbd.client.uri import parse_uri

    specs, secured = [], False
    for spec in (src, dst):
        if "://" in spec:
            try:
                address = parse_uri(spec)
            except SendenseError as exc:
                raise click.BadParameter(str(exc)) from exc
            if address.tls:
                secured = True
                certificates, fingerprint = address.tls_certificates or creds, address.tls_fingerprint or pin
                try:
                    spec = attrs.evolve(address, tls_certificates=certificates, tls_fingerprint=fingerprint).uri
                except SendenseError as exc:
                    raise click.BadParameter(str(exc)) from exc
        specs.append(spec)
    if not secured:
        raise click.UsageError("--tls-creds and --tls-fingerprint apply to nbds:// and nbds+unix:// URIs only")
    return specs[0], specs[1]


def _execute(copying: Coroutine[Any, Any, CopyResult]) -> CopyResult:
    """Run the copy; on failure one line on stderr and exit 1 (130 when interrupted)."""
    try:
        return asyncio.run(copying)
    except KeyboardInterrupt:
        click.echo("sendense-nbd copy: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # one line, never a traceback, whatever failed
        click.echo(f"sendense-nbd copy: error: {_one_line(exc)}", err=True)
        sys.exit(1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (SendenseError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"  # not one of ours: name it, it is a defect to report
