"""A server's refusal of an export (qemu-nbd's NBD_REP_ERR_UNKNOWN to GO) is an OptionError, not a
ProtocolError, and reaches the caller and the copy command as the same one-line message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sendense_nbd.client import connect
from sendense_nbd.errors import OptionError, ProtocolError
from sendense_nbd.protocol.constants import Option, OptionReply

pytestmark = pytest.mark.peer

REFUSAL = "NBD_OPT_GO for export 'nosuch' refused with NBD_REP_ERR_UNKNOWN: "


@pytest.fixture
def nosuch(tmp_path: Path, qemu_nbd: Callable[..., str]) -> str:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(64 * 1024))
    return qemu_nbd(image, export="disk").replace(":///disk?", ":///nosuch?")


async def test_a_refused_go_is_an_option_error(nosuch: str) -> None:
    with pytest.raises(OptionError) as info:
        await connect(nosuch)
    assert not isinstance(info.value, ProtocolError)
    assert info.value.option == Option.GO and info.value.reply == OptionReply.ERR_UNKNOWN
    assert str(info.value).startswith(REFUSAL) and info.value.unknown_export


def test_the_copy_command_reports_a_refused_go_on_one_line(nosuch: str, tmp_path: Path) -> None:
    target = tmp_path / "out.raw"
    result = subprocess.run(
        [sys.executable, "-m", "sendense_nbd", "copy", nosuch, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"sendense-nbd copy: error: {nosuch}: {REFUSAL}")
