"""A copy target's secret file: a regular file of the hub's user, mode 0600 or 0400, never a FIFO (which would
block the hub) or a symbolic link; with the hub's --secrets-dir, only a file directly in it (a policy cannot
make the hub read, or sign with, another file of the hub)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sendense_nbd.errors import OffsiteError
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.offsite.s3 import read_secret
from tests.hub.operating import local_hub
from tests.offsite.conftest import secret_file


def test_a_good_secret_file_is_read(tmp_path: Path) -> None:
    assert read_secret(secret_file(tmp_path, "s3cr3t")) == "s3cr3t"
    assert read_secret(secret_file(tmp_path, "s3cr3t", 0o400)) == "s3cr3t"
    assert read_secret(secret_file(tmp_path, "s3cr3t"), str(tmp_path)) == "s3cr3t"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o700, 0o500, 0o660, 0o200])
def test_a_secret_file_of_another_mode_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(OffsiteError, match=f"has mode {mode:04o}: it must be the hub user's alone, 0600 or 0400"):
        read_secret(secret_file(tmp_path, "x", mode))


def test_a_fifo_a_link_and_another_users_file_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    with pytest.raises(OffsiteError, match="is not a regular file"):
        read_secret(str(fifo))  # no writer: a blocking open would wait forever
    assert time.monotonic() - started < 1
    link = tmp_path / "link"
    link.symlink_to(secret_file(tmp_path, "x"))
    with pytest.raises(OffsiteError, match="link"):
        read_secret(str(link))
    theirs = secret_file(tmp_path, "x")
    os.chown(theirs, 4242, 4242)
    assert os.geteuid() != 4242
    with pytest.raises(OffsiteError, match=f"belongs to user 4242, not to the hub's user {os.geteuid()}"):
        read_secret(theirs)


def test_the_secrets_directory_confines_the_secret_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    inside = secret_file(secrets, "x")
    outside = secret_file(tmp_path, "x")
    assert read_secret(inside, str(secrets)) == "x"
    for path in (outside, str(secrets / ".." / Path(outside).name), "/etc/shadow", str(secrets)):
        with pytest.raises(OffsiteError, match="is not in the hub's secrets directory"):
            read_secret(path, str(secrets))
    nested = secrets / "sub"
    nested.mkdir()
    with pytest.raises(OffsiteError, match="is not in the hub's secrets directory"):
        read_secret(secret_file(nested, "x"), str(secrets))


async def test_a_hub_with_a_secrets_directory_refuses_a_policy_naming_another_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    outside = secret_file(tmp_path, "x")
    copy = {"endpoint": "http://127.0.0.1:9", "bucket": "copies", "access_key": "AK", "secret_file": outside,
            "retain": 60}  # fmt: skip
    policy = {"name": "p", "vms": {"include": ["/DC0/vm"]}, "schedule": {"every": 3600}, "copy": copy}
    async with local_hub(tmp_path / "repo", clock=ManualClock(time.time()), secrets_dir=str(secrets)) as hub:
        status, answer = await hub.call("POST", "/policies", policy)
        assert status == 400 and "is not in the hub's secrets directory" in answer["error"]["message"], answer
        assert str(outside) in answer["error"]["message"]
        assert (await hub.ok("GET", "/policies"))["policies"] == []
