"""Openers for export worker tests, importable by a worker process (it unpickles them): one that opens a raw
file after a pause, and one whose failure a worker can pickle but the hub cannot read back."""

from __future__ import annotations

import pickle
import sys
import time

import attrs

from sendense_nbd.hub.openers import ImageOpener
from sendense_nbd.storage.base import BlockDevice
from sendense_nbd.storage.modes import ImageFormat


@attrs.frozen
class SlowOpener:
    """The raw file ``path``, opened after ``pause`` seconds."""

    path: str
    pause: float

    def __call__(self) -> BlockDevice:
        """Sleep, then open it."""
        time.sleep(self.pause)
        return ImageOpener(self.path, ImageFormat.RAW)()


class Unreadable(Exception):
    """An error that unpickles only in an export worker process."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _unreadable, (str(self),)


def _unreadable(text: str) -> Unreadable:
    main = getattr(sys.modules["__main__"], "__spec__", None)
    if main is None or main.name != "sendense_nbd.hub.export_worker":
        raise pickle.UnpicklingError(f"only an export worker reads this: {text}")
    return Unreadable(text)


@attrs.frozen
class UnreadableOpener:
    """Fails with :class:`Unreadable`."""

    def __call__(self) -> BlockDevice:
        """Fail."""
        raise Unreadable("an opener that fails unreadably")
