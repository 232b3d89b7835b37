"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through the real proxy to an HTTP/1.1
WebSocket upstream, with a raw h2 client on the cleartext port (prior knowledge).
"""

from __future__ import annotations

import os

import pytest
from h2.events import RemoteSettingsChanged
from h2.settings import SettingCodes

from tests.integration.conftest import Rpxy, free_port, wait_for_port
from tests.support.bad_upstream import BadUpstream
from tests.support.h2client import H2Client
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsgen import Authority


@pytest.fixture(scope="module")
def bad():
    with BadUpstream() as started:
        yield started


@pytest.fixture(scope="module")
def proxy(bad, tmp_path_factory):
    # /ws: the recording upstream's WebSocket echo; /bad/...: its other paths (/bad/ok is a 200).
    config = f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[apps.app]
server_name = "localhost"
[[apps.app.reverse_proxy]]
upstream = [{{ location = "{bad.location}" }}]
[[apps.app.reverse_proxy]]
path = "/bad"
replace_path = "/"
upstream = [{{ location = "{bad.location}" }}]
"""
    started = Rpxy(tmp_path_factory.mktemp("wsh2"), config)
    yield started
    started.stop()
    assert_no_tracebacks(started.system_log())


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return header + payload


def open_websocket(client: H2Client, path: str = "/ws", *extra) -> int:
    return client.request(
        path,
        method="CONNECT",
        headers=[
            (b":protocol", b"websocket"),
            (b"sec-websocket-version", b"13"),
            *extra,
        ],
        end=False,
    )


def test_settings_advertise_extended_connect(proxy):
    with H2Client(proxy.port) as client:
        assert client.read_until(lambda c: c.of(RemoteSettingsChanged))
        (settings,) = client.of(RemoteSettingsChanged)[:1]
        assert settings.changed_settings[SettingCodes.ENABLE_CONNECT_PROTOCOL].new_value == 1


def test_websocket_echo_over_an_h2_stream(proxy, bad):
    with H2Client(proxy.port) as client:
        stream_id = open_websocket(client, "/ws", (b"sec-websocket-protocol", b"chat"))
        assert client.read_until(lambda c: c.status(stream_id) is not None)
        assert client.status(stream_id) == 200
        headers = client.headers(stream_id)
        assert b"sec-websocket-accept" not in headers and b"upgrade" not in headers
        assert not client.ended(stream_id)

        request = bad.wait_for_request("/ws")
        assert request is not None and request.upgrade and request.method == "GET"
        fields = {name.lower(): value for name, value in request.headers}
        assert fields["upgrade"].lower() == "websocket"
        assert "upgrade" in fields["connection"].lower()
        assert len(fields["sec-websocket-key"]) == 24
        assert fields["sec-websocket-version"] == "13"
        assert fields["sec-websocket-protocol"] == "chat"

        client.send_body(stream_id, ws_frame(1, b"hello over h2"), end=False)
        expected = server_frame(1, b"hello over h2")
        assert client.read_until(lambda c: len(c.body(stream_id)) >= len(expected))
        assert client.body(stream_id) == expected

        # larger than the stream window both ways: flow control keeps the relay going
        payload = os.urandom(200_000)
        client.send_body(stream_id, ws_frame(2, payload), end=False)
        expected += server_frame(2, payload)
        assert client.read_until(lambda c: len(c.body(stream_id)) >= len(expected), timeout=10)
        assert client.body(stream_id) == expected

        # the close handshake: the upstream echoes it and closes; the stream ends
        client.send_body(stream_id, ws_frame(8, b"\x03\xe8"), end=False)
        expected += server_frame(8, b"\x03\xe8")
        assert client.read_until(lambda c: c.ended(stream_id))
        assert client.body(stream_id) == expected


def test_other_streams_work_alongside_the_tunnel(proxy):
    with H2Client(proxy.port) as client:
        ws = open_websocket(client)
        assert client.read_until(lambda c: c.status(ws) is not None)
        assert client.status(ws) == 200
        get = client.request("/bad/ok")
        assert client.wait_response(get)
        assert client.status(get) == 200
        client.send_body(ws, ws_frame(1, b"still here"), end=False)
        expected = server_frame(1, b"still here")
        assert client.read_until(lambda c: len(c.body(ws)) >= len(expected))
        assert client.body(ws) == expected
        # the client ends its side: the tunnel closes, the stream ends
        client.h2.end_stream(ws)
        client.flush()
        assert client.read_until(lambda c: c.ended(ws) or ws in c.resets())
        again = client.request("/bad/ok")
        assert client.wait_response(again)
        assert client.status(again) == 200


def test_a_refused_upgrade_is_relayed_as_is(proxy):
    with H2Client(proxy.port) as client:
        stream_id = open_websocket(client, "/bad/ok")
        assert client.wait_response(stream_id)
        assert client.status(stream_id) == 200
        assert client.ended(stream_id)
        assert client.body(stream_id) == b"ok"  # the upstream's own answer
        missing = open_websocket(client, "/bad/nothing-here")
        assert client.wait_response(missing)
        assert client.status(missing) == 404 and client.ended(missing)


def test_plain_connect_is_405_and_other_protocols_501(proxy):
    with H2Client(proxy.port, validate=False) as client:
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"localhost:443")], end_stream=True)
        client.flush()
        assert client.wait_response(stream_id)
        assert client.status(stream_id) == 405
        other = client.request(
            "/ws", method="CONNECT", headers=[(b":protocol", b"connect-udp")], end=False
        )
        assert client.wait_response(other)
        assert client.status(other) == 501
        ok = client.request("/bad/ok")
        assert client.wait_response(ok)
        assert client.status(ok) == 200


def test_websocket_over_h2_on_the_tls_port(bad, tmp_path):
    # The same tunnel when h2 is chosen by ALPN on the TLS port (browsers only do RFC 8441 there).
    authority = Authority("wsh2 tls CA")
    cert, key = authority.issue("localhost").write(tmp_path, "localhost")
    ca_file = authority.write_cert(tmp_path / "ca.pem")
    tls_port = free_port()
    config = f"""
listen_port = {{port}}
listen_port_tls = {tls_port}
listen_address_v4 = "127.0.0.1"
[apps.app]
server_name = "localhost"
tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}", https_redirection = false }}
[[apps.app.reverse_proxy]]
upstream = [{{ location = "{bad.location}" }}]
"""
    directory = tmp_path / "proxy"
    directory.mkdir()
    proxy = Rpxy(directory, config)
    try:
        wait_for_port(tls_port)
        with H2Client(tls_port, ca_file=ca_file) as client:
            assert client.read_until(lambda c: c.of(RemoteSettingsChanged))
            settings = client.of(RemoteSettingsChanged)[0].changed_settings
            assert settings[SettingCodes.ENABLE_CONNECT_PROTOCOL].new_value == 1
            stream_id = open_websocket(client, "/ws?over-tls")
            assert client.read_until(lambda c: c.status(stream_id) is not None)
            assert client.status(stream_id) == 200
            client.send_body(stream_id, ws_frame(1, b"hello over TLS"), end=False)
            expected = server_frame(1, b"hello over TLS")
            assert client.read_until(lambda c: len(c.body(stream_id)) >= len(expected))
            assert client.body(stream_id) == expected
            client.send_body(stream_id, ws_frame(8, b"\x03\xe8"), end=False)
            expected += server_frame(8, b"\x03\xe8")
            assert client.read_until(lambda c: c.ended(stream_id))
            assert client.body(stream_id) == expected
        forwarded = {name.lower(): value for name, value in bad.wait_for_request("/ws?over-tls").headers}
        assert forwarded["x-forwarded-proto"] == "https"
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())
