"""The HTTP/1.1 front end in memory: H1Connection on a StringTransport with a fake clock
and a fake pipeline, so that timeouts, ordering and flow control are checked exactly and
without waiting.
"""

from __future__ import annotations

import tomllib

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from rpxy.config.load import parse_config
from rpxy.front.h1 import HEADER_TIMEOUT, IDLE_TIMEOUT, H1Factory
from rpxy.state import StateHolder, build_state


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

    def respond(self, status: int = 200, body: bytes = b"ok", *, length: bool = True, headers=()) -> None:
        response_headers = list(headers)
        if length:
            response_headers.append((b"content-length", b"%d" % len(body)))
        self.sink.send_head(status, response_headers)
        if body:
            self.sink.send_data(body)
        self.sink.send_end(None)


class RecordingAccessLog:
    """Collects (method, path, status) of what the front end logs by itself."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes, int]] = []

    def record(self, conn, head, host, status, *, upstream) -> None:
        self.records.append((head.method, head.path, status))


class FakePipeline:
    """Records requests; ``answer`` (if set) answers inside handle(), like a local response."""

    def __init__(self) -> None:
        self.exchanges: list[FakeExchange] = []
        self.answer: int | None = None
        self.access_log = RecordingAccessLog()

    def handle(self, conn, head, sink, *, content_length, body_expected):
        exchange = FakeExchange(head, sink)
        self.exchanges.append(exchange)
        if self.answer is not None:
            exchange.respond(self.answer, b"", headers=[(b"connection", b"close")])
        return exchange


def make_factory(top: str = "", experimental: str = ""):
    clock = MemoryReactorClock()
    text = (
        f"listen_port = 8080\n{top}\n"
        '[apps.a]\nserver_name = "localhost"\n'
        'reverse_proxy = [{ upstream = [{ location = "127.0.0.1:9" }] }]\n'
    )
    if experimental:
        text += f"[experimental]\n{experimental}\n"
    config = parse_config(tomllib.loads(text)).config
    holder = StateHolder(build_state(config, clock))
    pipeline = FakePipeline()
    return H1Factory(pipeline, holder, clock), pipeline, clock


def connect(factory: H1Factory, peer: str = "192.0.2.1", port: int = 40000):
    address = IPv4Address("TCP", peer, port)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=address, lenient=True)
    protocol.makeConnection(transport)
    return protocol, transport


def closed(transport: StringTransport) -> bool:
    return transport.disconnecting or transport.disconnected


def lose(protocol, transport) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


GET = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture
def env():
    return make_factory()


# -- header-read deadline and idle timeout (rpxy's hard-coded 20 s) ------------------------


def test_rpxy_timeouts():
    assert HEADER_TIMEOUT == 20.0
    assert IDLE_TIMEOUT == 20.0


def test_header_deadline_is_absolute_dribbling_does_not_extend_it(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    for _ in range(19):
        clock.advance(1)
        protocol.dataReceived(b"a")  # one byte a second: progress, but never a complete head
        assert not closed(transport)
    clock.advance(0.9)
    assert not closed(transport)
    clock.advance(0.1)  # 20 s after the first byte
    assert closed(transport)
    assert pipeline.exchanges == []
    assert transport.value() == b""


def test_header_deadline_counts_from_the_request_start(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    clock.advance(5)
    pipeline.exchanges[0].respond()
    clock.advance(10)  # idle 10 s, then a slow second head starts at t=15
    protocol.dataReceived(b"GET /y HTTP/1.1\r\n")
    clock.advance(19.9)
    assert not closed(transport)
    clock.advance(0.1)
    assert closed(transport)
    assert len(pipeline.exchanges) == 1


def test_idle_connection_without_any_request_is_closed(env):
    factory, _, clock = env
    _, transport = connect(factory)
    clock.advance(19.9)
    assert not closed(transport)
    clock.advance(0.1)
    assert closed(transport)
    assert transport.value() == b""


def test_idle_timeout_restarts_after_each_response(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    for n in range(3):
        clock.advance(15)  # under 20 s each time, 45 s in total
        protocol.dataReceived(GET)
        pipeline.exchanges[n].respond()
        assert not closed(transport)
    clock.advance(19.9)
    assert not closed(transport)
    clock.advance(0.1)
    assert closed(transport)


def test_no_timeout_while_the_response_is_awaited_or_streamed(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    clock.advance(120)  # a slow upstream is upstream_response_timeout's business
    assert not closed(transport)
    exchange = pipeline.exchanges[0]
    exchange.sink.send_head(200, [(b"content-length", b"3")])
    clock.advance(60)
    exchange.sink.send_data(b"abc")
    exchange.sink.send_end(None)
    assert not closed(transport)
    clock.advance(IDLE_TIMEOUT)
    assert closed(transport)


def test_a_body_at_the_minimum_rate_is_not_cut_by_any_deadline(env):
    # 500 bytes/s for 60 s: slower than the 20 s header deadline, at the body's minimum rate.
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 30000\r\n\r\n")
    for _ in range(60):
        clock.advance(1)
        protocol.dataReceived(b"b" * 500)
    exchange = pipeline.exchanges[0]
    assert not closed(transport)
    assert sum(map(len, exchange.body)) == 30000 and exchange.ended


def test_a_trickled_body_is_cut_at_its_absolute_deadline(env):
    # slowhttptest -B: a byte now and then never extends the deadline by much.
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(3):
        clock.advance(5)
        protocol.dataReceived(b"b")
    assert not closed(transport)
    clock.advance(5.1)  # 20 s + 3 bytes / 500 B/s
    assert closed(transport)
    assert pipeline.exchanges[0].gone or transport.disconnecting


def test_time_the_proxy_holds_the_body_back_does_not_count(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
    exchange = pipeline.exchanges[0]
    clock.advance(10)
    exchange.sink.request_producer.pauseProducing()  # the upstream is slow: backpressure
    clock.advance(60)
    assert not closed(transport)
    exchange.sink.request_producer.resumeProducing()
    clock.advance(9)
    assert not closed(transport)  # 10 + 9 s of the client's own time
    clock.advance(2)
    assert closed(transport)


def test_a_reader_that_stalls_for_20s_is_cut(env):
    # slowhttptest -X: the response is never taken; its transport stays paused.
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    exchange = pipeline.exchanges[0]
    upstream = RecordingProducer()
    exchange.sink.send_head(200, [(b"content-length", b"1000000")])
    exchange.sink.register_producer(upstream)
    watch = transport.producer  # what the transport pauses when the client does not read
    watch.pauseProducing()
    assert upstream.log == ["pause"]
    clock.advance(15)
    watch.resumeProducing()  # the client read a little: the buffer drained
    watch.pauseProducing()
    clock.advance(19)
    assert not closed(transport)
    clock.advance(1.5)
    assert closed(transport)


class RecordingProducer:
    def __init__(self) -> None:
        self.log: list[str] = []

    def pauseProducing(self) -> None:
        self.log.append("pause")

    def resumeProducing(self) -> None:
        self.log.append("resume")

    def stopProducing(self) -> None:
        self.log.append("stop")


def test_slowloris_sockets_are_evicted_at_max_clients():
    factory, pipeline, clock = make_factory("max_clients = 2")
    slow = [connect(factory, port=40000 + n) for n in range(2)]
    for protocol, _transport in slow:
        clock.advance(0.5)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nX-a: b\r\n")  # and never the rest
    probe, probe_transport = connect(factory, port=42000)
    assert not closed(probe_transport)
    assert closed(slow[0][1]) and not closed(slow[1][1])  # the longest waiting one went
    probe.dataReceived(GET)
    assert pipeline.exchanges and pipeline.exchanges[-1].head.path == b"/x"
    assert factory.active == 2


def test_a_connection_with_a_request_in_flight_is_never_evicted():
    factory, pipeline, clock = make_factory("max_clients = 1")
    busy, busy_transport = connect(factory)
    busy.dataReceived(GET)  # head complete, answer pending
    clock.advance(60)
    _late, late_transport = connect(factory, port=40001)
    assert closed(late_transport) and not closed(busy_transport)
def test_keep_alive_requests_cost_no_timer_each(env):
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    for n in range(200):
        clock.advance(0.01)
        protocol.dataReceived(GET)
        pipeline.exchanges[n].respond()
    # One lazily re-armed deadline for the connection, not one per request.
    assert len(clock.getDelayedCalls()) == 1
    assert not closed(transport)


# -- connection_handling_timeout and client limits ---------------------------------------------


def test_connection_handling_timeout_aborts_even_mid_response():
    factory, pipeline, clock = make_factory(experimental="connection_handling_timeout = 30")
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    exchange = pipeline.exchanges[0]
    exchange.sink.send_head(200, [(b"content-length", b"1000")])
    exchange.sink.send_data(b"x" * 10)
    clock.advance(29.9)
    assert not closed(transport)
    clock.advance(0.1)
    assert transport.disconnected  # aborted, not a graceful close
    lose(protocol, transport)
    assert exchange.gone
    assert clock.getDelayedCalls() == []


def test_connection_handling_timer_is_cancelled_when_the_connection_ends():
    factory, pipeline, clock = make_factory(experimental="connection_handling_timeout = 30")
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    pipeline.exchanges[0].respond()
    lose(protocol, transport)
    assert clock.getDelayedCalls() == []


def test_max_clients():
    factory, pipeline, _ = make_factory(top="max_clients = 3")
    held = [connect(factory, port=40000 + n) for n in range(3)]
    assert not any(closed(transport) for _, transport in held)
    for protocol, _transport in held:
        protocol.dataReceived(GET)  # each has a request in flight: none can be evicted
    refused, refused_transport = connect(factory, port=40010)
    assert refused_transport.disconnected  # dropped without a response
    refused.dataReceived(GET)
    assert refused_transport.value() == b""
    assert len(pipeline.exchanges) == 3
    lose(refused, refused_transport)  # a refused connection frees no slot it never had
    assert factory.active == 3
    lose(*held.pop())
    assert factory.active == 2
    protocol, transport = connect(factory, port=40020)
    assert not closed(transport)
    protocol.dataReceived(GET)
    assert len(pipeline.exchanges) == 4


def test_max_clients_per_ip():
    factory, _, _ = make_factory(top="max_clients_per_ip = 2")
    first = connect(factory, peer="192.0.2.1", port=1)
    connect(factory, peer="192.0.2.1", port=2)
    _, refused = connect(factory, peer="192.0.2.1", port=3)
    assert refused.disconnected
    _, other = connect(factory, peer="192.0.2.2", port=1)
    assert not closed(other)
    lose(*first)
    _, again = connect(factory, peer="192.0.2.1", port=4)
    assert not closed(again)
    assert factory.per_ip == {"192.0.2.1": 2, "192.0.2.2": 1}


# -- ordering, flow control, bodies -----------------------------------------------------------------


def test_pipelined_requests_wait_their_turn_with_reading_paused(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(GET + b"POST /2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc" + GET)
    assert len(pipeline.exchanges) == 1
    assert transport.producerState == "paused"
    pipeline.exchanges[0].respond(body=b"one")
    assert len(pipeline.exchanges) == 2
    second = pipeline.exchanges[1]
    assert (second.head.path, b"".join(second.body), second.ended) == (b"/2", b"abc", True)
    second.respond(body=b"two")
    assert transport.producerState == "producing"
    pipeline.exchanges[2].respond(body=b"three")
    out = transport.value()
    assert out.index(b"one") < out.index(b"two") < out.index(b"three")
    assert out.count(b"HTTP/1.1 200") == 3


def test_response_to_http10_without_length_is_close_delimited(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /x HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
    pipeline.exchanges[0].respond(body=b"streamed", length=False)
    out = transport.value()
    assert b"transfer-encoding" not in out
    assert b"connection: close\r\n" in out
    assert out.endswith(b"\r\n\r\nstreamed")
    assert closed(transport)


def test_response_to_http11_without_length_is_chunked(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    pipeline.exchanges[0].respond(body=b"streamed", length=False)
    out = transport.value()
    assert b"transfer-encoding: chunked\r\n" in out
    assert out.endswith(b"\r\n\r\n8\r\nstreamed\r\n0\r\n\r\n")
    assert not closed(transport)


def test_head_response_has_no_body_framing(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"HEAD /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    pipeline.exchanges[0].sink.send_head(200, [])
    pipeline.exchanges[0].sink.send_end(None)
    out = transport.value()
    assert b"transfer-encoding" not in out
    assert out.endswith(b"\r\n\r\n")
    assert not closed(transport)


def test_chunked_request_trailers_reach_the_exchange(env):
    factory, pipeline, _ = env
    protocol, _ = connect(factory)
    protocol.dataReceived(
        b"POST /t HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Check: 1\r\n\r\n"
    )
    exchange = pipeline.exchanges[0]
    assert b"".join(exchange.body) == b"abc"
    assert exchange.ended
    assert exchange.trailers == [(b"x-check", b"1")]


def test_expect_100_continue_is_sent_once_dispatched(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (b"expect", b"100-continue") not in pipeline.exchanges[0].head.headers
    protocol.dataReceived(b"hi")
    assert pipeline.exchanges[0].ended


def test_expect_100_continue_not_sent_when_answered_at_once(env):
    factory, pipeline, _ = env
    pipeline.answer = 413
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in out
    assert closed(transport)


def test_malformed_body_while_relaying_drops_the_exchange_and_answers_400(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    exchange = pipeline.exchanges[0]
    protocol.dataReceived(b"zz\r\n")
    assert exchange.gone
    assert not exchange.ended
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert closed(transport)
    assert pipeline.access_log.records == [(b"POST", b"/x", 400)]


def test_malformed_body_after_the_response_started_aborts(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    exchange = pipeline.exchanges[0]
    exchange.sink.send_head(200, [(b"content-length", b"100")])
    exchange.sink.send_data(b"partial")
    protocol.dataReceived(b"zz\r\n")
    assert transport.disconnected
    assert b"400" not in transport.value()
    lose(protocol, transport)
    assert exchange.gone


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_declined_h2c_upgrade_body_and_next_request_are_parsed(env, chunked):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    if chunked:
        framing, body = b"Transfer-Encoding: chunked\r\n", b"4\r\nbody\r\n0\r\n\r\n"
    else:
        framing, body = b"Content-Length: 4\r\n", b"body"
    head = b"POST /up HTTP/1.1\r\nHost: localhost\r\n" + upgrade + framing + b"\r\n"
    protocol.dataReceived(head + body[:3])
    protocol.dataReceived(body[3:] + GET)
    first = pipeline.exchanges[0]
    assert (b"".join(first.body), first.ended) == (b"body", True)
    first.respond()
    assert [exchange.head.path for exchange in pipeline.exchanges] == [b"/up", b"/x"]
    pipeline.exchanges[1].respond()
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2
    assert not closed(transport)


@pytest.mark.parametrize("separate", [False, True], ids=["same-read", "next-read"])
def test_declined_h2c_upgrade_without_body_keeps_the_connection(env, separate):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    upgrade = (
        b"GET /a HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    if separate:
        protocol.dataReceived(upgrade)
        protocol.dataReceived(GET)
    else:
        protocol.dataReceived(upgrade + GET)
    pipeline.exchanges[0].respond()
    pipeline.exchanges[1].respond()
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2
    assert not closed(transport)


def test_declined_upgrade_on_http10_is_plain(env):
    factory, pipeline, _ = env
    protocol, transport = connect(factory)
    protocol.dataReceived(
        b"POST /a HTTP/1.0\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    exchange = pipeline.exchanges[0]
    assert (b"".join(exchange.body), exchange.ended) == (b"abc", True)


def test_a_request_pipelined_behind_a_closing_answer_never_reaches_the_pipeline(env):
    # Found by fuzz/h1_request: the POST behind a 400 (Connection: close) was sent upstream
    # although its client would never read the answer.
    factory, pipeline, _clock = env
    pipeline.answer = 400
    protocol, transport = connect(factory)
    protocol.dataReceived(GET + b"POST /b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n\r\nx")
    assert [exchange.head.path for exchange in pipeline.exchanges] == [b"/x"]
    assert closed(transport)
    assert transport.value().count(b"HTTP/1.1 ") == 1


def test_a_response_that_ended_while_paused_is_not_cut_as_a_stall(env):
    # Once the upstream is unregistered the transport reports no progress: the stall deadline
    # must not cut a client still reading the buffered tail.
    factory, pipeline, clock = env
    protocol, transport = connect(factory)
    protocol.dataReceived(GET)
    exchange = pipeline.exchanges[0]
    exchange.sink.send_head(200, [(b"content-length", b"2")])
    exchange.sink.register_producer(RecordingProducer())
    watch = transport.producer
    watch.pauseProducing()
    exchange.sink.send_data(b"ok")
    exchange.sink.send_end(None)  # unregisters the upstream
    clock.advance(19)
    protocol.dataReceived(GET)  # the next request on the keep-alive connection
    clock.advance(5)
    assert not closed(transport)
    second = pipeline.exchanges[1]
    second.sink.register_producer(RecordingProducer())
    assert transport.producer is watch  # one watch per connection, not one per response
