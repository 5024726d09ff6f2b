"""NBD wire constants (doc/proto.md of NetworkBlockDevice/nbd).

Names follow the spec with the ``NBD_`` prefix and the group prefix dropped:
``NBD_OPT_GO`` is ``Option.GO``, ``NBD_CMD_FLAG_FUA`` is ``CommandFlag.FUA``.
"""

from __future__ import annotations

import enum

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809

#: Longest string (export name, description, context name) the spec allows.
MAX_STRING = 4096
#: Largest request payload the spec says no peer may treat as an attack.
MAX_PAYLOAD = 32 * 1024 * 1024


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags sent after the greeting (32 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option codes of the fixed newstyle handshake."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERROR = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types; the ``ERR_*`` ones have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERROR | 1
    ERR_POLICY = _REP_ERROR | 2
    ERR_INVALID = _REP_ERROR | 3
    ERR_PLATFORM = _REP_ERROR | 4
    ERR_TLS_REQD = _REP_ERROR | 5
    ERR_UNKNOWN = _REP_ERROR | 6
    ERR_SHUTDOWN = _REP_ERROR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERROR | 8
    ERR_TOO_BIG = _REP_ERROR | 9

    @property
    def is_error(self) -> bool:
        return bool(self.value & _REP_ERROR)


class TLSMode(enum.Enum):
    """Whether a connection uses TLS (``NBD_OPT_STARTTLS``)."""

    OFF = "off"  #: never: a server refuses STARTTLS, a client never sends it
    ALLOW = "allow"  #: a server accepts both; a client tries TLS and falls back to plaintext
    REQUIRE = "require"  #: TLS or nothing


class Info(enum.IntEnum):
    """``NBD_INFO_*`` items of ``NBD_OPT_INFO`` and ``NBD_OPT_GO``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    """Per-request command flags (16 bits)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Errno(enum.IntEnum):
    """The error values the spec allows on the wire."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationFlag(enum.IntFlag):
    """Extent flags of the ``base:allocation`` meta context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
#: qemu's context: per extent, the depth in the backing chain that holds it (0: none).
ALLOCATION_DEPTH = "qemu:allocation-depth"
