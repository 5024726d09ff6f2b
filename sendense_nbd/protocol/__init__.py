"""Sans-IO NBD: constants, the wire codec, and the handshake and transmission
state machines of both roles. Nothing in this package performs I/O or
imports asyncio."""

from sendense_nbd.protocol.client import ClientHandshake, Goal, Ready
from sendense_nbd.protocol.constants import (
    BASE_ALLOCATION,
    AllocationFlag,
    Command,
    CommandFlag,
    Errno,
    Option,
    OptionReply,
    TLSMode,
    TransmissionFlag,
)
from sendense_nbd.protocol.handshake import (
    Aborted,
    ExportInfo,
    Negotiated,
    ServerHandshake,
)
from sendense_nbd.protocol.replies import Reply, ReplyParser
from sendense_nbd.protocol.sansio import NEED_DATA, NeedData, StartTLS
from sendense_nbd.protocol.transmission import (
    Data,
    Disconnect,
    Hole,
    Rejection,
    Request,
    RequestParser,
    check_request,
)

__all__ = [
    "BASE_ALLOCATION",
    "NEED_DATA",
    "Aborted",
    "AllocationFlag",
    "ClientHandshake",
    "Command",
    "CommandFlag",
    "Data",
    "Disconnect",
    "Errno",
    "ExportInfo",
    "Goal",
    "Hole",
    "Negotiated",
    "NeedData",
    "Option",
    "OptionReply",
    "Ready",
    "Rejection",
    "Reply",
    "ReplyParser",
    "Request",
    "RequestParser",
    "ServerHandshake",
    "StartTLS",
    "TLSMode",
    "TransmissionFlag",
    "check_request",
]
