"""Creating files safely: a fresh temporary name, then a hard link that never replaces anything.

A new image is written under a hidden temporary name in its directory,
created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a planted file or symlink makes
it fail instead of being followed), synced, and linked to its final name.
``link`` fails when the final name exists, as a file or as a symlink, so
nothing is ever overwritten, and a crash leaves at most a temporary file
(:func:`is_temporary` names it, for the sweep after a restart).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable

#: Suffix of every temporary file made here (hidden: the name starts with a dot).
TEMPORARY_SUFFIX = ".creating"
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temporary_name(path: str) -> str:
    """A fresh hidden name next to ``path`` (``.NAME.RANDOM.creating``), within NAME_MAX."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name[:200]}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether a directory entry is a temporary file this module (or the hub) leaves on a crash."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def open_exclusive(path: str, mode: int = 0o644) -> int:
    """Create ``path`` for writing; fails if anything (a symlink too) already has that name."""
    return os.open(path, _CREATE_FLAGS, mode)


def link_new(temporary: str, path: str) -> None:
    """Give the complete file ``temporary`` its final name ``path`` (never replacing one), then
    drop the temporary name and sync the directory."""
    os.link(temporary, path, follow_symlinks=False)
    os.unlink(temporary)
    sync_directory(os.path.dirname(path) or ".")


def remove_quietly(path: str) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sync_directory(path: str) -> None:
    """Make the directory's entries (new names, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_new_file(path: str, write: Callable[[int], None], *, mode: int = 0o644) -> None:
    """Create ``path`` whole or not at all: ``write(fd)`` fills a fresh temporary file, which is
    synced and linked into place. :class:`FileExistsError` if ``path`` exists; nothing is left
    behind on any failure."""
    if os.path.lexists(path):
        raise FileExistsError(17, "File exists", path)
    temporary = temporary_name(path)
    fd = open_exclusive(temporary, mode)
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        link_new(temporary, path)
    finally:
        remove_quietly(temporary)
