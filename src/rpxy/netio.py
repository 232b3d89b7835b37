"""Writing to a TCP transport without a reactor round trip when nothing is queued.

Twisted's ``FileDescriptor.write`` always buffers: the bytes wait for the reactor to
register the socket for writing (an ``epoll_ctl``), report it writable in the next
poll, send, then unregister it (another ``epoll_ctl``). For a proxy answering small
requests that is most of the per-request event-loop work. When the transport has
nothing queued we can simply ``send`` now; whatever the kernel does not take is
handed to ``transport.write`` as usual, so ordering, backpressure (producers) and
error handling stay Twisted's.

This relies on ``twisted.internet.abstract.FileDescriptor`` attributes; any other
transport (TLS, test transports) takes the plain ``write`` path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection


def write_now(transport: Any, data: bytes) -> None:
    """Like ``transport.write(data)`` but sends immediately when the send buffer is empty.

    Only for a plain TCP connection: a TLS transport forwards unknown attributes to the
    TCP transport below it (``ProtocolWrapper.__getattr__``), so duck typing would send
    plaintext past the TLS layer.
    """
    if (
        isinstance(transport, Connection)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted see (and report) the failure through its normal write path.
            transport.write(data)
            return
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
