"""``tls = true`` upstreams: verified with service-identity, against the system store or ``ca_cert_path``."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from tests.integration.conftest import ROOT, curl, curl_status
from tests.support.certs import write_self_signed


@pytest.fixture
def tls_origin(tmp_path):
    cert, key = write_self_signed(tmp_path / "origin-certs", "localhost")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.origin", "--name", "tls-origin", "--tls-cert", str(cert), "--tls-key", str(key)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(proc.stdout.readline().split()[1])
    yield port, cert
    proc.terminate()
    proc.wait(5)


def _config(location: str, extra: str = "") -> str:
    return f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[apps.a]
server_name = "a.test"
reverse_proxy = [{{ upstream = [{{ location = "{location}", tls = true{extra} }}] }}]
"""


def test_tls_upstream_verified_against_ca_cert_path(rpxy_factory, tls_origin):
    port, cert = tls_origin
    proxy = rpxy_factory(_config(f"localhost:{port}", f', ca_cert_path = "{cert}"'))
    result = curl("-H", "Host: a.test", f"{proxy.url}/echo")
    body = json.loads(result.stdout)
    assert body["origin"] == "tls-origin"
    # The upstream saw an https request forwarded for an http client.
    headers = {name.lower(): value for name, value in body["headers"]}
    assert headers["x-forwarded-proto"] == "http"
    line = proxy.access_lines()[-1]
    assert line.endswith(f'"https://localhost:{port}/echo"')


def test_untrusted_upstream_certificate_is_502(rpxy_factory, tls_origin):
    port, _cert = tls_origin
    # Without ca_cert_path the system store is used, which does not trust the test CA.
    proxy = rpxy_factory(_config(f"localhost:{port}"))
    assert curl_status("-H", "Host: a.test", f"{proxy.url}/echo") == 502
    assert "certificate verify failed" in proxy.system_log()


def test_upstream_certificate_not_signed_by_the_configured_ca_is_502(rpxy_factory, tls_origin, tmp_path):
    port, _cert = tls_origin
    other_cert, _other_key = write_self_signed(tmp_path / "other", "other.test")
    # ca_cert_path names another CA: the origin's certificate does not chain to it.
    proxy = rpxy_factory(_config(f"localhost:{port}", f', ca_cert_path = "{other_cert}"'))
    assert curl_status("-H", "Host: a.test", f"{proxy.url}/echo") == 502



@pytest.fixture
def tls_origin_without_alpn(tmp_path):
    """A TLS server (Python's ssl, no ALPN configured) that answers anything with HTTP/1.1 400."""
    cert, key = write_self_signed(tmp_path / "plain-tls", "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(2)
                    seen.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], cert, seen
    stop.set()
    thread.join(5)
    listener.close()


def test_forced_http2_to_a_tls_upstream_without_alpn_h2_is_502_naming_alpn(rpxy_factory, tls_origin_without_alpn):
    # The upstream completes the handshake without choosing h2: the HTTP/2 preface is never
    # sent to it as if it were an HTTP/1.1 request, and the log names the cause.
    port, cert, seen = tls_origin_without_alpn
    config = _config(f"localhost:{port}", f', ca_cert_path = "{cert}"').replace(
        "}] }]", '}], upstream_options = ["force_http2_upstream"] }]'
    )
    proxy = rpxy_factory(config)
    assert curl_status("-H", "Host: a.test", f"{proxy.url}/echo") == 502
    assert "did not agree to HTTP/2 over TLS (ALPN chose none)" in proxy.system_log()
    assert not any(data.startswith(b"PRI * HTTP/2.0") for data in seen)
