"""A vCenter/ESXi session: credentials, TLS (verified or pinned), one worker thread.

pyvmomi is blocking. Every call runs in the session's single worker thread
(:meth:`VSphere.call`), so the event loop that drives the copy never
blocks and pyvmomi's connection is never used from two threads at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import getpass
import hashlib
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from sendense_nbd.errors import VSphereError

T = TypeVar("T")

PASSWORD_ENV = "VMWARE_PASSWORD"


def read_password(password_file: str | None = None, *, env: str = PASSWORD_ENV, prompt: bool = True) -> str:
    """The vCenter password: from ``password_file``, else ``$VMWARE_PASSWORD``, else a prompt.

    Never from argv, where any local user can read it with ``ps``.
    """
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as exc:
            raise VSphereError(f"cannot read the password file {password_file}: {exc.strerror}") from exc
    if env in os.environ:
        return os.environ[env]
    if prompt and os.isatty(0):
        return getpass.getpass("vCenter password: ")
    raise VSphereError(f"no vCenter password: give --vmware-password-file, or set ${env}")


@attrs.frozen
class Endpoint:
    """Where vCenter/ESXi listens, and how its certificate is trusted."""

    host: str
    port: int = 443
    #: SHA-1 or SHA-256 fingerprint to pin (hex, colons optional); None: verify against the CA store.
    thumbprint: str | None = None
    #: A CA bundle to verify against instead of the system store.
    ca_file: str | None = None

    @classmethod
    def parse(cls, text: str, *, thumbprint: str | None = None, ca_file: str | None = None) -> Endpoint:
        """``host``, ``host:port``, ``[v6]:port`` or ``https://host[:port][/sdk]``."""
        rest = text.split("://", 1)[1] if "://" in text else text
        rest = rest.split("/", 1)[0]
        host, port = rest, 443
        if rest.startswith("["):
            host, _, tail = rest[1:].partition("]")
            if tail.startswith(":"):
                port = _port(tail[1:], text)
        elif rest.count(":") == 1:
            host, _, number = rest.partition(":")
            port = _port(number, text)
        if not host:
            raise VSphereError(f"{text!r}: not a vCenter/ESXi address")
        return cls(host, port, thumbprint, ca_file)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise VSphereError(f"{whole!r}: bad port {text!r}")
    return int(text)


def normalize_thumbprint(text: str) -> str:
    """Upper-case hex pairs joined by colons (the form vddk wants); SHA-1 or SHA-256 only."""
    digits = text.replace(":", "").strip().upper()
    if len(digits) not in (40, 64) or any(c not in "0123456789ABCDEF" for c in digits):
        raise VSphereError(f"{text!r} is not a SHA-1 or SHA-256 thumbprint")
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def certificate_thumbprint(host: str, port: int = 443, *, algorithm: str = "sha1", timeout: float = 10.0) -> str:
    """The server certificate's fingerprint, colon-separated (SHA-1 is what nbdkit-vddk's ``thumbprint=`` takes)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise VSphereError(f"cannot read the TLS certificate of {host}:{port}: {exc}") from exc
    if not der:
        raise VSphereError(f"{host}:{port} sent no TLS certificate")
    return normalize_thumbprint(hashlib.new(algorithm, der).hexdigest())


class VSphere:
    """A logged-in session. Use :func:`connect`; close with :meth:`close`."""

    def __init__(self, endpoint: Endpoint, username: str, service_instance: Any, worker: Any) -> None:
        self.endpoint = endpoint
        self.username = username
        self.si = service_instance
        self.content = service_instance.RetrieveContent()
        self._worker: concurrent.futures.ThreadPoolExecutor = worker

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking pyvmomi ``function(*args, **kwargs)`` in the session's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, lambda: function(*args, **kwargs))

    async def close(self) -> None:
        from pyVim.connect import Disconnect

        try:
            await self.call(Disconnect, self.si)
        except Exception:  # noqa: BLE001 - logging out is best effort
            pass
        self._worker.shutdown(wait=False)

    async def __aenter__(self) -> VSphere:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(endpoint: Endpoint, username: str, password: str, *, http_timeout: float = 60.0) -> VSphere:
    """Log in to vCenter/ESXi.

    TLS is verified against the CA store (or ``endpoint.ca_file``), unless
    ``endpoint.thumbprint`` pins the certificate instead.
    """
    from pyVim.connect import SmartConnect
    from pyVmomi import vim, vmodl

    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vsphere")
    if endpoint.thumbprint:
        pinned = normalize_thumbprint(endpoint.thumbprint)
        algorithm = "sha1" if len(pinned) == 59 else "sha256"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=endpoint.ca_file)

    def login() -> Any:
        if endpoint.thumbprint:
            actual = certificate_thumbprint(endpoint.host, endpoint.port, algorithm=algorithm, timeout=http_timeout)
            if actual != pinned:
                raise VSphereError(
                    f"{endpoint.host}:{endpoint.port}: certificate thumbprint {actual} "
                    f"does not match the pinned {pinned}"
                )
        return SmartConnect(
            host=endpoint.host,
            port=endpoint.port,
            user=username,
            pwd=password,
            sslContext=context,
            httpConnectionTimeout=http_timeout,
        )

    opening = asyncio.get_running_loop().run_in_executor(worker, lambda: VSphere(endpoint, username, login(), worker))
    try:
        session = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(functools.partial(_log_out, worker))  # the login goes on in its thread
        raise
    except vim.fault.InvalidLogin as exc:
        worker.shutdown(wait=False)
        raise VSphereError(f"{endpoint.host}: login as {username!r} refused (wrong user or password)") from exc
    except ssl.SSLError as exc:
        worker.shutdown(wait=False)
        hint = " (pin it with --vmware-thumbprint, or give --vmware-ca-file)" if not endpoint.thumbprint else ""
        raise VSphereError(f"{endpoint.host}:{endpoint.port}: TLS verification failed: {exc}{hint}") from exc
    except VSphereError:
        worker.shutdown(wait=False)
        raise
    except (OSError, vim.fault.VimFault, vmodl.MethodFault) as exc:
        worker.shutdown(wait=False)
        raise VSphereError(f"cannot connect to {endpoint.host}:{endpoint.port}: {fault_text(exc)}") from exc
    return session


def _log_out(worker: concurrent.futures.ThreadPoolExecutor, opened: asyncio.Future[VSphere]) -> None:
    """Log out, in its own thread, a session whose login finished after the caller gave up on it."""
    from pyVim.connect import Disconnect

    if not opened.cancelled() and opened.exception() is None:
        worker.submit(Disconnect, opened.result().si)
    worker.shutdown(wait=False)


def fault_text(exc: BaseException) -> str:
    """A one-line message for a vSphere fault (its ``msg``) or any other exception."""
    message = getattr(exc, "msg", None) or str(exc)
    return " ".join(str(message).split()) or type(exc).__name__
