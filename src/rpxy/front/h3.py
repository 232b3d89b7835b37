"""HTTP/3 front end: a Twisted ``DatagramProtocol`` driving qh3's sans-IO QUIC + HTTP/3.

One :class:`H3Endpoint` per UDP socket (the port numbered like ``listen_port_tls``)
owns the connection-ID table and does what happens before a connection exists:
version negotiation, Retry (stateless address validation, required while many
handshakes are pending), the ``max_concurrent_connections`` limit. Each
:class:`H3Session` is one QUIC connection:
qh3's ``QuicConnection`` (time from the reactor, one timer re-armed from
``get_timer()``) and ``H3Connection``; every request stream is an :class:`_H3Stream`,
the :class:`~rpxy.streams.ResponseSink` handed to the same
:meth:`~rpxy.pipeline.Pipeline.handle` as HTTP/1.1 and HTTP/2 (and, for an RFC 9220
extended CONNECT, the client's end of a WebSocket tunnel). See docs/http3.md.

Backpressure:

- response: what the stream has queued in QUIC (``get_send_buffer_size``) above
  :data:`SEND_HIGH_WATER` pauses the upstream; below :data:`SEND_LOW_WATER` resumes it.
- request: qh3 extends the client's flow-control credit as soon as data arrives (its
  native core has no "consumed" signal), so the front end cannot withhold credit per
  stream as HTTP/2 does. Instead, once request bytes delivered to paused upstreams pass
  :data:`RECV_HOLD_THRESHOLD`, the session stops feeding datagrams to QUIC: up to
  :data:`MAX_HELD_DATAGRAMS` are held (unacknowledged), the rest dropped, and the
  client's congestion control backs off and retransmits, as a full TCP receive buffer
  does. Reading resumes when the upstreams catch up.

No routing or header policy lives here.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from typing import Any

from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3._hazmat import UdpSocketState as _UdpSocketState
from qh3._hazmat import encode_uint_var
from qh3._hazmat import EncoderStreamError
from qh3.h3.connection import (
    FrameType,
    FrameUnexpected,
    H3Connection,
    HeadersState,
    ProtocolError,
    QpackEncoderStreamError,
    Setting,
    encode_frame,
)
from qh3.h3.events import DataReceived, HeadersReceived
from qh3.h3.events import StopSending as H3StopSending
from qh3.h3.events import StreamReset as H3StreamReset
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnectionError
from qh3.quic.packet import QuicPacketType, QuicProtocolVersion, encode_quic_retry, encode_quic_version_negotiation
from twisted.application.service import Service
from twisted.internet import defer, udp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from rpxy.config.model import Config, H3Config
from rpxy.deadline import LazyDeadline
from rpxy.front.extended import prepare_stream_request
# Shared with HTTP/2: request validation and the stream-reset budget (rapid reset).
from rpxy.front.h2 import (
    MAX_HEADER_LIST_SIZE,
    RESET_BURST,
    RESET_RATE,
    Malformed,
    _Bucket,
    check_trailers,
    parse_extended_request,
)
from rpxy.message import ConnectionInfo, Headers, HttpError, RequestHead
from rpxy.pipeline import Pipeline, send_local_response
from rpxy.quic.timer import ConnectionTimer
from rpxy.quic.tls import CertificateChooser, ServerQuicConnection
from rpxy.quic.tokens import InvalidToken, RetryTokens
from rpxy.state import StateHolder
from rpxy.streams import Exchange, StreamTunnelEnd, TunnelEnd, TunnelPauser

__all__ = ["H3Endpoint", "H3Listeners", "H3Session", "UDPListener", "add_h3_listeners", "quic_configuration"]

log = Logger(namespace="rpxy.h3")

#: Length of the connection IDs we issue.
CID_LENGTH = 8
#: QUIC versions accepted (others get a Version Negotiation packet).
SUPPORTED_VERSIONS = [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2]
#: Per-stream bytes queued in QUIC above which the upstream is paused / below which resumed.
SEND_HIGH_WATER = 256 * 1024
SEND_LOW_WATER = 64 * 1024
#: Response bytes waiting in QUIC at which a connection transmits without waiting for the
#: end of the reactor turn (about one full datagram: coalescing is kept, latency is not added).
TRANSMIT_AT = 2400
#: Request bytes handed to paused upstreams, per connection, before reading stops.
RECV_HOLD_THRESHOLD = 1024 * 1024
#: Datagrams kept (unprocessed) while reading is stopped; more are dropped.
MAX_HELD_DATAGRAMS = 64
#: How often a graceful shutdown looks whether the HTTP/3 streams are done.
DRAIN_POLL = 0.1
#: Pending handshakes above which new connections must first answer a Retry (retry=None).
RETRY_WHEN_HANDSHAKING = 64
#: QUIC flow-control windows we advertise (connection, stream).
MAX_DATA = 4 * 1024 * 1024
MAX_STREAM_DATA = 1024 * 1024
#: "0 = infinite" idle timeout, as a finite QUIC transport parameter.
_NO_IDLE_TIMEOUT = 365 * 24 * 3600.0

# HTTP/3 error codes (RFC 9114 section 8.1).
H3_NO_ERROR = 0x100
H3_INTERNAL_ERROR = 0x102
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E

# RFC 9114 section 4.2: connection-specific fields are never sent (a local answer carries
# ``connection: close``).
_NOT_SENT = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer")
)
_STATUS = {status: str(status).encode() for status in range(100, 600)}
# What an H3/QUIC send raises for a stream the client already reset or a closing connection.
_SEND_ERRORS = (AssertionError, ProtocolError, QuicConnectionError, ValueError, KeyError)
_INITIAL = int(QuicPacketType.INITIAL)
# recvmmsg errors that only mean "nothing (more) to read" (ICMP errors queued on the socket).
_READ_IGNORED = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH))
# sendmsg errors of a kernel or device without UDP GSO.
_GSO_UNSUPPORTED = frozenset((errno.EIO, errno.EINVAL, errno.EOPNOTSUPP))


def quic_configuration(h3: H3Config, material: tuple) -> QuicConfiguration:
    """qh3's server configuration from ``[experimental.h3]`` (the certificate is replaced per SNI)."""
    leaf, chain, key = material
    idle = float(h3.max_idle_timeout) if h3.max_idle_timeout > 0 else _NO_IDLE_TIMEOUT
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=["h3"],
        connection_id_length=CID_LENGTH,
        idle_timeout=idle,
        max_data=MAX_DATA,
        max_stream_data=MAX_STREAM_DATA,
        supported_versions=list(SUPPORTED_VERSIONS),
        # qh3's H3Connection always advertises SETTINGS_H3_DATAGRAM, which RFC 9297 ties
        # to this transport parameter (clients close the connection without it).
        max_datagram_frame_size=65536,
    )
    configuration.certificate = leaf
    configuration.certificate_chain = list(chain)
    configuration.private_key = key
    return configuration


@implementer(IPushProducer)
class _H3Stream:
    """One request/response on a bidirectional stream: the pipeline's ResponseSink."""

    __slots__ = (
        "session",
        "stream_id",
        "head",
        "exchange",
        "content_length",
        "received",
        "request_done",
        "request_paused",
        "unacked",
        "head_fields",
        "response_started",
        "response_done",
        "closed",
        "producer",
        "producer_paused",
        "websocket",
        "tunnel",
        "early",
        "deadline",
        "tail",
    )

    def __init__(self, session: H3Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.head: RequestHead | None = None
        self.exchange: Exchange | None = None
        self.content_length: int | None = None
        self.received = 0
        self.request_done = False
        self.request_paused = False
        self.unacked = 0
        self.head_fields: Headers | None = None
        self.response_started = False
        self.response_done = False
        self.closed = False
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        # An extended CONNECT for a WebSocket (RFC 9220): the upstream's end of the tunnel
        # once it switched protocols, and the DATA that came before it.
        self.websocket = False
        self.tunnel: TunnelEnd | None = None
        self.early: list[bytes] | None = None
        #: ``connection_handling_timeout``: reactor time at which the stream is cut off.
        self.deadline: float | None = None
        #: The latest response chunk, not handed to QUIC yet (so that the FIN can join it).
        self.tail: bytes | None = None

    # -- the request body's producer (the upstream pauses us) ----------------------------

    @property
    def request_producer(self) -> _H3Stream:
        return self

    def pauseProducing(self) -> None:
        self.request_paused = True

    def resumeProducing(self) -> None:
        self.request_paused = False
        if self.unacked:
            self.session.released(self.unacked)
            self.unacked = 0

    def stopProducing(self) -> None:
        self.resumeProducing()

    # -- ResponseSink ----------------------------------------------------------------------

    def send_head(self, status: int, headers: Headers) -> None:
        if self.closed:
            return
        self.response_started = True
        if status == 101 and self.websocket:
            # RFC 9220 (as RFC 8441): the tunnel opens with a 2xx, and there is no accept key.
            status = 200
            headers = [item for item in headers if item[0] != b"sec-websocket-accept"]
        fields: Headers = [(b":status", _STATUS.get(status) or str(status).encode())]
        fields.extend([item for item in headers if item[0] not in _NOT_SENT])
        if status < 200:
            self._guard(lambda: self.session.h3.send_headers(self.stream_id, fields))
            return
        # Held until the body, the end or flush(): a bodiless response is one HEADERS frame + FIN.
        self.head_fields = fields

    def send_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        tail = self.tail
        # The latest chunk waits for the next call (flush() follows each upstream read), so
        # that the FIN can ride on the last DATA frame.
        self.tail = data
        if tail is not None or self.head_fields is not None:
            self._send(tail, False)

    def flush(self) -> None:
        if self.closed:
            return
        tail = self.tail
        if tail is not None or self.head_fields is not None:
            self.tail = None
            self._send(tail, False)
        self.session.write_soon()

    def send_end(self, trailers: Headers | None = None) -> None:
        if self.closed or self.response_done:
            return
        self.response_done = True
        fields = None
        if trailers:
            fields = [item for item in trailers if item[0] not in _NOT_SENT and item[0][:1] != b":"]
        tail, self.tail = self.tail, None
        if fields:
            self._send(tail, False)
            if not self.closed:
                try:
                    self.session.h3.send_headers(self.stream_id, fields, end_stream=True)
                except _SEND_ERRORS as error:
                    self._failed(error)
        else:
            self._send(tail if tail is not None else b"", True)
        if not self.closed and not self.request_done:
            # Answered before the whole body arrived: the client may stop sending it.
            try:
                self.session.quic.stop_stream(self.stream_id, H3_NO_ERROR)
            except _SEND_ERRORS as error:
                self._failed(error)
        self.session.stream_finished(self)

    def abort(self) -> None:
        if not self.closed:
            self.session.reset(self, H3_INTERNAL_ERROR)

    def register_producer(self, producer: IPushProducer) -> None:
        self.producer = producer
        self.session.watch(self)

    def unregister_producer(self) -> None:
        producer = self.producer
        if producer is not None:
            self.producer = None
            self.session.unwatch(self)
            if self.producer_paused:
                self.producer_paused = False
                producer.resumeProducing()

    def start_tunnel(self, upstream: TunnelEnd) -> TunnelEnd:
        """The upstream switched to WebSocket: this stream's DATA becomes the raw bytes both ways."""
        if not self.websocket:
            raise RuntimeError("protocol switches are relayed over HTTP/3 only for an extended CONNECT")
        end = StreamTunnelEnd(self)
        if self.closed:
            upstream.close()
            return end
        self.tunnel = upstream
        # Upstream bytes wait while QUIC holds too much for this stream.
        self.register_producer(TunnelPauser(upstream))
        # Client DATA goes on only while the upstream's transport takes it.
        upstream.register_producer(self)
        self.flush()  # the 200 HEADERS, without FIN
        early, self.early = self.early, None
        if early:
            for chunk in early:
                upstream.write(chunk)
        if self.closed:
            return end
        if self.request_done:
            # The client ended its side before the upstream switched: nothing will follow.
            self.tunnel = None
            upstream.close()
            self.send_end(None)
        else:
            self.resumeProducing()  # release what was held while we waited
        return end

    # -- internals -------------------------------------------------------------------------

    def _send(self, data: bytes | None, end: bool) -> None:
        """The held head (if any), then ``data`` (None: nothing) and the FIN if ``end``."""
        h3 = self.session.h3
        head = self.head_fields
        try:
            if head is not None:
                self.head_fields = None
                # HEADERS (+ DATA) (+ FIN) in one write: a small response is one QUIC call.
                h3.send_response(self.stream_id, head, data, end)
            elif data is not None:
                h3.send_data(self.stream_id, data, end)
        except _SEND_ERRORS as error:
            self._failed(error)
            return
        self.session.output_added(self, len(data) if data else 64)

    def _guard(self, action) -> None:  # type: ignore[no-untyped-def]
        """Run an H3/QUIC send; a stream the client already reset just ends quietly."""
        try:
            action()
        except _SEND_ERRORS as error:
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        log.debug("HTTP/3 stream {sid}: send failed: {error!r}", sid=self.stream_id, error=error)
        self.session.gone(self)

    def apply_backpressure(self, queued: int) -> None:
        producer = self.producer
        if producer is None:
            return
        if queued > SEND_HIGH_WATER:
            if not self.producer_paused:
                self.producer_paused = True
                producer.pauseProducing()
        elif queued < SEND_LOW_WATER and self.producer_paused:
            self.producer_paused = False
            producer.resumeProducing()


class _ServerH3Connection(H3Connection):
    """qh3's HTTP/3 connection, advertising SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 9220:
    WebSocket over HTTP/3), with a cheaper path for the common response."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.ENABLE_CONNECT_PROTOCOL] = 1
        return settings

    def _encode_headers(self, stream_id: int, headers: Headers) -> bytes:
        # As qh3's, minus the write of an empty encoder-stream update: a native call per
        # field section otherwise (our encoder rarely has dynamic-table updates to send).
        try:
            encoder, frame_data = self._encoder.encode(stream_id, headers)
        except EncoderStreamError as exc:
            raise QpackEncoderStreamError() from exc
        if encoder:
            self._encoder_bytes_sent += len(encoder)
            self._quic.send_stream_data(self._local_encoder_stream_id, encoder)
        return frame_data

    def send_response(self, stream_id: int, headers: Headers, data: bytes | None, end_stream: bool) -> None:
        """A final response's HEADERS frame and a first DATA frame in one QUIC write.

        The same state changes as ``send_headers`` then ``send_data`` (qh3's), which each
        make their own write into QUIC.
        """
        stream = self._get_or_create_stream(stream_id)
        if stream.headers_send_state != HeadersState.INITIAL:
            raise FrameUnexpected("a response head was already sent on this stream")
        frame = encode_frame(FrameType.HEADERS, self._encode_headers(stream_id, headers))
        if data:
            frame += encode_frame(FrameType.DATA, data)
        stream.headers_send_state = HeadersState.AFTER_HEADERS
        if end_stream:
            stream.finish_sending()
        self._maybe_cleanup_stream(stream)
        self._quic.send_stream_data(stream_id, frame, end_stream)


class H3Session:
    """One QUIC connection carrying HTTP/3."""

    def __init__(self, endpoint: H3Endpoint, quic: ServerQuicConnection, addr: tuple) -> None:
        self.endpoint = endpoint
        self.reactor = endpoint.reactor
        self.quic = quic
        self.addr = addr
        self.h3: Any = None
        self.streams: dict[int, _H3Stream] = {}
        self.watched: dict[int, _H3Stream] = {}
        self.cids: set[bytes] = set()
        self.timer = ConnectionTimer(self.reactor, self._on_timer)
        self.conn: ConnectionInfo | None = None
        self.held: deque[tuple[bytes, tuple]] | None = None
        self.unacked = 0
        #: Response bytes handed to QUIC since the last transmit (see :data:`TRANSMIT_AT`).
        self.unsent = 0
        self.dropped = 0
        self.closed = False
        self._busy = False
        self._write_call = None
        self.stream_deadline: LazyDeadline | None = None
        #: Streams reset by the client before their answer, or refused by us (rapid reset).
        self.resets = _Bucket(RESET_BURST, RESET_RATE, self.reactor.seconds())
        #: The highest request stream whose head was read (later ones were never seen).
        self.last_request_id = -1
        #: After our GOAWAY (graceful shutdown): request streams from this ID on are refused.
        self.goaway_id: int | None = None

    # -- input -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        held = self.held
        if held is not None:
            if len(held) < MAX_HELD_DATAGRAMS:
                held.append((data, addr))
            else:
                self.dropped += 1
            return
        self._feed(self.quic.receive_datagram, data, addr)

    def datagrams_received(self, datagrams: list[bytes], addr: tuple) -> None:
        """As :meth:`datagram_received` for a batch: one QUIC call, one pass over the events."""
        if self.held is not None or self.closed:
            for data in datagrams:
                self.datagram_received(data, addr)
            return
        self._feed(self.quic.receive_many_datagrams, datagrams, addr)

    def _feed(self, receive: Any, data: Any, addr: tuple) -> None:
        """Give QUIC what arrived, then act on its events; a failure closes this connection only."""
        self._busy = True
        try:
            receive(data, addr, self.reactor.seconds())
            self._process()
        except QuicConnectionError as error:
            self._closed_by_quic(error)
        except Exception:
            log.failure("HTTP/3 connection from {peer} failed", peer=addr[0])
            self._abort_connection()
        finally:
            self._busy = False
        # Not at once: the reactor usually hands over a batch of datagrams, and one transmit
        # after the batch coalesces their ACKs and answers into fewer datagrams.
        self.write_soon()

    def _on_timer(self) -> None:
        if self.closed:
            return
        self._busy = True
        try:
            self.quic.handle_timer(self.reactor.seconds())
            self._process()
        except QuicConnectionError as error:
            self._closed_by_quic(error)
        except Exception:
            log.failure("HTTP/3 timer failed")
            self._abort_connection()
        finally:
            self._busy = False
        self.transmit()

    def _process(self) -> None:
        quic = self.quic
        while True:
            event = quic.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is qevents.ConnectionIdIssued:
                self.cids.add(event.connection_id)
                self.endpoint.cids[event.connection_id] = self
            elif kind is qevents.ConnectionIdRetired:
                self.cids.discard(event.connection_id)
                if self.endpoint.cids.get(event.connection_id) is self:
                    del self.endpoint.cids[event.connection_id]
            elif kind is qevents.ProtocolNegotiated:
                if event.alpn_protocol == "h3" and self.h3 is None:
                    self.h3 = _ServerH3Connection(quic)
            elif kind is qevents.HandshakeCompleted:
                if self.conn is None:
                    self.endpoint.handshaking -= 1
                self.conn = ConnectionInfo(
                    peer_ip=_plain_ip(self.addr[0]),
                    peer_port=self.addr[1],
                    local_port=self.endpoint.local_port,
                    tls=True,
                    sni=quic.sni,
                )
                log.debug("HTTP/3 handshake with {peer}: sni={sni} group={group}", peer=self.addr[0], sni=quic.sni, group=quic.group)
            elif kind is qevents.ConnectionTerminated:
                self._terminated(event)
                return
            if self.h3 is not None and self.conn is not None:
                for h3_event in self.h3.handle_event(event):
                    self._on_h3_event(h3_event)
            elif self.h3 is not None:
                # Before the handshake completes (only control streams can arrive).
                for h3_event in self.h3.handle_event(event):
                    if isinstance(h3_event, (HeadersReceived, DataReceived)):
                        quic.reset_stream(h3_event.stream_id, H3_REQUEST_REJECTED)

    def _on_h3_event(self, event: Any) -> None:
        kind = type(event)
        if kind is HeadersReceived:
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self._on_request(event)
            else:
                self._on_trailers(stream, event)
        elif kind is DataReceived:
            self._on_data(event)
        elif kind is H3StreamReset or kind is H3StopSending:
            stream = self.streams.get(event.stream_id)
            sid = event.stream_id
            if stream is not None:
                if not stream.response_done:
                    # Our side ends too: the stream is then closed in QUIC and its credit returns.
                    self._quiet(lambda: self.quic.reset_stream(sid, H3_REQUEST_CANCELLED))
                self.gone(stream)
                self._count_reset()
            elif sid & 3 == 0 and sid > self.last_request_id:
                # Reset before its request head was read: close our side as well (or the
                # stream would stay half open, holding the client's stream credit).
                self._quiet(lambda: self.quic.reset_stream(sid, H3_REQUEST_CANCELLED))
                self._count_reset()

    def goaway(self) -> None:
        """Graceful shutdown: tell the client which requests will still be served (RFC 9114 5.2)."""
        h3 = self.h3
        if self.closed or h3 is None or self.goaway_id is not None:
            return
        self.goaway_id = self.last_request_id + 4 if self.last_request_id >= 0 else 0
        control = h3._local_control_stream_id
        if control is not None:
            frame = encode_frame(FrameType.GOAWAY, encode_uint_var(self.goaway_id))
            self._quiet(lambda: self.quic.send_stream_data(control, frame))
        self.write_soon()

    def _count_reset(self) -> None:
        """Each started-then-cancelled stream costs upstream work: a budget, as on HTTP/2."""
        if not self.resets.take(self.reactor.seconds()) and not self.closed:
            log.info("HTTP/3 connection from {peer}: too many stream resets (rapid reset)", peer=self.addr[0])
            self._quiet(lambda: self.quic.close(error_code=H3_EXCESSIVE_LOAD, reason_phrase="too many stream resets"))

    def _on_request(self, event: HeadersReceived) -> None:
        stream_id = event.stream_id
        if stream_id & 3 != 0:
            return  # not a client-initiated bidirectional stream
        if stream_id > self.last_request_id:
            self.last_request_id = stream_id
        endpoint = self.endpoint
        if len(self.streams) >= endpoint.max_streams or endpoint.clients_full():
            self._refuse(stream_id)
            return
        if self.goaway_id is not None and stream_id >= self.goaway_id:
            self._refuse(stream_id)  # after our GOAWAY: the client retries elsewhere
            return
        try:
            method, path, authority, fields, protocol = parse_extended_request(event.headers)
        except Malformed as error:
            log.debug("malformed HTTP/3 request from {peer}: {why}", peer=self.addr[0], why=str(error))
            self._refuse(stream_id, H3_MESSAGE_ERROR)
            return
        conn = self.conn
        assert conn is not None
        stream = _H3Stream(self, stream_id)
        body_expected = not event.stream_ended
        websocket = protocol is not None and protocol.lower() == b"websocket"
        if websocket:
            # A WebSocket (RFC 9220): for the pipeline, an HTTP/1.1-style GET Upgrade.
            head = RequestHead(b"GET", path, b"3", fields, authority, protocol=b"websocket")
            stream.websocket = True
        else:
            head = RequestHead(method, path, b"3", fields, authority)
        stream.head = head
        stream.request_done = not body_expected
        self.streams[stream_id] = stream
        endpoint.active_streams += 1
        if endpoint.stream_timeout:
            self._arm_stream_deadline(stream)
        pipeline = endpoint.pipeline
        expect_continue = False
        try:
            # As HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE and HTTP/1.1's 64 KiB (qh3 itself
            # accepts up to 256 KiB of decoded fields).
            if sum(len(name) + len(value) + 32 for name, value in event.headers) > MAX_HEADER_LIST_SIZE:
                raise HttpError(431, "header list over 64 KiB")
            content_length, body_expected, expect_continue = prepare_stream_request(
                head, method, protocol, body_expected=body_expected, end_flag="FIN"
            )
            body_limit = endpoint.h3_body_limit
            if body_limit is not None and content_length is not None and content_length > body_limit:
                raise HttpError(413, "experimental.h3.request_max_body_size")
        except HttpError as error:
            log.debug("bad HTTP/3 request from {peer}: {why}", peer=self.addr[0], why=error.reason)
            send_local_response(stream, error.status)
            pipeline.access_log.record(conn, head, "", error.status, upstream="")
            return
        if content_length and not body_expected:
            self.reset(stream, H3_MESSAGE_ERROR)
            return
        stream.content_length = content_length
        try:
            stream.exchange = pipeline.handle(conn, head, stream, content_length=content_length, body_expected=body_expected)
        except Exception:
            log.failure("HTTP/3 request handling failed")
            if not stream.closed:
                if stream.response_started:
                    stream.abort()
                else:
                    send_local_response(stream, 500)
            return
        if expect_continue and not stream.closed and not stream.response_started:
            stream._guard(lambda: self.h3.send_headers(stream_id, [(b":status", b"100")]))

    def _on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.request_done:
            return
        if stream.websocket:
            self._on_tunnel_data(stream, event)
            return
        data = event.data
        if data:
            stream.received += len(data)
            limit = stream.content_length
            if limit is not None and stream.received > limit:
                self.reset(stream, H3_MESSAGE_ERROR)
                return
            body_limit = self.endpoint.h3_body_limit
            if body_limit is not None and stream.received > body_limit:
                if stream.response_started:
                    self.reset(stream, H3_REQUEST_REJECTED)
                else:
                    exchange, stream.exchange = stream.exchange, None
                    if exchange is not None:
                        exchange.client_gone()
                    send_local_response(stream, 413)
                return
            if stream.request_paused:
                stream.unacked += len(data)
                self.unacked += len(data)
                if self.unacked > RECV_HOLD_THRESHOLD and self.held is None:
                    self.held = deque()
            exchange = stream.exchange
            if exchange is not None:
                exchange.request_data(data)
        if event.stream_ended and not stream.closed and not stream.request_done:
            stream.request_done = True
            if stream.content_length is not None and stream.received != stream.content_length:
                self.reset(stream, H3_MESSAGE_ERROR)
                return
            exchange = stream.exchange
            if exchange is not None:
                exchange.request_end(None)
            self._maybe_forget(stream)

    def _on_tunnel_data(self, stream: _H3Stream, event: DataReceived) -> None:
        """DATA on a WebSocket stream: raw bytes for the upstream, held while it cannot take them."""
        data = event.data
        if data:
            tunnel = stream.tunnel
            if tunnel is not None:
                tunnel.write(data)
                hold = stream.request_paused
            else:
                # Sent before the upstream switched protocols: kept (and counted as held).
                if stream.early is None:
                    stream.early = []
                stream.early.append(data)
                stream.request_paused = True
                hold = True
            if hold:
                stream.unacked += len(data)
                self.unacked += len(data)
                if self.unacked > RECV_HOLD_THRESHOLD and self.held is None:
                    self.held = deque()
        if event.stream_ended and not stream.closed:
            stream.request_done = True
            if stream.tunnel is not None:
                # The client closed its side of the tunnel: close the upstream, end ours.
                stream.tunnel = None
                if stream.exchange is not None:
                    stream.exchange.client_gone()
                stream.send_end(None)

    def _on_trailers(self, stream: _H3Stream, event: HeadersReceived) -> None:
        if stream.request_done or not event.stream_ended:
            self.reset(stream, H3_MESSAGE_ERROR)
            return
        try:
            trailers = check_trailers(event.headers)
        except Malformed:
            self.reset(stream, H3_MESSAGE_ERROR)
            return
        stream.request_done = True
        exchange = stream.exchange
        if exchange is not None:
            exchange.request_end(trailers)
        self._maybe_forget(stream)

    # -- connection_handling_timeout (per stream, as rpxy) --------------------------------

    def _arm_stream_deadline(self, stream: _H3Stream) -> None:
        stream.deadline = self.reactor.seconds() + self.endpoint.stream_timeout
        deadline = self.stream_deadline
        if deadline is None:
            deadline = self.stream_deadline = LazyDeadline(self.reactor, self._streams_expired)
        if deadline.when is None:
            deadline.set(stream.deadline)

    def _streams_expired(self) -> None:
        """Cut off the streams past their deadline; the streams are in creation order."""
        if self.closed:
            return
        now = self.reactor.seconds()
        for stream in list(self.streams.values()):
            when = stream.deadline
            if when is None:
                continue
            if when > now:
                assert self.stream_deadline is not None
                self.stream_deadline.set(when)
                break
            log.info("HTTP/3 stream from {peer} hit connection_handling_timeout", peer=self.addr[0])
            self.reset(stream, H3_REQUEST_CANCELLED)
        self.write_soon()

    # -- flow control ----------------------------------------------------------------------

    def released(self, size: int) -> None:
        """A paused upstream took ``size`` bytes: maybe read the client again."""
        self.unacked = max(0, self.unacked - size)
        if self.held is not None and self.unacked <= RECV_HOLD_THRESHOLD // 2:
            held, self.held = self.held, None
            if self.dropped:
                log.debug("HTTP/3 {peer}: {n} datagrams dropped while upstreams were slow", peer=self.addr[0], n=self.dropped)
                self.dropped = 0
            if held:
                self.reactor.callLater(0, self._replay, held)

    def _replay(self, held: deque) -> None:
        while held and not self.closed:
            if self.held is not None:
                # Paused again meanwhile: keep what is left, in order.
                held.extend(self.held)
                self.held = held
                return
            data, addr = held.popleft()
            self.datagram_received(data, addr)

    def watch(self, stream: _H3Stream) -> None:
        self.watched[stream.stream_id] = stream
        self.output_added(stream)

    def unwatch(self, stream: _H3Stream) -> None:
        self.watched.pop(stream.stream_id, None)

    def output_added(self, stream: _H3Stream, size: int = 0) -> None:
        """Output is waiting in QUIC: sent after this reactor turn, or now once a datagram's worth
        waits (responses that finished early in a long turn need not wait for its end)."""
        self.unsent += size
        if self.unsent >= TRANSMIT_AT and not self._busy:
            self.transmit()
        else:
            self.write_soon()

    # -- output ----------------------------------------------------------------------------

    def write_soon(self) -> None:
        if self._busy or self._write_call is not None or self.closed:
            return
        self._write_call = self.reactor.callLater(0, self._write_now)

    def _write_now(self) -> None:
        self._write_call = None
        self.transmit()

    def transmit(self) -> None:
        """Send what QUIC has for the wire, re-arm the timer, apply send backpressure."""
        if self.closed:
            return
        quic = self.quic
        self.unsent = 0
        try:
            datagrams = quic.datagrams_to_send(self.reactor.seconds())
        except Exception:
            log.failure("HTTP/3 send failed")
            self._abort_connection()
            return
        if datagrams:
            self.endpoint.send_datagrams(datagrams)
        for stream in list(self.watched.values()):
            try:
                queued = quic.get_send_buffer_size(stream.stream_id)
            except Exception:
                queued = 0
            stream.apply_backpressure(queued)
        self.timer.set(quic.get_timer())

    # -- stream and connection ends --------------------------------------------------------

    def _refuse(self, stream_id: int, code: int = H3_REQUEST_REJECTED) -> None:
        self._quiet(lambda: self.quic.reset_stream(stream_id, code))
        self._quiet(lambda: self.quic.stop_stream(stream_id, code))
        self._count_reset()

    def reset(self, stream: _H3Stream, code: int) -> None:
        if stream.closed:
            return
        sid = stream.stream_id
        if not stream.response_done:
            self._quiet(lambda: self.quic.reset_stream(sid, code))
        if not stream.request_done:
            self._quiet(lambda: self.quic.stop_stream(sid, code))
        self.gone(stream)
        self.write_soon()

    def gone(self, stream: _H3Stream) -> None:
        """The stream ended abnormally: the exchange stops, the stream is forgotten."""
        if stream.closed:
            return
        exchange, stream.exchange = stream.exchange, None
        self._forget(stream)
        if exchange is not None:
            exchange.client_gone()

    def stream_finished(self, stream: _H3Stream) -> None:
        """The response was sent completely."""
        self.write_soon()
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: _H3Stream) -> None:
        if stream.response_done:
            self._forget(stream)

    def _forget(self, stream: _H3Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        if stream.unacked:
            self.released(stream.unacked)
            stream.unacked = 0
        self.watched.pop(stream.stream_id, None)
        if self.streams.pop(stream.stream_id, None) is not None:
            self.endpoint.active_streams -= 1

    def _quiet(self, action) -> None:  # type: ignore[no-untyped-def]
        try:
            action()
        except Exception as error:  # a stream already gone on the QUIC side
            log.debug("HTTP/3 stream operation failed: {error!r}", error=error)

    def close(self, code: int = H3_NO_ERROR, reason: str = "") -> None:
        """Close the connection (service stop)."""
        if self.closed:
            return
        self._quiet(lambda: self.quic.close(error_code=code, reason_phrase=reason))
        self.transmit()
        self._terminated(None)

    def _closed_by_quic(self, error: QuicConnectionError) -> None:
        """QUIC closed the connection (the peer broke a transport rule, e.g. opened more
        streams than allowed) while we still acted on its last events: not our failure."""
        core = getattr(self.quic, "_core", None)
        why = getattr(core, "local_error", None) if core is not None else None
        log.info(
            "HTTP/3 connection from {peer} closed by QUIC: {why}",
            peer=_plain_ip(self.addr[0]),
            why=f"error {why[0]:#x}: {why[2]}" if why else str(error),
        )
        self._abort_connection()

    def _abort_connection(self) -> None:
        self._quiet(lambda: self.quic.close(error_code=H3_INTERNAL_ERROR, reason_phrase="internal error"))
        try:
            for data, addr in self.quic.datagrams_to_send(self.reactor.seconds()):
                self.endpoint.send(data, addr)
        except Exception:
            pass
        self._terminated(None)

    def _log_handshake_failure(self, event: Any) -> None:
        """As on TCP: peer, SNI and a category (our SNI refusals, or the TLS alert's reason)."""
        refusal = self.quic.refusal
        if refusal is not None:
            category, sni, reason = refusal.category, refusal.sni, refusal.reason
        elif event is not None and 0x100 <= (event.error_code or 0) <= 0x1FF:  # CRYPTO_ERROR: a TLS alert
            category, sni, reason = "handshake", self.quic.sni, event.reason_phrase or f"alert {event.error_code - 0x100}"
        else:
            return  # an abandoned or timed-out handshake: nothing worth a line
        log.info(
            "QUIC handshake failed: peer={peer}:{port} sni={sni} category={category}: {reason}",
            peer=_plain_ip(self.addr[0]),
            port=self.addr[1],
            sni=sni if sni is not None else "-",
            category=category,
            reason=reason,
        )

    def _terminated(self, event: Any) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        if self.stream_deadline is not None:
            self.stream_deadline.cancel()
        call, self._write_call = self._write_call, None
        if call is not None and call.active():
            call.cancel()
        self.held = None
        if self.conn is None:
            self._log_handshake_failure(event)
        streams = list(self.streams.values())
        for stream in streams:
            self.gone(stream)
        self.endpoint.session_closed(self)


class H3Endpoint(DatagramProtocol):
    """One UDP socket: connection IDs -> sessions, version negotiation, Retry, limits."""

    def __init__(
        self,
        pipeline: Pipeline,
        holder: StateHolder,
        reactor: Any,
        h3: H3Config,
        *,
        local_port: int = 0,
        max_clients: int = 0,
        retry: bool | None = None,
        chooser: CertificateChooser | None = None,
        stream_timeout: float = 0.0,
    ) -> None:
        self.pipeline = pipeline
        self.holder = holder
        self.reactor = reactor
        self.h3config = h3
        self.local_port = local_port
        self.chooser = chooser or CertificateChooser(lambda: holder.current.tls_contexts)
        self.cids: dict[bytes, H3Session] = {}
        self.sessions: set[H3Session] = set()
        self.max_connections = h3.max_concurrent_connections
        self.max_streams = h3.max_concurrent_bidistream
        self.max_clients = max_clients
        self.active_streams = 0
        #: ``experimental.h3.request_max_body_size`` (deprecated, 0 = no body at all).
        self.h3_body_limit = h3.request_max_body_size
        #: ``connection_handling_timeout``: the hard limit on each request stream (0 = none).
        self.stream_timeout = stream_timeout
        #: Retry (address validation before any state): True = always, False = never,
        #: None = only while more than :data:`RETRY_WHEN_HANDSHAKING` handshakes are pending
        #: (a flood of Initials, possibly spoofed, then costs one HMAC each, no TLS work).
        self.retry = retry
        self.tokens = RetryTokens() if retry is not False else None
        self.handshaking = 0
        self.send_errors = 0
        self._configuration: QuicConfiguration | None = None
        #: Graceful shutdown: no new connections; reactor time until which streams may finish.
        self.drain_deadline: float | None = None

    def apply(self, h3: H3Config, *, max_clients: int, stream_timeout: float) -> None:
        """Take new ``[experimental.h3]`` limits (a reload): new connections and streams use them."""
        self.h3config = h3
        self.max_connections = h3.max_concurrent_connections
        self.max_streams = h3.max_concurrent_bidistream
        self.h3_body_limit = h3.request_max_body_size
        self.max_clients = max_clients
        self.stream_timeout = stream_timeout
        self._configuration = None  # rebuilt (idle timeout) for the next connection

    def start_drain(self, deadline: float) -> None:
        """Stop taking connections, send every client a GOAWAY; streams may finish until ``deadline``."""
        self.drain_deadline = deadline
        for session in list(self.sessions):
            session.goaway()

    def open_streams(self) -> int:
        return sum(len(session.streams) for session in self.sessions)

    def clients_full(self) -> bool:
        return bool(self.max_clients) and self.active_streams >= self.max_clients

    def configuration(self) -> QuicConfiguration | None:
        material = self.chooser.any_material()
        if material is None:
            return None
        if self._configuration is None:
            self._configuration = quic_configuration(self.h3config, material)
        return self._configuration

    def send(self, data: bytes, addr: tuple) -> None:
        """Write one datagram; errors (full buffers, unreachable peers) cost the datagram only.

        Straight to the socket when there is one: ``udp.Port.write`` re-validates the
        address on every call, a measurable share of a small response's cost.
        """
        transport = self.transport
        if transport is None:
            return
        sock = getattr(transport, "socket", None)
        try:
            if sock is not None:
                sock.sendto(data, addr)
            else:
                transport.write(data, addr)
        except Exception as error:
            self.send_errors += 1
            log.debug("UDP send to {peer} failed: {error!r}", peer=addr[0], error=error)

    def send_datagrams(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Write a connection's datagrams: one batched call per peer address where the port has it."""
        transport = self.transport
        send_batch = getattr(transport, "send_batch", None)
        if send_batch is None or len(datagrams) == 1:
            for data, addr in datagrams:
                self.send(data, addr)
            return
        start = 0
        while start < len(datagrams):
            addr = datagrams[start][1]
            end = start + 1
            while end < len(datagrams) and datagrams[end][1] == addr:
                end += 1
            try:
                if send_batch([data for data, _addr in datagrams[start:end]], addr) < end - start:
                    self.send_errors += 1  # the socket buffer was full: the rest was dropped
            except Exception as error:
                self.send_errors += 1
                log.debug("UDP send to {peer} failed: {error!r}", peer=addr[0], error=error)
            start = end

    def datagrams_received(self, datagrams: list[bytes], addr: tuple) -> None:
        """Several datagrams from one peer (a ``recvmmsg`` batch): runs for one connection
        are handed to it together; anything else goes the per-datagram way."""
        try:
            cids = self.cids
            run: list[bytes] = []
            run_session: H3Session | None = None
            for data in datagrams:
                try:
                    session = cids.get(_pull_quic_header(data, 0, CID_LENGTH)[3])
                except ValueError:
                    session = None
                if session is not None and session is run_session:
                    run.append(data)
                    continue
                if run_session is not None:
                    run_session.datagrams_received(run, addr)
                    run_session, run = None, []
                if session is None:
                    self._datagram(data, addr)
                else:
                    run_session, run = session, [data]
            if run_session is not None:
                run_session.datagrams_received(run, addr)
        except Exception:
            log.failure("HTTP/3 datagrams from {peer} failed", peer=addr[0])

    def datagramReceived(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        try:
            self._datagram(data, addr)
        except Exception:
            log.failure("HTTP/3 datagram from {peer} failed", peer=addr[0])

    def _datagram(self, data: bytes, addr: tuple) -> None:
        try:
            header = _pull_quic_header(data, 0, CID_LENGTH)
        except ValueError:
            return
        version, packet_type, dcid, scid, token = header[0], header[1], header[3], header[4], header[5]
        session = self.cids.get(dcid)
        if session is not None:
            session.datagram_received(data, addr)
            return
        if version is None:
            return  # a short-header packet for a connection we do not know
        if len(data) < 1200:
            return  # RFC 9000 14.1: too small to answer without amplifying
        if version not in SUPPORTED_VERSIONS:
            self.send(
                encode_quic_version_negotiation(
                    source_cid=dcid, destination_cid=scid, supported_versions=list(SUPPORTED_VERSIONS)
                ),
                addr,
            )
            return
        if packet_type != _INITIAL:
            return
        if self.drain_deadline is not None:
            return  # shutting down
        if len(self.sessions) >= self.max_connections:
            log.debug("HTTP/3: max_concurrent_connections reached, Initial from {peer} dropped", peer=addr[0])
            return
        configuration = self.configuration()
        if configuration is None:
            return
        original_dcid = dcid
        retry_scid = None
        tokens = self.tokens
        if tokens is not None and (token or self.retry or self.handshaking >= RETRY_WHEN_HANDSHAKING):
            now = self.reactor.seconds()
            if not token:
                retry_scid = os.urandom(CID_LENGTH)
                self.send(
                    encode_quic_retry(
                        version=version,
                        source_cid=retry_scid,
                        destination_cid=scid,
                        original_destination_cid=dcid,
                        retry_token=tokens.issue(addr, dcid, retry_scid, now),
                    ),
                    addr,
                )
                return
            try:
                original_dcid, retry_scid = tokens.check(addr, token, now)
            except InvalidToken as error:
                log.debug("HTTP/3: Retry token from {peer} refused: {why}", peer=addr[0], why=str(error))
                return
        quic = ServerQuicConnection(
            chooser=self.chooser,
            stream_limits=(self.h3config.max_concurrent_bidistream, self.h3config.max_concurrent_unistream),
            configuration=configuration,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )
        session = H3Session(self, quic, addr)
        self.sessions.add(session)
        self.handshaking += 1
        for cid in (dcid, quic.host_cid):
            self.cids[cid] = session
            session.cids.add(cid)
        session.datagram_received(data, addr)

    def session_closed(self, session: H3Session) -> None:
        if session.conn is None:
            self.handshaking -= 1
        self.sessions.discard(session)
        for cid in session.cids:
            if self.cids.get(cid) is session:
                del self.cids[cid]
        session.cids.clear()

    def close_all(self) -> None:
        for session in list(self.sessions):
            session.close()


def _plain_ip(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class QuicUDPPort(udp.Port):
    """The UDP socket of an HTTP/3 listener: batched system calls, v6-only, optionally shared.

    Reads and writes go through qh3's ``UdpSocketState`` (quinn-udp) when the platform
    has it: ``recvmmsg`` takes up to 32 datagrams per call (with GRO, coalesced segments
    come back split) and a connection's datagrams leave in one ``sendmsg`` with GSO
    (:meth:`send_batch`). Per-datagram ``recvfrom``/``sendto`` otherwise (Twisted's).

    An IPv6 socket never also takes IPv4 (the v4 addresses have their own). With
    ``reuse_port`` (any family): SO_REUSEPORT, so that the worker processes of
    ``rpxy --workers N`` share the port (the kernel picks a socket by the 4-tuple hash).
    """

    reuse_port = False
    #: qh3's batched socket state, None where it is not available.
    batch: Any = None

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def _bindSocket(self) -> None:
        super()._bindSocket()
        try:
            self.batch = _UdpSocketState(self.socket.fileno())
        except Exception as error:  # not on this platform: Twisted's per-datagram calls
            log.info("HTTP/3: batched UDP system calls unavailable ({error}); one call per datagram", error=error)
            self.batch = None

    def connectionLost(self, reason=None):  # type: ignore[no-untyped-def]
        self.batch = None
        return super().connectionLost(reason)

    def doRead(self) -> None:
        batch = self.batch
        if batch is None:
            return super().doRead()
        received = 0
        protocol = self.protocol
        batch_received = getattr(protocol, "datagrams_received", None)
        while received < self.maxThroughput:
            try:
                datagrams = batch.recv()
            except OSError as error:
                if error.errno not in _READ_IGNORED:
                    # Logged, never raised: the reactor would close the listener for it.
                    log.warn("HTTP/3: UDP receive failed: {error}", error=error)
                return
            if not datagrams:
                return
            # Consecutive datagrams from one peer go together (one QUIC call for a batch).
            start, count = 0, len(datagrams)
            while start < count:
                addr = datagrams[start][1]
                end = start + 1
                while end < count and datagrams[end][1] == addr:
                    end += 1
                if len(addr) > 2:
                    addr = addr[:2]  # (host, port), as Twisted gives it
                run = [data for data, _addr in datagrams[start:end]]
                received += sum(map(len, run))
                try:
                    if len(run) == 1 or batch_received is None:
                        for data in run:
                            protocol.datagramReceived(data, addr)
                    else:
                        batch_received(run, addr)
                except BaseException:
                    log.failure("HTTP/3 datagram handling failed")
                start = end
        return None

    def send_batch(self, datagrams: list[bytes], addr: tuple) -> int:
        """Send ``datagrams`` to one peer; how many left (a full socket buffer drops the rest,
        which QUIC retransmits). Raises ``OSError`` naming what failed."""
        batch = self.batch
        if batch is None:
            sock = self.socket
            for data in datagrams:
                sock.sendto(data, addr)
            return len(datagrams)
        try:
            return batch.send(datagrams, addr)
        except OSError as error:
            if error.errno in _GSO_UNSUPPORTED and len(datagrams) > 1:
                # A kernel or device refusing GSO: from now on one datagram per call.
                batch.disable_gso()
                sent = getattr(error, "datagrams_sent", 0) or 0
                sock = self.socket
                for data in datagrams[sent:]:
                    sock.sendto(data, addr)
                return len(datagrams)
            raise


class UDPListener(Service):
    """Binds in startService, so a UDP port in use fails the start loudly."""

    def __init__(
        self, reactor: Any, port: int, endpoint: H3Endpoint, *, interface: str, reuse_port: bool = False
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.endpoint = endpoint
        self.interface = interface
        self.reuse_port = reuse_port
        self.listening_port = None

    def startService(self) -> None:
        listener = QuicUDPPort(self.port, self.endpoint, self.interface, 65535, self.reactor)
        listener.reuse_port = self.reuse_port
        listener.startListening()
        self.listening_port = listener
        self.endpoint.local_port = listener.getHost().port
        log.info("listening on {interface}:{port} (h3, udp)", interface=self.interface, port=self.endpoint.local_port)
        super().startService()

    def stopService(self):  # type: ignore[no-untyped-def]
        """After a graceful start (``start_drain``), waits for open streams until its deadline."""
        super().stopService()
        endpoint = self.endpoint
        deadline = endpoint.drain_deadline
        if deadline is None or not endpoint.open_streams() or self.reactor.seconds() >= deadline:
            return self._close()
        done: defer.Deferred = defer.Deferred()

        def poll() -> None:
            if endpoint.open_streams() and self.reactor.seconds() < deadline:
                self.reactor.callLater(DRAIN_POLL, poll)
                return
            if endpoint.open_streams():
                log.warn("shutting down: aborting {n} HTTP/3 stream(s) still open", n=endpoint.open_streams())
            self._close().chainDeferred(done)

        log.info("shutting down: waiting for {n} HTTP/3 stream(s)", n=endpoint.open_streams())
        poll()
        return done

    def _close(self) -> defer.Deferred:
        self.endpoint.close_all()
        if self.listening_port is None:
            return defer.succeed(None)
        port, self.listening_port = self.listening_port, None
        # udp.Port.stopListening returns None when the socket was not connected.
        return defer.maybeDeferred(port.stopListening)


class H3Listeners:
    """The service's HTTP/3 UDP listeners, kept in step with the config across reloads.

    Keyed by ``(interface, port)`` like the TCP listeners: a reload opens the sockets the new
    config wants (HTTP/3 turned on, the TLS port or an address changed), drains and closes
    those it no longer wants (their clients get a GOAWAY and their streams the graceful
    shutdown time to finish), and applies new ``[experimental.h3]`` limits to the ones it keeps.
    Iterating gives the current endpoints.
    """

    def __init__(self, parent: Any, pipeline: Pipeline, holder: StateHolder, reactor: Any) -> None:
        self.parent = parent
        self.pipeline = pipeline
        self.holder = holder
        self.reactor = reactor
        self.by_key: dict[tuple[str, int], tuple[UDPListener, H3Endpoint]] = {}
        #: The ACME service, once there is one: every endpoint's certificates consult it.
        self.acme: Any = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([endpoint for _listener, endpoint in self.by_key.values()])

    def __len__(self) -> int:
        return len(self.by_key)

    def set_acme(self, acme: Any) -> None:
        self.acme = acme
        for endpoint in self:
            endpoint.chooser.acme = acme

    def apply(self, config: Config) -> None:
        h3 = config.experimental.h3
        wanted: set[tuple[str, int]] = set()
        if h3 is not None and config.listen_port_tls is not None:
            wanted = {(interface, config.listen_port_tls) for interface in (*config.listen_address_v4, *config.listen_address_v6)}
        for key in [key for key in self.by_key if key not in wanted]:
            listener, endpoint = self.by_key.pop(key)
            timeout = float(getattr(config, "graceful_shutdown_timeout", 0.0) or 0.0)
            endpoint.start_drain(self.reactor.seconds() + timeout)
            log.info("reload: closing the HTTP/3 listener on {interface}:{port}", interface=key[0], port=key[1])
            if listener.parent is not None:
                listener.disownServiceParent()
        for key in sorted(wanted - set(self.by_key)):
            self._open(key, config)
        if h3 is not None:
            for endpoint in self:
                endpoint.apply(h3, max_clients=config.max_clients, stream_timeout=config.experimental.connection_handling_timeout)

    def _open(self, key: tuple[str, int], config: Config) -> None:
        interface, port = key
        h3 = config.experimental.h3
        assert h3 is not None
        endpoint = H3Endpoint(
            self.pipeline,
            self.holder,
            self.reactor,
            h3,
            max_clients=config.max_clients,
            stream_timeout=config.experimental.connection_handling_timeout,
        )
        endpoint.chooser.acme = self.acme
        # Under rpxy --workers N (parent.worker set) the workers share the port.
        reuse_port = getattr(self.parent, "worker", None) is not None
        listener = UDPListener(self.reactor, port, endpoint, interface=interface, reuse_port=reuse_port)
        if getattr(self.parent, "running", False):
            try:
                listener.setServiceParent(self.parent)
            except OSError as error:  # CannotListenError included: logged, retried by the next reload
                log.error("reload: cannot listen on {interface}:{port} (h3, udp): {error}", interface=interface, port=port, error=error)
                if listener.parent is not None:
                    listener.disownServiceParent()
                return
        else:
            listener.setServiceParent(self.parent)  # starts with the service: a port in use fails the start
        self.by_key[key] = (listener, endpoint)

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY at once; UDPListener.stopService then waits for the streams
        in flight, within the same graceful_shutdown_timeout as HTTP/1.1 and HTTP/2."""
        timeout = float(getattr(self.holder.current.config, "graceful_shutdown_timeout", 0.0) or 0.0)
        for endpoint in self:
            endpoint.start_drain(self.reactor.seconds() + timeout)


def add_h3_listeners(parent: Any, config: Config, pipeline: Pipeline, holder: StateHolder, reactor: Any) -> H3Listeners:
    """The HTTP/3 UDP listeners of ``parent``: open now when ``[experimental.h3]`` and a TLS port
    are set, and (with an ``on_reload`` hook list, as ``RpxyService`` has) following every reload."""
    listeners = H3Listeners(parent, pipeline, holder, reactor)
    listeners.apply(config)
    hooks = getattr(parent, "on_reload", None)
    if isinstance(hooks, list):
        hooks.append(lambda event: listeners.apply(event.new.config))
    drain_hooks = getattr(parent, "on_drain", None)
    if isinstance(drain_hooks, list):
        drain_hooks.append(listeners.drain)
    return listeners
