"""The HTTP/2 front end: the ``h2`` library's sans-IO connection driven by a Twisted connection.

A client connection becomes HTTP/2 in :mod:`rpxy.front.h1` when TLS negotiated ALPN ``h2``
or when a cleartext connection starts with the HTTP/2 preface (h2c with prior knowledge);
:class:`H2Session` then receives every byte of it. Each stream is one request for the
shared :class:`~rpxy.pipeline.Pipeline` (``RequestHead`` version ``b"2"``, the
pseudo-headers turned into method, path and authority) and its own
:class:`~rpxy.streams.ResponseSink` (:class:`_Stream`). Nothing here knows about routing
or header policy.

Flow control is end to end, with no whole-body buffering:

* request bodies: received DATA is acknowledged (WINDOW_UPDATE) only while the upstream
  takes it. The upstream transport pauses the stream's ``request_producer`` when it is full;
  acknowledgements then wait, so the client's stream window runs out. The connection
  window is large enough for every stream's window, so one stalled upstream never blocks
  the other streams.
* response bodies: DATA is sent as far as the client's windows allow; the rest is held
  on the stream (at most what the upstream delivered in one read) and the stream's
  upstream is paused until a WINDOW_UPDATE makes room. When the client stops reading
  altogether (the transport's buffer is full), every stream's upstream is paused and
  DATA waits, and past :data:`MAX_OUTPUT_WHILE_BLOCKED` of other output (response
  HEADERS, control answers) reading from the client stops too.

WebSocket over HTTP/2 (RFC 8441): SETTINGS_ENABLE_CONNECT_PROTOCOL is advertised; an
extended CONNECT with ``:protocol websocket`` reaches the pipeline as a GET whose
``RequestHead.protocol`` asks for the Upgrade (with a generated ``sec-websocket-key`` for
the HTTP/1.1 upstream). The upstream's 101 is answered ``:status 200`` and the stream
becomes a tunnel (:meth:`_Stream.start_tunnel`) with the same flow control as bodies.

Malformed requests (RFC 9113 section 8.1.1: uppercase or invalid field names,
connection-specific fields, CR/LF/NUL or surrounding whitespace in values, bad
pseudo-headers, a Content-Length the DATA does not match) are stream errors:
RST_STREAM(PROTOCOL_ERROR), nothing forwarded (the upstream never sees a complete
request). Requests that are well formed but refused by policy (Host vs ``:authority``,
too many fields, ...) get the same local answers as HTTP/1.1 (400, 431, ...).

Protections: the decoded header list is capped at 64 KiB (``SETTINGS_MAX_HEADER_LIST_SIZE``;
more is an HPACK bomb: GOAWAY(ENHANCE_YOUR_CALM)), a header block at
:data:`MAX_HEADER_BLOCK_FRAMES` frames / :data:`MAX_HEADER_BLOCK_BYTES` (CONTINUATION
flood: GOAWAY(ENHANCE_YOUR_CALM)); stream resets (the client's RST_STREAM on an
unfinished stream, and our stream errors) and control frames that make us answer (PING,
SETTINGS, unknown frames, empty DATA) are rate-limited by token buckets, past which the
connection ends with GOAWAY(ENHANCE_YOUR_CALM) (CVE-2023-44487 "rapid reset" and the
ping/settings floods); PING/SETTINGS answers queued while the client does not read are
capped (:data:`MAX_CONTROL_WHILE_BLOCKED`). Any other protocol error gets the GOAWAY
the RFC asks for (``h2`` chooses the code) and the connection is closed.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import (
    DenialOfServiceError,
    InvalidBodyLengthError,
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from h2.stream import StreamClosedBy, StreamInputs, StreamState
from hpack import Decoder
from hpack.exceptions import HPACKDecodingError, HPACKError, InvalidTableIndex, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable
from hyperframe.frame import ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rpxy.deadline import SEND_STALL_TIMEOUT, LazyDeadline
from rpxy.front.extended import prepare_stream_request
from rpxy.message import ConnectionInfo, Headers, HttpError, RequestHead
from rpxy.netio import write_now
from rpxy.pipeline import send_local_response
from rpxy.streams import StreamTunnelEnd, TunnelPauser

if TYPE_CHECKING:
    from rpxy.config.model import Config
    from rpxy.pipeline import Pipeline
    from rpxy.streams import Exchange, TunnelEnd

__all__ = [
    "H2Session",
    "IDLE_TIMEOUT",
    "MAX_HEADER_LIST_SIZE",
    "PREFACE",
    "parse_extended_request",
    "parse_request_headers",
    "check_trailers",
]

log = Logger()

#: What an HTTP/2 client sends first (RFC 9113 section 3.4); h2c prior knowledge starts with it.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: rpxy's idle timeout: a connection with no open stream for this long is closed (GOAWAY NO_ERROR).
IDLE_TIMEOUT = 20.0
#: SETTINGS_MAX_HEADER_LIST_SIZE: the decoded header list (RFC 7541 sizes), as HTTP/1.1's 64 KiB.
MAX_HEADER_LIST_SIZE = 64 * 1024
#: A header block (HEADERS + CONTINUATION) of more frames or more encoded bytes is a flood.
MAX_HEADER_BLOCK_FRAMES = 32
MAX_HEADER_BLOCK_BYTES = 128 * 1024
#: The stream window we advertise (the RFC's initial value): the most request body bytes
#: one stream can have in flight towards a stalled upstream.
STREAM_WINDOW = 65535
#: Stream resets (client RST_STREAM on unfinished streams, our stream errors, refused
#: streams): a burst of this many, then this many per second.
RESET_BURST = 200
RESET_RATE = 20.0
#: Frames that make us answer or are useless (PING, SETTINGS, unknown types, empty DATA).
CONTROL_BURST = 1000
CONTROL_RATE = 100.0
#: While the client is not reading: answers to PING/SETTINGS we queue before giving up.
MAX_CONTROL_WHILE_BLOCKED = 16 * 1024
#: While the client is not reading: other output we queue before we stop reading it too.
MAX_OUTPUT_WHILE_BLOCKED = 64 * 1024
#: ``H2Session.goaway_last`` before a graceful shutdown: above any stream id.
_NO_GOAWAY = 2**31
#: After our GOAWAY, how long the client gets to read it before the connection is aborted.
CLOSE_LINGER = 2.0

_PING_ACK_BYTES = 17
_SETTINGS_ACK_BYTES = 9

# RFC 9110 tokens; HTTP/2 field names must also be lower case (RFC 9113 section 8.2.1).
_TCHAR_LOWER = rb"!#$%&'*+\-.^_`|~0-9a-z"
_NAMES_RE = re.compile(rb"[" + _TCHAR_LOWER + rb"]+(?: [" + _TCHAR_LOWER + rb"]+)*")
_METHOD_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Origin-form: visible ASCII (and obs-text) only, so that the HTTP/1.1 request line we
# build upstream can never be split by a space or a control character.
_PATH_RE = re.compile(rb"/[\x21-\x7e\x80-\xff]*")
_OWS = b" \t"
# RFC 9113 section 8.2.2: connection-specific fields make a message malformed.
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
# Never sent to an HTTP/2 client (a local answer carries ``connection: close``).
_NOT_SENT = _CONNECTION_SPECIFIC | {b"te", b"trailer"}

_STATUS: dict[int, bytes] = {}


class Malformed(Exception):
    """A request or trailer header block that RFC 9113 makes malformed (a stream error)."""


def parse_request_headers(headers: Headers) -> tuple[bytes, bytes, bytes | None, Headers]:
    """``(method, path, authority, regular fields)`` of a request header block.

    As :func:`parse_extended_request`, but ``:protocol`` (extended CONNECT) is malformed.
    """
    method, path, authority, regular, protocol = parse_extended_request(headers)
    if protocol is not None:
        raise Malformed("unknown pseudo-header b':protocol'")
    return method, path, authority, regular


def parse_extended_request(headers: Headers) -> tuple[bytes, bytes, bytes | None, Headers, bytes | None]:
    """``(method, path, authority, regular fields, protocol)`` of a request header block.

    Raises :class:`Malformed` for anything RFC 9113 section 8 makes malformed: unknown,
    repeated, missing or misplaced pseudo-headers, an empty or non-origin-form
    ``:path`` (``*`` only for OPTIONS), a method that is not a token, field names that
    are not lower-case tokens, values with NUL/CR/LF or surrounding whitespace,
    connection-specific fields and ``te`` other than ``trailers``. CONNECT (which has
    no ``:path``) is returned with path ``b""`` for the caller to refuse. An extended
    CONNECT (RFC 8441: ``:protocol``, allowed only with CONNECT) needs ``:scheme`` and
    ``:path`` as any other request; ``protocol`` is None for every other request.
    """
    method = scheme = path = authority = protocol = None
    regular: Headers = []
    for item in headers:
        name = item[0]
        if name[:1] == b":":
            if regular:
                raise Malformed(f"pseudo-header {name!r} after a regular field")
            value = item[1]
            if name == b":method":
                if method is not None:
                    raise Malformed("repeated :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise Malformed("repeated :path")
                path = value
            elif name == b":scheme":
                if scheme is not None:
                    raise Malformed("repeated :scheme")
                scheme = value
            elif name == b":authority":
                if authority is not None:
                    raise Malformed("repeated :authority")
                authority = value
            elif name == b":protocol":
                if protocol is not None:
                    raise Malformed("repeated :protocol")
                protocol = value
            else:
                raise Malformed(f"unknown pseudo-header {name[:40]!r}")
        else:
            regular.append(item)
    if method is None:
        raise Malformed("no :method")
    if _METHOD_RE.fullmatch(method) is None:
        raise Malformed(f"invalid :method {method[:40]!r}")
    if protocol is not None and method != b"CONNECT":
        raise Malformed(":protocol without CONNECT")
    if method == b"CONNECT" and protocol is None:
        if scheme is not None or path is not None:
            raise Malformed("CONNECT with :scheme or :path")
        path = b""
    else:
        if scheme is None or path is None:
            raise Malformed("no :scheme or no :path")
        if _PATH_RE.fullmatch(path) is None and not (path == b"*" and method == b"OPTIONS"):
            raise Malformed(f"invalid :path {path[:100]!r}")
        if not scheme or b"\r" in scheme or b"\n" in scheme or b"\x00" in scheme:
            raise Malformed("invalid :scheme")
    if authority is not None and (b"\r" in authority or b"\n" in authority or b"\x00" in authority):
        raise Malformed("CR, LF or NUL in :authority")
    if protocol is not None and (not protocol or _METHOD_RE.fullmatch(protocol) is None):
        raise Malformed(f"invalid :protocol {protocol[:40]!r}")
    if regular:
        _check_fields(regular)
    return method, path, authority, regular, protocol


def check_trailers(headers: Headers) -> Headers:
    """The trailer fields of a request; :class:`Malformed` as for a header block (and no pseudo-headers)."""
    for item in headers:
        if item[0][:1] == b":":
            raise Malformed("pseudo-header in trailers")
    if headers:
        _check_fields(headers)
    return list(headers)


def _check_fields(fields: Headers) -> None:
    count = len(fields)
    names = [item[0] for item in fields]
    joined = b" ".join(names)
    if joined.count(b" ") != count - 1 or _NAMES_RE.fullmatch(joined) is None:
        bad = next((n for n in names if _NAMES_RE.fullmatch(n) is None or b" " in n), b"")
        raise Malformed(f"invalid field name {bad[:100]!r}")
    values = [item[1] for item in fields]
    joined = b"\n".join(values)
    if b"\r" in joined or b"\x00" in joined or joined.count(b"\n") != count - 1:
        raise Malformed("CR, LF or NUL in a field value")
    for value in values:
        if value and (value[0] in _OWS or value[-1] in _OWS):
            raise Malformed("field value with leading or trailing whitespace")
    if not _CONNECTION_SPECIFIC.isdisjoint(names):
        raise Malformed(f"connection-specific field {next(n for n in names if n in _CONNECTION_SPECIFIC)!r}")
    if b"te" in names:
        for name, value in fields:
            if name == b"te" and value.lower() != b"trailers":
                raise Malformed(f"te: {value[:40]!r}")


def _status(status: int) -> bytes:
    value = _STATUS.get(status)
    if value is None:
        value = _STATUS[status] = b"%d" % status
    return value


# -- HPACK for what we send ------------------------------------------------------------------

_STATIC_FULL: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_FULL.setdefault((_name, _value), _index)
    _STATIC_NAME.setdefault(_name, _index)
# Values worth keeping out of any compression context on the way (RFC 7541 section 7.1.3).
_NEVER_INDEXED = frozenset((b"set-cookie", b"authorization", b"proxy-authorization"))
_ENCODED_CACHE_SIZE = 4096


def _hpack_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _ResponseEncoder:
    """HPACK without the dynamic table for everything we send (as nginx encodes responses).

    Each field is an indexed static entry or a literal "without indexing" ("never
    indexed" for credentials), so its encoding does not depend on what was sent before
    and is cached: a response head costs a few dictionary lookups instead of h2's
    per-field table search. The first block (and the first after the client changes
    SETTINGS_HEADER_TABLE_SIZE) starts with a dynamic table size update to 0. Stands in
    for h2's ``H2Connection.encoder`` (``encode`` and ``header_table_size``).
    """

    def __init__(self) -> None:
        self.cache: dict[tuple[bytes, bytes], bytes] = {}
        self.huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
        self.size_update = True
        self._table_size = 4096

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._table_size = value
        self.size_update = True

    def encode(self, headers, huffman: bool = True) -> bytes:  # type: ignore[no-untyped-def]
        cache = self.cache
        parts = []
        if self.size_update:
            self.size_update = False
            parts.append(b"\x20")  # dynamic table size update: 0
        for field in headers:
            block = cache.get(field)
            if block is None:
                block = self._field(field[0], field[1])
                if len(cache) >= _ENCODED_CACHE_SIZE:
                    cache.clear()
                cache[(field[0], field[1])] = block
            parts.append(block)
        return b"".join(parts)

    def _field(self, name: bytes, value: bytes) -> bytes:
        index = _STATIC_FULL.get((name, value))
        if index is not None:
            return _hpack_integer(index, 7, 0x80)
        flags = 0x10 if name in _NEVER_INDEXED else 0x00
        index = _STATIC_NAME.get(name)
        if index is not None:
            return _hpack_integer(index, 4, flags) + self._string(value)
        return bytes((flags,)) + self._string(name) + self._string(value)

    def _string(self, data: bytes) -> bytes:
        coded = self.huffman.encode(data)
        if len(coded) < len(data):
            return _hpack_integer(len(coded), 7, 0x80) + coded
        return _hpack_integer(len(data), 7, 0x00) + data


class _RequestDecoder(Decoder):
    """hpack's decoder with the indexed representation decoded inline.

    Once a client's dynamic table is warm, most fields of most requests are one-byte
    table references; hpack spends a method call, a memoryview slice, an integer decoder
    and a tuple copy on each. Here they are a table lookup; every other representation
    (literals, table size updates, multi-byte indexes) goes to hpack's own code, and the
    header list size cap (the HPACK bomb guard) is applied to every field as before.
    Fields come back as plain ``(name, value)`` byte tuples.
    """

    def decode(self, data: bytes, raw: bool = False):  # type: ignore[no-untyped-def,override]
        if not raw:
            return super().decode(data, raw)
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        static = HeaderTable.STATIC_TABLE
        static_length = HeaderTable.STATIC_TABLE_LENGTH
        dynamic = self.header_table.dynamic_entries
        limit = self.max_header_list_size
        inflated = 0
        position = 0
        end = len(data)
        view = memoryview(data)
        while position < end:
            first = data[position]
            if first & 0x80 and first != 0xFF:
                index = (first & 0x7F) - 1
                if index < 0:
                    raise InvalidTableIndex("Invalid table index 0")
                if index < static_length:
                    header = static[index]
                else:
                    index -= static_length
                    if index >= len(dynamic):
                        raise InvalidTableIndex(f"Invalid table index {first & 0x7F}")
                    header = dynamic[index]
                consumed = 1
            elif first & 0x80:
                header, consumed = self._decode_indexed(view[position:])
            elif first & 0x40:
                header, consumed = self._decode_literal_index(view[position:])
            elif first & 0x20:
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                consumed = self._update_encoding_context(view[position:])
                position += consumed
                continue
            else:
                header, consumed = self._decode_literal_no_index(view[position:])
            append(header)
            inflated += 32 + len(header[0]) + len(header[1])
            if inflated > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
            position += consumed
        self._assert_valid_table_size()
        return headers


# -- the h2 connection, with stream-scoped errors kept stream-scoped --------------------


class StreamMalformed:
    """Event: a stream was reset with PROTOCOL_ERROR because its request was malformed."""

    __slots__ = ("stream_id", "reason")

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class StreamRefused:
    """Event: a stream over SETTINGS_MAX_CONCURRENT_STREAMS was refused (REFUSED_STREAM)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _HeaderBlockBuffer(FrameBuffer):
    """h2's frame buffer with a tighter cap on one header block (CONTINUATION flood)."""

    def _update_header_buffer(self, f):  # type: ignore[no-untyped-def]
        if self._headers_buffer and isinstance(f, ContinuationFrame):
            block = self._headers_buffer
            if len(block) >= MAX_HEADER_BLOCK_FRAMES or sum(len(x.data) for x in block) + len(f.data) > MAX_HEADER_BLOCK_BYTES:
                raise DenialOfServiceError("header block too large (CONTINUATION flood)")
        return super()._update_header_buffer(f)


# A frame header (RFC 9113 section 4.1): 24-bit length, type, flags, 31-bit stream id.
_FRAME_HEAD = struct.Struct(">BHBBL")
_DATA, _HEADERS = 0x0, 0x1
_END_STREAM, _END_HEADERS = 0x1, 0x4
_SENDING_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class _ServerConnection(H2Connection):
    """``h2``'s connection, except for two rules it makes connection errors.

    * A malformed request (RFC 9113 section 8.1.1: a Content-Length the DATA does not
      match, an invalid Content-Length, trailers without END_STREAM) is a *stream* error:
      the stream is reset with PROTOCOL_ERROR and a :class:`StreamMalformed` event
      reported; the connection and its other streams go on.
    * A new stream over our SETTINGS_MAX_CONCURRENT_STREAMS (a client may open some
      before it has read our SETTINGS) is refused with RST_STREAM(REFUSED_STREAM), which
      the client may retry, after its header block was decoded to keep HPACK in step.

    These hook ``_receive_frame``, private to h2 4.x (pinned ``h2>=4.1,<5``); the unit
    tests pin the behaviour.
    """

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _HeaderBlockBuffer(server=True)

    def _receive_frame(self, frame):  # type: ignore[no-untyped-def]
        # h2 4.x's own _receive_frame (minus its eager repr() of every frame for a trace
        # log), then the two rules above.
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as error:
            if not self._stream_is_closed_by_reset(error.stream_id):
                raise
            reset = RstStreamFrame(error.stream_id)
            reset.error_code = error.error_code
            self._prepare_for_sending([reset])
            return error._events
        except StreamIDTooLowError as error:
            if self._stream_is_closed_by_reset(error.stream_id):
                reset = RstStreamFrame(error.stream_id)
                reset.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                return []
            if self._stream_is_closed_by_end(error.stream_id):
                raise StreamClosedError(error.stream_id) from error
            raise
        except TooManyStreamsError:
            return self._refuse(frame)
        except ProtocolError as error:
            if not self._stream_scoped(frame, error):
                raise
            stream_id = frame.stream_id
            self.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            if isinstance(frame, DataFrame) and frame.flow_controlled_length:
                # Counted against the connection window before the error: hand it back.
                self.acknowledge_received_data(frame.flow_controlled_length, stream_id)
            return [StreamMalformed(stream_id, str(error))]
        self._prepare_for_sending(frames)
        return events

    # -- the common sends, without h2's generic per-call machinery -----------------------
    #
    # h2 builds hyperframe objects, re-encodes header names, logs and re-checks the
    # connection state on every send; for a response that is most of the HTTP/2 cost per
    # request. These two cover the common case (a final response head that fits one
    # HEADERS frame, DATA within the windows and the frame size) with the same stream
    # state transitions and window accounting h2 makes, and return False for anything
    # else, which then takes h2's own path (CONTINUATION, splitting, 1xx, closed streams).

    def send_response(self, stream_id: int, fields: Headers, data: bytes, end_stream: bool) -> bool:
        """HEADERS of a final response, then ``data`` (if any) as one DATA frame."""
        if self.state_machine.state is not ConnectionState.SERVER_OPEN:
            return False
        stream = self.streams.get(stream_id)
        if stream is None:
            return False
        machine = stream.state_machine
        if machine.state not in _SENDING_STATES or machine.headers_sent or fields[0][1][:1] == b"1":
            return False
        size = len(data)
        limit = self.max_outbound_frame_size
        if size > limit or size > stream.outbound_flow_control_window or size > self.outbound_flow_control_window:
            return False
        encoder = self.encoder
        size_update = encoder.size_update  # type: ignore[attr-defined]
        block = encoder.encode(fields)
        if len(block) > limit:
            encoder.size_update = size_update  # type: ignore[attr-defined]
            return False
        machine.process_input(StreamInputs.SEND_HEADERS)
        length = len(block)
        if not size:
            flags = _END_HEADERS | _END_STREAM if end_stream else _END_HEADERS
            if end_stream:
                machine.process_input(StreamInputs.SEND_END_STREAM)
            self._data_to_send += _FRAME_HEAD.pack(length >> 16, length & 0xFFFF, _HEADERS, flags, stream_id) + block
            return True
        machine.process_input(StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += b"".join(
            (
                _FRAME_HEAD.pack(length >> 16, length & 0xFFFF, _HEADERS, _END_HEADERS, stream_id),
                block,
                _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, _DATA, _END_STREAM if end_stream else 0, stream_id),
                data,
            )
        )
        return True

    def send_body(self, stream_id: int, data: bytes, end_stream: bool) -> bool:
        """One DATA frame (non-empty, within the windows and the frame size)."""
        if self.state_machine.state is not ConnectionState.SERVER_OPEN:
            return False
        stream = self.streams.get(stream_id)
        if stream is None:
            return False
        machine = stream.state_machine
        size = len(data)
        if (
            machine.state not in _SENDING_STATES
            or not size
            or size > self.max_outbound_frame_size
            or size > stream.outbound_flow_control_window
            or size > self.outbound_flow_control_window
        ):
            return False
        machine.process_input(StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, _DATA, _END_STREAM if end_stream else 0, stream_id)
        self._data_to_send += data
        return True

    def _receive_goaway_frame(self, frame: GoAwayFrame):  # type: ignore[no-untyped-def]
        # A client's GOAWAY(NO_ERROR) only says it opens no more streams (RFC 9113 §6.8):
        # the streams it already opened still get their answers. h2 would close the
        # connection state machine (and drop queued output), so a graceful one is reported
        # without touching the state; the session closes once the last stream is done.
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def _stream_scoped(self, frame, error: ProtocolError) -> bool:  # type: ignore[no-untyped-def]
        if type(error) not in (ProtocolError, InvalidBodyLengthError):
            return False  # subclasses: flow control, frame size, too many streams, DoS...
        if not isinstance(frame, (HeadersFrame, DataFrame)):
            return False
        if self.state_machine.state is ConnectionState.CLOSED:
            return False  # the connection state machine refused the frame
        cause = error.__cause__
        if cause is not None and not isinstance(cause, ValueError):
            return False  # HPACK decoding failed: the compression context is lost
        stream = self.streams.get(frame.stream_id)
        # The stream's own state machine refusing the frame closes it: a connection error.
        return stream is not None and not stream.closed

    def _refuse(self, frame):  # type: ignore[no-untyped-def]
        stream_id = frame.stream_id
        if not isinstance(frame, HeadersFrame) or stream_id % 2 == 0 or stream_id <= self.highest_inbound_stream_id:
            raise TooManyStreamsError(f"stream {stream_id} over the concurrent stream limit")
        try:
            self.decoder.decode(frame.data, raw=True)
        except OversizedHeaderListError as error:
            raise DenialOfServiceError(f"Oversized header block: {error}") from error
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as error:
            raise ProtocolError(f"Error decoding header block: {error}") from error
        self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        self.highest_inbound_stream_id = stream_id
        reset = RstStreamFrame(stream_id)
        reset.error_code = ErrorCodes.REFUSED_STREAM
        self._prepare_for_sending([reset])
        self._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM
        return [StreamRefused(stream_id)]


# -- one stream: the pipeline's sink ---------------------------------------------------


@implementer(IPushProducer)
class _Stream:
    """One request/response; the pipeline's ResponseSink and the request body's producer."""

    __slots__ = (
        "session",
        "stream_id",
        "head",
        "exchange",
        "body_expected",
        "content_length",
        "received",
        "request_done",
        "trailers",
        "request_paused",
        "unacked",
        "response_started",
        "closed",
        "pending",
        "end_pending",
        "end_trailers",
        "head_fields",
        "tail",
        "producer",
        "producer_paused",
        "websocket",
        "tunnel",
        "early",
    )

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.head: RequestHead | None = None
        self.exchange: Exchange | None = None
        self.body_expected = False
        self.content_length: int | None = None
        self.received = 0
        self.request_done = False
        self.trailers: Headers | None = None
        self.request_paused = False
        self.unacked = 0
        self.response_started = False
        self.closed = False
        # Response DATA the client's windows (or its not reading) hold back.
        self.pending: deque[bytes] | None = None
        self.end_pending = False
        self.end_trailers: Headers | None = None
        # A response head and the latest DATA chunk not handed to h2 yet.
        self.head_fields: Headers | None = None
        self.tail: bytes | None = None
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        # An extended CONNECT for a WebSocket (RFC 8441): the upstream's end of the tunnel
        # once it switched protocols, and the DATA that came before (not acknowledged yet).
        self.websocket = False
        self.tunnel: TunnelEnd | None = None
        self.early: list[bytes] | None = None

    @property
    def request_producer(self) -> _Stream:
        return self

    # IPushProducer: the upstream's transport pauses this stream's request body.
    def pauseProducing(self) -> None:
        self.request_paused = True

    def resumeProducing(self) -> None:
        self.request_paused = False
        if self.unacked and not self.closed:
            unacked, self.unacked = self.unacked, 0
            session = self.session
            session.acknowledge(unacked, self.stream_id)
            session.write_soon()

    def stopProducing(self) -> None:
        # The upstream connection went away; the exchange reports that itself.
        self.resumeProducing()

    # ResponseSink
    def send_head(self, status: int, headers: Headers) -> None:
        if self.closed:
            return
        self.response_started = True
        if status == 101 and self.websocket:
            # RFC 8441 section 5: the tunnel opens with a 2xx, and there is no accept key.
            status = 200
            headers = [item for item in headers if item[0] != b"sec-websocket-accept"]
        fields = [(b":status", _status(status))]
        fields.extend([item for item in headers if item[0] not in _NOT_SENT])
        # Held until the body, the end or flush(): a response without a body is then one
        # HEADERS frame carrying END_STREAM.
        self.head_fields = fields

    def send_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        pending = self.pending
        if pending is not None:
            pending.append(data)
            return
        tail = self.tail
        if tail is not None:
            self.tail = None
            self._send(tail)
            if self.closed:
                return
            if self.pending is not None:
                self.pending.append(data)
                return
        # The latest chunk waits for the next call (flush() after each upstream read), so
        # that END_STREAM can ride on its last DATA frame.
        self.tail = data

    def flush(self) -> None:
        if self.closed:
            return
        tail = self.tail
        if tail is not None:
            self.tail = None
            self._send(tail)
        elif self.head_fields is not None:
            try:
                self._send_head()
            except StreamClosedError:
                self.session.gone(self)
                return
        self.session.write_soon()

    def send_end(self, trailers: Headers | None = None) -> None:
        if self.closed:
            return
        if self.pending is None:
            tail = self.tail
            if tail is None:
                self._end(trailers)
                return
            self.tail = None
            if trailers:
                if self._send(tail):
                    self._end(trailers)
                    return
            elif self._send(tail, end=True):
                self.session.stream_done(self)
                return
            if self.closed:
                return
        self.end_pending = True
        self.end_trailers = trailers
        # What the windows let through must leave now: no flush() follows an upstream's end,
        # and the client sends no WINDOW_UPDATE for bytes it never received.
        self.session.write_soon()

    def abort(self) -> None:
        if not self.closed:
            self.session.reset(self, ErrorCodes.INTERNAL_ERROR)

    def register_producer(self, producer: IPushProducer) -> None:
        self.producer = producer
        if self.pending is not None or self.session.write_blocked:
            self._pause_producer()

    def unregister_producer(self) -> None:
        producer = self.producer
        if producer is not None:
            self.producer = None
            if self.producer_paused:
                # Leave it as we found it: a finished upstream connection goes back to
                # its pool and must read again.
                self.producer_paused = False
                producer.resumeProducing()

    def start_tunnel(self, upstream: TunnelEnd) -> TunnelEnd:
        """The upstream switched to WebSocket: this stream's DATA becomes the raw bytes both ways."""
        if not self.websocket:
            raise RuntimeError("protocol switches are relayed over HTTP/2 only for an extended CONNECT")
        end = StreamTunnelEnd(self)
        if self.closed:
            upstream.close()
            return end
        self.tunnel = upstream
        # Upstream bytes wait while the client's windows are full (or it does not read).
        self.producer = TunnelPauser(upstream)
        if self.session.write_blocked:
            self._pause_producer()
        # Client DATA is acknowledged only while the upstream's transport takes it.
        upstream.register_producer(self)
        self.flush()  # the 200 HEADERS, without END_STREAM
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
        elif not self.request_paused:
            self.resumeProducing()  # acknowledge what was held while we waited
        return end

    # -- internals ---------------------------------------------------------------------

    def _send_head(self) -> None:
        fields = self.head_fields
        if fields is not None:
            self.head_fields = None
            h2 = self.session.h2
            if not h2.send_response(self.stream_id, fields, b"", False):
                h2.send_headers(self.stream_id, fields)

    def _send(self, data: bytes, end: bool = False) -> bool:
        """Hand ``data`` (and END_STREAM) to h2 as far as the windows allow; True if all went."""
        session = self.session
        head = self.head_fields
        if head is not None and not session.write_blocked and session.h2.send_response(self.stream_id, head, data, end):
            self.head_fields = None
            return True
        try:
            self._send_head()
            if session.write_blocked:
                self._hold(data)
                return False
            rest = session.send_data(self.stream_id, data, end)
        except StreamClosedError:
            session.gone(self)
            return False
        if rest:
            self._hold(rest)
            return False
        return True

    def _hold(self, data: bytes) -> None:
        self.pending = deque((data,))
        self.session.blocked[self.stream_id] = self
        self._pause_producer()

    def _pause_producer(self) -> None:
        producer = self.producer
        if producer is not None and not self.producer_paused:
            self.producer_paused = True
            producer.pauseProducing()

    def _resume_producer(self) -> None:
        producer = self.producer
        if producer is not None and self.producer_paused:
            self.producer_paused = False
            producer.resumeProducing()

    def drain(self) -> bool:
        """Send held DATA as the windows allow; True when nothing is held any more."""
        pending = self.pending
        session = self.session
        while pending:
            try:
                rest = session.send_data(self.stream_id, pending[0])
            except StreamClosedError:
                session.gone(self)
                return True
            if rest:
                pending[0] = rest
                return False
            pending.popleft()
        self.pending = None
        if self.end_pending:
            self.end_pending = False
            self._end(self.end_trailers)
        else:
            self._resume_producer()
        return True

    def _end(self, trailers: Headers | None) -> None:
        h2 = self.session.h2
        fields = None
        if trailers:
            fields = [item for item in trailers if item[0] not in _NOT_SENT and item[0][:1] != b":"]
        try:
            head = self.head_fields
            if head is not None:
                self.head_fields = None
                if not h2.send_response(self.stream_id, head, b"", not fields):
                    h2.send_headers(self.stream_id, head, end_stream=not fields)
                if fields:
                    h2.send_headers(self.stream_id, fields, end_stream=True)
            elif fields:
                h2.send_headers(self.stream_id, fields, end_stream=True)
            else:
                h2.end_stream(self.stream_id)
        except StreamClosedError:
            self.session.gone(self)
            return
        self.session.stream_done(self)


# -- the connection ----------------------------------------------------------------------


class _Bucket:
    """A token bucket: ``take()`` is False once more than ``burst`` + ``rate``/s were taken."""

    __slots__ = ("burst", "rate", "tokens", "stamp")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        tokens -= 1.0
        self.tokens = tokens
        return tokens >= 0.0


@implementer(IPushProducer)
class H2Session:
    """One HTTP/2 client connection; also the producer the client's transport pauses.

    Built by :class:`rpxy.front.h1.H1Connection` (which keeps counting the connection for
    ``max_clients`` and enforcing ``connection_handling_timeout``) and fed every byte it
    receives; ``transport`` is the client's (TCP or TLS) transport.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        reactor: IReactorTime,
        conn: ConnectionInfo,
        transport,
        config: Config,
    ) -> None:
        self.pipeline = pipeline
        self.reactor = reactor
        self.conn = conn
        self.transport = transport
        self.streams: dict[int, _Stream] = {}
        #: Streams holding response DATA, in the order they blocked.
        self.blocked: dict[int, _Stream] = {}
        self.write_blocked = False  # the transport asked us to pause: the client is not reading
        self.read_paused = False
        self.blocked_output = 0
        self.blocked_control = 0
        self.in_receive = False
        self.closing = False
        #: the client sent GOAWAY(NO_ERROR): finish its open streams, then close
        self.peer_done = False
        #: After our graceful-shutdown GOAWAY (drain()): the last stream we answer.
        self.goaway_last = _NO_GOAWAY
        self.deadline = LazyDeadline(self.reactor, self._deadline_passed)
        self.send_stall: LazyDeadline | None = None
        self.close_call = None
        # On plain TCP, output is written once per reactor iteration: responses relayed in
        # one iteration share a send. (Twisted's TLS transport already batches its writes.)
        self.batch_writes = isinstance(transport, tcp.Connection)
        self.write_call = None
        now = reactor.seconds()
        self.resets = _Bucket(RESET_BURST, RESET_RATE, now)
        self.control = _Bucket(CONTROL_BURST, CONTROL_RATE, now)
        max_streams = config.max_concurrent_streams
        h2 = _ServerConnection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,  # parse_request_headers: stream errors, not GOAWAY
                normalize_inbound_headers=False,  # cookies are merged by the header policy
                validate_outbound_headers=False,  # the response policy already removed what h2 forbids
                normalize_outbound_headers=False,
            )
        )
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # WebSocket over HTTP/2 (RFC 8441)
            },
        )
        h2.decoder = _RequestDecoder()
        h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        h2.encoder = _ResponseEncoder()  # type: ignore[assignment]
        self.h2 = h2
        self._handlers = {
            RequestReceived: self._on_request,
            DataReceived: self._on_data,
            StreamEnded: self._on_stream_ended,
            TrailersReceived: self._on_trailers,
            StreamReset: self._on_reset,
            WindowUpdated: self._on_window,
            RemoteSettingsChanged: self._on_settings,
            PingReceived: self._on_ping,
            ConnectionTerminated: self._on_goaway,
            UnknownFrameReceived: self._on_unknown,
            StreamMalformed: self._on_malformed,
            StreamRefused: self._on_refused,
        }
        # Room for every stream's window, so that a stalled stream never blocks the others.
        self.connection_window = min((max_streams + 1) * STREAM_WINDOW, 2**31 - 1)

    # -- connection lifecycle -------------------------------------------------------------

    def start(self, data: bytes) -> None:
        """Send our preface (SETTINGS, the connection window) and process the first bytes."""
        h2 = self.h2
        h2.initiate_connection()
        increment = self.connection_window - STREAM_WINDOW
        if increment > 0:
            h2.increment_flow_control_window(increment)
        self.transport.registerProducer(self, True)
        self.deadline.set_after(IDLE_TIMEOUT)
        if data:
            self.dataReceived(data)
        else:
            self._write()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.in_receive = True
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as error:
            # h2 has queued the GOAWAY the RFC asks for (its error code: PROTOCOL_ERROR,
            # ENHANCE_YOUR_CALM for an HPACK bomb, FLOW_CONTROL_ERROR, ...).
            self.in_receive = False
            log.info("HTTP/2 connection error from {peer}: {error}", peer=self.conn.peer_ip, error=str(error))
            self._close(None)
            return
        handlers = self._handlers
        try:
            for event in events:
                if self.closing:
                    break
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(event)
        except Exception:
            self.in_receive = False
            log.failure("HTTP/2 request handling failed")
            self._close(ErrorCodes.INTERNAL_ERROR)
            return
        self.in_receive = False
        self.write_soon()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closing = True
        self.deadline.cancel()
        if self.send_stall is not None:
            self.send_stall.cancel()
        for call in (self.close_call, self.write_call):
            if call is not None and call.active():
                call.cancel()
        self.close_call = self.write_call = None
        self._drop_streams()

    # IPushProducer: the client's transport tells us when it cannot take more.
    def pauseProducing(self) -> None:
        if self.write_blocked:
            return
        self.write_blocked = True
        self.blocked_output = 0
        self.blocked_control = 0
        # A client that takes nothing for SEND_STALL_TIMEOUT in a row is cut (slow read).
        stall = self.send_stall
        if stall is None:
            stall = self.send_stall = LazyDeadline(self.reactor, self._send_stalled)
        stall.set_after(SEND_STALL_TIMEOUT)
        for stream in self.streams.values():
            stream._pause_producer()

    def resumeProducing(self) -> None:
        if not self.write_blocked or self.closing:
            return
        self.write_blocked = False
        if self.send_stall is not None:
            self.send_stall.clear()
        if self.read_paused:
            self.read_paused = False
            self.transport.resumeProducing()
        self._drain_blocked()
        for stream in list(self.streams.values()):
            if stream.pending is None:
                stream._resume_producer()
        self._write()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    # -- events ---------------------------------------------------------------------------

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if stream_id > self.goaway_last:
            # Opened before the client read our shutdown GOAWAY: it may retry it elsewhere.
            self._reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            method, path, authority, fields, protocol = parse_extended_request(event.headers)
        except Malformed as error:
            self._malformed(stream_id, str(error))
            return
        stream = _Stream(self, stream_id)
        body_expected = event.stream_ended is None
        websocket = protocol is not None and protocol.lower() == b"websocket"
        if websocket:
            # A WebSocket (RFC 8441): for the pipeline, an HTTP/1.1-style GET Upgrade.
            head = RequestHead(b"GET", path, b"2", fields, authority, protocol=b"websocket")
            stream.websocket = True
        else:
            head = RequestHead(method, path, b"2", fields, authority)
        stream.head = head
        stream.body_expected = body_expected and not websocket
        stream.request_done = not body_expected
        self.streams[stream_id] = stream
        self.deadline.clear()
        try:
            content_length, body_expected, expect_continue = prepare_stream_request(
                head, method, protocol, body_expected=body_expected, end_flag="END_STREAM"
            )
        except HttpError as error:
            log.debug("bad request from {peer}: {why}", peer=self.conn.peer_ip, why=error.reason)
            send_local_response(stream, error.status)
            self.pipeline.access_log.record(self.conn, head, "", error.status, upstream="")
            return
        if content_length and not body_expected:
            self._stream_error(stream, "content-length without DATA")
            return
        stream.content_length = content_length
        try:
            stream.exchange = self.pipeline.handle(
                self.conn, head, stream, content_length=content_length, body_expected=body_expected
            )
        except Exception:
            # A bug must cost this request (500), not the connection's other streams.
            log.failure("HTTP/2 request handling failed")
            if stream.closed:
                return
            if stream.response_started:
                stream.abort()
            else:
                send_local_response(stream, 500)
            return
        if expect_continue and not stream.closed and not stream.response_started:
            self.h2.send_headers(stream_id, [(b":status", b"100")])

    def _on_data(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        flow = event.flow_controlled_length
        stream = self.streams.get(stream_id)
        if stream is None or stream.request_done:
            if flow:
                self.acknowledge(flow, stream_id)
            return
        if stream.websocket:
            self._on_tunnel_data(stream, event)
            return
        data = event.data
        if data:
            stream.received += len(data)
            limit = stream.content_length
            if limit is not None and stream.received > limit:
                self._stream_error(stream, "DATA beyond content-length")
                if flow:
                    self.acknowledge(flow, stream_id)
                return
            exchange = stream.exchange
            if exchange is not None:
                exchange.request_data(data)
        elif not event.stream_ended and not self.control.take(self.reactor.seconds()):
            self._calm("empty DATA frames")
            return
        if flow:
            if stream.request_paused and not stream.closed:
                stream.unacked += flow
            else:
                self.acknowledge(flow, stream_id)

    def _on_tunnel_data(self, stream: _Stream, event: DataReceived) -> None:
        """DATA on a WebSocket stream: raw bytes for the upstream, acknowledged as it takes them."""
        data = event.data
        hold = False
        if data:
            tunnel = stream.tunnel
            if tunnel is not None:
                tunnel.write(data)
                hold = stream.request_paused
            elif not stream.response_started:
                # Sent before the upstream switched protocols: held (and not acknowledged).
                if stream.early is None:
                    stream.early = []
                stream.early.append(data)
                hold = True
        elif not event.stream_ended and not self.control.take(self.reactor.seconds()):
            self._calm("empty DATA frames")
            return
        flow = event.flow_controlled_length
        if flow:
            if hold and not stream.closed:
                stream.unacked += flow
            else:
                self.acknowledge(flow, stream.stream_id)

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        try:
            stream.trailers = check_trailers(event.headers)
        except Malformed as error:
            self._stream_error(stream, str(error))

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.request_done:
            return
        stream.request_done = True
        if stream.websocket:
            if stream.tunnel is not None:
                # The client closed its side of the tunnel: close the upstream, end ours.
                stream.tunnel = None
                if stream.exchange is not None:
                    stream.exchange.client_gone()
                stream.send_end(None)
            return
        if stream.content_length is not None and stream.received != stream.content_length:
            self._stream_error(stream, "content-length does not match the DATA")
            return
        exchange = stream.exchange
        if stream.body_expected and exchange is not None:
            exchange.request_end(stream.trailers)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        self._forget(stream)
        exchange = stream.exchange
        if exchange is not None:
            exchange.client_gone()
        if not self.resets.take(self.reactor.seconds()):
            self._calm("too many stream resets (rapid reset)")
            return
        self._maybe_idle()

    def _on_window(self, event: WindowUpdated) -> None:
        if self.blocked and not self.write_blocked:
            self._drain_blocked()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        if self._control_answer(_SETTINGS_ACK_BYTES, "SETTINGS flood"):
            # A larger SETTINGS_INITIAL_WINDOW_SIZE opens every stream's window.
            if self.blocked and not self.write_blocked:
                self._drain_blocked()

    def _on_ping(self, event: PingReceived) -> None:
        self._control_answer(_PING_ACK_BYTES, "PING flood")

    def _on_unknown(self, event: UnknownFrameReceived) -> None:
        if not self.control.take(self.reactor.seconds()):
            self._calm("flood of unknown frames")

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        if event.error_code == ErrorCodes.NO_ERROR:
            self.peer_done = True
            if self.streams:
                return  # answered first; _maybe_idle closes after the last one
            self._close(ErrorCodes.NO_ERROR)
            return
        # An error: h2 can no longer send on this connection, what is in flight ends here.
        log.info("HTTP/2 client {peer} sent GOAWAY({code})", peer=self.conn.peer_ip, code=str(event.error_code))
        self._close(None)

    def _on_malformed(self, event: StreamMalformed) -> None:
        log.debug("malformed HTTP/2 request from {peer}: {why}", peer=self.conn.peer_ip, why=event.reason)
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            self._forget(stream)
            if stream.exchange is not None:
                stream.exchange.client_gone()
        if not self.resets.take(self.reactor.seconds()):
            self._calm("too many malformed streams")
            return
        self._maybe_idle()

    def _on_refused(self, event: StreamRefused) -> None:
        if not self.resets.take(self.reactor.seconds()):
            self._calm("too many streams over the concurrency limit")

    # -- helpers for streams ------------------------------------------------------------------

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bytes:
        """Send as much of ``data`` as the windows allow; return the rest.

        With ``end_stream``, the last frame carries END_STREAM if all of ``data`` went.
        """
        h2 = self.h2
        if h2.send_body(stream_id, data, end_stream):
            return b""
        window = h2.local_flow_control_window(stream_id)
        size = len(data)
        frame = h2.max_outbound_frame_size
        if size <= window and size <= frame:
            h2.send_data(stream_id, data, end_stream=end_stream)
            return b""
        limit = min(size, window)
        offset = 0
        while offset < limit:
            end = min(offset + frame, limit)
            h2.send_data(stream_id, data[offset:end], end_stream=end_stream and end == size)
            offset = end
        return data[offset:]

    def acknowledge(self, size: int, stream_id: int) -> None:
        if not self.closing:
            self.h2.acknowledge_received_data(size, stream_id)

    def write_soon(self) -> None:
        if self.in_receive or self.closing:
            return
        if not self.batch_writes:
            self._write()
        elif self.write_call is None:
            self.write_call = self.reactor.callLater(0, self._write_later)

    def _write_later(self) -> None:
        self.write_call = None
        if not self.closing:
            self._write()

    def stream_done(self, stream: _Stream) -> None:
        """The response ended (END_STREAM sent)."""
        stream.closed = True
        stream_id = stream.stream_id
        self.streams.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if not stream.request_done:
            # A complete response while the client still sends: ask it to stop (RFC 9113 8.1).
            stream.request_done = True
            self._reset_stream(stream_id, ErrorCodes.NO_ERROR)
        self._release_window(stream)
        self._maybe_idle()
        self.write_soon()

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        """Reset ``stream`` from our side (the pipeline aborted it)."""
        stream.closed = True
        self.streams.pop(stream.stream_id, None)
        self._forget(stream)
        self._reset_stream(stream.stream_id, code)
        self._maybe_idle()
        self.write_soon()

    def gone(self, stream: _Stream) -> None:
        """h2 says the stream is closed already (a reset not yet seen as an event)."""
        self.streams.pop(stream.stream_id, None)
        self._forget(stream)
        self._maybe_idle()

    # -- internals ---------------------------------------------------------------------------

    def _forget(self, stream: _Stream) -> None:
        """Drop what a closed stream holds; its unacknowledged bytes go back to the connection window."""
        stream.closed = True
        self.blocked.pop(stream.stream_id, None)
        stream.pending = None
        stream.tail = stream.head_fields = None
        stream.producer = None
        stream.early = None
        self._release_window(stream)

    def _release_window(self, stream: _Stream) -> None:
        if stream.unacked:
            unacked, stream.unacked = stream.unacked, 0
            self.acknowledge(unacked, stream.stream_id)

    def _malformed(self, stream_id: int, reason: str) -> None:
        log.debug("malformed HTTP/2 request from {peer}: {why}", peer=self.conn.peer_ip, why=reason)
        self._reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
        if not self.resets.take(self.reactor.seconds()):
            self._calm("too many malformed streams")

    def _stream_error(self, stream: _Stream, reason: str) -> None:
        """A malformed request found after its stream started: reset it, abort its exchange."""
        self.streams.pop(stream.stream_id, None)
        self._forget(stream)
        exchange = stream.exchange
        if exchange is not None:
            exchange.client_gone()
        self._malformed(stream.stream_id, reason)
        self._maybe_idle()

    def _reset_stream(self, stream_id: int, code: ErrorCodes) -> None:
        if self.closing:
            return
        stream = self.h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self.h2.reset_stream(stream_id, code)

    def _drain_blocked(self) -> None:
        h2 = self.h2
        for stream_id, stream in list(self.blocked.items()):
            if stream.closed:
                self.blocked.pop(stream_id, None)
                continue
            if stream.drain():
                self.blocked.pop(stream_id, None)
            if h2.outbound_flow_control_window <= 0 or self.closing:
                break

    def _control_answer(self, size: int, what: str) -> bool:
        """Account for a PING/SETTINGS answer; False (and the connection ending) on a flood."""
        if not self.control.take(self.reactor.seconds()):
            self._calm(what)
            return False
        if self.write_blocked:
            self.blocked_control += size
            if self.blocked_control > MAX_CONTROL_WHILE_BLOCKED:
                self._calm(what + " while not reading", abort=True)
                return False
        return True

    def _calm(self, why: str, *, abort: bool = False) -> None:
        log.info("HTTP/2 client {peer}: {why}; GOAWAY(ENHANCE_YOUR_CALM)", peer=self.conn.peer_ip, why=why)
        self._close(ErrorCodes.ENHANCE_YOUR_CALM, abort=abort)

    def _maybe_idle(self) -> None:
        if not self.streams and not self.closing:
            if self.peer_done:
                self._close(ErrorCodes.NO_ERROR)
            else:
                self.deadline.set_after(IDLE_TIMEOUT)

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if not data:
            return
        if self.write_blocked:
            self.blocked_output += len(data)
            if self.blocked_output > MAX_OUTPUT_WHILE_BLOCKED and not self.read_paused and not self.closing:
                # The client reads nothing: stop reading what it sends until it does.
                self.read_paused = True
                self.transport.pauseProducing()
        write_now(self.transport, data)

    def _drop_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for stream in streams:
            stream.closed = True
            stream.pending = None
            stream.tail = stream.head_fields = None
            stream.producer = None
            if stream.exchange is not None:
                stream.exchange.client_gone()

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY(NO_ERROR) naming the last stream taken; the streams
        open now are answered, later ones refused, and the connection closes after the last."""
        if self.closing or self.goaway_last != _NO_GOAWAY:
            return
        if not self.streams:
            self._close(ErrorCodes.NO_ERROR)
            return
        last = self.goaway_last = self.h2.highest_inbound_stream_id
        self.peer_done = True  # _maybe_idle closes after the last stream
        self._write()
        # Written by hand: h2's close_connection() would move the connection to CLOSED and
        # refuse to send the responses still in flight.
        write_now(self.transport, GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())

    def _send_stalled(self) -> None:
        if self.closing:
            return
        log.info("HTTP/2 client {peer} read nothing for {seconds:.0f} s; closing", peer=self.conn.peer_ip, seconds=SEND_STALL_TIMEOUT)
        self._close(ErrorCodes.NO_ERROR, abort=True)

    def _close(self, code: ErrorCodes | None, *, abort: bool = False) -> None:
        """End the connection: GOAWAY(``code``) unless h2 already queued one, then close."""
        if self.closing:
            return
        self.closing = True
        self.deadline.clear()
        if self.write_call is not None and self.write_call.active():
            self.write_call.cancel()
        self.write_call = None
        self._drop_streams()
        h2 = self.h2
        if abort:
            h2.clear_outbound_data_buffer()  # the client reads nothing: only the GOAWAY is worth a try
        if code is not None and h2.state_machine.state is not ConnectionState.CLOSED:
            h2.close_connection(code)
        data = h2.data_to_send()
        transport = self.transport
        if data:
            write_now(transport, data)
        transport.unregisterProducer()
        if abort:
            transport.abortConnection()
            return
        if self.read_paused:
            self.read_paused = False
            transport.resumeProducing()
        transport.loseConnection()
        self.close_call = self.reactor.callLater(CLOSE_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self.close_call = None
        self.transport.abortConnection()

    def _deadline_passed(self) -> None:
        if self.closing:
            return
        if not self.streams:
            self._close(ErrorCodes.NO_ERROR)
