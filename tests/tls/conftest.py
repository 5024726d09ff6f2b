"""Fixtures of the TLS interop tests: the credential directories, a small image, TLS peers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import random_file
from tests.peers import processes
from tests.tls.peers import Pki, TLSPeers, make_pki

MiB = 1 << 20


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Every credential directory (good, mutual, wrong CA, expired, wrong name), made once."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 4 MiB raw image of random bytes."""
    return random_file(tmp_path / "disk.raw", 4 * MiB)


@pytest.fixture
def tls_peers() -> Iterator[TLSPeers]:
    """qemu-nbd and nbdkit over TLS, killed at teardown."""
    with processes("tls") as group:
        yield TLSPeers(group)


@pytest.fixture
def image_data(image: Path) -> bytes:
    """The bytes of :func:`image`."""
    return image.read_bytes()
