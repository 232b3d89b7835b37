"""The HTTP/2 upstream client against an in-memory h2 server (no sockets)."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from rpxy.config.model import UpstreamConfig
from rpxy.upstream.h2client import H2UpstreamPool, H2UpstreamStream, request_fields


class Handler:
    def __init__(self) -> None:
        self.events: list = []
        self.data = b""

    def upstream_head(self, status, headers, keep_alive) -> None:
        self.events.append(("head", status, headers))

    def upstream_data(self, data) -> None:
        self.data += data

    def upstream_flush(self) -> None:
        pass

    def upstream_end(self, trailers) -> None:
        self.events.append(("end", trailers))

    def upstream_failed(self, reason, received_anything) -> None:
        self.events.append(("failed", reason, received_anything))

    def upstream_timeout(self) -> None:
        self.events.append(("timeout",))


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class Server:
    """The upstream's side of one connection: an h2 server fed with what the client wrote."""

    def __init__(self, protocol, transport: StringTransport, settings: dict | None = None) -> None:
        self.protocol = protocol
        self.transport = transport
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.events: list = []

    def pump(self) -> list:
        """Client → server, then server → client; returns the server's new events."""
        events = []
        for _ in range(5):
            data = self.transport.value()
            self.transport.clear()
            if data:
                events.extend(self.h2.receive_data(data))
            out = self.h2.data_to_send()
            if out:
                self.protocol.dataReceived(out)
            if not data and not out:
                break
        self.events.extend(events)
        return events


class Endpoint:
    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.settings: dict | None = None

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        server = Server(protocol, transport, self.settings)
        self.servers.append(server)
        server.pump()
        return defer.succeed(protocol)


def make_pool(clock=None, settings=None):
    endpoint = Endpoint()
    endpoint.settings = settings
    upstream = UpstreamConfig(location="up.test:80", host="up.test", port=80, tls=False, ca_cert_path=None)
    pool = H2UpstreamPool(upstream, clock or task.Clock(), endpoint=endpoint)
    return pool, endpoint


def acquire(pool) -> H2UpstreamStream:
    got = []
    pool.acquire(got.append, lambda failure: got.append(failure))
    assert len(got) == 1 and isinstance(got[0], H2UpstreamStream), got
    return got[0]


FIELDS = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"up.test"), (b":path", b"/x")]


def test_request_fields_make_authority_from_host_and_drop_connection_fields() -> None:
    fields = request_fields(
        b"POST",
        b"http",
        b"/p?q",
        [(b"host", b"a.test"), (b"connection", b"keep-alive"), (b"te", b"trailers"), (b"x", b"1")],
        None,
    )
    assert fields == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"a.test"),
        (b":path", b"/p?q"),
        (b"te", b"trailers"),
        (b"x", b"1"),
    ]
    assert request_fields(b"GET", b"https", b"/", [(b"host", b"a.test")], b"b.test")[2] == (b":authority", b"b.test")


def test_round_trip_with_trailers_both_ways() -> None:
    pool, endpoint = make_pool()
    stream = acquire(pool)
    handler = Handler()
    post = [(b":method", b"POST"), *FIELDS[1:], (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    stream.send_request_fields(handler, post, end_stream=False)
    stream.write_body(b"hello")
    stream.end_body([(b"x-req-trailer", b"1")])
    server = endpoint.servers[0]
    events = server.pump()
    request = next(e for e in events if isinstance(e, RequestReceived))
    assert (b":method", b"POST") in request.headers and (b"te", b"trailers") in request.headers
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"hello"
    trailers = next(e for e in events if isinstance(e, TrailersReceived))
    assert trailers.headers == [(b"x-req-trailer", b"1")]
    assert any(isinstance(e, StreamEnded) for e in events)

    sid = request.stream_id
    server.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.h2.send_data(sid, b"answer")
    server.h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    server.pump()
    assert handler.events[0] == ("head", 200, [(b"content-type", b"application/grpc")])
    assert handler.data == b"answer"
    assert handler.events[-1] == ("end", [(b"grpc-status", b"0")])
    assert stream.closed and not pool.connections[0].streams


def test_streams_share_a_connection_until_the_stream_limit() -> None:
    pool, endpoint = make_pool(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    first, second = acquire(pool), acquire(pool)
    assert len(endpoint.servers) == 1
    assert not first.reused and second.reused
    for stream in (first, second):
        stream.send_request_fields(Handler(), FIELDS, end_stream=True)
    endpoint.servers[0].pump()
    third = acquire(pool)
    assert len(endpoint.servers) == 2 and third.connection is not first.connection
    # fresh=True always opens a new connection (the stale-connection retry).
    got = []
    pool.acquire(got.append, got.append, fresh=True)
    assert len(endpoint.servers) == 3


def test_request_body_pauses_the_client_until_the_upstream_window_opens() -> None:
    pool, endpoint = make_pool(settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    stream = acquire(pool)
    server = endpoint.servers[0]
    stream.send_request_fields(Handler(), [(b":method", b"POST"), *FIELDS[1:]], end_stream=False)
    server.pump()  # the server's SETTINGS (window 10) reach the client
    producer = Producer()
    stream.transport.registerProducer(producer, True)
    stream.write_body(b"x" * 25)
    stream.end_body(None)
    events = server.pump()
    assert producer.paused
    received = sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert received == 10
    assert not any(isinstance(e, StreamEnded) for e in events)
    sid = next(e for e in server.events if isinstance(e, RequestReceived)).stream_id
    for _ in range(3):
        server.h2.acknowledge_received_data(10, sid)
        server.h2.increment_flow_control_window(10, sid)
        events = server.pump()
        received += sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert received == 25
    assert any(isinstance(e, StreamEnded) for e in server.events)


def test_request_body_resumes_the_client_when_drained() -> None:
    pool, endpoint = make_pool(settings={SettingCodes.INITIAL_WINDOW_SIZE: 10})
    stream = acquire(pool)
    server = endpoint.servers[0]
    stream.send_request_fields(Handler(), [(b":method", b"POST"), *FIELDS[1:]], end_stream=False)
    server.pump()
    producer = Producer()
    stream.transport.registerProducer(producer, True)
    stream.write_body(b"y" * 15)
    server.pump()
    assert producer.paused
    sid = next(e for e in server.events if isinstance(e, RequestReceived)).stream_id
    server.h2.increment_flow_control_window(100, sid)
    server.pump()
    assert not producer.paused and producer.calls == ["pause", "resume"]


def test_response_data_is_acknowledged_only_while_the_client_reads() -> None:
    pool, endpoint = make_pool()
    stream = acquire(pool)
    handler = Handler()
    stream.send_request_fields(handler, FIELDS, end_stream=True)
    server = endpoint.servers[0]
    sid = next(e for e in server.pump() if isinstance(e, RequestReceived)).stream_id
    server.h2.send_headers(sid, [(b":status", b"200")])
    stream.pauseProducing()
    size = 160 * 1024  # over half the stream window: h2 sends WINDOW_UPDATE then
    for _ in range(10):
        server.h2.send_data(sid, b"z" * (size // 10))
    events = server.pump()
    assert handler.data == b"z" * size
    assert not [e for e in events if isinstance(e, WindowUpdated) and e.stream_id == sid]
    stream.resumeProducing()
    events = server.pump()
    updates = [e for e in events if isinstance(e, WindowUpdated) and e.stream_id == sid]
    assert updates and updates[0].delta == size


def test_rst_stream_from_upstream_fails_the_exchange() -> None:
    pool, endpoint = make_pool()
    stream = acquire(pool)
    handler = Handler()
    stream.send_request_fields(handler, FIELDS, end_stream=True)
    server = endpoint.servers[0]
    sid = next(e for e in server.pump() if isinstance(e, RequestReceived)).stream_id
    server.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
    server.pump()
    assert handler.events == [("failed", "stream reset by upstream (REFUSED_STREAM)", False)]
    # The connection still serves new streams.
    again = acquire(pool)
    assert again.connection is stream.connection


def test_client_cancel_sends_rst_stream_cancel() -> None:
    pool, endpoint = make_pool()
    stream = acquire(pool)
    handler = Handler()
    stream.send_request_fields(handler, FIELDS, end_stream=True)
    server = endpoint.servers[0]
    server.pump()
    stream.abort()
    events = server.pump()
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert resets and resets[0].error_code == ErrorCodes.CANCEL
    assert handler.events == []


def test_goaway_lets_open_streams_finish_and_new_requests_use_a_new_connection() -> None:
    pool, endpoint = make_pool()
    first = acquire(pool)
    second = acquire(pool)
    h1, h2_ = Handler(), Handler()
    first.send_request_fields(h1, FIELDS, end_stream=True)
    second.send_request_fields(h2_, FIELDS, end_stream=True)
    server = endpoint.servers[0]
    ids = [e.stream_id for e in server.pump() if isinstance(e, RequestReceived)]
    server.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=ids[0])
    server.pump()
    assert h2_.events == [("failed", "stream refused by GOAWAY", False)]
    third = acquire(pool)
    assert third.connection is not first.connection and len(endpoint.servers) == 2
    # The stream the upstream accepted still completes on the old connection.
    server.h2.state_machine.state = server.h2.state_machine.state.__class__.SERVER_OPEN
    server.h2.send_headers(ids[0], [(b":status", b"204")], end_stream=True)
    server.pump()
    assert h1.events == [("head", 204, []), ("end", None)]
    assert first.connection.closing  # closed once its last stream ended


def test_connection_loss_fails_open_streams() -> None:
    pool, endpoint = make_pool()
    stream = acquire(pool)
    handler = Handler()
    stream.send_request_fields(handler, FIELDS, end_stream=True)
    endpoint.servers[0].pump()
    stream.connection.connectionLost(None)
    assert handler.events and handler.events[0][0] == "failed"
    assert not pool.connections


def test_response_deadline() -> None:
    clock = task.Clock()
    pool, endpoint = make_pool(clock)
    stream = acquire(pool)
    handler = Handler()
    stream.send_request_fields(handler, FIELDS, end_stream=True)
    stream.set_response_deadline(clock.seconds() + 5)
    clock.advance(4)
    assert handler.events == []
    clock.advance(2)
    assert handler.events == [("timeout",)]


def test_idle_connection_closes_after_idle_timeout() -> None:
    clock = task.Clock()
    pool, endpoint = make_pool(clock)
    stream = acquire(pool)
    stream.send_request_fields(Handler(), FIELDS, end_stream=True)
    server = endpoint.servers[0]
    sid = next(e for e in server.pump() if isinstance(e, RequestReceived)).stream_id
    server.h2.send_headers(sid, [(b":status", b"200")], end_stream=True)
    server.pump()
    assert pool.connections
    clock.advance(pool.idle_timeout + 1)
    assert not pool.connections
    assert server.transport.disconnecting


def test_version_choice() -> None:
    from types import SimpleNamespace

    from rpxy.pipeline import wants_http2

    auto = SimpleNamespace(h2_pools=(object(),), force_http2=False)
    forced2 = SimpleNamespace(h2_pools=(object(),), force_http2=True)
    forced11 = SimpleNamespace(h2_pools=None, force_http2=False)
    grpc = [(b"content-type", b"application/grpc+proto")]
    json = [(b"content-type", b"application/json")]
    assert wants_http2(auto, grpc, None)
    assert wants_http2(auto, [(b"content-type", b"Application/GRPC")], None)
    assert not wants_http2(auto, json, None) and not wants_http2(auto, [], None)
    assert wants_http2(forced2, json, None)
    assert not wants_http2(forced11, grpc, None)
    assert not wants_http2(forced2, [], b"websocket")  # protocol switches stay HTTP/1.1


def test_requests_wait_when_the_upstream_lowers_its_stream_limit() -> None:
    pool, endpoint = make_pool()
    first, second = acquire(pool), acquire(pool)  # chosen before the upstream's SETTINGS arrive
    server = endpoint.servers[0]
    server.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    server.pump()
    h1, h2_ = Handler(), Handler()
    first.send_request_fields(h1, FIELDS, end_stream=True)
    post = [(b":method", b"POST"), *FIELDS[1:]]
    second.send_request_fields(h2_, post, end_stream=False)
    producer = Producer()
    second.transport.registerProducer(producer, True)
    second.write_body(b"held")
    second.end_body([(b"x-t", b"1")])
    assert producer.paused
    requests = [e for e in server.pump() if isinstance(e, RequestReceived)]
    assert len(requests) == 1 and h2_.events == []
    server.h2.send_headers(requests[0].stream_id, [(b":status", b"200")], end_stream=True)
    events = server.pump()
    assert h1.events[-1] == ("end", None)
    # The first stream ended: the waiting one opens, with its body and trailers.
    assert [e for e in events if isinstance(e, RequestReceived)]
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"held"
    assert [e.headers for e in events if isinstance(e, TrailersReceived)] == [[(b"x-t", b"1")]]


def test_unused_stream_released_before_sending() -> None:
    pool, endpoint = make_pool()
    stream = acquire(pool)
    connection = stream.connection
    pool.release(stream)
    assert connection.reserved == 0 and not connection.streams
    assert acquire(pool).connection is connection
