"""Graceful shutdown in memory: the Drainer on a fake clock, and what drain() does to the
HTTP/1.1 and HTTP/2 front ends (real H1Connection / H2Session on StringTransports)."""

from __future__ import annotations

import tomllib

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rpxy.config.load import parse_config
from rpxy.front.h1 import H1Factory
from rpxy.shutdown import Drainer
from rpxy.state import StateHolder, build_state

# -- the Drainer -------------------------------------------------------------------------------


class FakeConnection:
    def __init__(self, factory: FakeFactory) -> None:
        self.factory = factory
        self.transport = self
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.factory.connections.discard(self)


class FakeFactory:
    def __init__(self, count: int) -> None:
        self.connections = set()
        for _ in range(count):
            self.connections.add(FakeConnection(self))
        self.drained = False

    def drain(self) -> None:
        self.drained = True


def fired(deferred) -> bool:
    results = []
    deferred.addBoth(results.append)
    return bool(results)


def test_nothing_open_fires_at_once() -> None:
    factory = FakeFactory(0)
    drainer = Drainer(Clock(), lambda: [factory])
    assert fired(drainer.drain(30))
    assert factory.drained and not drainer.active


def test_fires_when_the_last_connection_closes() -> None:
    clock = Clock()
    factories = [FakeFactory(1), FakeFactory(1)]
    drainer = Drainer(clock, lambda: factories)
    done = drainer.drain(30)
    assert all(factory.drained for factory in factories)
    clock.advance(1)
    assert not fired(done) and drainer.active
    factories[0].connections.clear()
    clock.advance(1)
    assert not fired(done)
    factories[1].connections.clear()
    clock.advance(1)
    assert fired(done)
    assert not clock.getDelayedCalls()  # the deadline was cancelled


def test_the_deadline_aborts_what_is_left() -> None:
    clock = Clock()
    factory = FakeFactory(2)
    left = list(factory.connections)
    drainer = Drainer(clock, lambda: [factory])
    done = drainer.drain(30)
    clock.advance(29.9)
    assert not fired(done) and not any(c.aborted for c in left)
    clock.advance(0.2)
    assert all(c.aborted for c in left)
    clock.advance(1)
    assert fired(done)


def test_force_aborts_at_once() -> None:
    clock = Clock()
    factory = FakeFactory(1)
    (connection,) = factory.connections
    drainer = Drainer(clock, lambda: [factory])
    done = drainer.drain(120)
    drainer.force("second stop signal")
    clock.advance(0.1)
    assert connection.aborted and fired(done)
    assert not clock.getDelayedCalls()


# -- the front ends ------------------------------------------------------------------------------


class Exchange:
    def __init__(self, sink) -> None:
        self.sink = sink

    def request_data(self, data: bytes) -> None:
        pass

    def request_end(self, trailers=None) -> None:
        pass

    def client_gone(self) -> None:
        pass

    def respond(self, body: bytes = b"ok") -> None:
        self.sink.send_head(200, [(b"content-length", b"%d" % len(body))])
        self.sink.send_data(body)
        self.sink.send_end(None)


class AccessLog:
    def record(self, *args, **kwargs) -> None:
        pass


class Pipeline:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.access_log = AccessLog()

    def handle(self, conn, head, sink, *, content_length, body_expected):
        exchange = Exchange(sink)
        self.exchanges.append(exchange)
        return exchange


@pytest.fixture
def env():
    clock = MemoryReactorClock()
    text = 'listen_port = 8080\n[apps.a]\nserver_name = "localhost"\nreverse_proxy = [{ upstream = [{ location = "127.0.0.1:9" }] }]\n'
    holder = StateHolder(build_state(parse_config(tomllib.loads(text)).config, clock))
    pipeline = Pipeline()
    return H1Factory(pipeline, holder, clock), pipeline, clock


def connect(factory: H1Factory):
    address = IPv4Address("TCP", "192.0.2.1", 40000)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def closing(transport: StringTransport) -> bool:
    return transport.disconnecting


def lose(protocol, transport) -> None:
    """What the reactor does after loseConnection: the connection ends."""
    protocol.connectionLost(None)


def test_factory_tracks_its_connections(env) -> None:
    factory, _, _ = env
    protocol, transport = connect(factory)
    assert factory.connections == {protocol}
    lose(protocol, transport)
    assert factory.connections == set()


def test_idle_keep_alive_connection_closes_at_once(env) -> None:
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    pipeline.exchanges[-1].respond()
    assert not closing(transport)
    factory.drain()
    assert closing(transport)


def test_request_in_flight_is_answered_with_connection_close_then_closed(env) -> None:
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    factory.drain()
    assert not closing(transport)
    pipeline.exchanges[-1].respond(b"done")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in answer and answer.endswith(b"done")
    assert closing(transport)


def test_response_already_started_closes_after_its_end(env) -> None:
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    sink = pipeline.exchanges[-1].sink
    sink.send_head(200, [(b"content-length", b"4")])
    sink.send_data(b"do")
    factory.drain()
    assert not closing(transport)
    sink.send_data(b"ne")
    sink.send_end(None)
    assert closing(transport)


def test_connection_started_during_the_drain_closes(env) -> None:
    """A TLS handshake that was in progress when the listener closed."""
    factory, _, _ = env
    factory.drain()
    _, transport = connect(factory)
    assert closing(transport)


# -- HTTP/2 ----------------------------------------------------------------------------------------


def frames(data: bytes) -> list[Frame]:
    found = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        found.append(frame)
        data = data[9 + length :]
    return found


def h2_client():
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


def send_request(client: H2Connection, protocol) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"localhost")],
        end_stream=True,
    )
    protocol.dataReceived(client.data_to_send())
    return stream_id


def test_http2_stream_in_flight_gets_goaway_then_its_answer_then_the_close(env) -> None:
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    client = h2_client()
    protocol.dataReceived(client.data_to_send())
    first = send_request(client, protocol)
    clock.advance(0.01)  # batched writes
    transport.clear()
    factory.drain()
    goaways = [f for f in frames(transport.value()) if isinstance(f, GoAwayFrame)]
    assert [(g.error_code, g.last_stream_id) for g in goaways] == [(0, first)]
    assert not closing(transport)
    # A stream the client opened before reading the GOAWAY is refused (it may retry it).
    transport.clear()
    late = send_request(client, protocol)
    clock.advance(0.01)
    assert len(pipeline.exchanges) == 1
    resets = [f for f in frames(transport.value()) if isinstance(f, RstStreamFrame)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(late, ErrorCodes.REFUSED_STREAM)]
    # The stream in flight is answered, then the connection closes.
    transport.clear()
    pipeline.exchanges[0].respond(b"done")
    clock.advance(0.01)
    sent = frames(transport.value())
    assert any(isinstance(f, HeadersFrame) and f.stream_id == first for f in sent)
    assert any(isinstance(f, DataFrame) and f.stream_id == first and "END_STREAM" in f.flags for f in sent)
    assert closing(transport)


def test_idle_http2_connection_gets_goaway_and_closes(env) -> None:
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    client = h2_client()
    protocol.dataReceived(client.data_to_send())
    send_request(client, protocol)
    pipeline.exchanges[0].respond()
    clock.advance(0.01)
    transport.clear()
    factory.drain()
    goaways = [f for f in frames(transport.value()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [0]
    assert closing(transport)


def test_pipelined_requests_already_received_are_all_answered(env) -> None:
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"GET /1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    factory.drain()
    for index in range(3):
        assert not closing(transport)
        pipeline.exchanges[index].respond(b"r%d" % index)
    answer = transport.value()
    assert answer.count(b"HTTP/1.1 200") == 3
    assert answer.count(b"connection: close") == 1 and answer.endswith(b"r2")
    assert closing(transport)


def test_a_connection_that_never_reports_its_end_does_not_hold_the_stop_forever() -> None:
    clock = Clock()
    factory = FakeFactory(1)
    (connection,) = factory.connections
    connection.abortConnection = lambda: None  # a transport that never ends
    drainer = Drainer(clock, lambda: [factory])
    done = drainer.drain(1)
    clock.advance(1.01)
    assert not fired(done)
    clock.pump([0.05] * 120)
    assert fired(done)
    assert not clock.getDelayedCalls()


def test_first_signal_stops_the_reactor_a_second_one_forces() -> None:
    import signal

    from rpxy.shutdown import install_shutdown_signals

    class FakeReactor:
        running = True

        def __init__(self) -> None:
            self.stops = 0

        def callFromThread(self, f, *args) -> None:
            f(*args)

        def stop(self) -> None:
            self.stops += 1

    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    reactor, forced = FakeReactor(), []
    try:
        assert install_shutdown_signals(reactor, lambda: forced.append(1)) == [signal.SIGTERM, signal.SIGINT]
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert (reactor.stops, forced) == (1, [])
        # Installed again (the reactor replaced it meanwhile): the next signal still forces.
        install_shutdown_signals(reactor, lambda: forced.append(1))
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert (reactor.stops, forced) == (1, [1])
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
