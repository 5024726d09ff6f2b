"""Names in certificates: the hosts the hub's certificate is valid for, and whose a client certificate is.

The hub hands its nodes ``nbds://HOST:PORT/...`` URIs, and a node checks the hub's certificate against
``HOST``. :class:`CertificateNames` reads the names of the hub's ``server-cert.pem`` and answers, as a
TLS client would (RFC 6125, as OpenSSL checks it), whether a host is one of them, so that a host that
cannot work is refused when the hub starts or a node is registered, not in the middle of a job:

* an IP address matches the certificate's IP address names only (a zone id, ``fe80::1%eth0``, is not
  part of the address);
* a DNS name matches a DNS name of the certificate, case-insensitively (a trailing dot is not
  ignored: OpenSSL does not match ``hub.example.com.``; the hub writes its hosts without one), or a
  wildcard one as OpenSSL's ``valid_star`` admits it (partial wildcards off, as Python sets them):
  ``*`` is the whole left-most label, followed by at least two labels of letters, digits and inner
  ``-``, without a trailing dot; it stands for one label of letters, digits and ``-`` (or a literal
  ``*``). So ``*.example.com`` matches ``hub.example.com``, neither ``example.com`` nor
  ``a.hub.example.com``; ``*.com``, ``h*.example.com``, ``*.example.com.`` and ``*.-a.example.com``
  match no host but their own text;
* the subject's common name counts as a DNS name only when the certificate has no DNS name at all.

:func:`client_names` reads the names of a client certificate by the same rule (its DNS names, its
common name only when it has none, RFC 6125 6.4.4), which the hub's exports bind to the node whose
job they serve.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from sendense_nbd.errors import TLSError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: A label after a wildcard, as OpenSSL's valid_star admits it (lower case: names are compared lowered).
_PATTERN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
#: What a wildcard may stand for: one label of letters, digits and '-' (OpenSSL's wildcard_match).
_MATCHED_LABEL = re.compile(r"[a-z0-9-]+|\*")
#: What parsing a certificate (or its extensions, parsed on first use) raises for a damaged one.
_DAMAGED = (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


@attrs.frozen
class CertificateNames:
    """The DNS names and IP addresses a server certificate is valid for."""

    dns: tuple[str, ...] = ()
    ips: tuple[IPAddress, ...] = ()

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> CertificateNames:
        """The names of a parsed certificate: its subjectAltName, or its common name without DNS names."""
        try:
            alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = [_dns(name) for name in alt.get_values_for_type(x509.DNSName)]
            ips = [address for address in alt.get_values_for_type(x509.IPAddress) if isinstance(address, IPAddress)]
        except x509.ExtensionNotFound:
            dns, ips = [], []
        if not dns:
            dns = [_dns(str(a.value)) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return cls(tuple(dns), tuple(ips))

    @classmethod
    def from_pem(cls, path: str | os.PathLike[str]) -> CertificateNames:
        """The names of the first certificate in the PEM file ``path`` (a :class:`TLSError` names the file)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise TLSError(f"{os.fspath(path)}: cannot be read: {exc.strerror or exc}") from None
        try:
            return cls.from_certificate(x509.load_pem_x509_certificate(data))
        except _DAMAGED as exc:
            raise TLSError(
                f"{os.fspath(path)}: not a PEM certificate whose names can be read ({exc}): reissue it "
                "(sendense-nbd tls init, or docs/TLS.md's openssl steps)"
            ) from None

    def matches(self, host: str) -> bool:
        """Whether a TLS client connecting to ``host`` accepts a certificate with these names."""
        address = _ip(host)
        if address is not None:
            return address in self.ips
        name = _dns(host)
        return any(_dns_match(pattern, name) for pattern in self.dns)

    def __str__(self) -> str:
        listed = [f"DNS:{name}" for name in self.dns] + [f"IP:{address}" for address in self.ips]
        return ", ".join(listed) if listed else "no names"


def check_host(host: str, names: CertificateNames, what: str) -> None:
    """Refuse (:class:`TLSError`) a host the hub's certificate is not valid for; ``what`` says whose host."""
    if not names.matches(host):
        raise TLSError(
            f"{what} {host} is not a name in the hub's certificate ({names}): nodes would refuse the "
            f"certificate at their first connection. Use one of these names, or issue the certificate for "
            f"{host} (sendense-nbd tls init --hub-name/--hub-address)"
        )


def client_names(certificate: Mapping[str, Any] | None) -> frozenset[str]:
    """The names of a client certificate, as ``ssl`` decodes a verified peer's (``SSLObject.getpeercert()``):
    its DNS names, or its common name(s) when it has none (RFC 6125 6.4.4, the rule of the server side);
    none without a certificate."""
    if not certificate:
        return frozenset()
    names = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return frozenset(str(name) for name in names)


def names_text(names: Iterable[str]) -> str:
    """Client certificate names for a sentence."""
    listed = sorted(names)
    return ", ".join(repr(name) for name in listed) if listed else "no name"


def _ip(host: str) -> IPAddress | None:
    """``host`` as an IP address without its zone id, or None for a DNS name."""
    try:
        return ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None


def _dns(name: str) -> str:
    return name.lower()


def _dns_match(pattern: str, name: str) -> bool:
    """RFC 6125 6.4.3 as OpenSSL's X509_check_host applies it (both lower case): the same text, or a
    wildcard pattern (:func:`_wildcard_suffix`) whose ``*`` stands for the name's first label."""
    if pattern == name:
        return True
    suffix = _wildcard_suffix(pattern)
    if suffix is None or not name.endswith(suffix):
        return False
    return bool(_MATCHED_LABEL.fullmatch(name[: -len(suffix)]))


def _wildcard_suffix(pattern: str) -> str | None:
    """What follows the ``*`` of a wildcard pattern OpenSSL's ``valid_star`` admits (with partial
    wildcards off): ``*`` as the whole first label, then at least two labels, none empty (so no trailing
    dot), of letters, digits and ``-`` not at either end; None for any other pattern."""
    if not pattern.startswith("*."):
        return None
    labels = pattern[2:].split(".")
    if len(labels) < 2 or not all(_PATTERN_LABEL.fullmatch(label) for label in labels):
        return None
    return pattern[1:]
