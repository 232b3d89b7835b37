"""The two small interfaces that connect a front end to the request pipeline.

A front end (HTTP/1.1 now; HTTP/2 and HTTP/3 later) turns wire events into calls on an
:class:`Exchange` and receives the response through its own :class:`ResponseSink`. Both
sides stream: nothing here holds a whole body. Backpressure crosses the boundary as
Twisted push producers: the sink pauses the upstream when the client is slow, and the
front end hands over a producer that pauses the client's request body when the upstream
is slow.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from rpxy.message import Headers


class ResponseSink(Protocol):
    """Where the pipeline writes one response; implemented by each front end per request."""

    #: Pauses/resumes the client's request body (for upstream backpressure).
    request_producer: IPushProducer

    def send_head(self, status: int, headers: Headers) -> None: ...

    def send_data(self, data: bytes) -> None: ...

    def flush(self) -> None:
        """Write out anything held back (a sink may delay a head to coalesce it with the body)."""

    def send_end(self, trailers: Headers | None = None) -> None: ...

    def abort(self) -> None:
        """The response cannot be completed: reset the stream / close the connection."""

    def register_producer(self, producer: IPushProducer) -> None:
        """While registered, the sink pauses ``producer`` when the client cannot keep up."""

    def unregister_producer(self) -> None: ...

    def start_tunnel(self, upstream: TunnelEnd) -> TunnelEnd:
        """Switch to a raw byte relay after a 101; returns the client's end of the tunnel."""


class TunnelEnd(Protocol):
    """One side of an upgraded (WebSocket) connection relaying raw bytes."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def register_producer(self, producer: IPushProducer) -> None:
        """While registered, this end pauses ``producer`` when it cannot take more bytes."""


@implementer(IPushProducer)
class TunnelPauser:
    """Pauses one end of a tunnel while the other end cannot take more bytes."""

    __slots__ = ("end",)

    def __init__(self, end: TunnelEnd) -> None:
        self.end = end

    def pauseProducing(self) -> None:
        self.end.pause()

    def resumeProducing(self) -> None:
        self.end.resume()

    def stopProducing(self) -> None:
        self.end.close()


class StreamTunnelEnd:
    """The client's end of a WebSocket tunnel carried by one stream of a multiplexed
    connection (RFC 8441 over HTTP/2, RFC 9220 over HTTP/3).

    The stream (the front end's response sink) keeps its flow control: bytes from the
    upstream go out as DATA within the client's windows, END_STREAM / FIN once the held
    data is out.
    """

    __slots__ = ("stream",)

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream

    def write(self, data: bytes) -> None:
        stream = self.stream
        if not stream.closed:
            stream.send_data(data)
            stream.flush()

    def close(self) -> None:
        """The upstream closed: the stream ends after what it still holds."""
        stream = self.stream
        stream.tunnel = None
        if not stream.closed:
            stream.send_end(None)

    def pause(self) -> None:
        self.stream.pauseProducing()

    def resume(self) -> None:
        self.stream.resumeProducing()


class Exchange(Protocol):
    """The pipeline's side of one request, fed by the front end."""

    def request_data(self, data: bytes) -> None: ...

    def request_end(self, trailers: Headers | None = None) -> None: ...

    def client_gone(self) -> None:
        """The client went away: stop work and release upstream resources."""
