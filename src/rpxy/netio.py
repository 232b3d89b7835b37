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

import socket
from typing import Any

from twisted.internet.tcp import Connection

#: Upstream TCP keepalive, as rpxy's 20 s idle time; then 3 probes 5 s apart, so a silently
#: dead upstream (a host gone, a NAT entry expired) is noticed in ~35 s instead of hours.
KEEPALIVE_IDLE = 20
KEEPALIVE_INTERVAL = 5
KEEPALIVE_PROBES = 3


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


def socket_below(transport: Any) -> tuple[socket.socket | None, bool]:
    """The OS socket under ``transport``, and whether a wrapper (TLS) sits in between.

    Walks ``.transport`` links using instance attributes only: Twisted's protocol wrappers
    forward unknown attribute reads to the transport below, which would hide the wrapper.
    """
    wrapped = False
    for _ in range(4):
        attributes = getattr(transport, "__dict__", None)
        if attributes is None:
            return None, wrapped
        sock = attributes.get("socket")
        if isinstance(sock, socket.socket):
            return sock, wrapped
        wrapped = True
        transport = attributes.get("transport")
    return None, wrapped


def enable_keepalive(transport: Any) -> None:
    """TCP keepalive on an upstream connection (best effort: a platform may lack the knobs)."""
    sock, _ = socket_below(transport)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except (OSError, AttributeError):
        pass
