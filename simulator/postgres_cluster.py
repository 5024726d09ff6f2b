#!/usr/bin/env python3
"""A real PostgreSQL test cluster (Debian's postgresql 15), every file under one directory.

initdb in DIR/data, the server listening on a unix socket in DIR/socket (mode 0700: only its owner,
and root, reach it; trust there) and on 127.0.0.1 at a free port (scram-sha-256 with a random password
made for this cluster, kept in DIR/cluster.json, mode 0600, and given in its URLs: another local user
cannot connect), the test superuser ``sendense``, ``fsync`` on as in production. PostgreSQL refuses
to run as root: as root, the cluster's files belong to the ``postgres`` system user (made by Debian's
postgresql package) and its tools run through ``runuser``.

    python3 simulator/postgres_cluster.py start DIR    # initdb (or restart) DIR, print the Cluster as JSON
    python3 simulator/postgres_cluster.py status DIR   # the Cluster and whether it runs
    python3 simulator/postgres_cluster.py stop DIR     # stop the server by its postmaster.pid (fast shutdown)

From Python: ``start(directory) -> Cluster``, ``stop(directory)``, ``load(directory)``,
``create_database(cluster, name) -> url``; ``claim(directory)`` marks a directory as this process's
and ``sweep(parent, prefix)`` stops and removes the claimed ones whose process is gone (as
simulator/ceph_cluster.py does). Stdlib and attrs only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import claims  # simulator/claims.py
from claims import OWNER_FILE, claim  # noqa: F401  (claim: this module's, for its callers)

STATE_FILE = "cluster.json"
#: The test superuser (trust authentication, local connections only).
USER = "sendense"
#: The system user the server runs as when we are root.
SERVER_USER = "postgres"
PORT_RANGE = (32100, 40000)
START_ATTEMPTS = 3


class ClusterError(Exception):
    """The cluster could not be started, reached or stopped; the message says which step and why."""


@attrs.frozen
class Cluster:
    """How clients reach a running test cluster."""

    directory: str
    socket_dir: str
    port: int
    host: str = "127.0.0.1"
    user: str = USER
    #: The superuser's password over TCP (random per cluster; the unix socket trusts its owner).
    password: str = ""

    def url(self, database: str = "postgres") -> str:
        """``postgresql://`` URL of ``database`` over TCP on 127.0.0.1 (with the cluster's password)."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        """The same over the unix socket."""
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"


def _bindir() -> Path:
    """Where initdb, pg_ctl and createdb are (the newest installed major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ClusterError("PostgreSQL is not installed (no initdb); run ./setup.sh")
    return Path(initdb).resolve().parent


def _as_server(args: Sequence[str | Path]) -> list[str]:
    """``args`` run as the server's user: through runuser when we are root."""
    if os.geteuid() != 0:
        return [str(a) for a in args]
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ClusterError(
            f"no {SERVER_USER} system user (Debian's postgresql package makes it); run ./setup.sh"
        ) from None
    return ["runuser", "-u", SERVER_USER, "--", *(str(a) for a in args)]


def _run(args: Sequence[str | Path], *, what: str, cwd: Path, timeout: float = 60) -> str:
    try:
        done = subprocess.run(
            _as_server(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{what} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        raise ClusterError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def _give(path: Path) -> None:
    """``path`` (and what is under it) to the server's user, when we are root."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(SERVER_USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            os.chown(name, user.pw_uid, user.pw_gid)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port() -> int:
    rng = secrets.SystemRandom()
    while True:
        port = rng.randrange(*PORT_RANGE)
        if _port_free(port):
            return port


def _configure(directory: Path, port: int) -> None:
    """The server's settings (appended to postgresql.conf: later lines win) and trust for local clients."""
    data = directory / "data"
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(port),
        "unix_socket_directories": f"'{directory / 'socket'}'",
        "fsync": "on",
        "synchronous_commit": "on",
        "max_connections": "300",
        "shared_buffers": "32MB",
        "dynamic_shared_memory_type": "posix",
    }
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\n# simulator/postgres_cluster.py\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    (data / "pg_hba.conf").write_text(
        f"local all {USER} trust\nhost all {USER} 127.0.0.1/32 scram-sha-256\nhost all {USER} ::1/128 scram-sha-256\n"
    )


def _initdb(directory: Path) -> str:
    """initdb, the superuser's password set to a new random one (returned)."""
    (directory / "data").mkdir(mode=0o700)
    (directory / "socket").mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    pwfile = directory / "pwfile"
    pwfile.touch(mode=0o600)
    pwfile.write_text(password + "\n")
    _give(directory)
    try:
        _run(
            [_bindir() / "initdb", "-D", directory / "data", "-U", USER, "--auth=trust", "-E", "UTF8",
             "--no-locale", "--no-sync", f"--pwfile={pwfile}"],
            what="initdb", cwd=directory, timeout=120,
        )  # fmt: skip
    finally:
        pwfile.unlink()
    return password


def _server_up(directory: Path, port: int, timeout: float) -> None:
    """pg_ctl start, waiting until it accepts connections (the log: DIR/log)."""
    log = directory / "log"
    if not log.exists():
        log.touch()
        _give(log)
    _run(
        [_bindir() / "pg_ctl", "-D", directory / "data", "-l", log, "-w", "-t", str(int(timeout)), "-o",
         f"-p {port}", "start"],
        what=f"start PostgreSQL on port {port} (log: {log})", cwd=directory, timeout=timeout + 10,
    )  # fmt: skip


def _save(directory: Path, cluster: Cluster) -> None:
    partial = directory / (STATE_FILE + ".tmp")
    partial.touch(mode=0o600)
    partial.chmod(0o600)
    partial.write_text(json.dumps(attrs.asdict(cluster)) + "\n")
    partial.replace(directory / STATE_FILE)


def start(directory: str | os.PathLike[str], *, timeout: float = 60) -> Cluster:
    """initdb ``directory`` (created if needed) and start its server, or restart the cluster it holds."""
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        path.chmod(0o755)  # the server's user reaches its data and socket through it
    fresh = not (path / STATE_FILE).exists()
    if fresh and any(entry.name != OWNER_FILE for entry in path.iterdir()):
        raise ClusterError(f"{path} is neither empty nor a test PostgreSQL cluster")
    try:
        password = _initdb(path) if fresh else load(path).password
        for attempt in range(START_ATTEMPTS):
            port = _pick_port() if fresh else load(path).port
            cluster = Cluster(str(path), str(path / "socket"), port, password=password)
            _configure(path, port)
            try:
                _server_up(path, port, timeout)
                break
            except ClusterError:
                if not fresh or attempt == START_ATTEMPTS - 1 or _port_free(port):
                    raise  # not a port taken meanwhile
        _save(path, cluster)
        return cluster
    except BaseException:
        stop(path)
        raise


def load(directory: str | os.PathLike[str]) -> Cluster:
    """The cluster ``directory`` holds (started or not)."""
    try:
        return Cluster(**json.loads((Path(directory) / STATE_FILE).read_text()))
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise ClusterError(f"{directory} holds no test PostgreSQL cluster ({exc})") from None


def running_pid(directory: str | os.PathLike[str]) -> int | None:
    """The server's pid (postmaster.pid's first line) if that process is this cluster's postgres."""
    data = Path(directory).resolve() / "data"
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
        return None
    return pid if str(data).encode() in cmdline else None


def stop(directory: str | os.PathLike[str], *, timeout: float = 30) -> None:
    """Stop the server by its pid file: SIGINT (fast shutdown), SIGKILL after ``timeout``; never by name."""
    pid = running_pid(directory)
    if pid is None:
        return
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while running_pid(directory) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    if running_pid(directory) == pid:
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline + 10:
            time.sleep(0.05)


def create_database(cluster: Cluster, name: str) -> str:
    """Make database ``name`` (letters, digits, ``_``) in ``cluster``; its TCP URL."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ClusterError(f"{name!r}: a database name is lower-case letters, digits and _")
    done = subprocess.run(
        [_bindir() / "createdb", "-h", cluster.socket_dir, "-p", str(cluster.port), "-U", cluster.user, name],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise ClusterError(f"createdb {name} failed: {done.stderr.strip()}")
    return cluster.url(name)


def sweep(parent: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Stop and remove the clusters in ``parent``/``prefix``* whose owner process is gone; those removed."""
    return claims.sweep(parent, prefix, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: start, stop or status of the cluster in DIR."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("directory")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    try:
        if args.action == "stop":
            stop(args.directory)
            return 0
        cluster = start(args.directory, timeout=args.timeout) if args.action == "start" else load(args.directory)
        up = running_pid(args.directory) is not None
        print(json.dumps({"cluster": attrs.asdict(cluster), "url": cluster.url(), "running": up}))
    except ClusterError as e:
        print(f"postgres_cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
