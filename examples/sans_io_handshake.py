"""The protocol layer without any I/O: a handshake as bytes in, bytes out.

    .venv/bin/python examples/sans_io_handshake.py

``ServerHandshake`` is fed the bytes a client would send and hands back the
bytes to answer with and the events that follow; no sockets, no asyncio.
"""

from __future__ import annotations

from sendense_nbd.protocol import ExportInfo, Negotiated, Option, ServerHandshake, TransmissionFlag, wire

export = ExportInfo(name="disk", size=1 << 30, flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH)
handshake = ServerHandshake({"disk": export})

greeting = handshake.data_to_send()
print(f"server greets with {len(greeting)} bytes, handshake flags {wire.decode_greeting(greeting):#x}")

# A client: fixed newstyle + no zeroes, then NBD_OPT_GO for "disk" with no info requests.
go_data = wire.encode_string("disk") + wire.U16.pack(0)
handshake.receive_data(wire.CLIENT_FLAGS.pack(3) + wire.encode_option(Option.GO, go_data))

replies = handshake.data_to_send()
while replies:
    header = wire.decode_option_reply_header(replies[: wire.OPTION_REPLY_HEADER.size])
    print(f"reply to option {header.option}: type {header.reply:#x}, {header.length} bytes")
    replies = replies[wire.OPTION_REPLY_HEADER.size + header.length :]

event = handshake.next_event()
assert isinstance(event, Negotiated)
print(f"negotiated export {event.export.name!r} of {event.export.size} bytes; transmission starts")
