"""The node's configuration is strict: every section refuses a key it does not know, naming it and the
section, and ``[vddk]`` becomes typed settings (no peers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendense_nbd.backup import VddkSettings
from sendense_nbd.errors import ConfigError
from sendense_nbd.node.config import SECTIONS, load

MINIMAL = '[vcenter]\nendpoint = "vc:443"\nusername = "u"\npassword = "p"\n'


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_vddk_section_becomes_typed_settings(tmp_path: Path) -> None:
    text = (
        f'{MINIMAL}[vddk]\nlibdir = "/opt/vddk"\ntransports = "nbdssl:nbd"\ncompression = "zlib"\n'
        'thumbprint = "AA:BB"\nnbdkit = "/usr/sbin/nbdkit"\nplugin = "python /x.py"\n'
        'options = {config = "/etc/vddk.conf", port = 902}\n'
    )
    assert load(_write(tmp_path, text)).vddk == VddkSettings(
        thumbprint="AA:BB",
        libdir="/opt/vddk",
        transports="nbdssl:nbd",
        compression="zlib",
        nbdkit="/usr/sbin/nbdkit",
        plugin="python /x.py",
        options=(("config", "/etc/vddk.conf"), ("port", "902")),
    )
    assert load(_write(tmp_path, MINIMAL)).vddk == VddkSettings()


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_refuses_an_unknown_key(tmp_path: Path, section: str) -> None:
    tables = {"vcenter": MINIMAL, "vddk": "[vddk]\n", "node": "[node]\n", "tls": "[tls]\n"}
    tables[section] += 'transport = "nbd"\n'  # a misspelt key is an error, never silently ignored
    with pytest.raises(ConfigError, match=rf"unknown key 'transport' in \[{section}\]"):
        load(_write(tmp_path, "".join(tables.values())))


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("[vddk]\nlibdir = 5\n", r"\[vddk\] libdir must be a string"),
        ('[vddk]\noptions = "config=/x"\n', r"\[vddk\] options must be a table"),
        ("vddk = 3\n", r"\[vddk\] must be a table"),
        ("[node]\ntoken_file = 7\n", r"\[node\] token_file must be a string"),
        ('[vddk]\nplugin = "vddk \\"x"\n', r"\[vddk\] plugin 'vddk \"x' is not a list of shell words"),
        ('[vddk]\nplugin = " "\n', r"\[vddk\] plugin is empty"),
    ],
)
def test_wrong_types_are_refused_by_key(tmp_path: Path, extra: str, problem: str) -> None:
    text = extra + MINIMAL if extra.startswith("vddk =") else MINIMAL + extra
    with pytest.raises(ConfigError, match=problem):
        load(_write(tmp_path, text))


def test_merge_gap_is_bytes_and_zero_by_default(tmp_path: Path) -> None:
    assert load(_write(tmp_path, MINIMAL)).merge_gap == 0  # the WAN default: only changed bytes cross
    assert load(_write(tmp_path, f"{MINIMAL}[node]\nmerge_gap = 1048576\n")).merge_gap == 1 << 20
    for bad in ("-1", '"1M"', "true", "2147483648"):
        with pytest.raises(ConfigError, match=r"\[node\] merge_gap must be a number of bytes from 0 to"):
            load(_write(tmp_path, f"{MINIMAL}[node]\nmerge_gap = {bad}\n"))


def test_requests_in_flight_are_a_bounded_count(tmp_path: Path) -> None:
    assert load(_write(tmp_path, MINIMAL)).requests == 16
    assert load(_write(tmp_path, f"{MINIMAL}[node]\nrequests = 64\n")).requests == 64
    for bad in ("0", "257", '"64"'):
        with pytest.raises(ConfigError, match=r"\[node\] requests"):
            load(_write(tmp_path, f"{MINIMAL}[node]\nrequests = {bad}\n"))


def test_checkpoint_is_bytes_from_one_mib(tmp_path: Path) -> None:
    assert load(_write(tmp_path, MINIMAL)).checkpoint == 64 << 20
    assert load(_write(tmp_path, f"{MINIMAL}[node]\ncheckpoint = 1073741824\n")).checkpoint == 1 << 30
    for bad in ("0", "1048575", '"64M"'):
        with pytest.raises(ConfigError, match=r"\[node\] checkpoint must be a number of bytes from 1048576 to"):
            load(_write(tmp_path, f"{MINIMAL}[node]\ncheckpoint = {bad}\n"))
