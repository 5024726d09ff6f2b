"""``serve --fork``: the checks before the fork, systemd's sockets, and a parent that always ends.

The parent of ``--fork`` returns once the child listens; it must take systemd's sockets before
forking (``LISTEN_PID`` is its own pid), tell usage errors with exit 2 itself, give up on a child that
never gets ready, and run none of the caller's clean-up (the PID file is the child's) whatever stops it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

from tests.conftest import random_file, server_command, wait_gone

pytestmark = pytest.mark.peer
MiB = 1 << 20

#: Stands for systemd: the socket becomes fd 3 of the exec'd server, LISTEN_PID its pid.
_SYSTEMD = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
)

#: ``_fork`` with a child that never says it is ready; the caller's ``finally`` leaves a trace if it runs.
_NEVER_READY = (
    "import os, sys, time\n"
    "from sendense_nbd.cli import nbd as cli\n"
    "cli.FORK_READY_TIMEOUT = float(sys.argv[1])\n"
    "try:\n"
    "    cli._fork()\n"
    "    open(sys.argv[2] + '.child', 'w').write(str(os.getpid()))\n"
    "    time.sleep(60)\n"
    "finally:\n"
    "    open(sys.argv[2] + '.finally.' + str(os.getpid()), 'w').close()\n"
)


def test_fork_serves_systemds_socket(tmp_path: Path) -> None:
    """LISTEN_PID names the process systemd started, the parent: it takes the socket before forking."""
    disk = random_file(tmp_path / "d.raw", MiB)
    pid_file = tmp_path / "pid"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    serve = ["-m", "sendense_nbd", "serve", "--fork", "--pid-file", str(pid_file), "-t", "-f", "raw", "-r", "-p", "1"]
    result = subprocess.run(
        [sys.executable, "-c", _SYSTEMD, str(listener.fileno()), *serve, str(disk)],
        pass_fds=(listener.fileno(),),
        capture_output=True,
        timeout=60,
    )
    listener.close()
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
            assert probe.recv(8) == b"NBDMAGIC"  # (a timeout if nobody accepts on it)
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/")  # not port 1: the inherited socket, served by the child
        assert h.pread(MiB, 0) == disk.read_bytes()
        h.shutdown()
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 20) and not pid_file.exists()


def test_fork_tells_usage_errors_before_forking(tmp_path: Path) -> None:
    disk = random_file(tmp_path / "d.raw", MiB)
    args = ["serve", "--fork", "-k", str(tmp_path / "s.sock"), "--tls-verify-client", "-f", "raw", str(disk)]
    result = subprocess.run(server_command(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--tls-creds and --tls-verify-client need --tls allow or require" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_fork_gives_up_on_a_child_that_never_listens(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _NEVER_READY, "1", str(marker)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and time.monotonic() - started < 30
    child = int(Path(f"{marker}.child").read_text())
    assert f"the server (pid {child}) was not listening after 1 s, and was killed" in result.stderr
    assert wait_gone(child, 20)
    assert list(tmp_path.glob("m.finally.*")) == []  # neither the parent nor the killed child ran it


def test_fork_parent_interrupted_runs_none_of_the_callers_clean_up(tmp_path: Path) -> None:
    """^C while the parent waits: it exits 1 at once; the caller's ``finally`` (which would remove the
    child's PID file in serve) runs only in the child."""
    marker = tmp_path / "m"
    parent = subprocess.Popen([sys.executable, "-c", _NEVER_READY, "60", str(marker)], stderr=subprocess.PIPE)
    child_file = Path(f"{marker}.child")
    deadline = time.monotonic() + 30
    while not child_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(child_file.read_text())
    try:
        parent.send_signal(signal.SIGINT)
        assert parent.wait(timeout=20) == 1
        assert not (tmp_path / f"m.finally.{parent.pid}").exists()
    finally:
        os.kill(child, signal.SIGTERM)
        assert parent.stderr is not None
        parent.stderr.close()
    assert wait_gone(child, 20)
