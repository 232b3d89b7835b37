"""Sending the PROXY protocol to upstreams (upstream_options send_proxy_protocol_v1 / _v2; beyond rpxy).

Each upstream connection starts with a header naming the client connection; a keep-alive
client keeps its own upstream connection and two clients never share one. Over TLS the
header precedes the ClientHello. The origin here refuses any connection without a header.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.integration.conftest import curl
from tests.support.proxy_origin import ProxyOrigin
from tests.support.tlsgen import Authority


def config(location: str, option: str, extra: str = "") -> str:
    return f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[apps.pp]
server_name = "pp.test"
reverse_proxy = [{{ upstream = [{{ location = "{location}"{extra} }}], upstream_options = ["{option}"] }}]
"""


@pytest.fixture
def origin():
    started = ProxyOrigin()
    yield started
    started.stop()


def keep_alive_requests(port: int, count: int) -> list[dict]:
    """``count`` requests on one client connection; the answers and the client's own port."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for n in range(count):
            sock.sendall(f"GET /r{n} HTTP/1.1\r\nHost: pp.test\r\n\r\n".encode())
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = json.loads(reader.read(length))
            answer["client_port"] = sock.getsockname()[1]
            answers.append(answer)
    return answers


@pytest.mark.parametrize(("option", "version"), [("send_proxy_protocol_v1", 1), ("send_proxy_protocol_v2", 2)])
def test_each_client_connection_gets_its_own_announced_upstream_connection(rpxy_factory, origin, option, version):
    proxy = rpxy_factory(config(origin.location, option))
    first = keep_alive_requests(proxy.port, 3)
    second = keep_alive_requests(proxy.port, 2)
    for answers in (first, second):
        assert {a["version"] for a in answers} == {version}
        assert {tuple(a["source"]) for a in answers} == {("127.0.0.1", answers[0]["client_port"])}
        assert {tuple(a["destination"]) for a in answers} == {("127.0.0.1", proxy.port)}
        assert len({a["connection"] for a in answers}) == 1  # the client's connection is reused
    assert first[0]["connection"] != second[0]["connection"]  # never shared between clients
    assert origin.refused == []


def test_curl_through_a_tls_upstream_with_the_header_before_the_handshake(rpxy_factory, tmp_path):
    authority = Authority("pp upstream CA")
    leaf = authority.issue("localhost")
    cert, key = leaf.write(tmp_path, "localhost")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    origin = ProxyOrigin(tls_context=context)
    try:
        ca = authority.write_cert(tmp_path / "ca.pem")
        proxy = rpxy_factory(config(origin.location, "send_proxy_protocol_v2", f', tls = true, ca_cert_path = "{ca}"'))
        result = curl("-H", "Host: pp.test", f"{proxy.url}/over-tls")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["version"] == 2 and answer["source"][0] == "127.0.0.1"
        assert answer["request"] == "GET /over-tls HTTP/1.1"
        assert origin.refused == []
    finally:
        origin.stop()


@pytest.mark.parametrize(("option", "kind"), [("send_proxy_protocol_v1", "http"), ("send_proxy_protocol_v2", "tcp")])
def test_health_checks_announce_themselves_as_the_proxys_own(rpxy_factory, origin, option, kind):
    # PROXY UNKNOWN (v1) / LOCAL (v2): an upstream requiring the header accepts the checks.
    health = f'{{ type = "{kind}", path = "/health", interval = 1, timeout = 0.5, unhealthy_threshold = 1, healthy_threshold = 1 }}'
    text = config(origin.location, option).replace(
        f'upstream_options = ["{option}"] }}', f'upstream_options = ["{option}"], health_check = {health} }}'
    )
    assert "health_check" in text
    proxy = rpxy_factory(text)
    deadline = time.monotonic() + 10
    while origin.connections < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert origin.connections >= 2  # checks arrived
    if kind == "http":
        assert origin.refused == []
    assert keep_alive_requests(proxy.port, 1)[0]["version"] == (1 if option.endswith("v1") else 2)
    assert "unhealthy" not in proxy.system_log().lower()
