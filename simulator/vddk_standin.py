"""Stand-in for nbdkit's vddk plugin, for tests against our vcsim.

Run as an nbdkit python plugin (stdlib only, so nbdkit's embedded python needs no PYTHONPATH)::

    nbdkit -r python simulator/vddk_standin.py \\
        server=127.0.0.1 port=PORT user=user password=-FD thumbprint=AA:BB:... \\
        vm=moref=vm-57 snapshot=snapshot-78 transports=nbdssl:nbd compression=none \\
        file='[LocalDS_0] DC0_H0_VM0/disk1.vmdk'

It takes the parameters of nbdkit-vddk-plugin(1) and rejects unknown ones. Like the real plugin it
connects to the server when a client opens a connection (``open``); that fails when the server's TLS
certificate does not match ``thumbprint``, the login fails, ``vm`` is not a VM of the server,
``snapshot`` is not a snapshot of that VM, or ``file`` is not one of that VM's disks.

It finds the disk data through vcsim itself (``GET https://server:port/sendense/manifest``, which
names the state directory and each disk's data file), so nothing but the vddk command line is needed.
With ``snapshot=`` it serves the snapshot's frozen copy of the disk, without it the live disk.
The export is read-only and reports holes through extents.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import http.client
import json
import os
import re
import ssl
import sys
from xml.sax.saxutils import escape

import nbdkit

API_VERSION = 2

_BOOL_KEYS = {"single-link", "unbuffered", "create"}
_KNOWN_KEYS = {
    "server",
    "port",
    "user",
    "password",
    "cookie",
    "thumbprint",
    "vm",
    "snapshot",
    "file",
    "transports",
    "compression",
    "libdir",
    "config",
    "nfchostport",
    "single-link",
    "unbuffered",
    "vimapiver",
    "reexec",
    "create",
    "create-adapter-type",
    "create-hwversion",
    "create-size",
    "create-type",
}
_COMPRESSION = {"none", "zlib", "fastlz", "skipz"}
_TRANSPORTS = {"file", "san", "hotadd", "nbd", "nbdssl"}

_params: dict[str, str] = {}


def _bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}: not a boolean: {value!r}")


def _read_password(value: str) -> str:
    """nbdkit_read_password: literal, '-' (tty/stdin), '-FD' (file descriptor) or '+FILE'."""

    def strip_nl(s: str) -> str:
        return s[:-1] if s.endswith("\n") else s

    if value == "-":  # as nbdkit 1.32: interactive only
        if sys.stdin is None or not sys.stdin.isatty():
            raise ValueError("stdin is not a tty, cannot read password interactively")
        import getpass

        return getpass.getpass("password: ")
    if value.startswith("-") and value[1:].isdigit():
        fd = int(value[1:])
        if fd < 3:
            raise ValueError("password=-FD cannot use stdin, stdout or stderr")
        chunks = []
        while True:
            b = os.read(fd, 4096)
            if not b:
                break
            chunks.append(b)
        os.close(fd)
        return strip_nl(b"".join(chunks).decode())
    if value.startswith("+"):
        with builtins.open(value[1:], encoding="utf-8") as f:  # open() is the nbdkit callback below
            return strip_nl(f.read())
    return value


def config(key: str, value: str) -> None:
    if key not in _KNOWN_KEYS:
        raise ValueError(f"unknown parameter {key!r} (vddk stand-in)")
    if key in _params:
        raise ValueError(f"parameter {key!r} given more than once")
    if key == "password":
        value = _read_password(value)
    elif key in _BOOL_KEYS:
        _bool(key, value)
    elif key in ("port", "nfchostport"):
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"{key}: invalid port {value!r}")
    elif key == "compression":
        if value.lower() not in _COMPRESSION:
            raise ValueError(f"compression: unknown method {value!r}")
    elif key == "transports":
        modes = value.split(":")
        bad = [m for m in modes if m not in _TRANSPORTS]
        if bad or not value:
            raise ValueError(f"transports: unknown mode(s) {bad or value!r}")
    elif key == "vm":
        if not re.fullmatch(r"moref=[^?&=\s]+", value):
            raise ValueError(f"vm: expected moref=ID, got {value!r}")
    elif key == "thumbprint":
        if not re.fullmatch(r"([0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}|([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}", value):
            raise ValueError(f"thumbprint: not a colon-separated SHA-1 or SHA-256 fingerprint: {value!r}")
    elif key == "config":
        if not os.path.isfile(value):
            raise ValueError(f"config: {value}: no such file")
    _params[key] = value


def config_complete() -> None:
    if "file" not in _params:
        raise ValueError("file parameter is required")
    if "server" not in _params:
        raise ValueError("server parameter is required (the stand-in only serves remote disks)")
    if "vm" not in _params:
        raise ValueError("vm=moref=ID is required when server is given")
    if "thumbprint" not in _params:
        raise ValueError("thumbprint is required when server is given")
    if "cookie" not in _params and ("user" not in _params or "password" not in _params):
        raise ValueError("user and password (or cookie) are required when server is given")
    if _bool("create", _params.get("create", "false")):
        raise ValueError("create=true is not supported by the stand-in")
    modes = _params.get("transports", "nbdssl:nbd").split(":")
    if not {"nbd", "nbdssl"} & set(modes):
        raise ValueError(f"transports={_params['transports']}: no network transport (nbd, nbdssl) allowed")


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def _fingerprint(der: bytes, algo: str) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.new(algo, der).digest())


def _soap(conn: http.client.HTTPSConnection, body: str, cookie: str | None) -> tuple[int, str, str | None]:
    env = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )
    headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": "urn:vim25/7.0"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("POST", "/sdk", env.encode(), headers)
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    set_cookie = resp.getheader("Set-Cookie")
    return resp.status, text, set_cookie.split(";", 1)[0] if set_cookie else None


def _fault(text: str) -> str | None:
    m = re.search(r"<faultstring>(.*?)</faultstring>", text, re.S)
    if m is None and "Fault>" not in text:
        return None
    kind = re.search(r'xsi:type="(\w+)"', text)
    return f"{kind.group(1) if kind else 'fault'}: {m.group(1) if m else ''}".strip()


def _connect() -> dict:
    """Check the server like VixDiskLib_ConnectEx + VixDiskLib_Open would; return the disk to serve."""
    p = _params
    host, port = p["server"], int(p.get("port", "443"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified below by thumbprint, as VDDK does
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    try:
        try:
            conn.connect()
        except OSError as e:
            raise RuntimeError(f"cannot connect to {host}:{port}: {e}") from e
        der = conn.sock.getpeercert(binary_form=True)
        want = p["thumbprint"].upper()
        got = _fingerprint(der, "sha1" if len(want) == 59 else "sha256")
        if got != want:
            raise RuntimeError(f"SSL thumbprint mismatch: server {host}:{port} has {got}, expected {want}")

        cookie = p.get("cookie")
        if cookie is not None and not cookie.startswith("vmware_soap_session="):
            cookie = f"vmware_soap_session={cookie}"  # vddk takes the session cookie's value
        if cookie is None:
            login = (
                '<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this>'
                f"<userName>{escape(p['user'])}</userName><password>{escape(p['password'])}</password></Login>"
            )
            _, text, cookie = _soap(conn, login, None)
            fault = _fault(text)
            if fault is not None or cookie is None:
                raise RuntimeError(f"login to {host}:{port} as {p['user']!r} failed: {fault or 'no session'}")

        moref = p["vm"].split("=", 1)[1]
        retrieve = (
            '<RetrievePropertiesEx xmlns="urn:vim25"><_this type="PropertyCollector">propertyCollector</_this>'
            "<specSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet></propSet>"
            f'<objectSet><obj type="VirtualMachine">{escape(moref)}</obj></objectSet></specSet>'
            "<options></options></RetrievePropertiesEx>"
        )
        _, text, _ = _soap(conn, retrieve, cookie)
        fault = _fault(text)
        if "NotAuthenticated" in text:
            raise RuntimeError(f"cookie: not a valid session on {host}:{port}")
        if fault is not None or "<name>name</name>" not in text:
            raise RuntimeError(f"vm=moref={moref}: no such virtual machine ({fault or 'not found'})")

        conn.request("GET", "/sendense/manifest", headers={"Cookie": cookie})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"simulator manifest: HTTP {resp.status}")
        manifest = json.loads(body)
        try:
            _soap(
                conn,
                '<Logout xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this></Logout>',
                cookie if "cookie" not in p else None,
            )
        except (OSError, http.client.HTTPException):
            pass
    finally:
        conn.close()

    vm = next((v for v in manifest["vms"] if v["moref"] == moref), None)
    if vm is None:
        raise RuntimeError(f"vm=moref={moref}: no such virtual machine")
    disks = vm["disks"]
    if "snapshot" in p:
        snap = next((s for s in vm["snapshots"] if s["moref"] == p["snapshot"]), None)
        if snap is None:
            raise RuntimeError(f"snapshot={p['snapshot']}: no such snapshot of {moref}")
        disks = snap["disks"]
    disk = next((d for d in disks if d["fileName"] == p["file"]), None)
    if disk is None:
        names = ", ".join(d["fileName"] for d in disks)
        raise RuntimeError(f"file={p['file']!r}: not a disk of {moref} (disks: {names})")
    return {"path": disk["path"], "size": int(disk["capacityInBytes"])}


def open(readonly: bool) -> dict:  # noqa: A001 - nbdkit callback name
    disk = _connect()
    fd = os.open(disk["path"], os.O_RDONLY)
    size = os.fstat(fd).st_size
    if size < disk["size"]:
        os.close(fd)
        raise RuntimeError(f"{disk['path']}: {size} bytes, expected {disk['size']}")
    return {"fd": fd, "size": disk["size"], "path": disk["path"]}


def close(h: dict) -> None:
    os.close(h["fd"])


def get_size(h: dict) -> int:
    return h["size"]


def can_write(h: dict) -> bool:
    return False


def can_multi_conn(h: dict) -> bool:
    return True


def can_extents(h: dict) -> bool:
    return True


def pread(h: dict, buf: bytearray, offset: int, flags: int) -> None:
    n = len(buf)
    data = os.pread(h["fd"], n, offset)
    if len(data) < n:
        data += b"\0" * (n - len(data))
    buf[:] = data


def extents(h: dict, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    fd, end = h["fd"], min(h["size"], offset + count)
    out: list[tuple[int, int, int]] = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end
        data = min(data, end)
        if data > pos:
            out.append((pos, data - pos, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        out.append((pos, hole - pos, 0))
        pos = hole
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
