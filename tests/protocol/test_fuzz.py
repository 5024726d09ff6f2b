"""Hypothesis-driven runs of the fuzz entry point (atheris is not needed)."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("fuzz_server", Path(__file__).with_name("fuzz_server.py"))
assert _spec is not None and _spec.loader is not None
fuzz_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_server)
fuzz_one_input = fuzz_server.fuzz_one_input

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def nbd_string(text: str) -> bytes:
    return struct.pack(">I", len(text.encode())) + text.encode()


FLAGS = struct.pack(">I", 3)
PREFIXES = [
    b"",
    FLAGS,
    FLAGS + opt(8),
    FLAGS + opt(1, b"disk"),
    struct.pack(">I", 0) + opt(1, b"ro"),
    FLAGS + opt(7, nbd_string("ro") + b"\x00\x00"),
    FLAGS + opt(7, nbd_string("") + b"\x00\x01\x00\x03"),
    FLAGS
    + opt(8)
    + opt(10, nbd_string("disk") + b"\x00\x00\x00\x01" + nbd_string("base:allocation"))
    + opt(7, nbd_string("disk") + b"\x00\x00"),
]

request = st.builds(
    lambda flags, command, handle, offset, length, payload: (
        struct.pack(">IHHQQI", 0x25609513, flags, command, handle, offset, len(payload) if command == 1 else length)
        + (payload if command == 1 else b"")
    ),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8, 16]),
    st.integers(0, 9) | st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1) | st.integers(0, 1 << 20).map(lambda v: v & ~511),
    st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 512, 4096, 1 << 20]),
    st.binary(max_size=600),
)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    fuzz_one_input(data)


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=1024))
def test_valid_prefix_then_arbitrary_bytes(prefix: bytes, tail: bytes) -> None:
    fuzz_one_input(prefix + tail)


@FUZZ
@given(
    prefix=st.sampled_from(PREFIXES[3:]),
    requests=st.lists(request, max_size=8),
    tail=st.binary(max_size=64),
)
def test_valid_handshake_then_requests(prefix: bytes, requests: list[bytes], tail: bytes) -> None:
    fuzz_one_input(prefix + b"".join(requests) + tail)


@FUZZ
@given(
    options=st.lists(
        st.tuples(st.integers(0, 12) | st.integers(0, 2**32 - 1), st.binary(max_size=80)),
        max_size=6,
    ),
    tail=st.binary(max_size=64),
)
def test_option_sequences(options: list[tuple[int, bytes]], tail: bytes) -> None:
    fuzz_one_input(FLAGS + b"".join(opt(o, d) for o, d in options) + tail)


def test_corner_inputs() -> None:
    for data in [
        b"",
        b"\x00",
        FLAGS + b"IHAVEOPT" + struct.pack(">II", 3, 0xFFFFFFFF),
        FLAGS + b"IHAVEOPT" + struct.pack(">II", 6, 0x10001) + bytes(0x10001),
        FLAGS + opt(6, b"\xff" * 8),
        FLAGS + opt(9, nbd_string("disk") + b"\xff\xff\xff\xff"),
        FLAGS + opt(1, b"disk") + struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 32 * 1024 * 1024 + 1),
        FLAGS + opt(1, b"disk") + struct.pack(">IHHQQI", 0x25609513, 0xFFFF, 7, 1, 2**64 - 1, 2**32 - 1),
        FLAGS + opt(2) + b"after abort",
    ]:
        fuzz_one_input(data)
