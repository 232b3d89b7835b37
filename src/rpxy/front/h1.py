"""The HTTP/1.1 front end: a Twisted protocol around httptools' (llhttp's) strict parser.

It only moves bytes and events: requests become :class:`~rpxy.message.RequestHead`
objects handed to the shared :class:`~rpxy.pipeline.Pipeline`, and the pipeline's
response comes back through this module's :class:`_Cycle` sink. Pipelined requests
are answered strictly in order: a request that arrives while another is being answered
waits (with reading paused) until its turn.

Limits are enforced here because they are about the wire: request line (414), header
block and count (431), an absolute header-read deadline and an idle keep-alive timeout
(one lazily re-armed timer per connection, so keep-alive requests cost no timer
operations), ``max_clients``/``max_clients_per_ip`` and ``connection_handling_timeout``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import httptools
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rpxy.front.h2 import PREFACE, H2Session
from rpxy.deadline import SEND_STALL_TIMEOUT, LazyDeadline
from rpxy.message import ConnectionInfo, Headers, HttpError, RequestHead
from rpxy.netio import write_now
from rpxy.pipeline import requested_upgrade, send_local_response
from rpxy.policy.responses import reason
from rpxy.policy.validate import MAX_HEADER_COUNT, check_request_head
from rpxy.streams import TunnelPauser
from rpxy.tls import connection_sni

if TYPE_CHECKING:
    from rpxy.pipeline import Pipeline
    from rpxy.state import StateHolder
    from rpxy.streams import Exchange, TunnelEnd

log = Logger()

#: rpxy's hard-coded idle / header-read timeout.
HEADER_TIMEOUT = 20.0
IDLE_TIMEOUT = 20.0
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BLOCK = 64 * 1024
#: An early-answered request body smaller than this is read and discarded to keep the connection.
MAX_DISCARD = 1024 * 1024
LINGER_SECONDS = 2.0
#: Slow request bodies (beyond rpxy, as Apache's mod_reqtimeout "body=20,MinRate=500"): the
#: body must arrive within 20 s plus 1 s per 500 bytes received; time the proxy itself holds
#: the client back (backpressure, pipelining) does not count.
BODY_TIMEOUT = 20.0
BODY_MIN_RATE = 500.0
#: At max_clients, the connection that has waited longest for a request head (a slowloris
#: socket, an idle keep-alive client) is closed to admit a new client, however short its
#: wait: an attacker reconnecting as fast as it is evicted must not keep every slot young.
EVICT_AFTER = 0.0

_PAUSE_PIPELINE = 1
_PAUSE_UPSTREAM = 2
_PAUSE_UPGRADE = 4

_NO_BODY_STATUS = frozenset((204, 304))
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason(status))
        _STATUS_LINES[status] = line
    return line


def split_target(url: bytes) -> tuple[bytes, bytes | None]:
    """(origin-form path, authority or None) from a request-target; absolute-form allowed."""
    if url[:1] == b"/":
        return url, None
    if url == b"*":
        return url, None
    scheme, sep, rest = url.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        end = len(rest)
        for delimiter in (b"/", b"?"):
            position = rest.find(delimiter)
            if position != -1 and position < end:
                end = position
        authority = rest[:end]
        if not authority or b"@" in authority:
            raise HttpError(400, "bad authority in absolute-form target")
        path = rest[end:]
        if not path:
            path = b"/"
        elif path[:1] == b"?":
            path = b"/" + path
        return path, authority
    raise HttpError(400, "unsupported request-target form")


@implementer(IPushProducer)
class _Cycle:
    """One request/response on the connection; the pipeline's ResponseSink for it."""

    __slots__ = (
        "connection",
        "head",
        "exchange",
        "pending",
        "body_expected",
        "body_done",
        "body_received",
        "trailers",
        "content_length",
        "keep_alive",
        "close_after",
        "is_head",
        "chunked_response",
        "response_started",
        "response_done",
        "upgrade",
        "expect_continue",
        "producer_registered",
        "error",
        "unsent_head",
    )

    def __init__(self, connection: H1Connection) -> None:
        self.connection = connection
        self.head: RequestHead | None = None
        self.exchange: Exchange | None = None
        self.pending: list[bytes] | None = None
        self.body_expected = False
        self.body_done = False
        self.body_received = 0
        self.trailers: Headers | None = None
        self.content_length: int | None = None
        self.keep_alive = True
        self.close_after = False
        self.is_head = False
        self.chunked_response = False
        self.response_started = False
        self.response_done = False
        self.upgrade = False
        self.expect_continue = False
        self.producer_registered = False
        self.error: HttpError | None = None
        self.unsent_head: bytes | None = None

    @property
    def request_producer(self) -> _Cycle:
        # A property, not an attribute holding self: no reference cycle per request.
        return self

    # IPushProducer: the upstream's transport pauses the client's request body.
    def pauseProducing(self) -> None:
        self.connection._pause(_PAUSE_UPSTREAM)

    def resumeProducing(self) -> None:
        self.connection._resume(_PAUSE_UPSTREAM)

    def stopProducing(self) -> None:
        # The upstream connection went away; its exchange reports that itself.
        self.connection._resume(_PAUSE_UPSTREAM)

    # ResponseSink
    def send_head(self, status: int, headers: Headers) -> None:
        self.response_started = True
        head = self.head
        no_body = self.is_head or status in _NO_BODY_STATUS or status < 200
        has_length = False
        parts = [_status_line(status)]
        append = parts.append
        for name, value in headers:
            if name == b"content-length":
                has_length = True
            elif name == b"connection":
                if value.lower() == b"close":
                    self.close_after = True
                continue
            append(name + b": " + value + b"\r\n")
        if status == 101:
            append(b"connection: upgrade\r\n")
        elif not no_body and not has_length:
            if head is not None and head.version == b"1.1":
                self.chunked_response = True
                append(b"transfer-encoding: chunked\r\n")
            else:
                self.close_after = True
        if status != 101:
            if self.close_after or not self.keep_alive:
                self.close_after = True
                append(b"connection: close\r\n")
            elif head is not None and head.version == b"1.0":
                append(b"connection: keep-alive\r\n")
        append(b"\r\n")
        # Held back until the first body bytes, the end, or flush(): one send per small response.
        self.unsent_head = b"".join(parts)

    def flush(self) -> None:
        """Send a head still held back (the upstream's bytes so far are all relayed)."""
        head = self.unsent_head
        if head is not None:
            self.unsent_head = None
            write_now(self.connection.transport, head)

    def send_data(self, data: bytes) -> None:
        if not data:
            return
        head = self.unsent_head
        if head is not None:
            self.unsent_head = None
        else:
            head = b""
        if self.chunked_response:
            write_now(self.connection.transport, b"".join((head, b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            write_now(self.connection.transport, head + data if head else data)

    def send_end(self, trailers: Headers | None = None) -> None:
        head = self.unsent_head or b""
        self.unsent_head = None
        if self.chunked_response:
            if trailers:
                end = b"".join(
                    [b"0\r\n", *[name + b": " + value + b"\r\n" for name, value in trailers], b"\r\n"]
                )
            else:
                end = b"0\r\n\r\n"
            write_now(self.connection.transport, head + end)
        elif head:
            write_now(self.connection.transport, head)
        self.unregister_producer()
        self.response_done = True
        self.connection._response_done(self)

    def abort(self) -> None:
        self.unregister_producer()
        self.response_done = True
        self.connection.transport.abortConnection()

    def register_producer(self, producer: IPushProducer) -> None:
        if not self.producer_registered:
            self.producer_registered = True
            connection = self.connection
            watch = connection.send_watch
            if watch is None:
                watch = connection.send_watch = _SendWatch(connection)
            watch.producer = producer  # one watch per connection: one response at a time
            connection.transport.registerProducer(watch, True)

    def unregister_producer(self) -> None:
        if self.producer_registered:
            self.producer_registered = False
            connection = self.connection
            connection.transport.unregisterProducer()
            # Without a producer the transport no longer reports progress: a stall deadline
            # left armed could cut a client still reading the tail of the response.
            connection.send_resumed()
            if connection.send_watch is not None:
                connection.send_watch.producer = None

    def start_tunnel(self, upstream: TunnelEnd) -> TunnelEnd:
        return self.connection._start_tunnel(upstream)


@implementer(IPushProducer)
class _SendWatch:
    """The upstream as the client transport's producer, telling the connection when the
    client stops taking data (for the send-stall deadline)."""

    __slots__ = ("connection", "producer")

    def __init__(self, connection: H1Connection) -> None:
        self.connection = connection
        self.producer: IPushProducer | None = None

    def pauseProducing(self) -> None:
        self.connection.send_paused()
        if self.producer is not None:
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.connection.send_resumed()
        if self.producer is not None:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        if self.producer is not None:
            self.producer.stopProducing()


class _ClientTunnelEnd:
    def __init__(self, connection: H1Connection) -> None:
        self.connection = connection

    def write(self, data: bytes) -> None:
        self.connection.transport.write(data)

    def close(self) -> None:
        transport = self.connection.transport
        # A TLS transport defers its close_notify (and the TCP close) while a producer is
        # registered: drop the upstream's pauser first, or the client is never closed.
        transport.unregisterProducer()
        transport.loseConnection()

    def pause(self) -> None:
        self.connection._pause(_PAUSE_UPSTREAM)

    def resume(self) -> None:
        self.connection._resume(_PAUSE_UPSTREAM)


class _DeclinedUpgradeBody:
    """Parser callbacks for a connection after an Upgrade it declined: the primed head is
    swallowed, then every event goes to the connection (the body, later requests)."""

    def __init__(self, connection: H1Connection) -> None:
        self.connection = connection
        self.primed = False

    def on_message_begin(self) -> None:
        if self.primed:
            self.connection.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self.primed:
            self.connection.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.primed:
            self.connection.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.primed:
            self.connection.on_headers_complete()
        else:
            self.primed = True

    def on_body(self, body: bytes) -> None:
        self.connection.on_body(body)

    def on_message_complete(self) -> None:
        self.connection.on_message_complete()


class H1Connection(Protocol):
    """One client connection speaking HTTP/1.x."""

    def __init__(self, factory: H1Factory) -> None:
        self.factory = factory
        self.reactor: IReactorTime = factory.reactor
        self.pipeline: Pipeline = factory.pipeline
        self.conn: ConnectionInfo | None = None
        self.parser: httptools.HttpRequestParser | None = None
        self.reading: _Cycle | None = None
        self.active: _Cycle | None = None
        self.queue: deque[_Cycle] = deque()
        self.paused = 0
        self.closing = False
        self.counted = False
        self.deadline = LazyDeadline(self.reactor, self._deadline_passed)
        self.hard_deadline_call = None
        self.linger_call = None
        #: The request whose body is being read, when the body deadline applies; the
        #: deadline's origin (moved later by time spent paused) and when a pause began.
        self.body_cycle: _Cycle | None = None
        self.body_start = 0.0
        self.body_paused_at: float | None = None
        self.send_deadline: LazyDeadline | None = None
        self.send_watch: _SendWatch | None = None
        self.url = b""
        self.headers: Headers = []
        self.header_total = 0
        self.in_headers = False
        self.raw_head_bytes = 0
        self.tunnel_upstream: TunnelEnd | None = None
        self.upgrade_buffer: list[bytes] | None = None
        self.discarding: _Cycle | None = None
        self.declined_upgrade: _Cycle | None = None
        # Until the first bytes show which protocol the connection speaks (ALPN or the h2c preface).
        self.sniffing = True
        self.sniffed = b""
        self.h2: H2Session | None = None
        #: Graceful shutdown (drain()): answer what was asked, then close.
        self.draining = False

    # -- connection lifecycle -----------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        peer = transport.getPeer()
        local = transport.getHost()
        if self.factory.tls:
            self.conn = ConnectionInfo(
                peer.host, peer.port, local.port, tls=True, sni=connection_sni(transport), local_ip=local.host
            )
        else:
            self.conn = ConnectionInfo(peer.host, peer.port, local.port, local_ip=local.host)
        config = self.factory.holder.current.config
        if not self.factory.admit(peer.host, config.max_clients, config.max_clients_per_ip):
            log.info("connection from {peer} refused: client limit reached", peer=peer.host)
            self.closing = True
            transport.abortConnection()
            return
        self.counted = True
        self.factory.connections.add(self)
        self.factory.waiting_start(self)
        try:
            transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.parser = httptools.HttpRequestParser(self)
        self.deadline.set_after(IDLE_TIMEOUT)
        hard = config.experimental.connection_handling_timeout
        if hard > 0:
            self.hard_deadline_call = self.reactor.callLater(hard, self._hard_timeout)
        if self.factory.draining:
            self.drain()  # its TLS handshake finished while the proxy shuts down

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.connections.discard(self)
        if self.counted:
            self.counted = False
            self.factory.release(self.conn.peer_ip)
        self.factory.waiting_end(self)
        self.closing = True
        self.deadline.cancel()
        self.body_cycle = None
        if self.send_deadline is not None:
            self.send_deadline.cancel()
        for call in (self.hard_deadline_call, self.linger_call):
            if call is not None and call.active():
                call.cancel()
        self.hard_deadline_call = self.linger_call = None
        if self.h2 is not None:
            self.h2.connectionLost(reason)
            return
        active = self.active
        self.active = None
        if active is not None and active.exchange is not None:
            active.exchange.client_gone()

    def dataReceived(self, data: bytes) -> None:
        h2 = self.h2
        if h2 is not None:
            h2.dataReceived(data)
            return
        if self.sniffing:
            data = self._sniff(data)
            if not data:
                return
        tunnel = self.tunnel_upstream
        if tunnel is not None:
            tunnel.write(data)
            return
        if self.closing:
            return
        if self.upgrade_buffer is not None:
            self.upgrade_buffer.append(data)
            self._pause(_PAUSE_UPGRADE)
            return
        parser = self.parser
        if parser is None:
            return  # after malformed input nothing is parsed (the error answer is on its way)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._parser_upgrade(data[upgrade.args[0]:])
            return
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, HttpError):
                self._protocol_error(cause.status, cause.reason)
            else:
                log.failure("request handling failed", Failure(cause) if cause is not None else None)
                self._protocol_error(500, "internal error")
            return
        except httptools.HttpParserError as error:
            self._protocol_error(400, str(error))
            return
        if self.in_headers:
            # Everything fed so far belonged to an unfinished head: cap it (llhttp would buffer it).
            self.raw_head_bytes += len(data)
            if self.raw_head_bytes > MAX_HEADER_BLOCK + MAX_REQUEST_LINE:
                self._protocol_error(414 if not self.headers and self.url else 431, "request head too large")

    def _sniff(self, data: bytes) -> bytes | None:
        """The connection's first bytes: HTTP/2 (ALPN ``h2``, or the h2c preface on cleartext)
        hands the connection to :class:`~rpxy.front.h2.H2Session`; returns the bytes for
        HTTP/1.1, or None once handed over or while a partial preface is buffered."""
        if self.closing:
            return None
        if self.sniffed:
            data = self.sniffed + data
            self.sniffed = b""
        if self.factory.tls:
            self.sniffing = False
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                self._hand_over(data)
                return None
            return data
        size = min(len(data), len(PREFACE))
        if data[:size] != PREFACE[:size]:
            self.sniffing = False
            return data
        if size < len(PREFACE):
            self.sniffed = data
            return None
        self.sniffing = False
        self._hand_over(data)
        return None

    def _hand_over(self, data: bytes) -> None:
        """Become the carrier of an HTTP/2 session: this object keeps counting the client and
        enforcing connection_handling_timeout; every byte goes to the session."""
        self.deadline.clear()
        self.factory.waiting_end(self)
        self.parser = None
        self.h2 = H2Session(self.pipeline, self.reactor, self.conn, self.transport, self.factory.holder.current.config)
        self.h2.start(data)

    # -- parser callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reading = _Cycle(self)
        self.url = b""
        self.headers = []
        self.header_total = 0
        self.raw_head_bytes = 0
        self.in_headers = True
        self.deadline.set_after(HEADER_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_REQUEST_LINE:
            raise HttpError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_headers:
            cycle = self.reading
            if cycle is not None:
                if cycle.trailers is None:
                    cycle.trailers = []
                if len(cycle.trailers) >= MAX_HEADER_COUNT:
                    raise HttpError(431, "too many trailer fields")
                cycle.trailers.append((name.lower(), value))
            return
        headers = self.headers
        if len(headers) >= MAX_HEADER_COUNT:
            raise HttpError(431, "too many header fields")
        self.header_total += len(name) + len(value) + 4
        if self.header_total > MAX_HEADER_BLOCK:
            raise HttpError(431, "header block too large")
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.deadline.clear()
        self.factory.waiting_end(self)
        parser = self.parser
        cycle = self.reading
        method = parser.get_method()
        version = parser.get_http_version().encode()
        if version not in (b"1.1", b"1.0"):
            raise HttpError(505, "unsupported HTTP version")
        if method == b"CONNECT":
            raise HttpError(405, "CONNECT is not supported")
        path, authority = split_target(self.url)
        headers = self.headers
        head = RequestHead(method, path, version, headers, authority)
        content_length = check_request_head(head, http1=True)
        chunked = False
        expect = None
        for name, value in headers:
            if name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                expect = value
        cycle.head = head
        cycle.content_length = content_length
        cycle.body_expected = chunked or bool(content_length)
        cycle.body_done = not cycle.body_expected
        cycle.keep_alive = parser.should_keep_alive() and not self.draining
        cycle.is_head = method == b"HEAD"
        if parser.should_upgrade():
            token = requested_upgrade(headers) if version == b"1.1" else None
            if token is not None:
                head.protocol = token  # the pipeline relays it; it never rescans the headers
                cycle.upgrade = True
                cycle.close_after = True  # unless the upstream switches protocols
            else:
                # llhttp stops at any Upgrade, but this one (h2c, HTTP/1.0) is never relayed:
                # the request is proxied as plain HTTP/1.1 and parsing resumes after it.
                self.declined_upgrade = cycle
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise HttpError(417, "unsupported expectation")
            head.headers = [(name, value) for name, value in headers if name != b"expect"]
            cycle.expect_continue = version == b"1.1" and cycle.body_expected
        if cycle.body_expected:
            cycle.pending = []
            if not cycle.upgrade:
                self._start_body_deadline(cycle)
        if self.active is None:
            self._dispatch(cycle)
        else:
            self.queue.append(cycle)
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        cycle = self.reading
        if cycle is None:
            return
        cycle.body_received += len(body)
        if cycle is self.body_cycle and self.body_paused_at is None:
            self.deadline.set(self.body_start + BODY_TIMEOUT + cycle.body_received / BODY_MIN_RATE)
        if cycle.response_done:
            if cycle.body_received > MAX_DISCARD:
                self._close(linger=True)
            return
        exchange = cycle.exchange
        if exchange is not None:
            exchange.request_data(body)
        elif cycle.pending is not None:
            cycle.pending.append(body)

    def on_message_complete(self) -> None:
        cycle = self.reading
        if cycle is self.declined_upgrade and cycle is not None and not cycle.body_done:
            return  # llhttp ends the message at the Upgrade; its body follows (_parser_upgrade)
        self.reading = None
        if cycle is not None and cycle is self.body_cycle:
            self.body_cycle = None
            self.deadline.clear()
        if cycle is None or cycle.head is None:
            return
        if not cycle.body_done:
            cycle.body_done = True
            exchange = cycle.exchange
            if exchange is not None:
                exchange.request_end(cycle.trailers)
            if cycle.response_done and not self.closing:
                self._next()

    # -- request dispatch and response ordering ----------------------------------

    def _dispatch(self, cycle: _Cycle) -> None:
        if self.closing:
            # A request pipelined behind an answer that closes the connection: the client
            # will never read its response, so the upstream must never see it either.
            return
        self.active = cycle
        head = cycle.head
        if cycle.error is not None:
            status = cycle.error.status
            send_local_response(cycle, status, close=True)
            # Rejected input is logged too: the head as far as it was parsed.
            logged = head if head is not None else RequestHead(b"-", self.url or b"-", b"1.1", [])
            self.pipeline.access_log.record(self.conn, logged, "", status, upstream="")
            return
        exchange = self.pipeline.handle(
            self.conn, head, cycle, content_length=cycle.content_length, body_expected=cycle.body_expected
        )
        cycle.exchange = exchange
        if cycle.response_done:
            return
        if cycle.expect_continue and not cycle.response_started:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        pending = cycle.pending
        if pending:
            cycle.pending = None
            for chunk in pending:
                exchange.request_data(chunk)
        else:
            cycle.pending = None
        if cycle.body_expected and cycle.body_done:
            exchange.request_end(cycle.trailers)

    def _response_done(self, cycle: _Cycle) -> None:
        if self.active is not cycle:
            return
        self.active = None
        if self.closing:
            return
        if cycle.close_after:
            self._close(linger=not cycle.body_done)
            return
        if not cycle.body_done:
            remaining = (cycle.content_length or 0) - cycle.body_received
            if cycle.content_length is None or remaining > MAX_DISCARD:
                self._close(linger=True)
            # else: the rest of the body is read and discarded; on_message_complete continues.
            return
        self._next()

    def _next(self) -> None:
        if self.queue:
            cycle = self.queue.popleft()
            if not self.queue:
                self._resume(_PAUSE_PIPELINE)
            self._dispatch(cycle)
        elif self.reading is None:
            if self.draining:
                self._close(linger=False)
                return
            self.deadline.set_after(IDLE_TIMEOUT)
            self.factory.waiting_start(self)

    def _protocol_error(self, status: int, why: str) -> None:
        """Malformed or over-limit input: answer ``status`` in turn, then close."""
        if self.closing:
            return
        log.debug("bad request from {peer}: {why}", peer=self.conn.peer_ip if self.conn else "?", why=why)
        self.in_headers = False
        self.deadline.clear()
        self.body_cycle = None
        reading = self.reading
        cycle = _Cycle(self)
        cycle.head = reading.head if reading is not None and reading.head is not None else None
        cycle.error = HttpError(status, why)
        cycle.keep_alive = False
        cycle.close_after = True
        self.reading = None
        # Nothing after malformed input can be trusted: stop parsing.
        self.parser = None
        self.upgrade_buffer = None
        self.queue.clear()
        active = self.active
        if active is not None and active is reading:
            # The body of the request being relayed is malformed: the upstream must never
            # see it complete, so the exchange is dropped (its upstream connection aborted).
            if active.response_started:
                self.closing = True
                active.abort()  # connectionLost tells the exchange
                return
            self.active = None
            if active.exchange is not None:
                active.exchange.client_gone()
        if self.active is None:
            self._dispatch(cycle)
        else:
            self.queue.append(cycle)
        self.closing = True if self.active is None else self.closing

    def _parser_upgrade(self, rest: bytes) -> None:
        declined = self.declined_upgrade
        if declined is not None:
            self.declined_upgrade = None
            if declined.body_done:
                self.parser = httptools.HttpRequestParser(self)
            else:
                # llhttp skipped the body of an upgrade request: parse it with a parser primed
                # by a head of the same framing, whose events go to this connection as usual.
                self.parser = httptools.HttpRequestParser(_DeclinedUpgradeBody(self))
                if declined.content_length is not None:
                    framing = b"content-length: %d" % declined.content_length
                else:
                    framing = b"transfer-encoding: chunked"
                self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
            if rest:
                self.dataReceived(rest)
            return
        cycle = self.active if self.active is not None and self.active.upgrade else None
        if cycle is None:
            for queued in self.queue:
                if queued.upgrade:
                    cycle = queued
        if cycle is not None and cycle.response_done:
            # The pipeline answered locally (or the upstream declined): the connection closes.
            self._close(linger=False)
            return
        if cycle is None:
            # e.g. ``Upgrade: h2c`` that we never honour: keep speaking HTTP/1.1.
            self.parser = httptools.HttpRequestParser(self)
            if rest:
                self.dataReceived(rest)
            return
        self.upgrade_buffer = [rest] if rest else []
        self._pause(_PAUSE_UPGRADE)

    def _start_tunnel(self, upstream: TunnelEnd) -> TunnelEnd:
        self.tunnel_upstream = upstream
        self.deadline.clear()
        cycle = self.active
        if cycle is not None:
            cycle.flush()
            cycle.response_done = True
        self.active = None
        self.queue.clear()
        client_end = _ClientTunnelEnd(self)
        self.transport.registerProducer(TunnelPauser(upstream), True)
        buffered, self.upgrade_buffer = self.upgrade_buffer, None
        if buffered:
            for chunk in buffered:
                upstream.write(chunk)
        self.paused = 0
        self.transport.resumeProducing()
        self._tunnel_cycle = cycle
        return client_end

    # -- graceful shutdown ---------------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown: an idle connection closes now; one with a request in flight
        answers it (with ``Connection: close`` when its head is not sent yet) and then closes.
        HTTP/2 gets GOAWAY(NO_ERROR). A WebSocket tunnel is left to the shutdown deadline."""
        if self.closing or self.draining:
            return
        self.draining = True
        if self.h2 is not None:
            self.h2.drain()
            return
        if self.tunnel_upstream is not None:
            return
        if self.active is None and self.reading is None and not self.queue:
            self._close(linger=False)
            return
        # The last request received says Connection: close: the ones before it (pipelined,
        # already read) are answered first. A head still arriving gets it when it completes.
        last = self.reading or (self.queue[-1] if self.queue else self.active)
        if last is not None:
            last.keep_alive = False

    # -- flow control, timers, closing --------------------------------------------------

    def _pause(self, why: int) -> None:
        if not self.paused:
            self.transport.pauseProducing()
            if self.body_cycle is not None and self.body_paused_at is None:
                # We hold the client back: that time is not the client's slowness.
                self.body_paused_at = self.reactor.seconds()
                self.deadline.clear()
        self.paused |= why

    def _resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and not self.closing:
                self.transport.resumeProducing()
                paused_at = self.body_paused_at
                cycle = self.body_cycle
                if paused_at is not None and cycle is not None:
                    self.body_paused_at = None
                    self.body_start += self.reactor.seconds() - paused_at
                    self.deadline.set(self.body_start + BODY_TIMEOUT + cycle.body_received / BODY_MIN_RATE)

    def _start_body_deadline(self, cycle: _Cycle) -> None:
        self.body_cycle = cycle
        self.body_start = self.reactor.seconds()
        if self.paused:
            self.body_paused_at = self.body_start
        else:
            self.body_paused_at = None
            self.deadline.set(self.body_start + BODY_TIMEOUT)

    def _deadline_passed(self) -> None:
        if self.closing:
            return
        cycle = self.body_cycle
        if cycle is not None:
            elapsed = self.reactor.seconds() - self.body_start
            log.info(
                "request body from {peer} too slow ({received} bytes in {elapsed:.0f} s); closing",
                peer=self.conn.peer_ip,
                received=cycle.body_received,
                elapsed=elapsed,
            )
            self.closing = True
            self.transport.abortConnection()
            return
        if self.in_headers:
            log.info("request head from {peer} not received in time", peer=self.conn.peer_ip)
        self._close(linger=False)

    # -- slow readers: a response the client does not take -----------------------

    def send_paused(self) -> None:
        """The client's transport stopped taking our writes (its buffers are full)."""
        deadline = self.send_deadline
        if deadline is None:
            deadline = self.send_deadline = LazyDeadline(self.reactor, self._send_stalled)
        if deadline.when is None:
            deadline.set_after(SEND_STALL_TIMEOUT)

    def send_resumed(self) -> None:
        if self.send_deadline is not None:
            self.send_deadline.clear()

    def _send_stalled(self) -> None:
        if self.closing:
            return
        log.info("response to {peer} not read for {seconds:.0f} s; closing", peer=self.conn.peer_ip, seconds=SEND_STALL_TIMEOUT)
        self.closing = True
        self.transport.abortConnection()

    def evict(self) -> None:
        """Closed to admit a new client at max_clients (it was waiting for a request head)."""
        log.info("connection from {peer} closed to admit a new client (max_clients reached)", peer=self.conn.peer_ip)
        if self.counted:
            self.counted = False
            self.factory.release(self.conn.peer_ip)
        self.factory.waiting_end(self)
        self.closing = True
        self.deadline.clear()
        self.transport.abortConnection()

    def _hard_timeout(self) -> None:
        self.hard_deadline_call = None
        log.info("connection from {peer} hit connection_handling_timeout", peer=self.conn.peer_ip)
        self.closing = True
        self.transport.abortConnection()

    def _close(self, *, linger: bool) -> None:
        """Close after the written response; with ``linger``, half-close first so that the
        client reads our answer before the unread rest of its upload could reset the connection."""
        if self.closing:
            return
        self.closing = True
        self.deadline.clear()
        # Only a plain TCP transport: a TLS transport would forward loseWriteConnection to the
        # socket below it (ProtocolWrapper.__getattr__) and skip its own close_notify.
        if linger and isinstance(self.transport, tcp.Connection):
            self.transport.resumeProducing()
            self.transport.loseWriteConnection()
            self.linger_call = self.reactor.callLater(LINGER_SECONDS, self._linger_over)
            return
        self.transport.loseConnection()

    def _linger_over(self) -> None:
        self.linger_call = None
        self.transport.loseConnection()


class H1Factory(Factory):
    """Builds :class:`H1Connection` for one listener and counts clients for the limits."""

    protocol = H1Connection
    noisy = False

    def __init__(self, pipeline: Pipeline, holder: StateHolder, reactor: IReactorTime, *, tls: bool = False) -> None:
        self.pipeline = pipeline
        self.holder = holder
        self.reactor = reactor
        self.tls = tls
        self.active = 0
        self.per_ip: dict[str, int] = {}
        #: Counted connections waiting for a request head, oldest wait first (eviction order).
        self.waiting: dict[H1Connection, float] = {}
        #: Open (counted) connections, for a graceful shutdown to drain.
        self.connections: set[H1Connection] = set()
        self.draining = False

    def drain(self) -> None:
        """Graceful shutdown: every open connection finishes what is in flight, then closes;
        one that starts from now on (its TLS handshake was in progress) closes once idle."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()

    def buildProtocol(self, addr) -> H1Connection:  # type: ignore[override]
        return H1Connection(self)

    def admit(self, ip: str, max_clients: int, max_per_ip: int) -> bool:
        """Count a new connection unless it would exceed a limit.

        At ``max_clients``, the connection that has waited longest for a request head is
        closed to make room: slow-header attackers and idle keep-alive clients cannot lock
        legitimate clients out (as nginx reuses idle keep-alive connections when it runs
        out). Connections with a request in flight are never closed for this.
        """
        count = self.per_ip.get(ip, 0) if max_per_ip else 0
        if max_per_ip and count >= max_per_ip:
            return False
        if max_clients and self.active >= max_clients and not self._evict_one():
            return False
        if max_per_ip:
            self.per_ip[ip] = count + 1
        self.active += 1
        return True

    def _evict_one(self) -> bool:
        if not self.waiting:
            return False
        connection, since = next(iter(self.waiting.items()))
        if self.reactor.seconds() - since < EVICT_AFTER:
            return False
        connection.evict()
        return True

    def waiting_start(self, connection: H1Connection) -> None:
        waiting = self.waiting
        waiting.pop(connection, None)
        waiting[connection] = self.reactor.seconds()

    def waiting_end(self, connection: H1Connection) -> None:
        self.waiting.pop(connection, None)

    def release(self, ip: str) -> None:
        self.active -= 1
        count = self.per_ip.get(ip)
        if count is not None:
            if count <= 1:
                del self.per_ip[ip]
            else:
                self.per_ip[ip] = count - 1
