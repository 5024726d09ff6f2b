"""NBD URIs, per doc/uri.md of NetworkBlockDevice/nbd."""

from __future__ import annotations

import pytest

from sendense_nbd.client.uri import NBDAddress, parse_uri, resolve
from sendense_nbd.errors import URIError


@pytest.mark.parametrize(
    "uri, export",
    [
        # The table of "NBD URI export name".
        ("nbd://example.com/disk", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
        ("nbd://example.com/%C3%A9t%C3%A9", "été"),
    ],
)
def test_export_names(uri: str, export: str) -> None:
    address = parse_uri(uri)
    assert address == NBDAddress(export, host="example.com", port=10809)
    assert parse_uri(address.uri) == address


def test_tcp_ports_and_hosts() -> None:
    assert parse_uri("nbd://127.0.0.1:1234/x") == NBDAddress("x", host="127.0.0.1", port=1234)
    assert parse_uri("nbd://[::1]:10810/") == NBDAddress("", host="::1", port=10810)
    assert parse_uri("NBD://user@Host/x").host == "host"  # userinfo is only for TLS
    assert NBDAddress("a b", host="::1", port=99).uri == "nbd://[::1]:99/a%20b"


def test_unix_sockets() -> None:
    assert parse_uri("nbd+unix:///disk?socket=/run/nbd.sock") == NBDAddress("disk", socket="/run/nbd.sock")
    assert parse_uri("nbd+unix://?socket=nbd.sock") == NBDAddress("", socket="nbd.sock")
    assert parse_uri("nbd+unix:///?socket=/tmp/a%20b") == NBDAddress("", socket="/tmp/a b")
    abstract = parse_uri("nbd+unix:///?socket=%00/abstract")
    assert abstract.socket == "\0/abstract" and abstract.is_unix
    address = NBDAddress("d", socket="/tmp/s")
    assert address.uri == "nbd+unix:///d?socket=/tmp/s" and parse_uri(str(address)) == address


@pytest.mark.parametrize(
    "uri, match",
    [
        ("nbd://example.com/disk?tls-type=x509", "TLS parameters.*need TLS"),
        ("nbd://example.com/disk?tls-certificates=/d", "need TLS"),
        ("nbds://example.com/disk?tls-type=psk", "only x509"),
        ("nbds://example.com/disk?tls-verify-peer=maybe", "neither true nor false"),
        ("nbds://example.com/disk?tls-fingerprint=sha1:abcd", "sha256"),
        ("nbds://example.com/disk?tls-fingerprint=", "empty"),
        ("nbds://example.com/disk?tls-psk-file=/k", "unknown query"),
        ("nbds+unix:///disk", "socket"),
        ("nbds+unix://host/disk?socket=s", "no host"),
        ("http://example.com/disk", "not an NBD URI"),
        ("nbd+unix:///disk", "socket"),
        ("nbd+unix:///disk?socket=", "socket"),
        ("nbd+unix://host/disk?socket=s", "no host"),
        ("nbd:///disk", "need a host"),
        ("nbd://example.com:99999/", "out of range|Port"),
        ("nbd://example.com:0/", "out of range"),
        ("nbd://example.com/disk?x-unknown=1", "unknown query"),
        ("nbd://example.com/disk?socket=/s", "unknown query"),
        ("nbd+unix:///?socket=a&socket=b", "more than once"),
        ("nbd://example.com/%FF", "UTF-8"),
        ("nbd://example.com/a%00b", "NUL"),
        ("nbd://example.com/disk#frag", "fragment"),
    ],
)
def test_bad_uris(uri: str, match: str) -> None:
    with pytest.raises(URIError, match=match):
        parse_uri(uri)


def test_uri_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_uri("ftp://x")


def test_resolve_targets() -> None:
    assert resolve("localhost") == NBDAddress("", host="localhost", port=10809)
    assert resolve("10.0.0.1", 1234, "d") == NBDAddress("d", host="10.0.0.1", port=1234)
    assert resolve("nbd://h/a", export="b") == NBDAddress("b", host="h")
    assert resolve(NBDAddress(socket="/s"), export="e") == NBDAddress("e", socket="/s")
    with pytest.raises(URIError):
        resolve("nbd://h/a", 1234)
    with pytest.raises(URIError):
        NBDAddress("x")


def test_nbds_uris() -> None:
    address = parse_uri("nbds://hub.example:10810/disk?tls-certificates=/etc/tls/node1")
    assert address == NBDAddress("disk", host="hub.example", port=10810, tls=True, tls_certificates="/etc/tls/node1")
    assert address.server_hostname == "hub.example"
    assert parse_uri(address.uri) == address
    pin = "sha256:" + "ab" * 32
    loose = parse_uri(f"NBDS://10.0.0.1/d?tls-verify-peer=no&tls-hostname=hub&tls-fingerprint={pin.upper()}")
    assert (loose.tls_verify_peer, loose.server_hostname, loose.tls_fingerprint) == (False, "hub", pin)
    assert parse_uri(loose.uri) == loose
    unix = parse_uri("nbds+unix:///d?socket=/run/s&tls-type=x509")
    assert unix.tls and unix.socket == "/run/s" and unix.server_hostname == "localhost"
    assert parse_uri(unix.uri) == unix
    assert not parse_uri("nbd://h/d").tls


def test_tls_settings_need_tls() -> None:
    with pytest.raises(URIError, match="need TLS"):
        NBDAddress("d", host="h", tls_certificates="/d")
