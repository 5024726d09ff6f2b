"""TLS for NBD: contexts from qemu-layout credential directories, certificate pins, TLS-PSK keys
(:mod:`~sendense_nbd.tls.credentials`), and a deployment's certificates made with the
``cryptography`` library (:mod:`~sendense_nbd.tls.pki`, imported on first use).

::

    server = server_context("/etc/sendense/tls/hub", verify_client=True)
    client = client_context("/etc/sendense/tls/nodes/node1")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sendense_nbd.errors import TLSError
from sendense_nbd.lazy import lazy_getattr
from sendense_nbd.tls.credentials import (
    ServerCredentials,
    check_fingerprint,
    client_context,
    fingerprint,
    handshake_error,
    parse_fingerprint,
    parse_psk_file,
    psk_client_context,
    psk_server_context,
    server_context,
)

if TYPE_CHECKING:
    from sendense_nbd.tls.pki import Issued, Layout, init_pki, issue_certificate, make_ca

__all__ = [
    "Issued",
    "Layout",
    "ServerCredentials",
    "TLSError",
    "check_fingerprint",
    "client_context",
    "fingerprint",
    "handshake_error",
    "init_pki",
    "issue_certificate",
    "make_ca",
    "parse_fingerprint",
    "parse_psk_file",
    "psk_client_context",
    "psk_server_context",
    "server_context",
]

__getattr__ = lazy_getattr(
    __name__, dict.fromkeys(["Issued", "Layout", "init_pki", "issue_certificate", "make_ca"], "sendense_nbd.tls.pki")
)
