"""The node's configuration is strict: every section refuses a key it does not know, naming it and the
section, ``[vddk]`` becomes typed settings, and ``[node] hub_url``/``nbd_host`` pin where a job may
report and write (no peers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendense_nbd.backup import VddkSettings
from sendense_nbd.errors import BadRequest, ConfigError
from sendense_nbd.node.config import SECTIONS, load
from sendense_nbd.node.requests import BackupRequest

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


HUB = "https://hub.example.com:8443"


def test_nbd_host_pins_the_targets_instead_of_hub_urls_host(tmp_path: Path) -> None:
    """``[node] nbd_host``: the hub's NBD address when it is not the API's; the targets must be on it (and
    only on it), the job must still report to ``hub_url``."""
    hub = '[node]\nhub_url = "https://hub.example.com:8443"\n'
    loaded = load(_write(tmp_path, f'{MINIMAL}{hub}nbd_host = "10.0.0.2"\n'))
    assert (loaded.hub_urls, loaded.nbd_hosts) == (("https://hub.example.com:8443",), {HUB: "10.0.0.2"})
    named = load(_write(tmp_path, f'{MINIMAL}{hub}nbd_host = "Hub.Example.COM"\n'))
    assert named.nbd_hosts == {HUB: "hub.example.com"}
    assert load(_write(tmp_path, f'{MINIMAL}{hub}nbd_host = "fe80::1%eth0"\n')).nbd_hosts == {HUB: "fe80::1%eth0"}
    for bad in ('"10.0.0.2:10809"', '"a b"', "5"):
        with pytest.raises(ConfigError, match=r"\[node\] nbd_host .*must be a host name or an IP address"):
            load(_write(tmp_path, f"{MINIMAL}{hub}nbd_host = {bad}\n"))
    with pytest.raises(ConfigError, match=r"\[node\] nbd_host = HOST needs hub_url: it names"):
        load(_write(tmp_path, f'{MINIMAL}[node]\nnbd_host = "10.0.0.2"\n'))

    def job(target: str) -> dict[str, object]:
        return {"job_id": "j1", "vm_path": "/DC0/vm/x", "api_url": "https://hub.example.com:8443",
                "targets": {"2000": target}}  # fmt: skip

    pinned = {"hub_urls": ("https://hub.example.com:8443",), "nbd_hosts": {HUB: "10.0.0.2"}}
    assert BackupRequest.from_json(job("nbds://10.0.0.2:10100/e"), **pinned).targets == (
        (2000, "nbds://10.0.0.2:10100/e"),
    )
    for elsewhere in ("nbds://hub.example.com:10100/e", "nbds://10.0.0.3:10100/e"):
        with pytest.raises(BadRequest, match=r"is not on this node's hub \(10.0.0.2, from \[node\] nbd_host\)"):
            BackupRequest.from_json(job(elsewhere), **pinned)
    with pytest.raises(BadRequest, match=r"is not on this node's hub \(hub.example.com, from \[node\] hub_url\)"):
        BackupRequest.from_json(job("nbds://10.0.0.2:10100/e"), hub_urls=("https://hub.example.com:8443",))
    with pytest.raises(BadRequest, match="api_url is not this node's hub"):
        BackupRequest.from_json({**job("nbds://10.0.0.2:10100/e"), "api_url": "https://10.0.0.2:8443"}, **pinned)


def test_an_ipv6_zone_id_is_the_same_host_in_hub_url_and_targets() -> None:
    """RFC 6874: ``[fe80::1%25eth0]`` in both URLs names the host ``fe80::1%eth0``."""
    hub_url = "http://[fe80::1%25eth0]:8082"
    body = {
        "job_id": "j1",
        "vm_path": "/DC0/vm/x",
        "api_url": hub_url,
        "targets": {"2000": "nbd://[fe80::1%25eth0]:10100/e"},
    }
    assert BackupRequest.from_json(body, hub_urls=(hub_url,)).targets == ((2000, "nbd://[fe80::1%25eth0]:10100/e"),)
    other = {**body, "targets": {"2000": "nbd://[fe80::1%25eth1]:10100/e"}}
    with pytest.raises(BadRequest, match=r"is not on this node's hub \(fe80::1%eth0, from \[node\] hub_url\)"):
        BackupRequest.from_json(other, hub_urls=(hub_url,))


def test_the_host_pin_compares_hosts_in_one_normal_form(tmp_path: Path) -> None:
    """Hub and node normalise hosts with the same function (normal_host): a DNS name without case or trailing
    dot, an IP address as ipaddress prints it, zone id included. So ``hub.example.com.`` on both sides, an
    uncompressed upper-case IPv6 target against a compressed pin, and an RFC 6874 pin are the same host, and
    another zone, address or name is not."""

    def taken(pin: str, target: str) -> bool:
        config = load(_write(tmp_path, f"{MINIMAL}[node]\n{pin}"))
        body = {"job_id": "j1", "vm_path": "/DC0/vm/x", "api_url": config.hub_urls[0], "targets": {"2000": target}}
        try:
            BackupRequest.from_json(body, hub_urls=config.hub_urls, nbd_hosts=config.nbd_hosts)
        except BadRequest as exc:
            assert "is not on this node's hub" in str(exc)
            return False
        return True

    dotted = 'hub_url = "https://hub.example.com.:8443"\n'
    assert taken(dotted, "nbds://hub.example.com.:10100/e") and taken(dotted, "nbds://HUB.example.COM:10100/e")
    assert taken('hub_url = "https://h:1"\nnbd_host = "hub.example.com."\n', "nbds://hub.example.com.:10100/e")
    assert not taken(dotted, "nbds://hub.example.org:10100/e")
    v6 = 'hub_url = "http://[2001:db8::1]:8082"\n'
    assert taken(v6, "nbd://[2001:DB8:0:0::1]:10100/e") and not taken(v6, "nbd://[2001:db8::2]:10100/e")
    assert taken('hub_url = "http://h:1"\nnbd_host = "2001:0DB8::1"\n', "nbd://[2001:db8::1]:10100/e")
    zoned = 'hub_url = "http://h:1"\nnbd_host = "[fe80::1%25eth0]"\n'
    assert load(_write(tmp_path, f"{MINIMAL}[node]\n{zoned}")).nbd_hosts == {"http://h:1": "fe80::1%eth0"}
    assert taken(zoned, "nbd://[FE80::1%25eth0]:10100/e") and not taken(zoned, "nbd://[fe80::1%25eth1]:10100/e")
    assert not taken(zoned, "nbd://[fe80::1]:10100/e")  # no zone is another host
    for bad in ('nbd_host = "[fe80::1%25]"', 'nbd_host = "[fe80::1%2eth0]"'):
        with pytest.raises(ConfigError, match="zone id"):
            load(_write(tmp_path, f'{MINIMAL}[node]\nhub_url = "http://h:1"\n{bad}\n'))
    with pytest.raises(ConfigError, match=r"the host of \[node\] hub_url 'h_1' must be a host name"):
        load(_write(tmp_path, f'{MINIMAL}[node]\nhub_url = "http://h_1:1"\n'))


TWO_HUBS = '[node]\nhub_url = ["http://127.0.0.2:8082", "http://127.0.0.5:8083/"]\n'
THREE_HUBS = '[node]\nhub_url = ["http://127.0.0.2:8082", "http://127.0.0.5:8083/", "http://127.0.0.6:8084"]\n'


def test_several_hubs_are_pinned_each_with_its_own_targets_host(tmp_path: Path) -> None:
    """A node serving a cluster through one tunnel per hub pins every hub's end: a job may name any of them
    (trailing ``/`` or not), and its targets must be on that hub's host, not on another pinned hub's."""
    config = load(_write(tmp_path, MINIMAL + TWO_HUBS))
    assert config.hub_urls == ("http://127.0.0.2:8082", "http://127.0.0.5:8083/")
    one = '[node]\nhub_url = "http://127.0.0.2:8082"\n'
    assert load(_write(tmp_path, MINIMAL + one)).hub_urls == ("http://127.0.0.2:8082",)
    assert load(_write(tmp_path, MINIMAL)).hub_urls == ()

    def job(api_url: str, host: str) -> dict[str, object]:
        return {"job_id": "j1", "vm_path": "/DC0/vm/x", "api_url": api_url,
                "targets": {"2000": f"nbd://{host}:10100/e"}}  # fmt: skip

    pins = {"hub_urls": config.hub_urls, "nbd_hosts": config.nbd_hosts}
    for api_url, host in (("http://127.0.0.2:8082/", "127.0.0.2"), ("http://127.0.0.5:8083", "127.0.0.5")):
        taken = BackupRequest.from_json(job(api_url, host), **pins)
        assert (taken.api_url, taken.targets) == (api_url, ((2000, f"nbd://{host}:10100/e"),))
    with pytest.raises(BadRequest, match=r"targets\[2000\] is not on this node's hub \(127.0.0.2, from \[node\] hub"):
        BackupRequest.from_json(job("http://127.0.0.2:8082", "127.0.0.5"), **pins)
    with pytest.raises(BadRequest, match=r"targets\[2000\] is not on this node's hub \(127.0.0.5, from \[node\] hub"):
        BackupRequest.from_json(job("http://127.0.0.5:8083", "127.0.0.2"), **pins)
    for unpinned in ("http://127.0.0.3:8082", "http://127.0.0.2:8083", "https://127.0.0.2:8082", "http://h/" * 200):
        with pytest.raises(BadRequest) as refused:
            BackupRequest.from_json(job(unpinned, "127.0.0.2"), **pins)
        message = str(refused.value)
        assert message == "api_url is not one of this node's 2 hubs ([node] hub_url)", unpinned
    assert BackupRequest.from_json(job("http://127.0.0.3:8082", "10.9.9.9"), hub_urls=()).targets  # unpinned: any


@pytest.mark.parametrize(
    ("node", "problem"),
    [
        ("hub_url = []", r"\[node\] hub_url lists 0 URLs; give 1 to 64"),
        (
            f"hub_url = {[f'http://h{n}:1' for n in range(65)]}".replace("'", '"'),
            r"hub_url lists 65 URLs; give 1 to 64",
        ),
        ('hub_url = ["http://a:1", 5]', r"\[node\] hub_url\[1\] must be an http:// or https:// URL"),
        ('hub_url = ["http://a:1", ["http://b:1"]]', r"\[node\] hub_url\[1\] must be an http:// or https:// URL"),
        ('hub_url = ["ftp://a:1"]', r"\[node\] hub_url\[0\] must be an http:// or https:// URL"),
        ('hub_url = ["http://[::1:8082"]', r"\[node\] hub_url\[0\] must be an http:// or https:// URL"),
        ('hub_url = ["http://a:1", "http://h_1:1"]', r"the host of \[node\] hub_url\[1\] 'h_1' must be a host"),
        ('hub_url = ["http://a:1", "http://b:1", "http://a:1/"]', r"hub_url\[2\] repeats hub_url\[0\]: list each"),
        ("hub_url = {a = 1}", r"\[node\] hub_url must be an http:// or https:// URL or a list of them"),
        ("hub_url = 8082", r"\[node\] hub_url must be an http:// or https:// URL or a list of them"),
        (
            'hub_url = ["http://127.0.0.2:8082", "http://127.0.0.5:8083"]\nnbd_host = "10.0.0.2"',
            r"\[node\] nbd_host = HOST needs hub_url to pin one hub, not 2: .* give a table by hub",
        ),
        ('hub_url = "http://a:1"\nnbd_host = {"http://b:1" = "10.0.0.2"}', r"names 'http://b:1', which is not one of"),
        (
            'hub_url = "http://a:1"\nnbd_host = {"http://a:1" = "10.0.0.2", "http://a:1/" = "10.0.0.3"}',
            r"\[node\] nbd_host names 'http://a:1/' twice",
        ),
        ('hub_url = "http://a:1"\nnbd_host = {"http://a:1" = "a:1"}', r"nbd_host\['http://a:1'\] 'a:1' must be a host"),
        ('hub_url = "http://a:1"\nnbd_host = ["10.0.0.2"]', r"\[node\] nbd_host must be .* or a table of them by"),
    ],
)
def test_a_hub_url_list_is_checked_item_by_item(tmp_path: Path, node: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(_write(tmp_path, f"{MINIMAL}[node]\n{node}\n"))


def test_a_hub_url_list_holds_up_to_64_hubs_and_one_may_have_nbd_host(tmp_path: Path) -> None:
    many = [f"https://hub{n}.example.com:8443" for n in range(64)]
    listed = ", ".join(f'"{url}"' for url in many)
    assert load(_write(tmp_path, f"{MINIMAL}[node]\nhub_url = [{listed}]\n")).hub_urls == tuple(many)
    one = load(_write(tmp_path, f'{MINIMAL}[node]\nhub_url = ["https://h:1"]\nnbd_host = "10.0.0.2"\n'))
    assert (one.hub_urls, one.nbd_hosts) == (("https://h:1",), {"https://h:1": "10.0.0.2"})


def test_each_pinned_hub_may_have_its_own_nbd_host(tmp_path: Path) -> None:
    """``nbd_host`` as a table by hub URL: a hub listed there pins its jobs' targets to its own host, one not
    listed to its hub_url's host; a trailing ``/`` on either side makes no difference."""
    table = '{"http://127.0.0.2:8082/" = "10.0.0.2", "http://127.0.0.6:8084" = "Hub-C.example"}'
    config = load(_write(tmp_path, f"{MINIMAL}{THREE_HUBS}nbd_host = {table}\n"))
    assert config.nbd_hosts == {"http://127.0.0.2:8082": "10.0.0.2", "http://127.0.0.6:8084": "hub-c.example"}
    pins = {"hub_urls": config.hub_urls, "nbd_hosts": config.nbd_hosts}

    def job(api_url: str, host: str) -> dict[str, object]:
        return {"job_id": "j1", "vm_path": "/DC0/vm/x", "api_url": api_url,
                "targets": {"2000": f"nbd://{host}:10100/e"}}  # fmt: skip

    for api_url, host in (
        ("http://127.0.0.2:8082", "10.0.0.2"), ("http://127.0.0.5:8083", "127.0.0.5"),
        ("http://127.0.0.6:8084/", "hub-c.example"),
    ):  # fmt: skip
        assert BackupRequest.from_json(job(api_url, host), **pins).targets == ((2000, f"nbd://{host}:10100/e"),)
    for api_url, host, pinned in (
        ("http://127.0.0.2:8082", "127.0.0.2", r"10.0.0.2, from \[node\] nbd_host"),
        ("http://127.0.0.2:8082", "hub-c.example", r"10.0.0.2, from \[node\] nbd_host"),
        ("http://127.0.0.5:8083", "10.0.0.2", r"127.0.0.5, from \[node\] hub_url"),
        ("http://127.0.0.6:8084", "10.0.0.2", r"hub-c.example, from \[node\] nbd_host"),
    ):
        with pytest.raises(BadRequest, match=rf"is not on this node's hub \({pinned}\)"):
            BackupRequest.from_json(job(api_url, host), **pins)


def test_tls_checks_every_pinned_hub(tmp_path: Path) -> None:
    """With ``[tls]`` every pinned hub is reached over HTTPS or on loopback (a tunnel's end): one http://
    member elsewhere would carry the hub token in clear."""
    tls = f'[tls]\nfingerprint = "sha256:{"ab" * 32}"\n'
    good = '"https://hub.example.com:8443", "http://127.0.0.5:8083", "http://localhost:8082"'
    assert len(load(_write(tmp_path, f"{MINIMAL}[node]\nhub_url = [{good}]\n{tls}")).hub_urls) == 3
    bad = '["http://127.0.0.2:8082", "http://hub2.example.com:8082"]'
    with pytest.raises(ConfigError, match=r"\[tls\] with an http:// \[node\] hub_url on hub2.example.com, not loop"):
        load(_write(tmp_path, f"{MINIMAL}[node]\nhub_url = {bad}\n{tls}"))
    with pytest.raises(ConfigError, match=r"\[tls\] needs \[node\] hub_url"):
        load(_write(tmp_path, MINIMAL + tls))
