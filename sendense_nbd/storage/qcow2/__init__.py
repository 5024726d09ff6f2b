"""qcow2 in pure Python: the format, a crash-safe device, creation, checking."""

from sendense_nbd.storage.qcow2.create import create_qcow2
from sendense_nbd.storage.qcow2.device import Qcow2Device

__all__ = ["Qcow2Device", "create_qcow2"]
