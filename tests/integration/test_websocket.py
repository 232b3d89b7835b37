"""WebSocket (HTTP/1.1 Upgrade) through the real proxy with the ``websockets`` client, and
the upgrade corner cases: refused upgrades, ``h2c`` (never relayed), and a 101 that does
not match what was asked for.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.integration.conftest import Origin, Rpxy, curl
from tests.support.bad_upstream import BadUpstream
from tests.support.rawhttp import RawConnection, assert_no_tracebacks, request

HOST = "127.0.0.1"  # the app's server_name, so that ws://127.0.0.1:port/ sends a matching Host


@pytest.fixture(scope="module")
def origin():
    started = Origin("ws")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def bad():
    with BadUpstream() as started:
        yield started


@pytest.fixture(scope="module")
def proxy(origin, bad, tmp_path_factory):
    # /echo (and everything else) goes to the test origin; /ws to the recording upstream's
    # WebSocket echo, /bad/... to its misbehaving paths.
    config = f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[apps.app]
server_name = "{HOST}"
[[apps.app.reverse_proxy]]
upstream = [{{ location = "{origin.location}" }}]
[[apps.app.reverse_proxy]]
path = "/bad"
replace_path = "/"
upstream = [{{ location = "{bad.location}" }}]
[[apps.app.reverse_proxy]]
path = "/ws"
upstream = [{{ location = "{bad.location}" }}]
"""
    started = Rpxy(tmp_path_factory.mktemp("ws"), config)
    yield started
    started.stop()
    assert_no_tracebacks(started.system_log())


def ws_connect(proxy: Rpxy, path: str = "/ws", **kwargs):
    return connect(f"ws://{HOST}:{proxy.port}{path}", proxy=None, compression=None, open_timeout=5, close_timeout=5, **kwargs)


def test_text_and_binary_messages_round_trip(proxy):
    with ws_connect(proxy) as ws:
        ws.send("hello through rpxy")
        assert ws.recv(timeout=5) == "hello through rpxy"
        payload = os.urandom(3000)
        ws.send(payload)
        assert ws.recv(timeout=5) == payload
        for n in range(20):
            ws.send(f"message {n}")
        assert [ws.recv(timeout=5) for _ in range(20)] == [f"message {n}" for n in range(20)]


def test_large_message_round_trips(proxy):
    payload = os.urandom(1024 * 1024)
    with ws_connect(proxy, max_size=2 * 1024 * 1024) as ws:
        ws.send(payload)
        assert ws.recv(timeout=30) == payload


def test_ping_pong_through_the_tunnel(proxy):
    with ws_connect(proxy) as ws:
        assert ws.ping(b"are you there").wait(5)


def test_close_handshake_closes_both_sides(proxy):
    # The origin answers a close frame and drops the connection: the proxy must pass the
    # drop on to the client.
    key = base64.b64encode(os.urandom(16)).decode()
    with RawConnection(proxy.port) as conn:
        conn.send(
            request(
                "GET",
                "/ws",
                host=HOST,
                headers=[
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", key),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
        )
        switched = conn.read_head()
        assert switched.status == 101
        assert switched.header("upgrade").lower() == "websocket"
        assert "upgrade" in switched.header("connection").lower()
        conn.send(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # masked close, code 1000, zero mask
        assert conn.wait_closed(timeout=5)
        assert conn.buffer == b"\x88\x02\x03\xe8"


def test_origin_sees_the_upgrade_request(proxy):
    # /echo does not switch protocols: the client gets its 200 as an ordinary response, and
    # the JSON shows the Upgrade and Connection headers reached the origin.
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(proxy, "/echo?ws")
    response = refused.value.response
    assert response.status_code == 200
    seen = {name.lower(): value for name, value in json.loads(response.body)["headers"]}
    assert seen["upgrade"].lower() == "websocket"
    assert "upgrade" in seen["connection"].lower()
    assert "sec-websocket-key" in seen


def test_upstream_refusing_the_upgrade_is_relayed(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(
            request("GET", "/echo?refused", host=HOST, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])
        )
        response = conn.read_response()
        assert response.status == 200
        assert json.loads(response.body)["uri"] == "/echo?refused"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(proxy, "/status/403")
    assert refused.value.response.status_code == 403


def test_h2c_upgrade_is_answered_as_http11(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(
            request(
                "GET",
                "/echo?h2c",
                host=HOST,
                headers=[("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")],
            )
        )
        response = conn.read_response()
        assert response.version == "HTTP/1.1"
        assert response.status == 200
        assert response.header("upgrade") is None
        seen = {name.lower() for name, _ in json.loads(response.body)["headers"]}
        assert "upgrade" not in seen
        assert "http2-settings" not in seen
        assert "connection" not in seen


def test_h2c_upgrade_with_chunked_body_then_pipelined_request(proxy):
    # curl --http2 on http:// sends Upgrade: h2c even with a body; llhttp stops at the
    # Upgrade, so the body and what follows must still be parsed as HTTP/1.1.
    h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    with RawConnection(proxy.port) as conn:
        conn.send(
            f"POST /echo?h2c-chunked HTTP/1.1\r\nHost: {HOST}\r\n{h2c}Transfer-Encoding: chunked\r\n\r\n".encode()
            + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            + request("POST", "/echo?after-h2c", host=HOST, body=b"next")
            + request("GET", "/echo?last", host=HOST, close=True)
        )
        first = json.loads(conn.read_response().body)
        assert (first["uri"], first["body_length"]) == ("/echo?h2c-chunked", 11)
        second = json.loads(conn.read_response().body)
        assert (second["uri"], second["body_length"]) == ("/echo?after-h2c", 4)
        assert json.loads(conn.read_response().body)["uri"] == "/echo?last"
        assert conn.wait_closed()


def test_h2c_upgrade_with_body_by_curl(proxy):
    result = curl("-sS", "--http2", "-d", "hello h2c", f"{proxy.url}/echo?curl-h2c", timeout=10)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["body_length"] == 9
    assert "upgrade" not in {name.lower() for name, _ in data["headers"]}


def test_h2c_upgrade_with_body(proxy):
    body = b"payload with an h2c upgrade"
    with RawConnection(proxy.port) as conn:
        conn.send(
            request(
                "POST",
                "/echo?h2c-body",
                host=HOST,
                headers=[("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")],
                body=body,
            )
        )
        response = conn.read_response()
        assert response.status == 200
        data = json.loads(response.body)
        assert data["body_length"] == len(body)
        assert "upgrade" not in {name.lower() for name, _ in data["headers"]}


@pytest.mark.parametrize("path", ["/bad/101-mismatch", "/bad/101-none"])
def test_101_without_matching_upgrade_is_500(proxy, path):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", path, host=HOST, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]))
        response = conn.read_response()
        assert response.status == 500
        assert response.body == b""


def test_101_to_a_request_without_upgrade_is_500(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/bad/101-mismatch?plain", host=HOST))
        response = conn.read_response()
        assert response.status == 500


def test_proxy_keeps_serving_after_websockets(proxy):
    for _ in range(5):
        with ws_connect(proxy) as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "x"
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/echo?after", host=HOST, close=True))
        assert conn.read_response().status == 200
