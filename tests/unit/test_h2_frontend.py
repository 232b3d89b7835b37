"""The HTTP/2 front end in memory: h2's client-side connection talking to the real
H1Connection -> H2Session hand-over on a StringTransport with a fake clock and a fake
pipeline, so that flow control, stream errors, floods and timeouts are checked exactly.
"""

from __future__ import annotations

import tomllib

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from rpxy.config.load import parse_config
from rpxy.front import h2 as h2front
from rpxy.front.h1 import H1Factory
from rpxy.front.h2 import PREFACE, Malformed, check_trailers, parse_request_headers
from rpxy.state import StateHolder, build_state

# -- fakes -------------------------------------------------------------------------------


class FakeExchange:
    def __init__(self, head, sink) -> None:
        self.head = head
        self.sink = sink
        self.body: list[bytes] = []
        self.ended = False
        self.trailers = None
        self.gone = False

    def request_data(self, data: bytes) -> None:
        self.body.append(data)

    def request_end(self, trailers=None) -> None:
        self.ended = True
        self.trailers = trailers

    def client_gone(self) -> None:
        self.gone = True

    def respond(self, status: int = 200, body: bytes = b"ok", headers=(), trailers=None) -> None:
        self.sink.send_head(status, [*headers, (b"content-length", b"%d" % len(body))])
        if body:
            self.sink.send_data(body)
        self.sink.send_end(trailers)


class RecordingAccessLog:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes, bytes, int]] = []

    def record(self, conn, head, host, status, *, upstream) -> None:
        self.records.append((head.method, head.path, head.version, status))


class FakePipeline:
    def __init__(self) -> None:
        self.exchanges: list[FakeExchange] = []
        self.calls: list[dict] = []
        self.answer: int | None = None
        self.access_log = RecordingAccessLog()

    def handle(self, conn, head, sink, *, content_length, body_expected):
        exchange = FakeExchange(head, sink)
        self.exchanges.append(exchange)
        self.calls.append({"conn": conn, "content_length": content_length, "body_expected": body_expected})
        if self.answer is not None:
            exchange.respond(self.answer, b"", headers=[(b"connection", b"close")])
        return exchange


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.log: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.log.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.log.append("resume")

    def stopProducing(self) -> None:
        self.log.append("stop")


class TlsStringTransport(StringTransport):
    negotiatedProtocol = b"h2"


def make_env(top: str = "", *, tls: bool = False):
    clock = MemoryReactorClock()
    text = (
        f"listen_port = 8080\n{top}\n"
        '[apps.a]\nserver_name = "localhost"\n'
        'reverse_proxy = [{ upstream = [{ location = "127.0.0.1:9" }] }]\n'
    )
    config = parse_config(tomllib.loads(text)).config
    holder = StateHolder(build_state(config, clock))
    pipeline = FakePipeline()
    return H1Factory(pipeline, holder, clock, tls=tls), pipeline, clock


def connect(factory, transport_class=StringTransport):
    address = IPv4Address("TCP", "192.0.2.1", 40000)
    protocol = factory.buildProtocol(address)
    transport = transport_class(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=address, lenient=True)
    protocol.makeConnection(transport)
    return protocol, transport


def closed(transport: StringTransport) -> bool:
    return transport.disconnecting or transport.disconnected


def parse_frames(data: bytes) -> list[Frame]:
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


class Client:
    """h2's client side wired to one server connection in memory."""

    def __init__(self, env, *, validate: bool = True, window: int | None = None, transport_class=StringTransport) -> None:
        self.factory, self.pipeline, self.clock = env
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
                validate_inbound_headers=True,
            )
        )
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.protocol, self.transport = connect(self.factory, transport_class)
        self.events: list = []
        self.raw = b""
        self.pump()

    @property
    def session(self):
        return self.protocol.h2

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            data = self.h2.data_to_send()
            if data:
                self.protocol.dataReceived(data)
                moved = True
            out = self.transport.value()
            if out:
                self.transport.clear()
                self.raw += out
                if self.h2.state_machine.state.name != "CLOSED":
                    self.events.extend(self.h2.receive_data(out))
                moved = True
            if not moved:
                return

    def request(self, path: str = "/x", *, method: str = "GET", end: bool = True, extra=(), authority: str = "localhost") -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", authority.encode()),
            *extra,
        ]
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self.pump()
        return stream_id

    def send_raw(self, data: bytes) -> None:
        """Bytes past h2's client state machine (the server's answer is parsed as frames)."""
        self.protocol.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        self.raw += out

    def of(self, kind, stream_id: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]

    def response(self, stream_id: int) -> tuple[dict, bytes, bool]:
        heads = self.of(ResponseReceived, stream_id)
        headers = dict(heads[0].headers) if heads else {}
        body = b"".join(e.data for e in self.of(DataReceived, stream_id))
        return headers, body, bool(self.of(StreamEnded, stream_id))

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.of(StreamReset)}

    def goaway(self) -> int | None:
        terminated = self.of(ConnectionTerminated)
        if terminated:
            return terminated[-1].error_code
        for frame in parse_frames(self.raw):
            if isinstance(frame, GoAwayFrame):
                return frame.error_code
        return None


@pytest.fixture
def env():
    return make_env()


# -- header block parsing (pure) ------------------------------------------------------------


def request_block(*extra, method=b"GET", path=b"/p?q=1", authority=b"example.com", scheme=b"https"):
    block = [(b":method", method), (b":scheme", scheme), (b":path", path)]
    if authority is not None:
        block.append((b":authority", authority))
    return [*block, *extra]


def test_pseudo_headers_become_method_path_authority():
    method, path, authority, fields = parse_request_headers(
        request_block((b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"accept", b"*/*"))
    )
    assert (method, path, authority) == (b"GET", b"/p?q=1", b"example.com")
    assert fields == [(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"accept", b"*/*")]


@pytest.mark.parametrize(
    "block",
    [
        request_block((b"Accept", b"*/*")),  # uppercase name
        request_block((b"connection", b"keep-alive")),
        request_block((b"keep-alive", b"5")),
        request_block((b"transfer-encoding", b"chunked")),
        request_block((b"upgrade", b"websocket")),
        request_block((b"proxy-connection", b"x")),
        request_block((b"te", b"gzip")),
        request_block((b"x", b"a\r\nb")),
        request_block((b"x", b"a\nb")),
        request_block((b"x", b"a\x00b")),
        request_block((b"x", b" a")),
        request_block((b"x y", b"a")),
        request_block((b"", b"a")),
        request_block((b"x:y", b"a")),
        request_block(path=b""),
        request_block(path=b"x"),
        request_block(path=b"/a b"),
        request_block(path=b"/a\tb"),
        request_block(path=b"http://evil/"),
        request_block(path=b"*"),  # only OPTIONS
        request_block(method=b"GET /x"),
        request_block(method=b""),
        request_block(authority=b"a\r\nb"),
        [(b":method", b"GET"), (b":path", b"/")],  # no :scheme
        [(b":method", b"GET"), (b":scheme", b"http")],  # no :path
        [(b":scheme", b"http"), (b":path", b"/")],  # no :method
        [*request_block(), (b":method", b"GET")],  # repeated
        [(b"accept", b"*/*"), *request_block()],  # pseudo after regular
        [*request_block(), (b":status", b"200")],
        [*request_block(), (b":protocol", b"websocket")],
        [(b":method", b"CONNECT"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a:443")],
    ],
)
def test_malformed_request_blocks(block):
    with pytest.raises(Malformed):
        parse_request_headers(block)


def test_well_formed_oddities_are_accepted():
    assert parse_request_headers(request_block((b"te", b"trailers")))[3] == [(b"te", b"trailers")]
    assert parse_request_headers(request_block(method=b"OPTIONS", path=b"*"))[1] == b"*"
    assert parse_request_headers(request_block((b"host", b"h"), authority=None))[2] is None
    assert parse_request_headers([(b":method", b"CONNECT"), (b":authority", b"a:443")])[:2] == (b"CONNECT", b"")
    assert parse_request_headers(request_block((b"x", b"")))[3] == [(b"x", b"")]


def test_trailers_are_checked():
    assert check_trailers([(b"grpc-status", b"0")]) == [(b"grpc-status", b"0")]
    for bad in ([(b":path", b"/")], [(b"X", b"1")], [(b"x", b"a\rb")], [(b"connection", b"close")]):
        with pytest.raises(Malformed):
            check_trailers(bad)


# -- hand-over from the HTTP/1.1 connection ----------------------------------------------------


def test_h2c_prior_knowledge_becomes_http2(env):
    client = Client(env)
    assert client.session is not None
    stream_id = client.request("/hello?x=1", extra=[(b"user-agent", b"t"), (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    (exchange,) = client.pipeline.exchanges
    head = exchange.head
    assert (head.method, head.path, head.version, head.authority) == (b"GET", b"/hello?x=1", b"2", b"localhost")
    assert head.headers == [(b"user-agent", b"t"), (b"cookie", b"a=1"), (b"cookie", b"b=2")]
    assert client.pipeline.calls[0]["body_expected"] is False
    assert client.pipeline.calls[0]["conn"].peer_ip == "192.0.2.1"
    exchange.respond(200, b"hi", headers=[(b"x-a", b"1"), (b"server", b"rpxy")])
    client.pump()
    headers, body, ended = client.response(stream_id)
    assert headers[b":status"] == b"200" and headers[b"x-a"] == b"1" and headers[b"content-length"] == b"2"
    assert (body, ended) == (b"hi", True)


def test_preface_split_across_reads(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    for i in range(0, len(PREFACE), 5):
        protocol.dataReceived(PREFACE[i : i + 5])
    assert protocol.h2 is not None
    frames = parse_frames(transport.value())
    assert isinstance(frames[0], SettingsFrame)


def test_http11_is_not_mistaken_for_the_preface(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"P")
    protocol.dataReceived(b"OST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    assert protocol.h2 is None
    assert pipeline.exchanges[0].head.version == b"1.1"


def test_pri_that_is_not_the_preface_is_http11(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    assert protocol.h2 is None
    assert transport.value().startswith(b"HTTP/1.1 4") or transport.value().startswith(b"HTTP/1.1 5")


def test_alpn_h2_on_tls_hands_over_without_a_preface_check():
    env = make_env(tls=True)
    client = Client(env, transport_class=TlsStringTransport)
    assert client.session is not None
    client.request("/tls")
    assert client.pipeline.exchanges[0].head.path == b"/tls"


def test_settings_advertise_the_configured_stream_limit():
    client = Client(make_env("max_concurrent_streams = 7"))
    (settings,) = client.of(RemoteSettingsChanged)
    changed = {code: setting.new_value for code, setting in settings.changed_settings.items()}
    assert changed[SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert changed[SettingCodes.MAX_HEADER_LIST_SIZE] == 65536
    # the connection window has room for every stream's window
    assert client.h2.outbound_flow_control_window == 8 * 65535


def test_connection_counts_for_max_clients_until_lost(env):
    client = Client(env)
    assert client.factory.active == 1
    client.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.factory.active == 0


# -- requests and responses ---------------------------------------------------------------------


def test_request_body_streams_and_trailers_reach_the_exchange(env):
    client = Client(env)
    stream_id = client.request("/up", method="POST", end=False, extra=[(b"content-length", b"6"), (b"te", b"trailers")])
    (exchange,) = client.pipeline.exchanges
    assert client.pipeline.calls[0] == {**client.pipeline.calls[0], "content_length": 6, "body_expected": True}
    client.h2.send_data(stream_id, b"abc")
    client.pump()
    assert exchange.body == [b"abc"] and not exchange.ended
    client.h2.send_data(stream_id, b"def")
    client.h2.send_headers(stream_id, [(b"x-checksum", b"1")], end_stream=True)
    client.pump()
    assert exchange.body == [b"abc", b"def"]
    assert exchange.ended and exchange.trailers == [(b"x-checksum", b"1")]


def test_response_trailers_are_a_trailing_headers_frame(env):
    client = Client(env)
    stream_id = client.request()
    exchange = client.pipeline.exchanges[0]
    exchange.sink.send_head(200, [(b"content-type", b"application/grpc")])
    exchange.sink.send_data(b"\x00\x00\x00\x00\x00")
    exchange.sink.send_end([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
    client.pump()
    (trailers,) = client.of(TrailersReceived, stream_id)
    assert trailers.headers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
    assert client.response(stream_id)[2]


def test_response_frames_are_merged(env):
    client = Client(env)
    empty = client.request("/empty")
    small = client.request("/small")
    client.raw = b""
    bodyless, with_body = client.pipeline.exchanges
    bodyless.sink.send_head(204, [(b"x-a", b"1")])
    bodyless.sink.send_end(None)
    with_body.sink.send_head(200, [(b"content-length", b"5")])
    with_body.sink.send_data(b"hello")
    with_body.sink.send_end(None)
    client.pump()
    frames = [f for f in parse_frames(client.raw) if f.stream_id in (empty, small)]
    assert [(type(f).__name__, f.stream_id, sorted(f.flags)) for f in frames] == [
        ("HeadersFrame", empty, ["END_HEADERS", "END_STREAM"]),
        ("HeadersFrame", small, ["END_HEADERS"]),
        ("DataFrame", small, ["END_STREAM"]),
    ]
    assert client.response(empty)[2] and client.response(small)[1:] == (b"hello", True)


def test_flush_sends_the_head_of_a_response_still_waiting_for_its_body(env):
    client = Client(env)
    stream_id = client.request("/events")
    sink = client.pipeline.exchanges[0].sink
    sink.send_head(200, [(b"content-type", b"text/event-stream")])
    client.pump()
    assert client.response(stream_id)[0] == {}
    sink.flush()  # after each upstream read
    client.pump()
    assert client.response(stream_id)[0][b":status"] == b"200"
    sink.send_data(b"data: 1\n\n")
    sink.flush()
    client.pump()
    assert client.response(stream_id)[1:] == (b"data: 1\n\n", False)


def test_response_encoder_round_trips_through_hpack():
    from hpack import Decoder

    encoder = h2front._ResponseEncoder()
    decoder = Decoder()
    blocks = [
        [(b":status", b"200"), (b"content-type", b"text/html"), (b"server", b"rpxy")],
        [(b":status", b"404"), (b"set-cookie", b"a=1; HttpOnly"), (b"x-custom", b"\x00\xff" * 100)],
        [(b":status", b"299"), (b"x-long", b"v" * 5000), (b"accept-ranges", b"bytes"), (b"x-custom", b"\x00\xff" * 100)],
    ]
    for block in blocks:
        assert decoder.decode(encoder.encode(block), raw=True) == block
    assert decoder.header_table_size == 0  # we told the client: no dynamic table
    encoder.header_table_size = 100  # the client changed SETTINGS_HEADER_TABLE_SIZE
    assert encoder.encode([(b":status", b"200")]) == b"\x20\x88"
    assert encoder.encode([(b":status", b"200")]) == b"\x88"


def test_connection_specific_response_fields_are_not_sent(env):
    client = Client(env)
    client.pipeline.answer = 400  # send_local_response(..., close=True) adds connection: close
    stream_id = client.request()
    headers, _, ended = client.response(stream_id)
    assert headers[b":status"] == b"400" and b"connection" not in headers and ended
    assert not closed(client.transport)  # a local answer never closes an HTTP/2 connection


def test_several_concurrent_streams_are_independent(env):
    client = Client(env)
    ids = [client.request(f"/s{i}") for i in range(5)]
    exchanges = client.pipeline.exchanges
    assert [e.head.path for e in exchanges] == [b"/s0", b"/s1", b"/s2", b"/s3", b"/s4"]
    for exchange in reversed(exchanges):
        exchange.respond(200, exchange.head.path)
    client.pump()
    assert [client.response(i)[1] for i in ids] == [b"/s0", b"/s1", b"/s2", b"/s3", b"/s4"]


def test_local_answer_before_the_body_ends_resets_with_no_error(env):
    client = Client(env)
    client.pipeline.answer = 404
    stream_id = client.request("/x", method="POST", end=False)
    assert client.response(stream_id)[2]
    assert client.resets() == {stream_id: ErrorCodes.NO_ERROR}
    client.pipeline.answer = None
    other = client.request("/y")
    assert client.pipeline.exchanges[-1].head.path == b"/y" and other == stream_id + 2


def test_bad_policy_answers_are_local_and_logged(env):
    client = Client(env)
    extra = [(b"x-h%d" % i, b"v") for i in range(101)]
    stream_id = client.request("/many", extra=extra)
    assert client.response(stream_id)[0][b":status"] == b"431"
    assert client.pipeline.exchanges == []
    assert client.pipeline.access_log.records == [(b"GET", b"/many", b"2", 431)]


def test_expect_100_continue_is_answered_here(env):
    client = Client(env)
    stream_id = client.request("/up", method="POST", end=False, extra=[(b"expect", b"100-continue")])
    (exchange,) = client.pipeline.exchanges
    assert exchange.head.headers == []  # not forwarded
    informational = [e for e in client.events if type(e).__name__ == "InformationalResponseReceived"]
    assert [dict(e.headers)[b":status"] for e in informational] == [b"100"]
    client.h2.send_data(stream_id, b"body", end_stream=True)
    client.pump()
    assert exchange.body == [b"body"] and exchange.ended


def test_unknown_expectation_is_417(env):
    client = Client(env)
    stream_id = client.request("/up", method="POST", end=False, extra=[(b"expect", b"magic")])
    assert client.response(stream_id)[0][b":status"] == b"417"
    assert client.pipeline.exchanges == []


def test_a_failing_pipeline_costs_one_request_not_the_connection(env):
    client = Client(env)

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    original = client.pipeline.handle
    client.pipeline.handle = broken
    stream_id = client.request("/boom")
    assert client.response(stream_id)[0][b":status"] == b"500"
    client.pipeline.handle = original
    client.request("/fine")
    assert client.pipeline.exchanges[-1].head.path == b"/fine" and not closed(client.transport)


def test_connect_is_refused_with_405(env):
    client = Client(env, validate=False)
    stream_id = client.h2.get_next_available_stream_id()
    client.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"a:443")], end_stream=True)
    client.pump()
    assert client.response(stream_id)[0][b":status"] == b"405"


# -- flow control ---------------------------------------------------------------------------------


def test_request_body_is_acknowledged_only_as_the_upstream_takes_it(env):
    client = Client(env)
    stream_id = client.request("/up", method="POST", end=False)
    exchange = client.pipeline.exchanges[0]
    exchange.sink.request_producer.pauseProducing()  # the upstream's transport is full
    window = client.h2.local_flow_control_window(stream_id)
    client.h2.send_data(stream_id, b"x" * 16384)
    client.h2.send_data(stream_id, b"x" * 16384)
    client.h2.send_data(stream_id, b"x" * 16384)
    client.h2.send_data(stream_id, b"x" * 16383)
    client.pump()
    assert sum(map(len, exchange.body)) == 65535
    assert client.h2.local_flow_control_window(stream_id) == window - 65535 == 0  # nothing handed back
    exchange.sink.request_producer.resumeProducing()
    client.pump()
    assert client.h2.local_flow_control_window(stream_id) == 65535
    # other streams were never blocked by the stalled one
    assert client.h2.outbound_flow_control_window > 65535


def test_response_is_held_to_the_client_window_and_pauses_the_upstream():
    client = Client(make_env(), window=1000)
    stream_id = client.request()
    exchange = client.pipeline.exchanges[0]
    upstream = Producer()
    exchange.sink.send_head(200, [])
    exchange.sink.register_producer(upstream)
    exchange.sink.send_data(b"a" * 3000)
    exchange.sink.flush()
    client.pump()
    assert len(client.response(stream_id)[1]) == 1000
    assert upstream.paused
    exchange.sink.send_data(b"b" * 10)  # what the upstream delivered before it paused
    exchange.sink.unregister_producer()
    assert upstream.log == ["pause", "resume"]  # left reading, for its pool
    exchange.sink.send_end(None)
    client.pump()
    assert not client.response(stream_id)[2]  # the end waits for the data
    for _ in range(3):
        client.h2.acknowledge_received_data(1000, stream_id)
        client.pump()
    headers, body, ended = client.response(stream_id)
    assert body == b"a" * 3000 + b"b" * 10 and ended
    assert client.session.blocked == {} and client.session.streams == {}


def test_window_update_resumes_the_upstream():
    client = Client(make_env(), window=100)
    stream_id = client.request()
    exchange = client.pipeline.exchanges[0]
    upstream = Producer()
    exchange.sink.send_head(200, [])
    exchange.sink.register_producer(upstream)
    exchange.sink.send_data(b"a" * 150)
    exchange.sink.flush()
    client.pump()
    assert upstream.paused
    client.h2.acknowledge_received_data(100, stream_id)
    client.pump()
    assert not upstream.paused
    assert client.response(stream_id)[1] == b"a" * 150


def test_a_client_that_does_not_read_pauses_every_upstream(env):
    client = Client(env)
    ids = [client.request(f"/{i}") for i in range(2)]
    upstreams = []
    for exchange in client.pipeline.exchanges:
        producer = Producer()
        upstreams.append(producer)
        exchange.sink.send_head(200, [])
        exchange.sink.register_producer(producer)
    client.session.pauseProducing()  # what the transport does when its buffer is full
    assert all(p.paused for p in upstreams)
    client.pipeline.exchanges[0].sink.send_data(b"held")
    client.pipeline.exchanges[0].sink.flush()
    client.pump()
    assert client.response(ids[0])[1] == b""
    client.session.resumeProducing()
    client.pump()
    assert not any(p.paused for p in upstreams)
    assert client.response(ids[0])[1] == b"held"


# -- stream errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [(b"X-Upper", b"1")],
        [(b"connection", b"close")],
        [(b"transfer-encoding", b"chunked")],
        [(b"x-bad", b"a\r\nx-injected: 1")],
        [(b"x-bad", b"a\x00")],
        [(b"te", b"gzip")],
    ],
)
def test_malformed_requests_are_stream_errors_never_forwarded(env, extra):
    client = Client(env, validate=False)
    stream_id = client.request("/bad", extra=extra)
    assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}
    assert client.pipeline.exchanges == []
    good = client.request("/good")
    assert [e.head.path for e in client.pipeline.exchanges] == [b"/good"]
    assert good not in client.resets() and not closed(client.transport)


def test_content_length_shorter_than_the_data_is_a_stream_error(env):
    client = Client(env, validate=False)
    stream_id = client.request("/up", method="POST", end=False, extra=[(b"content-length", b"3")])
    exchange = client.pipeline.exchanges[0]
    client.h2.send_data(stream_id, b"12345", end_stream=True)
    client.pump()
    assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}
    assert exchange.gone and not exchange.ended
    client.request("/next")
    assert client.pipeline.exchanges[-1].head.path == b"/next" and client.goaway() is None


def test_content_length_longer_than_the_data_is_a_stream_error(env):
    client = Client(env, validate=False)
    stream_id = client.request("/up", method="POST", end=False, extra=[(b"content-length", b"10")])
    exchange = client.pipeline.exchanges[0]
    client.h2.send_data(stream_id, b"12345")
    client.h2.send_headers(stream_id, [(b"x-t", b"1")], end_stream=True)  # trailers end it early
    client.pump()
    assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}
    assert exchange.gone and not exchange.ended


def test_content_length_without_data_is_a_stream_error(env):
    client = Client(env, validate=False)
    stream_id = client.request("/up", method="POST", end=True, extra=[(b"content-length", b"10")])
    assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}


def test_invalid_content_length_is_a_stream_error(env):
    client = Client(env, validate=False)
    stream_id = client.request("/up", method="POST", end=False, extra=[(b"content-length", b"1x")])
    assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}
    assert client.pipeline.exchanges == [] and client.goaway() is None


def test_malformed_trailers_are_a_stream_error(env):
    client = Client(env, validate=False)
    stream_id = client.request("/up", method="POST", end=False)
    exchange = client.pipeline.exchanges[0]
    client.h2.send_headers(stream_id, [(b"X-Upper", b"1")], end_stream=True)
    client.pump()
    assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}
    assert exchange.gone and not exchange.ended


def test_client_reset_tells_the_exchange(env):
    client = Client(env)
    stream_id = client.request("/slow")
    exchange = client.pipeline.exchanges[0]
    client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
    client.pump()
    assert exchange.gone
    exchange.sink.send_head(200, [])  # a late answer is dropped
    exchange.sink.send_data(b"x")
    exchange.sink.send_end(None)
    client.pump()
    assert client.response(stream_id) == ({}, b"", False)


def test_streams_over_the_limit_are_refused_not_fatal():
    client = Client(make_env("max_concurrent_streams = 2"))
    # Three HEADERS in one go, as from a client that has not read our SETTINGS yet.
    encoder = Encoder()

    def headers(stream_id: int, path: bytes) -> bytes:
        block = encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", path), (b":authority", b"localhost")])
        return HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize()

    client.send_raw(headers(1, b"/1") + headers(3, b"/2") + headers(5, b"/3"))
    resets = [f for f in parse_frames(client.raw) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(5, ErrorCodes.REFUSED_STREAM)]
    assert [e.head.path for e in client.pipeline.exchanges] == [b"/1", b"/2"]
    for exchange in client.pipeline.exchanges:
        exchange.respond()
    client.send_raw(headers(7, b"/4"))  # HPACK stayed in step: the next block decodes
    assert client.pipeline.exchanges[-1].head.path == b"/4"
    assert not any(isinstance(f, GoAwayFrame) for f in parse_frames(client.raw))


# -- floods and protocol errors ----------------------------------------------------------------------


def test_rapid_reset_ends_in_enhance_your_calm(env):
    client = Client(env)
    exchanges = client.pipeline.exchanges
    for _ in range(h2front.RESET_BURST + 5):
        stream_id = client.request("/r")
        if client.goaway() is not None:
            break
        client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.pump()
        if client.goaway() is not None:
            break
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    assert closed(client.transport)
    assert all(e.gone for e in exchanges)
    assert len(exchanges) <= h2front.RESET_BURST + 1


def test_resets_within_the_rate_are_fine(env):
    client = Client(env)
    for _ in range(h2front.RESET_BURST * 2):
        stream_id = client.request("/r")
        client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.pump()
        client.clock.advance(1.0 / h2front.RESET_RATE)
    assert client.goaway() is None and not closed(client.transport)


def test_ping_flood_ends_in_enhance_your_calm(env):
    client = Client(env)
    for i in range(h2front.CONTROL_BURST + 10):
        client.h2.ping(b"%08d" % i)
    client.pump()
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    assert closed(client.transport)


def test_pings_while_the_client_does_not_read_are_capped(env):
    client = Client(env)
    client.session.pauseProducing()  # the client stopped reading
    for i in range(1500):
        client.h2.ping(b"%08d" % i)
    client.protocol.dataReceived(client.h2.data_to_send())
    frames = parse_frames(client.transport.value())
    acks = [f for f in frames if isinstance(f, PingFrame)]
    assert len(acks) * 17 <= h2front.MAX_CONTROL_WHILE_BLOCKED
    assert isinstance(frames[-1], GoAwayFrame) and frames[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.transport.disconnecting


def test_settings_flood_ends_in_enhance_your_calm(env):
    client = Client(env)
    for _ in range(h2front.CONTROL_BURST + 10):
        client.send_raw(SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 0}).serialize())
        if closed(client.transport):
            break
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM


def test_empty_data_flood_ends_in_enhance_your_calm(env):
    client = Client(env)
    stream_id = client.request("/up", method="POST", end=False)
    for _ in range(h2front.CONTROL_BURST + 10):
        client.send_raw(DataFrame(stream_id, b"").serialize())
        if closed(client.transport):
            break
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.pipeline.exchanges[0].gone


def _encoded_headers(*extra) -> bytes:
    return Encoder().encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"localhost"), *extra]
    )


def test_oversized_header_list_ends_in_goaway(env):
    client = Client(env)
    block = _encoded_headers(*[(b"x-%d" % i, b"v" * 1000) for i in range(70)])  # > 64 KiB decoded
    frames = [HeadersFrame(1, block[:16384], flags=["END_STREAM"])]
    for offset in range(16384, len(block), 16384):
        frames.append(ContinuationFrame(1, block[offset : offset + 16384]))
    frames[-1].flags.add("END_HEADERS")
    client.send_raw(b"".join(f.serialize() for f in frames))
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.pipeline.exchanges == [] and closed(client.transport)


def test_hpack_bomb_ends_in_goaway(env):
    client = Client(env)
    encoder = Encoder()
    first = encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"localhost"), (b"x-big", b"v" * 4000)])
    client.send_raw(HeadersFrame(1, first, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert len(client.pipeline.exchanges) == 1
    # Then a tiny block that references the 4 KB entry 40 times (160 KB decoded).
    block = encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"localhost")] + [(b"x-big", b"v" * 4000)] * 40)
    assert len(block) < 200
    client.send_raw(HeadersFrame(3, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(client.pipeline.exchanges) == 1 and client.pipeline.exchanges[0].gone


def test_continuation_flood_ends_in_enhance_your_calm(env):
    client = Client(env)
    client.send_raw(HeadersFrame(1, _encoded_headers()[:5]).serialize())
    for _ in range(h2front.MAX_HEADER_BLOCK_FRAMES + 5):
        client.send_raw(ContinuationFrame(1, b"").serialize())
        if closed(client.transport):
            break
    assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.pipeline.exchanges == []


def test_protocol_error_gets_goaway_and_close(env):
    client = Client(env)
    stream_id = client.request("/open")
    exchange = client.pipeline.exchanges[0]
    client.send_raw(DataFrame(2, b"x").serialize())  # DATA on an idle, even (server) stream
    assert client.goaway() == ErrorCodes.PROTOCOL_ERROR
    assert closed(client.transport) and exchange.gone
    del stream_id


def test_bad_preface_after_alpn_gets_goaway():
    env = make_env(tls=True)
    factory, pipeline, clock = env
    protocol, transport = connect(factory, TlsStringTransport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert closed(transport)
    assert pipeline.exchanges == []


def test_client_goaway_with_an_error_ends_the_connection(env):
    client = Client(env)
    client.request("/a")
    exchange = client.pipeline.exchanges[0]
    client.h2.close_connection(ErrorCodes.INTERNAL_ERROR)
    client.pump()
    assert exchange.gone and closed(client.transport)


def goaway_frame(code: int = 0) -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = 0
    frame.error_code = code
    return frame.serialize()


def test_client_graceful_goaway_lets_open_streams_finish(env):
    # RFC 9113 §6.8: GOAWAY(NO_ERROR) from a client stops new streams, not its open ones.
    client = Client(env)
    first = client.request("/a")
    second = client.request("/b", method="POST", end=False)
    one, two = client.pipeline.exchanges
    client.send_raw(goaway_frame())
    assert not one.gone and not two.gone and not closed(client.transport)
    one.respond(200, b"first")
    client.pump()
    assert client.response(first)[1:] == (b"first", True)
    assert not closed(client.transport)
    client.h2.send_data(second, b"body", end_stream=True)
    client.pump()
    assert b"".join(two.body) == b"body" and two.ended
    two.respond(201, b"second")
    client.pump()
    assert client.response(second)[1:] == (b"second", True)
    assert closed(client.transport)
    assert client.goaway() == ErrorCodes.NO_ERROR


def test_client_graceful_goaway_on_an_idle_connection_closes_it(env):
    client = Client(env)
    client.request("/a")
    client.pipeline.exchanges[0].respond(200, b"x")
    client.pump()
    client.send_raw(goaway_frame())
    assert closed(client.transport)


# -- timers ------------------------------------------------------------------------------------------


def test_idle_connection_is_closed_after_20s(env):
    client = Client(env)
    assert h2front.IDLE_TIMEOUT == 20.0
    client.clock.advance(19.9)
    assert not closed(client.transport)
    client.clock.advance(0.2)
    assert closed(client.transport)
    client.pump()
    assert client.goaway() == ErrorCodes.NO_ERROR


def test_an_open_stream_keeps_the_connection_and_the_idle_time_restarts_after_it(env):
    client = Client(env)
    stream_id = client.request("/slow")
    client.clock.advance(60)
    assert not closed(client.transport)
    client.pipeline.exchanges[0].respond()
    client.pump()
    assert client.response(stream_id)[2]
    client.clock.advance(19)
    assert not closed(client.transport)
    client.clock.advance(1.1)
    assert closed(client.transport)


def test_unfinished_header_block_does_not_hold_the_connection(env):
    client = Client(env)
    client.send_raw(HeadersFrame(1, _encoded_headers()[:5]).serialize())  # no END_HEADERS, ever
    client.clock.advance(20.1)
    assert closed(client.transport)


def test_linger_after_goaway_then_abort(env):
    client = Client(env)
    client.clock.advance(20.1)
    assert client.transport.disconnecting
    client.clock.advance(h2front.CLOSE_LINGER)
    assert client.transport.disconnected or client.transport.disconnecting


# -- the direct send path (HEADERS + DATA without h2's generic send) ------------------------------


def test_a_small_response_is_one_headers_and_one_data_frame_with_h2_state_kept(env):
    client = Client(env)
    stream_id = client.request("/fast")
    server_h2 = client.session.h2
    window_before = server_h2.outbound_flow_control_window
    exchange = client.pipeline.exchanges[0]
    before = len(client.raw)
    exchange.respond(200, b"x" * 1000, headers=[(b"content-type", b"text/plain")])
    client.pump()
    frames = [f for f in parse_frames(client.raw[before:]) if getattr(f, "stream_id", 0) == stream_id]
    assert [type(f).__name__ for f in frames] == ["HeadersFrame", "DataFrame"]
    assert frames[0].flags == {"END_HEADERS"} and frames[1].flags == {"END_STREAM"}
    headers, body, ended = client.response(stream_id)
    assert headers[b":status"] == b"200" and headers[b"content-type"] == b"text/plain"
    assert (body, ended) == (b"x" * 1000, True)
    # h2's own view is what its send path would have left: stream closed, windows charged.
    assert server_h2.streams[stream_id].closed
    assert server_h2.outbound_flow_control_window == window_before - 1000
    # and the connection goes on: the next response on the same connection
    second = client.request("/again")
    client.pipeline.exchanges[1].respond(204, b"")
    client.pump()
    assert client.response(second)[0][b":status"] == b"204" and client.response(second)[2]


def test_a_body_beyond_the_stream_window_falls_back_to_split_frames(env):
    client = Client(env, window=1000)
    stream_id = client.request("/big")
    exchange = client.pipeline.exchanges[0]
    exchange.respond(200, b"y" * 2500)
    client.pump()
    headers, body, ended = client.response(stream_id)
    assert body == b"y" * 1000 and not ended  # the window is the limit, the rest is held
    client.h2.acknowledge_received_data(1000, stream_id)
    client.pump()
    client.h2.acknowledge_received_data(1000, stream_id)
    client.pump()
    _, body, ended = client.response(stream_id)
    assert (body, ended) == (b"y" * 2500, True)


def test_a_client_that_reads_nothing_for_20s_is_cut(env):
    client = Client(env)
    client.request("/big")
    session = client.session
    session.pauseProducing()  # the transport's buffers are full: the client is not reading
    client.clock.advance(15)
    session.resumeProducing()  # it read something
    session.pauseProducing()
    client.clock.advance(19)
    assert not closed(client.transport)
    client.clock.advance(1.5)
    assert closed(client.transport)
    assert client.pipeline.exchanges[0].gone
