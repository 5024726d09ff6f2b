"""qcow2 in pure Python: the format and the mapping (pure code), the metadata cache and the
allocator, the crash-safe device over them, creation, checking and commit."""

from sendense_nbd.storage.qcow2.create import create_qcow2
from sendense_nbd.storage.qcow2.device import Qcow2Device

__all__ = ["Qcow2Device", "create_qcow2"]
