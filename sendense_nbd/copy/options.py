"""How to copy: :class:`CopyOptions`, the frozen settings of :func:`~sendense_nbd.copy.copy`."""

from __future__ import annotations

import enum

import attrs

from sendense_nbd.copy.plan import DEFAULT_MERGE_GAP, DEFAULT_REQUEST_SIZE, TargetMode

_POSITIVE = attrs.validators.ge(1)
_NOT_NEGATIVE = attrs.validators.ge(0)


class OverlayZeroes(enum.Enum):
    """How zero areas reach a target with a backing chain."""

    #: WRITE_ZEROES with NO_HOLE: the server must make the range read zeroes
    #: (as qemu and our qcow2 server do with the zero flag).
    WRITE_ZEROES = "write-zeroes"
    #: Zero data, for servers whose WRITE_ZEROES would let the backing file show through.
    BUFFERS = "buffers"


@attrs.frozen(slots=True, kw_only=True)
class CopyOptions:
    """The settings of one copy; the defaults suit one disk over a LAN."""

    #: Connections per endpoint (one without ``NBD_FLAG_CAN_MULTI_CONN``).
    connections: int = attrs.field(default=4, validator=_POSITIVE)
    #: Requests in flight per connection.
    requests: int = attrs.field(default=16, validator=_POSITIVE)
    #: Largest read or write (rounded down to the block size, and to what the endpoints accept).
    request_size: int = attrs.field(default=DEFAULT_REQUEST_SIZE, validator=_POSITIVE)
    #: What the target reads where the copy does not write (AUTO: probe it).
    target_mode: TargetMode = attrs.field(default=TargetMode.AUTO, validator=attrs.validators.instance_of(TargetMode))
    #: Changed areas closer than this are copied as one.
    merge_gap: int = attrs.field(default=DEFAULT_MERGE_GAP, validator=_NOT_NEGATIVE)
    #: After the copy, read every byte of both sides again (the source through new connections) and compare.
    verify: bool = False
    #: FLUSH the target before reporting success.
    flush: bool = True
    #: Seconds between progress events at most (the final one is always sent).
    progress_interval: float = 0.5
    #: Attempts after a transient failure, per item.
    retries: int = attrs.field(default=5, validator=_NOT_NEGATIVE)
    #: Seconds before the first retry; doubled each time, up to 8 s.
    backoff: float = 0.1
    #: Data bytes written between checkpoint FLUSHes.
    checkpoint_bytes: int = attrs.field(default=1 << 30, validator=_NOT_NEGATIVE)
    overlay_zeroes: OverlayZeroes = attrs.field(
        default=OverlayZeroes.WRITE_ZEROES, validator=attrs.validators.instance_of(OverlayZeroes)
    )
