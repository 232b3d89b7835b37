"""PROXY protocol v1/v2 on the TCP listeners through the real proxy (experimental.tcp_recv_proxy_protocol).

The carried address is the client: it reaches the upstream as X-Forwarded-For, is what the
access log shows, and is what max_clients_per_ip counts. Connections without a header, with
a bad one, or from outside trusted_proxies are closed without an answer.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from rpxy.proxy_protocol import encode_v1, encode_v2
from tests.integration.conftest import Origin, Rpxy, curl, free_port, wait_for_port
from tests.support.http import echo_json
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsgen import Authority


@pytest.fixture(scope="module")
def origin():
    started = Origin("pp")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pp-pki")
    authority = Authority("proxy protocol CA")
    cert, key = authority.issue("pp.test").write(directory, "pp.test")
    return authority.write_cert(directory / "ca.pem"), cert, key


def config(origin: Origin, pki, *, trusted: str = '"127.0.0.0/8"', tls_port: int | None = None, top: str = "") -> str:
    ca, cert, key = pki
    tls = ""
    if tls_port is not None:
        tls = f'tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}", https_redirection = false }}\n'
    return f"""
listen_port = {{port}}
{f"listen_port_tls = {tls_port}" if tls_port else ""}
listen_address_v4 = "127.0.0.1"
trusted_forwarded_proxies = []
{top}
[apps.pp]
server_name = "pp.test"
{tls}reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]
[experimental.tcp_recv_proxy_protocol]
trusted_proxies = [{trusted}]
timeout = 3000
"""


@pytest.fixture(scope="module")
def proxy(origin, pki, tmp_path_factory):
    tls_port = free_port()
    started = Rpxy(tmp_path_factory.mktemp("pp"), config(origin, pki, tls_port=tls_port))
    wait_for_port(tls_port)
    started.tls_port = tls_port
    yield started
    started.stop()
    assert_no_tracebacks(started.system_log())


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    return b"".join(chunks)


def echo_request(path: str = "/echo") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n".encode()


def forwarded_for(answer: bytes) -> str:
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    body = echo_json(answer.split(b"\r\n\r\n", 1)[1])
    headers = {name.lower(): value for name, value in body["headers"]}
    return headers["x-forwarded-for"]


def test_v1_address_is_the_client(proxy):
    header = encode_v1(("203.0.113.7", 5555), ("127.0.0.1", proxy.port))
    answer = exchange(proxy.port, header + echo_request("/echo?v1"))
    assert forwarded_for(answer) == "203.0.113.7"
    lines = [line for line in proxy.access_lines() if "/echo?v1" in line]
    assert lines and "<- 203.0.113.7:5555 --" in lines[-1], lines


def test_v2_ipv6_address_is_the_client(proxy):
    header = encode_v2(("2001:db8::42", 4242), ("::1", proxy.port))
    assert forwarded_for(exchange(proxy.port, header + echo_request())) == "2001:db8::42"


def test_v2_before_tls_on_the_tls_port(proxy, pki):
    ca, _cert, _key = pki
    raw = socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=5)
    raw.sendall(encode_v2(("198.51.100.23", 1000), ("127.0.0.1", proxy.tls_port)))
    context = ssl.create_default_context(cafile=str(ca))
    with context.wrap_socket(raw, server_hostname="pp.test") as tls:
        tls.sendall(echo_request("/echo?tls"))
        chunks = []
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    assert forwarded_for(b"".join(chunks)) == "198.51.100.23"


def test_curl_haproxy_protocol(proxy):
    # A real client sending PROXY v1 (its own address: 127.0.0.1).
    result = curl("--haproxy-protocol", "-H", "Host: pp.test", f"{proxy.url}/echo")
    assert result.returncode == 0, result.stderr
    headers = {name.lower(): value for name, value in echo_json(result.stdout)["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_no_header_or_a_bad_one_gets_no_answer(proxy):
    assert exchange(proxy.port, echo_request()) == b""  # not a PROXY header: closed at once
    assert exchange(proxy.port, b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n" + echo_request()) == b""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 ")  # and nothing more: the 3 s timeout closes it (a reset)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - started < 9
    log = proxy.system_log()
    assert "PROXY protocol: no PROXY protocol header from 127.0.0.1" in log
    assert "PROXY protocol: no header from 127.0.0.1 in time" in log


def test_untrusted_peer_is_refused(origin, pki, tmp_path):
    proxy = Rpxy(tmp_path, config(origin, pki, trusted='"10.0.0.0/8"'))
    try:
        header = encode_v1(("203.0.113.7", 5555), ("127.0.0.1", proxy.port))
        assert exchange(proxy.port, header + echo_request()) == b""
        assert "connection from 127.0.0.1 refused: not in trusted_proxies" in proxy.system_log()
    finally:
        proxy.stop()


def test_max_clients_per_ip_counts_the_carried_address(origin, pki, tmp_path):
    proxy = Rpxy(tmp_path, config(origin, pki, top="max_clients_per_ip = 1"))
    try:
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        held.sendall(encode_v1(("203.0.113.1", 1), ("127.0.0.1", proxy.port)) + b"GET /echo HTTP/1.1\r\nHost: pp.test\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200")  # counted, kept open
        same = exchange(proxy.port, encode_v1(("203.0.113.1", 2), ("127.0.0.1", proxy.port)) + echo_request())
        other = exchange(proxy.port, encode_v1(("203.0.113.2", 3), ("127.0.0.1", proxy.port)) + echo_request())
        held.close()
        assert same == b""  # the same carried client: over its limit
        assert forwarded_for(other) == "203.0.113.2"  # another carried client, same TCP peer
    finally:
        proxy.stop()


def test_a_reload_turns_the_requirement_on_and_off(origin, pki, tmp_path):
    with_pp = config(origin, pki)
    without_pp = with_pp.split("[experimental.tcp_recv_proxy_protocol]")[0]
    proxy = Rpxy(tmp_path, without_pp, extra_args=["--config-poll-interval", "0.2"])
    header = encode_v1(("203.0.113.9", 9), ("127.0.0.1", proxy.port))

    def plain_served() -> bool:
        return exchange(proxy.port, echo_request()).startswith(b"HTTP/1.1 200")

    def wait_for(predicate) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.2)
        return False

    try:
        assert plain_served()
        proxy.config_path.write_text(with_pp.replace("{port}", str(proxy.port)))
        assert wait_for(lambda: not plain_served())
        assert forwarded_for(exchange(proxy.port, header + echo_request())) == "203.0.113.9"
        proxy.config_path.write_text(without_pp.replace("{port}", str(proxy.port)))
        assert wait_for(plain_served)
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())
