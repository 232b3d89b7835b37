"""HTTP/1.1 connections to upstream servers, parsed with httptools (llhttp).

One :class:`UpstreamConnection` carries one request at a time and is handed back to its
:class:`rpxy.upstream.pool.UpstreamPool` when both the request and the response finished
cleanly on a keep-alive connection. Responses stream to a handler as events; the handler
decides what reaches the client. Anything the parser refuses (bad status line, HTTP/0.9,
conflicting framing) is reported as a failure so that the client gets a 502, never the
garbage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol as TypingProtocol

import httptools
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from rpxy.message import Headers
from rpxy.deadline import LazyDeadline
from rpxy.netio import enable_keepalive, write_now

if TYPE_CHECKING:
    from rpxy.upstream.pool import UpstreamPool

#: Caps on what an upstream may send us as a response head.
MAX_RESPONSE_HEADER_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 200


class ResponseHandler(TypingProtocol):
    """Receives one upstream response; implemented by the pipeline's exchange."""

    def upstream_head(self, status: int, headers: Headers, keep_alive: bool) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_end(self, trailers: Headers | None) -> None: ...

    def upstream_failed(self, reason: str, received_anything: bool) -> None: ...

    def upstream_tunnel_data(self, data: bytes) -> None: ...

    def upstream_flush(self) -> None:
        """The bytes of one read are all delivered: a good moment to write to the client."""

    def upstream_timeout(self) -> None:
        """The response deadline set with set_response_deadline passed."""


class _HeadResponseDone(Exception):
    """Raised from the parser callback to stop llhttp waiting for a HEAD response's body."""


class UpstreamConnection(Protocol):
    """One keep-alive HTTP/1.1 client connection; also the push producer of its responses."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.handler: ResponseHandler | None = None
        self.connected_ok = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._header_bytes = 0
        self._in_head = False
        self._head_delivered = False
        self._is_head_request = False
        self._chunked_body = False
        self._received_anything = False
        self._response_complete = False
        self._request_complete = False
        self._keep_alive = False
        self._tunnel = False
        self._status = 0
        self._closing = False
        self._paused = False
        self._close_delimited = False
        self._deadline = LazyDeadline(pool.reactor, self._deadline_passed)

    # -- Twisted protocol -------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ok = True
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass
        enable_keepalive(self.transport)

    def dataReceived(self, data: bytes) -> None:
        handler = self.handler
        if self._tunnel:
            if handler is not None:
                handler.upstream_tunnel_data(data)
            return
        if handler is None:
            # Bytes nobody asked for (an idle pooled connection): the stream is out of sync.
            self.close()
            return
        self._received_anything = True
        try:
            self._parser.feed_data(data)
            handler = self.handler
            if handler is not None:
                handler.upstream_flush()
        except httptools.HttpParserUpgrade as exc:
            if self._status == 101 and self._tunnel:
                rest = data[exc.args[0]:]
                if rest and self.handler is not None:
                    self.handler.upstream_tunnel_data(rest)
            else:
                self._fail("upgrade without 101")
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadResponseDone):
                self._parser = httptools.HttpResponseParser(self)
                return
            self._fail(f"bad response: {exc.__context__ or exc}")
        except httptools.HttpParserError as exc:
            self._fail(f"bad response: {exc}")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.pool.connection_lost(self)
        self._deadline.cancel()
        handler = self.handler
        if handler is None:
            return
        self.handler = None
        if self._tunnel:
            handler.upstream_end(None)
            return
        if not self._response_complete:
            # A response delimited by the close of the connection ends here legitimately.
            # (httptools has no feed_eof: without Content-Length or chunking, EOF is the end.)
            if self._head_delivered and self._close_delimited:
                self._response_complete = True
                handler.upstream_end(None)
                return
            why = reason.getErrorMessage() if reason is not None else "closed"
            handler.upstream_failed(
                f"connection closed by upstream ({why})"
                if self._received_anything
                else f"connection closed before response ({why})",
                self._received_anything,
            )

    # -- request side (called by the exchange) ------------------------------

    def send_request(
        self, handler: ResponseHandler, head: bytes, *, is_head: bool, chunked_body: bool
    ) -> None:
        """Start one request; the caller then streams the body with write_body/end_body."""
        self.handler = handler
        self._is_head_request = is_head
        self._chunked_body = chunked_body
        self._received_anything = False
        self._response_complete = False
        self._request_complete = False
        self._head_delivered = False
        self._close_delimited = False
        self._status = 0
        write_now(self.transport, head)

    def write_body(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked_body:
            write_now(self.transport, b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            write_now(self.transport, data)

    def end_body(self, trailers: Headers | None = None) -> None:
        if self._chunked_body:
            if trailers:
                self.transport.writeSequence(
                    [b"0\r\n", *[name + b": " + value + b"\r\n" for name, value in trailers], b"\r\n"]
                )
            else:
                self.transport.write(b"0\r\n\r\n")
        self._request_complete = True
        if self._response_complete:
            self._finished()

    def set_response_deadline(self, when: float | None) -> None:
        """Arm (or clear, with None) the response-head deadline; see :mod:`rpxy.deadline`."""
        self._deadline.set(when)

    def _deadline_passed(self) -> None:
        handler = self.handler
        if handler is not None:
            handler.upstream_timeout()

    def tunnel_write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        """Drop the connection (never reused)."""
        if not self._closing:
            self._closing = True
            self.handler = None
            self.transport.loseConnection()

    def abort(self) -> None:
        self._closing = True
        self.handler = None
        self.transport.abortConnection()

    # IPushProducer for the response direction: the client's transport pauses us.
    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._header_bytes = 0
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._header_bytes += len(name) + len(value)
            if self._header_bytes > MAX_RESPONSE_HEADER_BYTES or len(self._headers) >= MAX_RESPONSE_HEADERS:
                raise ValueError("upstream response header block too large")
            self._headers.append((name.lower(), value))
        else:
            # Trailer fields of a chunked response.
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            # httptools takes any three digits ("050"); RFC 9110 section 15 allows 100-599.
            raise ValueError(f"invalid status code {status:03d}")
        self._status = status
        if 100 <= status < 200 and status != 101:
            return  # interim responses (100 Continue, 103) are not relayed
        handler = self.handler
        headers = self._headers
        self._headers = []
        self._keep_alive = self._parser.should_keep_alive()
        self._head_delivered = True
        self._close_delimited = status != 101 and not self._is_head_request and _is_close_delimited(status, headers)
        if status == 101:
            self._tunnel = True
        if handler is not None:
            handler.upstream_head(status, headers, self._keep_alive)
        if self._is_head_request and status != 101:
            self._complete(None)
            raise _HeadResponseDone()

    def on_body(self, body: bytes) -> None:
        if self._status < 200:
            # An interim response has no body (RFC 9110 section 15.2); httptools frames one
            # after e.g. "199" with a Content-Length, which must never reach the client.
            raise ValueError(f"a body in an interim {self._status} response")
        handler = self.handler
        if handler is not None:
            handler.upstream_data(body)

    def on_message_complete(self) -> None:
        status = self._status
        if (100 <= status < 200) or self._response_complete:
            return
        trailers = self._headers or None
        self._headers = []
        self._complete(trailers)

    # -- internals ----------------------------------------------------------

    def _complete(self, trailers: Headers | None) -> None:
        self._response_complete = True
        handler = self.handler
        if handler is not None:
            handler.upstream_end(trailers)
        if self._request_complete:
            self._finished()

    def _finished(self) -> None:
        """Both directions done: back to the pool or closed."""
        self.handler = None
        if self._keep_alive and not self._closing and not self._tunnel:
            if self._paused:
                # A slow client paused us during the last read; the sink has let go of us
                # without resuming, and a pooled connection must read its next response.
                self.resumeProducing()
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, reason: str) -> None:
        handler = self.handler
        self.handler = None
        if handler is not None:
            handler.upstream_failed(reason, self._received_anything)
        self.abort()


def _is_close_delimited(status: int, headers: Headers) -> bool:
    if status in (204, 304):
        return False
    for name, _ in headers:
        if name == b"content-length" or name == b"transfer-encoding":
            return False
    return True
