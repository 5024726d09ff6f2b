"""NBD URIs, per doc/uri.md of NetworkBlockDevice/nbd."""

from __future__ import annotations

import pytest

from sendense_nbd.client.uri import NBDAddress, normal_host, parse_uri, resolve, uri_host
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


@pytest.mark.parametrize(
    "uri, host",
    [
        ("nbd://[fe80::1%25eth0]:1/x", "fe80::1%eth0"),  # RFC 6874
        ("nbd://[FE80::1%25Eth0]:1/x", "fe80::1%Eth0"),  # the zone keeps its case: it names an interface
        ("nbd://[fe80::1%eth0]:1/x", "fe80::1%eth0"),  # a bare %, not followed by two hex digits (RFC 6874 4.)
        ("nbd://[fe80::1%2525]:1/x", "fe80::1%25"),  # %25 is the separator: the zone is "25"
    ],
)
def test_ipv6_zone_ids(uri: str, host: str) -> None:
    address = parse_uri(uri)
    assert address.host == host and address.server_hostname == host.partition("%")[0].lower()
    assert parse_uri(address.uri) == address


@pytest.mark.parametrize(
    "uri, match",
    [
        ("nbd://[fe80::1%25]:1/x", "zone id is 1-64"),  # empty
        ("nbd://[fe80::1%25a%2Fb]:1/x", "not appear to be an IPv4 or IPv6"),  # a second %: urlsplit refuses
        ("nbd://[fe80::1%2eth0]:1/x", "a zone id follows %25"),  # %2e is an escape, not a separator
        ("nbd://[fe80::1%25" + "x" * 65 + "]:1/x", "zone id is 1-64"),
    ],
)
def test_malformed_zone_ids_are_refused(uri: str, match: str) -> None:
    with pytest.raises(URIError, match=match):
        parse_uri(uri)


@pytest.mark.parametrize(
    "host, normal",
    [
        ("Hub.Example.COM.", "hub.example.com"),
        ("hub.example.com", "hub.example.com"),
        ("10.0.0.2", "10.0.0.2"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("[fe80::1%25eth0]", "fe80::1%eth0"),  # bracketed: read as in a URI
        ("fe80::1%25eth0", "fe80::1%25eth0"),  # not bracketed: the zone id is "25eth0"
    ],
)
def test_normal_host(host: str, normal: str) -> None:
    assert normal_host(host) == normal
    assert normal_host(uri_host(normal)) == normal  # what goes into a URI reads back the same


@pytest.mark.parametrize(
    "host, match",
    [
        ("hub:10809", "must be a host name"),
        ("[[2001:db8::1]]", "must be a host name"),
        ("[10.0.0.2]", "brackets hold an IPv6 address only"),
        ("[hub.example.com]", "must be a host name"),
        ("fe80::1%a b", "zone id is 1-64"),
        ("[fe80::1%25]", "zone id is 1-64"),
        ("a..b", "must be a host name"),
        ("-a.example.com", "must be a host name"),
        ("", "must be a host name"),
    ],
)
def test_normal_host_refuses_what_is_no_host(host: str, match: str) -> None:
    with pytest.raises(URIError, match=f"nbd_host .*{match}"):
        normal_host(host, "nbd_host")
