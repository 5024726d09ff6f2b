"""Which repository a hub uses: ``--repo rbd://POOL[/NS]?conf=&id=&keyring=&prefix=`` parsed strictly, a hub
directory recording its RBD repository (so the offline commands find it, and another repository is refused),
and the hub's command line refusing what cannot work before it opens anything. No cluster is needed: nothing
here connects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sendense_nbd.errors import RepositoryError
from sendense_nbd.hub.repository import LocalStore, RbdStore, open_store
from sendense_nbd.hub.repository.rbd import RbdLocation, parse_location


def test_rbd_locations_are_parsed_strictly_and_read_back() -> None:
    location = parse_location("rbd://backups/site-a?conf=/etc/ceph/ceph.conf&id=hub&keyring=/k&prefix=sb")
    assert location == RbdLocation("backups", "site-a", "/etc/ceph/ceph.conf", "hub", "/k", "sb")
    assert parse_location(location.url) == location
    assert parse_location("rbd://rbd") == RbdLocation("rbd")
    assert parse_location("rbd://rbd").url == "rbd://rbd"
    for bad, why in [
        ("rbd://rbd?user=hub", "unknown key 'user'"),
        ("rbd://rbd?id=a&id=b", "give id once"),
        ("rbd://rbd?conf=", "give conf once, with a value"),
        ("rbd://po@ol", "pool 'po@ol'"),
        ("rbd://rbd/a/b", "namespace 'a/b'"),
        ("rbd://rbd?prefix=x.y/z", "prefix"),
        ("rbd://", "pool ''"),
        ("/srv/backups", "is not an rbd:// repository"),
    ]:
        with pytest.raises(RepositoryError, match=why):
            parse_location(bad)


def test_a_hub_directory_records_its_rbd_repository(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "local"), None), LocalStore)
    state = tmp_path / "state"
    state.mkdir()
    store = open_store(str(state), "rbd://rbd?conf=/c&id=hub&prefix=one")
    assert isinstance(store, RbdStore) and store.location == "rbd://rbd?conf=/c&id=hub&prefix=one"
    found = open_store(str(state), None)  # the offline commands: only the directory
    assert isinstance(found, RbdStore) and found.where == store.where
    moved = open_store(str(state), "rbd://rbd?conf=/other&id=hub2&prefix=one")  # a new conf or user is fine
    assert isinstance(moved, RbdStore) and moved.where.conf == "/other"
    with pytest.raises(RepositoryError, match="another RBD repository"):
        open_store(str(state), "rbd://rbd?conf=/c&id=hub&prefix=two")
    local = tmp_path / "was-local"
    local.mkdir()
    (local / "hub.db").write_bytes(b"")
    with pytest.raises(RepositoryError, match="holds a local repository's hub.db"):
        open_store(str(local), "rbd://rbd")


def _hub(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sendense_nbd", "hub", "--listen", "127.0.0.1:0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_hub_refuses_a_repository_it_cannot_use(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    rbd_state = tmp_path / "rbd-state"
    rbd_state.mkdir()
    (rbd_state / "store.json").write_text('{"rbd": "rbd://rbd"}\n')
    for args, why in [
        (["--repo", str(rbd_state)], "is the state directory of an RBD repository"),
        (["--repo", "rbd://rbd?conf=/c"], "needs --state-dir"),
        (["--repo", str(tmp_path / "repo"), "--state-dir", state], "--state-dir goes with an rbd://"),
        (["--repo", "rbd://rbd?bogus=1", "--state-dir", state], "unknown key 'bogus'"),
        (["--repo", "s3://bucket", "--state-dir", state], "a directory, or rbd://"),
    ]:
        result = _hub(*args)
        assert result.returncode == 2 and why in result.stderr, (args, result.stderr)
    assert not Path(state).exists()
