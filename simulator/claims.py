"""Test cluster directories claimed by the process that made them, swept once that process is gone.

``claim(directory)`` writes ``owner.json``: the owner's pid and its start time, so that a pid reused
since is not taken for the owner. ``sweep(parent, prefix, stop)`` stops (with the cluster's own
``stop``) and removes the claimed directories ``parent``/``prefix``* whose owner is gone, as a
SIGKILLed test session leaves them. Used by simulator/ceph_cluster.py and
simulator/postgres_cluster.py (imported as ``claims``: simulator/ is on sys.path when they run as
scripts; tests/conftest.py puts it there while it loads them). Stdlib only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

#: The file naming the process a cluster directory belongs to (see :func:`claim` and :func:`sweep`).
OWNER_FILE = "owner.json"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def claim(directory: str | os.PathLike[str], pid: int | None = None) -> None:
    """Mark ``directory`` as belonging to process ``pid`` (default: this one), for :func:`sweep`."""
    pid = os.getpid() if pid is None else pid
    path = Path(directory) / OWNER_FILE
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"pid": pid, "start": process_start(pid)}) + "\n")
    partial.replace(path)  # whole or absent: a reader never sees half a claim


def abandoned(directory: Path) -> bool:
    """``directory`` is claimed by a process that is gone (a pid reused since does not count as its owner)."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False  # unclaimed, or not a claim we can read: not ours to remove
    return owner["start"] is None or process_start(int(owner["pid"])) != owner["start"]


def sweep(parent: str | os.PathLike[str], prefix: str, stop: Callable[[Path], None]) -> list[Path]:
    """``stop`` then remove each directory ``parent``/``prefix``* whose owner is gone; the directories removed."""
    removed = []
    for directory in sorted(Path(parent).glob(f"{prefix}*")):
        if directory.is_dir() and abandoned(directory):
            stop(directory)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed
