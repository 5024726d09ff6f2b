"""qemu's rbd: filenames and their json: form, parsed as qemu's rbd driver splits them (no cluster needed)."""

from __future__ import annotations

import json

import pytest

from sendense_nbd.errors import ImageError, RbdSpecError
from sendense_nbd.protocol.constants import AllocationFlag
from sendense_nbd.protocol.extents import Extent
from sendense_nbd.storage.rbd import RbdSpec, as_spec, is_rbd_filename, map_from_ranges, parse_rbd_filename

HOLE = int(AllocationFlag.HOLE | AllocationFlag.ZERO)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rbd:rbd/disk", RbdSpec("rbd", "disk")),
        ("rbd:rbd/disk@snap1", RbdSpec("rbd", "disk", snapshot="snap1")),
        ("rbd:rbd/ns/disk", RbdSpec("rbd", "disk", namespace="ns")),
        ("rbd:rbd/ns/disk@s", RbdSpec("rbd", "disk", snapshot="s", namespace="ns")),
        (
            "rbd:rbd/disk:conf=/etc/ceph/ceph.conf:id=backup:keyring=/etc/ceph/k",
            RbdSpec("rbd", "disk", conf="/etc/ceph/ceph.conf", user="backup", keyring="/etc/ceph/k"),
        ),
        (
            r"rbd:rbd/disk@s:mon_host=10.0.0.1\:6789\;10.0.0.2\:6789:client_mount_timeout=5",
            RbdSpec(
                "rbd",
                "disk",
                snapshot="s",
                options=(("mon_host", "10.0.0.1:6789;10.0.0.2:6789"), ("client_mount_timeout", "5")),
            ),
        ),
        # \ escapes the next character anywhere: a colon in a path, an @ or / in a name
        (r"rbd:p\/1/im\@g\:x@sn\:ap:conf=/a\:b.conf", RbdSpec("p/1", "im@g:x", snapshot="sn:ap", conf="/a:b.conf")),
        # qemu looks for the snapshot's @ anywhere after the pool, options included, then for a namespace's
        # / in what came before: an unescaped @ in a value makes another name, here as in qemu
        ("rbd:rbd/disk:conf=/x@y.conf", RbdSpec("rbd", "x", snapshot="y.conf", namespace="disk:conf=")),
    ],
)
def test_colon_form(name: str, expected: RbdSpec) -> None:
    assert parse_rbd_filename(name) == expected
    assert is_rbd_filename(name)


@pytest.mark.parametrize(
    "spec",
    [
        RbdSpec("rbd", "disk"),
        RbdSpec(
            "p:o@o/l",
            "i:m@a/g\\e",
            snapshot="s:n@a/p",
            namespace="n:s",
            conf="/c:o@n/f",
            user="u:s",
            keyring="/k:e@y",
            options=(("mon_host", "1.2.3.4:6789"), ("a=b", "c:d")),
        ),
    ],
)
def test_filename_round_trips(spec: RbdSpec) -> None:
    assert parse_rbd_filename(spec.filename) == spec


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rbd:disk", "a pool name is required"),
        ("rbd:/disk", "the pool name is empty"),
        ("rbd:rbd/", "the image name is empty"),
        ("rbd:rbd/disk@", "the snapshot name is empty"),
        ("rbd:rbd/disk:conf", "option 'conf' has no value"),
        ("rbd:rbd/disk:=x", "empty name"),
        ('json:{"driver":"rbd","pool":"rbd"}', "needs a string 'image'"),
        ('json:{"driver":"rbd","pool":"rbd","image":"d","key-secret":"sec0"}', "'key-secret'"),
        ('json:{"driver":"rbd","pool":"rbd","image":"d","server":[{"port":"1"}]}', 'needs "host" and "port"'),
        # qemu requires the port (InetSocketAddressBase)
        ('json:{"driver":"rbd","pool":"rbd","image":"d","server":[{"host":"h"}]}', 'needs "host" and "port"'),
        ('json:{"driver":"rbd","pool":"rbd","image":"d","server":[{"host":5,"port":"1"}]}', "host is a string"),
        ('json:{"driver":"rbd","pool":"rbd","image":"d","server":{"host":"h"}}', "non-empty list"),
        # every value has its type: a number would have been a TypeError traceback
        ('json:{"driver":"rbd","pool":"p","image":"i","user":5}', "string 'user', not 5"),
        ('json:{"driver":"rbd","pool":"p","image":"i","conf":["x"]}', "string 'conf'"),
        ('json:{"driver":"rbd","pool":"p","image":"i","snapshot":1}', "string 'snapshot'"),
        ('json:{"driver":"rbd","pool":"p","image":"i","namespace":{}}', "string 'namespace'"),
        ('json:{"driver":"rbd","pool":"p","image":"i","user":""}', '"user" is empty'),
        ('json:{"driver":"rbd","pool":"p","image":"i","auth-client-required":"cephx"}', "list of strings"),
        ('json:{"driver":"rbd","pool":"p","image":"i","=keyvalue-pairs":"[\\"a\\"]"}', "=keyvalue-pairs is a list"),
        ('json:{"driver":"rbd","pool":"p","image":"i","=keyvalue-pairs":"[x"}', "=keyvalue-pairs is not JSON"),
        ('json:{"driver":"rbd","pool":"p","image":"i","=keyvalue-pairs":[1,2]}', "=keyvalue-pairs is a list"),
        ('json:{"file":{"driver":"rbd","pool":"p","image":"i"},"file.pool":"q"}', "key 'pool' is given twice"),
        ("rbd:rbd/disk:id=", "id= is empty"),
        ('json:{"driver":"raw","offset":512,"file":{"driver":"rbd","pool":"p","image":"d"}}', "raw driver options"),
        ('json:{"driver":', "not JSON"),
        ("/var/disk.raw", "is not an rbd: filename"),
    ],
)
def test_malformed_names_are_refused_with_the_reason(name: str, message: str) -> None:
    with pytest.raises(RbdSpecError, match=message) as caught:
        parse_rbd_filename(name)
    assert isinstance(caught.value, ImageError)  # the CLI's one-line image errors


def test_json_forms() -> None:
    top = {
        "driver": "rbd",
        "pool": "rbd",
        "namespace": "ns",
        "image": "disk",
        "snapshot": "s",
        "conf": "/etc/ceph/ceph.conf",
        "user": "backup",
        "server": [{"host": "10.0.0.1", "port": "3300"}, {"host": "fd00::1", "port": "6789"}],
        "auth-client-required": ["cephx", "none"],
        "=keyvalue-pairs": json.dumps(["keyring", "/etc/ceph/k", "rbd_cache", "false"]),
    }
    expected = RbdSpec(
        "rbd",
        "disk",
        snapshot="s",
        namespace="ns",
        conf="/etc/ceph/ceph.conf",
        user="backup",
        keyring="/etc/ceph/k",
        options=(
            ("mon_host", "10.0.0.1:3300;[fd00::1]:6789"),  # qemu joins them with ';'
            ("auth_client_required", "cephx;none"),
            ("rbd_cache", "false"),
        ),
    )
    assert parse_rbd_filename("json:" + json.dumps(top)) == expected
    nested = {"driver": "raw", "file": {"driver": "rbd", "pool": "rbd", "image": "disk"}}
    assert parse_rbd_filename("json:" + json.dumps(nested)) == RbdSpec("rbd", "disk")
    dotted = {"file.driver": "rbd", "file.pool": "rbd", "file.image": "disk", "driver": "raw"}
    assert parse_rbd_filename("json:" + json.dumps(dotted)) == RbdSpec("rbd", "disk")
    # qemu's flattened form all the way down (lists as .0, .1), and mixed with a nested object
    deep = {
        "file.driver": "rbd",
        "file.pool": "rbd",
        "file.image": "disk",
        "file.server.0.host": "10.0.0.1",
        "file.server.0.port": 6789,
        "file.server.1.host": "10.0.0.2",
        "file.server.1.port": "3300",
    }
    deep_spec = RbdSpec("rbd", "disk", options=(("mon_host", "10.0.0.1:6789;10.0.0.2:3300"),))
    assert parse_rbd_filename("json:" + json.dumps(deep)) == deep_spec
    mixed = {"file": {"driver": "rbd", "image": "disk"}, "file.pool": "rbd", "file.snapshot": "s"}
    assert parse_rbd_filename("json:" + json.dumps(mixed)) == RbdSpec("rbd", "disk", snapshot="s")


def test_other_names_are_not_rbd() -> None:
    qcow2 = {"driver": "qcow2", "file": {"driver": "file", "filename": "/x.qcow2"}}
    for name in ("/dev/rbd0", "disk.raw", "json:" + json.dumps(qcow2), "json:{broken", "nbd://h/rbd:x"):
        assert not is_rbd_filename(name)


def test_path_never_shows_options() -> None:
    spec = parse_rbd_filename("rbd:rbd/ns/disk@s:id=u:key=AQBsecret==")
    assert spec.path == "rbd/ns/disk@s" and "secret" not in spec.path
    assert spec.at(None).path == "rbd/ns/disk"


def test_map_from_ranges_fills_holes_clips_and_merges() -> None:
    four = 4 << 20
    ranges = [(four, four), (0, four), (3 * four, four), (8 * four, four)]
    assert map_from_ranges(ranges, 2 << 20, 10 * four) == [
        Extent(2 << 20, four + four - (2 << 20), 0),
        Extent(2 * four, four, HOLE),
        Extent(3 * four, four, 0),
        Extent(4 * four, 4 * four, HOLE),
        Extent(8 * four, four, 0),
        Extent(9 * four, four, HOLE),
    ]
    assert map_from_ranges([], 0, 100) == [Extent(0, 100, HOLE)]
    assert map_from_ranges([(0, 200)], 50, 100) == [Extent(50, 50, 0)]


def test_untrusted_names_carry_only_a_few_ceph_options() -> None:
    """A name from an API caller may say where the monitors are and how to log in, nothing else."""
    allowed = (
        r"rbd:rbd/disk:conf=/etc/ceph/c.conf:id=u:keyring=/k:mon_host=10.0.0.1\:6789"
        ":auth-client-required=cephx:rados osd op timeout=5:client_mount_timeout=3:rados_mon_op_timeout=4"
    )
    assert as_spec(allowed, trusted=False) == parse_rbd_filename(allowed)
    for option in ("admin_socket=/run/x.asok", "log_file=/etc/passwd", "keyfile=/root/k", "rbd_cache=true"):
        name = f"rbd:rbd/disk:id=u:{option}"
        assert as_spec(name) == parse_rbd_filename(name)  # the operator's names carry any option
        with pytest.raises(RbdSpecError, match=f"Ceph options \\['{option.split('=')[0]}'\\] are not accepted here"):
            as_spec(name, trusted=False)
    pairs = {"driver": "rbd", "pool": "p", "image": "i", "=keyvalue-pairs": json.dumps(["admin_socket", "/x"])}
    with pytest.raises(RbdSpecError, match="admin_socket"):
        as_spec("json:" + json.dumps(pairs), trusted=False)
    built = RbdSpec("rbd", "disk", "snap", "ns", "/etc/ceph/c.conf", "hub", "/etc/ceph/k").filename
    assert as_spec(built, trusted=False).path == "rbd/ns/disk@snap"  # what the hub builds passes
