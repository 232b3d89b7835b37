"""WebSocket over HTTP/2 (RFC 8441) in the front end, in memory: h2's client against the
real H2Session with the fake pipeline of test_h2_frontend, and a fake upstream tunnel end.
"""

from __future__ import annotations

import pytest
from h2.events import RemoteSettingsChanged
from h2.settings import SettingCodes
from test_h2_frontend import Client, Malformed, make_env, parse_request_headers

from rpxy.front.h2 import parse_extended_request


class FakeUpstreamEnd:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def register_producer(self, producer) -> None:
        self.producer = producer


@pytest.fixture
def env():
    return make_env()


def open_websocket(client: Client, path: str = "/chat") -> int:
    return client.request(path, method="CONNECT", end=False, extra=[(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")])


def switch(client: Client, stream_id: int):
    exchange = client.pipeline.exchanges[-1]
    upstream = FakeUpstreamEnd()
    exchange.sink.send_head(101, [(b"upgrade", b"websocket"), (b"connection", b"upgrade"), (b"sec-websocket-accept", b"x")])
    end = exchange.sink.start_tunnel(upstream)
    client.pump()
    return exchange, upstream, end


def test_extended_connect_parsing():
    block = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/c"), (b":authority", b"a")]
    assert parse_extended_request(block) == (b"CONNECT", b"/c", b"a", [], b"websocket")
    with pytest.raises(Malformed):
        parse_request_headers(block)  # the 4-tuple parser still refuses :protocol
    for bad in (
        [(b":method", b"GET"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/c")],
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a")],
        [(b":method", b"CONNECT"), (b":protocol", b"web socket"), (b":scheme", b"https"), (b":path", b"/c")],
    ):
        with pytest.raises(Malformed):
            parse_extended_request(bad)


def test_settings_enable_connect_protocol(env):
    client = Client(env)
    (settings,) = client.of(RemoteSettingsChanged)
    assert settings.changed_settings[SettingCodes.ENABLE_CONNECT_PROTOCOL].new_value == 1


def test_extended_connect_is_a_get_upgrade_for_the_pipeline(env):
    client = Client(env)
    open_websocket(client)
    exchange = client.pipeline.exchanges[0]
    head = exchange.head
    assert (head.method, head.path, head.version, head.protocol) == (b"GET", b"/chat", b"2", b"websocket")
    fields = dict(head.headers)
    assert len(fields[b"sec-websocket-key"]) == 24 and fields[b"sec-websocket-version"] == b"13"
    assert client.pipeline.calls[0]["body_expected"] is False
    assert client.pipeline.calls[0]["content_length"] is None


def test_101_becomes_200_and_data_flows_both_ways(env):
    client = Client(env)
    stream_id = open_websocket(client)
    client.h2.send_data(stream_id, b"early")  # before the upstream switched: held
    client.pump()
    stream = client.session.streams[stream_id]
    assert stream.unacked == 5
    exchange, upstream, end = switch(client, stream_id)
    headers, body, ended = client.response(stream_id)
    assert headers[b":status"] == b"200" and b"sec-websocket-accept" not in headers and not ended
    assert upstream.written == [b"early"] and upstream.producer is not None
    assert stream.unacked == 0  # acknowledged once the upstream took it
    client.h2.send_data(stream_id, b"to upstream")
    client.pump()
    assert upstream.written[-1] == b"to upstream"
    end.write(b"to client")
    client.pump()
    assert client.response(stream_id)[1] == b"to client"
    end.close()  # the upstream closed
    client.pump()
    assert client.response(stream_id)[2]
    assert client.session.streams == {}


def test_client_end_stream_closes_the_upstream(env):
    client = Client(env)
    stream_id = open_websocket(client)
    exchange, upstream, end = switch(client, stream_id)
    client.h2.end_stream(stream_id)
    client.pump()
    assert exchange.gone  # the pipeline closes the upstream
    assert client.response(stream_id)[2]


def test_upstream_is_paused_while_the_client_window_is_full(env):
    client = Client(make_env(), window=100)
    stream_id = open_websocket(client)
    exchange, upstream, end = switch(client, stream_id)
    end.write(b"a" * 150)
    client.pump()
    assert upstream.paused and len(client.response(stream_id)[1]) == 100
    client.h2.acknowledge_received_data(100, stream_id)
    client.pump()
    assert not upstream.paused and client.response(stream_id)[1] == b"a" * 150


def test_client_data_waits_for_the_upstream(env):
    client = Client(env)
    stream_id = open_websocket(client)
    exchange, upstream, end = switch(client, stream_id)
    upstream.producer.pauseProducing()  # the upstream's transport is full
    client.h2.send_data(stream_id, b"x" * 16384)
    client.h2.send_data(stream_id, b"x" * 16384)
    client.h2.send_data(stream_id, b"x" * 16384)
    client.h2.send_data(stream_id, b"x" * 16383)
    client.pump()
    assert sum(map(len, upstream.written)) == 65535
    assert client.h2.local_flow_control_window(stream_id) == 0  # nothing handed back
    upstream.producer.resumeProducing()
    client.pump()
    assert client.h2.local_flow_control_window(stream_id) == 65535


def test_refused_upgrade_is_relayed(env):
    client = Client(env)
    stream_id = open_websocket(client)
    client.pipeline.exchanges[0].respond(404, b"")
    client.pump()
    headers, body, ended = client.response(stream_id)
    assert headers[b":status"] == b"404" and ended


def test_other_protocols_are_501(env):
    client = Client(env)
    stream_id = client.request("/c", method="CONNECT", end=False, extra=[(b":protocol", b"connect-udp")])
    assert client.response(stream_id)[0][b":status"] == b"501"
    assert client.pipeline.exchanges == []
