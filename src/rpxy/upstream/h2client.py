"""HTTP/2 connections to upstream servers, on the ``h2`` library's sans-IO connection.

Used for gRPC (always HTTP/2) and for routes with ``force_http2_upstream``: h2c with prior
knowledge for ``http://`` upstreams, ALPN ``h2`` over TLS otherwise. One
:class:`H2UpstreamPool` per upstream keeps multiplexed :class:`H2ClientConnection` s; a
request gets an :class:`H2UpstreamStream` from the first connection with room for one more
stream (a new connection once every connection reached the upstream's
``SETTINGS_MAX_CONCURRENT_STREAMS``, or after a GOAWAY).

A stream presents the same interface to :class:`rpxy.pipeline.ProxyExchange` as
:class:`rpxy.upstream.h1client.UpstreamConnection` (``write_body``/``end_body``, the
response events on the handler, ``pauseProducing``/``resumeProducing`` for the response
direction, ``abort``/``close``, ``set_response_deadline``, ``reused``), except that the
request head is a field list (:meth:`H2UpstreamStream.send_request_fields`). Its
``transport`` is the stream itself: the exchange registers the client's request producer
there, and the stream pauses it while the upstream's flow-control windows hold request DATA
back.

Flow control: response DATA is acknowledged (WINDOW_UPDATE) only while the client takes it
(the sink has not paused the stream), so one stream buffers at most its window
(:data:`STREAM_WINDOW`); the connection window is large enough for every stream's window,
so a slow client never stalls the other streams of the connection.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rpxy.deadline import LazyDeadline
from rpxy.message import Headers
from rpxy.netio import enable_keepalive, write_now
from rpxy.upstream.pool import _endpoint

if TYPE_CHECKING:
    from rpxy.config.model import UpstreamConfig
    from rpxy.upstream.h1client import ResponseHandler

log = Logger()

#: The stream window we advertise: response bytes one stream may have in flight.
STREAM_WINDOW = 256 * 1024
#: Streams per connection we open at most, whatever the upstream allows.
MAX_STREAMS_PER_CONNECTION = 256
#: Before the upstream's SETTINGS arrive: streams we assume it takes (RFC 9113 recommends >= 100).
ASSUMED_MAX_STREAMS = 100
#: Caps on a response header list from the upstream.
MAX_RESPONSE_HEADER_LIST_SIZE = 64 * 1024

# Fields that are never sent in HTTP/2 (RFC 9113 section 8.2.2); "host" becomes :authority.
_NOT_FORWARDED = frozenset(
    (b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


class H2UpstreamStream:
    """One request/response on an upstream HTTP/2 connection (the exchange's ``upstream``)."""

    def __init__(self, connection: H2ClientConnection, reused: bool) -> None:
        self.connection = connection
        self.pool = connection.pool
        self.reused = reused
        self.stream_id = 0
        self.started = False
        self.handler: ResponseHandler | None = None
        self.received_anything = False
        self.head_delivered = False
        self.trailers: Headers | None = None
        self.request_ended = False
        self.response_ended = False
        self.closed = False
        # Request DATA the upstream's windows hold back; END_STREAM (and trailers) after it.
        self.pending: deque[bytes] | None = None
        self.end_pending = False
        self.end_trailers: Headers | None = None
        self.request_producer: IPushProducer | None = None
        # Response direction: paused by the client's sink; DATA then stays unacknowledged.
        self.paused = False
        self.unacked = 0
        self.deadline = LazyDeadline(connection.pool.reactor, self._deadline_passed)

    # The exchange registers the client's request producer on ``upstream.transport``.
    @property
    def transport(self) -> H2UpstreamStream:
        return self

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self.closed or self.request_ended:
            return
        self.request_producer = producer
        if self.pending is not None:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.request_producer = None

    # -- request side (called by the exchange) ------------------------------------------

    def send_request_fields(self, handler: ResponseHandler, fields: Headers, *, end_stream: bool) -> None:
        """Send the request head (pseudo-headers first); the body follows with write_body/end_body."""
        self.handler = handler
        self.request_ended = end_stream
        self.connection.start_stream(self, fields, end_stream)

    def write_body(self, data: bytes) -> None:
        if not data or self.closed or self.request_ended:
            return
        if self.pending is not None:
            self.pending.append(data)
        else:
            rest = self.connection.send_data(self, data)
            if rest:
                self.pending = deque((rest,))
                self.connection.blocked[self.stream_id] = self
        if self.pending is not None and self.request_producer is not None:
            self.request_producer.pauseProducing()
        self.connection.flush()

    def end_body(self, trailers: Headers | None = None) -> None:
        if self.closed or self.request_ended:
            return
        if self.pending is not None:
            self.end_pending = True
            self.end_trailers = trailers
            return
        self._end_request(trailers)
        self.connection.flush()

    def _end_request(self, trailers: Headers | None) -> None:
        self.request_ended = True
        self.request_producer = None
        connection = self.connection
        try:
            if trailers:
                fields = [item for item in trailers if item[0][:1] != b":" and item[0] not in _NOT_FORWARDED]
                connection.h2.send_headers(self.stream_id, fields, end_stream=True)
            else:
                connection.h2.end_stream(self.stream_id)
        except (StreamClosedError, ProtocolError):
            return
        if self.response_ended:
            connection.stream_done(self)

    def drain(self) -> bool:
        """Send held request DATA as the windows allow; True when nothing is held any more."""
        pending = self.pending
        while pending:
            rest = self.connection.send_data(self, pending[0])
            if rest:
                pending[0] = rest
                return False
            pending.popleft()
        self.pending = None
        if self.end_pending:
            self.end_pending = False
            self._end_request(self.end_trailers)
        elif self.request_producer is not None:
            self.request_producer.resumeProducing()
        return True

    def set_response_deadline(self, when: float | None) -> None:
        self.deadline.set(None if self.closed else when)

    def _deadline_passed(self) -> None:
        handler = self.handler
        if handler is not None and not self.closed:
            handler.upstream_timeout()

    def close(self) -> None:
        """The exchange is done with this stream (a response that ended early, or never used)."""
        self._cancel(ErrorCodes.CANCEL)

    def abort(self) -> None:
        """The client went away (or the exchange gave up): RST_STREAM(CANCEL) upstream."""
        self._cancel(ErrorCodes.CANCEL)

    def _cancel(self, code: ErrorCodes) -> None:
        self.handler = None
        if self.closed:
            return
        connection = self.connection
        if self.stream_id and not (self.request_ended and self.response_ended):
            try:
                connection.h2.reset_stream(self.stream_id, code)
            except (StreamClosedError, ProtocolError):
                pass
        connection.stream_done(self)
        connection.flush()

    # IPushProducer for the response direction: the client's sink pauses us.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.unacked and not self.closed:
            unacked, self.unacked = self.unacked, 0
            self.connection.acknowledge(unacked, self.stream_id)
            self.connection.flush()

    def stopProducing(self) -> None:
        self.abort()

    # -- response events (from the connection) --------------------------------------------

    def on_response(self, headers: Headers) -> None:
        self.received_anything = True
        self.deadline.cancel()
        status = 0
        fields: Headers = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value) if value.isdigit() else 0
            else:
                fields.append((name, value))
        handler = self.handler
        if not 200 <= status <= 999 or status == 101:
            self.fail(f"bad response status {status}")
            return
        self.head_delivered = True
        if handler is not None:
            handler.upstream_head(status, fields, True)

    def on_data(self, data: bytes, flow: int) -> None:
        self.received_anything = True
        handler = self.handler
        if handler is not None and data:
            handler.upstream_data(data)
        if flow:
            if self.paused and not self.closed:
                self.unacked += flow
            else:
                self.connection.acknowledge(flow, self.stream_id)

    def on_end(self) -> None:
        self.response_ended = True
        self.deadline.cancel()
        handler, self.handler = self.handler, None
        if not self.head_delivered:
            if handler is not None:
                handler.upstream_failed("stream ended without a response", self.received_anything)
            self._cancel(ErrorCodes.PROTOCOL_ERROR)
            return
        if handler is not None:
            handler.upstream_end(self.trailers)
        if self.request_ended:
            self.connection.stream_done(self)

    def fail(self, reason: str) -> None:
        """The stream (or its connection) failed: tell the exchange, reset what is still open."""
        handler, self.handler = self.handler, None
        self.deadline.cancel()
        if handler is not None:
            handler.upstream_failed(reason, self.received_anything)
        self._cancel(ErrorCodes.CANCEL)

    def flush_handler(self) -> None:
        handler = self.handler
        if handler is not None:
            handler.upstream_flush()


@implementer(IHandshakeListener)
class H2ClientConnection(Protocol):
    """One HTTP/2 client connection to an upstream, multiplexing :class:`H2UpstreamStream` s."""

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.streams: dict[int, H2UpstreamStream] = {}
        #: Streams acquired but whose HEADERS are not sent yet (they count against the limit).
        self.reserved = 0
        #: Streams waiting for the upstream's stream limit (SETTINGS lowered it meanwhile).
        self.queued: deque[tuple[H2UpstreamStream, Headers, bool]] = deque()
        self.used = 0
        self.blocked: dict[int, H2UpstreamStream] = {}
        self.goaway = False
        self.closing = False
        self.in_receive = False
        self.idle = LazyDeadline(pool.reactor, self._idle_passed)
        h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,  # the request policy already removed what h2 forbids
                normalize_outbound_headers=False,
            )
        )
        h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEADER_LIST_SIZE,
            },
        )
        h2.decoder.max_header_list_size = MAX_RESPONSE_HEADER_LIST_SIZE
        self.h2 = h2
        self.settings_received = False
        self._handlers = {
            ResponseReceived: self._on_response,
            DataReceived: self._on_data,
            TrailersReceived: self._on_trailers,
            StreamEnded: self._on_stream_ended,
            StreamReset: self._on_reset,
            WindowUpdated: self._on_window,
            RemoteSettingsChanged: self._on_settings,
            ConnectionTerminated: self._on_goaway,
        }

    # -- Twisted protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass
        enable_keepalive(self.transport)
        h2 = self.h2
        h2.initiate_connection()
        window = min((MAX_STREAMS_PER_CONNECTION + 1) * STREAM_WINDOW, 2**31 - 1)
        h2.increment_flow_control_window(window - 65535)
        self.flush()

    def handshakeCompleted(self) -> None:
        """Over TLS: the upstream must have chosen ``h2`` by ALPN before it reads our frames.

        An upstream that ignores ALPN (or picks ``http/1.1``) would read the HTTP/2 preface
        as a broken HTTP/1.1 request; the operator gets a 502 and a line naming the cause.
        """
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            return
        chosen = negotiated.decode("ascii", "replace") if negotiated else "none"
        self._fail_all(f"upstream did not agree to HTTP/2 over TLS (ALPN chose {chosen}); remove force_http2_upstream or enable h2 there")
        self._drop()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.in_receive = True
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as error:
            self.in_receive = False
            self._fail_all(f"HTTP/2 protocol error from upstream: {error}")
            self.flush()
            self._drop()
            return
        touched: dict[int, H2UpstreamStream] = {}
        handlers = self._handlers
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                stream = handler(event)
                if stream is not None:
                    touched[stream.stream_id] = stream
        for stream in touched.values():
            stream.flush_handler()
        self.in_receive = False
        self.flush()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closing = True
        self.idle.cancel()
        self.pool.connection_lost(self)
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._fail_all(f"connection closed by upstream ({why})")

    # -- streams ------------------------------------------------------------------------

    @property
    def max_streams(self) -> int:
        remote = self.h2.remote_settings.max_concurrent_streams if self.settings_received else ASSUMED_MAX_STREAMS
        return min(remote, MAX_STREAMS_PER_CONNECTION)

    @property
    def usable(self) -> bool:
        return not self.goaway and not self.closing and self.transport is not None

    def has_room(self) -> bool:
        return self.usable and len(self.streams) + self.reserved + len(self.queued) < self.max_streams

    def reserve(self) -> H2UpstreamStream:
        self.reserved += 1
        self.idle.clear()
        stream = H2UpstreamStream(self, reused=self.used > 0)
        self.used += 1
        return stream

    def start_stream(self, stream: H2UpstreamStream, fields: Headers, end_stream: bool) -> None:
        self.reserved -= 1
        stream.started = True
        if not self.usable:
            stream.fail("upstream connection went away")
            return
        if self.queued or self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            # The upstream lowered its stream limit after we chose this connection: the
            # request waits for a stream to end (its body is held, the client paused).
            stream.pending = deque()
            self.queued.append((stream, fields, end_stream))
            return
        self._open(stream, fields, end_stream)
        self.flush()

    def _open(self, stream: H2UpstreamStream, fields: Headers, end_stream: bool) -> None:
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        stream.stream_id = stream_id
        self.streams[stream_id] = stream
        try:
            h2.send_headers(stream_id, fields, end_stream=end_stream)
        except ProtocolError as error:
            stream.fail(f"cannot open a stream: {error}")

    def _start_queued(self) -> None:
        queued = self.queued
        h2 = self.h2
        while queued and self.usable and h2.open_outbound_streams < h2.remote_settings.max_concurrent_streams:
            stream, fields, end_stream = queued.popleft()
            self._open(stream, fields, end_stream)
            if not stream.closed and stream.pending is not None and not stream.drain():
                self.blocked[stream.stream_id] = stream

    def send_data(self, stream: H2UpstreamStream, data: bytes) -> bytes:
        """Send as much of ``data`` as the windows allow; return the rest."""
        h2 = self.h2
        try:
            window = h2.local_flow_control_window(stream.stream_id)
            frame = h2.max_outbound_frame_size
            limit = min(len(data), window)
            offset = 0
            while offset < limit:
                end = min(offset + frame, limit)
                h2.send_data(stream.stream_id, data[offset:end])
                offset = end
        except (StreamClosedError, ProtocolError):
            return b""
        return data[offset:]

    def acknowledge(self, size: int, stream_id: int) -> None:
        if not self.closing:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except (StreamClosedError, ProtocolError):
                pass

    def stream_done(self, stream: H2UpstreamStream) -> None:
        if stream.closed:
            return
        stream.closed = True
        stream.deadline.cancel()
        stream.pending = None
        stream.request_producer = None
        if stream.stream_id:
            self.streams.pop(stream.stream_id, None)
            self.blocked.pop(stream.stream_id, None)
            if stream.unacked:
                # Give the connection window back (the stream window no longer matters).
                unacked, stream.unacked = stream.unacked, 0
                self.acknowledge(unacked, stream.stream_id)
        elif not stream.started:
            self.reserved -= 1
        else:
            for index, item in enumerate(self.queued):
                if item[0] is stream:
                    del self.queued[index]
                    break
        self._start_queued()
        self._maybe_idle()

    def flush(self) -> None:
        if self.in_receive or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            write_now(self.transport, data)

    def close(self) -> None:
        """Close when idle (pool shutdown); busy connections finish their streams first."""
        self.goaway = True
        if not self.streams and not self.reserved and not self.queued:
            self._drop(graceful=True)

    # -- events ---------------------------------------------------------------------------

    def _on_response(self, event: ResponseReceived) -> H2UpstreamStream | None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_response(event.headers)
            if event.stream_ended is not None and not stream.closed:
                stream.on_end()
        return stream

    def _on_data(self, event: DataReceived) -> H2UpstreamStream | None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            if event.flow_controlled_length:
                self.acknowledge(event.flow_controlled_length, event.stream_id)
            return None
        stream.on_data(event.data, event.flow_controlled_length)
        if event.stream_ended is not None and not stream.closed:
            stream.on_end()
        return stream

    def _on_trailers(self, event: TrailersReceived) -> H2UpstreamStream | None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.trailers = [item for item in event.headers if item[0][:1] != b":"]
            if event.stream_ended is not None and not stream.closed:
                stream.on_end()
        return stream

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and not stream.closed and not stream.response_ended:
            stream.on_end()
        return None

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and not stream.closed:
            code = event.error_code
            name = getattr(code, "name", str(code))
            if stream.response_ended and code == ErrorCodes.NO_ERROR:
                # RFC 9113 8.1: the response is complete, the upstream wants no more request body.
                self.stream_done(stream)
            else:
                stream.fail(f"stream reset by upstream ({name})")
        return None

    def _on_window(self, event: WindowUpdated) -> None:
        self._drain_blocked()
        return None

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        self.settings_received = True
        self._drain_blocked()
        self._start_queued()
        self.pool.room_changed(self)
        return None

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        self.goaway = True
        self.pool.connection_lost(self)
        last = event.last_stream_id if event.last_stream_id is not None else 0
        code = event.error_code
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                # Never processed: the exchange may retry it elsewhere.
                stream.received_anything = False
                stream.fail("stream refused by GOAWAY")
        if code != ErrorCodes.NO_ERROR:
            self._fail_all(f"upstream GOAWAY ({getattr(code, 'name', code)})")
            self._drop()
            return None
        if self.streams:
            # h2 closes its state machine on any GOAWAY; the streams the upstream still
            # serves (graceful shutdown) go on: we just never open new ones here.
            self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        else:
            self._drop(graceful=True)
        return None

    # -- internals ---------------------------------------------------------------------------

    def _drain_blocked(self) -> None:
        for stream_id, stream in list(self.blocked.items()):
            if stream.closed:
                self.blocked.pop(stream_id, None)
                continue
            if stream.drain():
                self.blocked.pop(stream_id, None)
            if self.h2.outbound_flow_control_window <= 0:
                break

    def _fail_all(self, reason: str) -> None:
        queued = [item[0] for item in self.queued]
        self.queued.clear()
        for stream in [*self.streams.values(), *queued]:
            stream.fail(reason)
        self.streams.clear()
        self.blocked.clear()

    def _maybe_idle(self) -> None:
        if self.streams or self.reserved or self.queued:
            return
        if self.goaway:
            self._drop(graceful=True)
        elif not self.closing:
            self.idle.set_after(self.pool.idle_timeout)

    def _idle_passed(self) -> None:
        if not self.streams and not self.reserved and not self.queued and not self.closing:
            self.goaway = True
            self.pool.connection_lost(self)
            self._drop(graceful=True)

    def _drop(self, *, graceful: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        self.idle.cancel()
        self.pool.connection_lost(self)
        transport = self.transport
        if transport is None:
            return
        if graceful:
            try:
                self.h2.close_connection(ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
            data = self.h2.data_to_send()
            if data:
                write_now(transport, data)
            transport.loseConnection()
        else:
            transport.abortConnection()


class _Factory(Factory):
    noisy = False

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> H2ClientConnection:  # type: ignore[override]
        return H2ClientConnection(self.pool)


Waiter = tuple[Callable[[H2UpstreamStream], None], Callable[[Failure], None]]


class H2UpstreamPool:
    """Multiplexed HTTP/2 connections to one upstream (the HTTP/2 sibling of UpstreamPool)."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        reactor,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 15.0,
        endpoint=None,
        preamble: bytes | None = None,
    ) -> None:
        self.upstream = upstream
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.connections: list[H2ClientConnection] = []
        #: Connects in flight, each with the requests waiting for it.
        self._connecting: list[list[Waiter]] = []
        if endpoint is None:
            endpoint = _endpoint(reactor, upstream, connect_timeout, alpn=[b"h2"], preamble=preamble)
        self._endpoint = endpoint
        self._factory = _Factory(self)
        self._closed = False

    def acquire(
        self,
        on_ready: Callable[[H2UpstreamStream], None],
        on_error: Callable[[Failure], None],
        *,
        fresh: bool = False,
    ) -> None:
        """Hand a stream to ``on_ready`` (on a shared connection when one has room)."""
        if not fresh:
            for connection in reversed(self.connections):
                if connection.has_room():
                    on_ready(connection.reserve())
                    return
            for waiters in self._connecting:
                if len(waiters) < ASSUMED_MAX_STREAMS:
                    waiters.append((on_ready, on_error))
                    return
        waiters: list[Waiter] = [(on_ready, on_error)]
        self._connecting.append(waiters)
        deferred = self._endpoint.connect(self._factory)
        deferred.addCallbacks(self._connected, self._connect_failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _connected(self, connection: H2ClientConnection, waiters: list[Waiter]) -> None:
        self._remove_attempt(waiters)
        if not self._closed:
            self.connections.append(connection)
        for index, (on_ready, on_error) in enumerate(waiters):
            if connection.has_room():
                on_ready(connection.reserve())
            else:
                # More waiters than the connection takes: the rest start over.
                rest = waiters[index:]
                for ready, error in rest:
                    self.acquire(ready, error)
                break
        if self._closed:
            # A pool retired by a reload still serves the requests that were waiting
            # (closing first would send them round a connect loop); it closes after them.
            connection.close()
        if not connection.streams and not connection.reserved:
            connection._maybe_idle()

    def _connect_failed(self, failure: Failure, waiters: list[Waiter]) -> None:
        self._remove_attempt(waiters)
        for _on_ready, on_error in waiters:
            on_error(failure)

    def _remove_attempt(self, waiters: list[Waiter]) -> None:
        for index, attempt in enumerate(self._connecting):
            if attempt is waiters:
                del self._connecting[index]
                return

    def release(self, stream: H2UpstreamStream) -> None:
        """Give back a stream the exchange did not use."""
        stream.close()

    def room_changed(self, connection: H2ClientConnection) -> None:
        """Hook for the upstream's SETTINGS (nothing waits for room: new connections open instead)."""

    def connection_lost(self, connection: H2ClientConnection) -> None:
        try:
            self.connections.remove(connection)
        except ValueError:
            pass

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    def close(self) -> None:
        """Close idle connections; busy ones close when their last stream ends."""
        self._closed = True
        for connection in list(self.connections):
            connection.close()


def request_fields(method: bytes, scheme: bytes, path: bytes, headers: Headers, host: bytes | None) -> Headers:
    """The HTTP/2 header list for a prepared request: pseudo-headers, then the fields.

    ``host`` replaces the Host field as ``:authority`` (set_upstream_host); otherwise the
    request's Host becomes ``:authority``. Connection-specific fields are dropped.
    """
    authority = host
    fields: Headers = []
    for item in headers:
        name = item[0]
        if name in _NOT_FORWARDED:
            if name == b"host" and authority is None:
                authority = item[1]
            continue
        fields.append(item)
    head = [(b":method", method), (b":scheme", scheme), (b":authority", authority or b""), (b":path", path)]
    head.extend(fields)
    return head
