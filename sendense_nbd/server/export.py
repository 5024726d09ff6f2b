"""Exports: a named block device and what the handshake says about it."""

from __future__ import annotations

import attrs

from sendense_nbd.errors import ServerError
from sendense_nbd.protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, MAX_PAYLOAD, TransmissionFlag
from sendense_nbd.protocol.handshake import ExportInfo
from sendense_nbd.storage.base import BlockDevice, require_opened


def _opened(export: Export, _: attrs.Attribute[BlockDevice], device: BlockDevice) -> None:
    try:
        require_opened(device, f"export {export.name!r}")
    except TypeError as exc:
        raise ServerError(str(exc)) from None


@attrs.frozen(slots=True)
class Export:
    """A block device served under ``name``: the checking adapter or a filter over it, never a bare backend."""

    name: str
    device: BlockDevice = attrs.field(validator=_opened)
    description: str = ""
    readonly: bool = False
    #: Offer ``qemu:allocation-depth``, as ``qemu-nbd -A`` does.
    allocation_depth: bool = False

    @property
    def writable(self) -> bool:
        """Clients may write: not exported read-only and the device can write."""
        return not self.readonly and self.device.capabilities.writable

    def info(self, *, multi_conn: bool) -> ExportInfo:
        """The handshake's view; ``multi_conn`` when several clients may share it."""
        caps = self.device.capabilities
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        flags |= TransmissionFlag.SEND_DF
        if caps.can_cache:
            flags |= TransmissionFlag.SEND_CACHE
        if self.writable:
            # TRIM is advisory: offered on every writable export, as qemu-nbd does, and a
            # device that cannot trim (``--discard ignore``) accepts it as a no-op.
            flags |= TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_TRIM
            if caps.can_fast_zero:
                flags |= TransmissionFlag.SEND_FAST_ZERO
        else:
            flags |= TransmissionFlag.READ_ONLY
        if multi_conn and caps.can_multi_conn and caps.can_flush:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return ExportInfo(
            name=self.name,
            size=self.device.size,
            flags=flags,
            description=self.description,
            min_block=caps.min_block,
            preferred_block=caps.preferred_block,
            max_block=MAX_PAYLOAD,
            meta_contexts=(BASE_ALLOCATION, ALLOCATION_DEPTH) if self.allocation_depth else (BASE_ALLOCATION,),
        )
