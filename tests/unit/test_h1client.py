"""The upstream HTTP/1.1 client connection in memory: response framing, keep-alive return to
the pool, failures that must become 502, the lazily re-armed response deadline."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from rpxy.upstream.h1client import UpstreamConnection


class FakePool:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.released: list[UpstreamConnection] = []
        self.lost: list[UpstreamConnection] = []

    def release(self, connection: UpstreamConnection) -> None:
        self.released.append(connection)

    def connection_lost(self, connection: UpstreamConnection) -> None:
        self.lost.append(connection)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def upstream_head(self, status, headers, keep_alive) -> None:
        self.events.append(("head", status, headers))

    def upstream_data(self, data) -> None:
        self.events.append(("data", data))

    def upstream_flush(self) -> None:
        pass

    def upstream_end(self, trailers) -> None:
        self.events.append(("end", trailers))

    def upstream_failed(self, reason, received_anything) -> None:
        self.events.append(("failed", received_anything))

    def upstream_tunnel_data(self, data) -> None:
        self.events.append(("tunnel", data))

    def upstream_timeout(self) -> None:
        self.events.append(("timeout",))

    def body(self) -> bytes:
        return b"".join(event[1] for event in self.events if event[0] == "data")

    def kinds(self) -> list[str]:
        return [event[0] for event in self.events if event[0] != "data"]


def make():
    pool = FakePool()
    connection = UpstreamConnection(pool)
    transport = StringTransport(lenient=True)
    connection.makeConnection(transport)
    return connection, transport, pool


def start(connection, *, method_head: bool = False, chunked: bool = False, end: bool = True) -> Recorder:
    handler = Recorder()
    connection.send_request(handler, b"GET / HTTP/1.1\r\nhost: u\r\n\r\n", is_head=method_head, chunked_body=chunked)
    if end:
        connection.end_body(None)
    return handler


def lost(connection, reason=ConnectionDone) -> None:
    connection.connectionLost(Failure(reason()))


def test_content_length_response_returns_connection_to_pool():
    connection, transport, pool = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhel")
    connection.dataReceived(b"lo")
    assert handler.kinds() == ["head", "end"]
    assert handler.events[0] == ("head", 200, [(b"content-length", b"5"), (b"x-a", b"1")])
    assert handler.body() == b"hello"
    assert pool.released == [connection]
    assert not transport.disconnecting


def test_response_before_request_body_finished_is_not_pooled_early():
    connection, _, pool = make()
    handler = start(connection, end=False)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert handler.kinds() == ["head", "end"]
    assert pool.released == []  # the request is still being written on it
    connection.end_body(None)
    assert pool.released == [connection]


def test_chunked_response_with_trailers():
    connection, _, pool = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nGrpc-Status: 0\r\n\r\n")
    assert handler.body() == b"abcde"
    assert handler.events[-1] == ("end", [(b"grpc-status", b"0")])
    assert pool.released == [connection]


def test_head_response_has_no_body_and_next_response_parses():
    connection, _, pool = make()
    handler = start(connection, method_head=True)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert handler.kinds() == ["head", "end"]
    assert pool.released == [connection]
    second = start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert second.kinds() == ["head", "end"]
    assert second.body() == b"ok"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(status):
    connection, _, pool = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert handler.kinds() == ["head", "end"]
    assert pool.released == [connection]


def test_interim_responses_are_not_relayed():
    connection, _, _ = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    connection.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert handler.kinds() == ["head", "end"]
    assert handler.events[0][1] == 201


def test_connection_close_response_is_not_pooled():
    connection, transport, pool = make()
    start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert pool.released == []
    assert transport.disconnecting


def test_http10_response_is_not_pooled():
    connection, transport, pool = make()
    start(connection)
    connection.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.released == []
    assert transport.disconnecting


@pytest.mark.parametrize(
    "response",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"<html>http/0.9</html>\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * (70 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 050 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 199 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=[
        "garbage", "http09", "bad-status", "cl-and-te", "two-lengths", "negative-length", "bad-chunk", "huge-head",
        "status-below-100", "status-above-599", "body-in-interim",
    ],
)
def test_malformed_responses_fail(response):
    connection, transport, pool = make()
    handler = start(connection)
    connection.dataReceived(response)
    assert "failed" in handler.kinds()
    assert "end" not in handler.kinds()
    assert not [event for event in handler.events if event[0] == "data"]  # no body bytes relayed
    assert transport.disconnected  # aborted, never reused
    assert pool.released == []


def test_close_delimited_response_ends_at_eof():
    connection, _, pool = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    connection.dataReceived(b" bytes")
    lost(connection)
    assert handler.kinds() == ["head", "end"]
    assert handler.body() == b"some bytes"
    assert pool.released == []


@pytest.mark.parametrize(
    "partial",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"],
    ids=["content-length", "chunked"],
)
def test_truncated_response_fails(partial):
    connection, _, _ = make()
    handler = start(connection)
    connection.dataReceived(partial)
    lost(connection, ConnectionLost)
    assert handler.kinds() == ["head", "failed"]
    assert handler.events[-1] == ("failed", True)


def test_close_before_any_response_reports_nothing_received():
    connection, _, pool = make()
    handler = start(connection)
    lost(connection)
    assert handler.events == [("failed", False)]
    assert pool.lost == [connection]


def test_unsolicited_bytes_on_an_idle_connection_close_it():
    connection, transport, pool = make()
    start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.released == [connection]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert transport.disconnecting


def test_switching_protocols_starts_a_tunnel():
    connection, transport, _ = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    connection.dataReceived(b"\x81\x01!")
    assert handler.kinds() == ["head", "tunnel", "tunnel"]
    assert [event[1] for event in handler.events if event[0] == "tunnel"] == [b"\x81\x02hi", b"\x81\x01!"]
    connection.tunnel_write(b"raw")
    assert transport.value().endswith(b"raw")
    lost(connection)
    assert handler.kinds()[-1] == "end"


def test_chunked_request_body_encoding():
    connection, transport, _ = make()
    start(connection, chunked=True, end=False)
    connection.write_body(b"hello")
    connection.write_body(b"")  # nothing: an empty chunk would end the body
    connection.end_body([(b"x-t", b"1")])
    assert transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n")


def test_response_deadline_fires_and_is_lazily_moved():
    connection, _, pool = make()
    clock = pool.reactor
    handler = start(connection)
    connection.set_response_deadline(clock.seconds() + 10)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    connection.set_response_deadline(None)
    # Next request on the same connection: the deadline moves without a new timer.
    second = start(connection)
    connection.set_response_deadline(clock.seconds() + 10)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)  # the first timer fires at t=10 and re-arms for t=15
    assert second.events == []
    clock.advance(4.9)
    assert second.events == []
    clock.advance(0.1)
    assert second.events == [("timeout",)]
    assert handler.kinds() == ["head", "end"]


def test_response_deadline_timer_cancelled_on_close():
    connection, _, pool = make()
    start(connection)
    connection.set_response_deadline(pool.reactor.seconds() + 10)
    lost(connection)
    assert pool.reactor.getDelayedCalls() == []


def test_a_connection_paused_by_a_slow_client_is_resumed_before_pooling():
    connection, transport, pool = make()
    handler = start(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    connection.pauseProducing()  # the client's transport is full
    assert transport.producerState == "paused"
    connection.dataReceived(b"world")  # already in flight: the response completes while paused
    assert handler.kinds() == ["head", "end"]
    assert pool.released == [connection]
    assert transport.producerState == "producing"
