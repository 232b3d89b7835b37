"""gRPC end to end through the real rpxy process: a grpcio client on rpxy's cleartext port
(h2c prior knowledge) and a grpcio server upstream (h2c: gRPC always goes over HTTP/2).

All four call kinds, an error status with details and trailing metadata, metadata both
ways, large messages (flow control both ways), a client cancel that the server observes,
gRPC over TLS with ALPN to rpxy, and the version options (force_http2_upstream for plain
requests, force_http11_upstream overriding gRPC).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import pytest

grpc = pytest.importorskip("grpc")

from tests.integration.conftest import curl, raw_request  # noqa: E402
from tests.support.grpc_h2origin import H2Origin  # noqa: E402
from tests.support.grpc_server import EchoServer, stub  # noqa: E402
from tests.support.tlsgen import Authority  # noqa: E402

AUTHORITY = "grpc.test"

CONFIG = """
listen_port = {port}
listen_address_v4 = "127.0.0.1"
[apps.g]
server_name = "grpc.test"
[[apps.g.reverse_proxy]]
upstream = [{ location = "127.0.0.1:UPSTREAM" }]
upstream_options = [OPTIONS]
"""


def _config(upstream_port: int, options: str = "") -> str:
    return CONFIG.replace("UPSTREAM", str(upstream_port)).replace("OPTIONS", options)


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def channel(rpxy_factory, echo_server):
    proxy = rpxy_factory(_config(echo_server.port))
    with grpc.insecure_channel(
        f"127.0.0.1:{proxy.port}", options=[("grpc.default_authority", AUTHORITY)]
    ) as channel:
        channel.proxy = proxy  # type: ignore[attr-defined]
        yield channel


def test_unary(channel) -> None:
    assert stub(channel, "uu", "Unary")(b"hello", timeout=10) == b"echo:hello"
    line = channel.proxy.access_lines()[-1]
    assert "/test.Echo/Unary" in line and " 200 " in line


def test_metadata_both_ways(channel, echo_server) -> None:
    response, call = stub(channel, "uu", "Unary").with_call(
        b"m", metadata=(("x-meta", "v1"), ("x-trailer", "t1")), timeout=10
    )
    assert response == b"echo:m"
    assert ("x-meta-back", "v1") in tuple(call.initial_metadata())
    assert ("x-trailer-back", "t1") in tuple(call.trailing_metadata())
    seen = dict(echo_server.seen_metadata)
    assert seen["x-meta"] == "v1"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # it went through rpxy's header policy


def test_error_status_details_and_trailers(channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub(channel, "uu", "Fail")(b"oops", timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "bad thing: oops"
    assert ("x-why", "because") in tuple(error.trailing_metadata())


def test_server_streaming(channel) -> None:
    items = list(stub(channel, "us", "ServerStream")(b"50", timeout=10))
    assert items == [b"item %d" % index for index in range(50)]


def test_client_streaming(channel) -> None:
    result = stub(channel, "su", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10)
    assert result == b"a,b,c"


def test_bidi_streaming_interleaved(channel) -> None:
    """Each answer arrives before the next message is sent: nothing waits for the end."""
    outgoing: list[bytes] = []
    ready = threading.Semaphore(0)

    def requests():
        for index in range(5):
            message = b"m%d" % index
            outgoing.append(message)
            yield message
            assert ready.acquire(timeout=10), "the answer did not come back before the next message"

    answers = []
    for answer in stub(channel, "ss", "Bidi")(requests(), timeout=20):
        answers.append(answer)
        ready.release()
    assert answers == [b"re:m%d" % index for index in range(5)]


def test_large_messages_both_ways(channel) -> None:
    """Bigger than every HTTP/2 window on both hops: flow control must keep moving."""
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB
    assert stub(channel, "uu", "Unary")(payload, timeout=30) == b"echo:" + payload
    parts = [bytes([index]) * 700_000 for index in range(4)]
    assert stub(channel, "su", "ClientStream")(iter(parts), timeout=30) == b",".join(parts)


def test_many_concurrent_calls(channel) -> None:
    call = stub(channel, "uu", "Unary")
    futures = [call.future(b"%d" % index, timeout=20) for index in range(60)]
    assert [future.result() for future in futures] == [b"echo:%d" % index for index in range(60)]


def test_client_cancel_reaches_the_server(channel, echo_server) -> None:
    future = stub(channel, "uu", "Hang").future(b"x", timeout=30)
    assert echo_server.hang_started.wait(10)
    future.cancel()
    assert echo_server.cancelled.wait(10), "the upstream stream was not cancelled"
    # The proxy still serves.
    assert stub(channel, "uu", "Unary")(b"after", timeout=10) == b"echo:after"


def test_force_http11_upstream_overrides_grpc(rpxy_factory, echo_server) -> None:
    proxy = rpxy_factory(_config(echo_server.port, '"force_http11_upstream"'))
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.default_authority", AUTHORITY)]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            stub(channel, "uu", "Unary")(b"x", timeout=10)
    # HTTP/1.1 to an HTTP/2-only server: no gRPC answer.
    assert info.value.code() != grpc.StatusCode.OK


@pytest.fixture
def h2_origin():
    origin = H2Origin()
    yield origin
    origin.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")
def test_force_http2_upstream_for_plain_requests(rpxy_factory, h2_origin) -> None:
    """A plain request reaches an h2c-only origin only with force_http2_upstream."""
    plain = rpxy_factory(_config(h2_origin.port))
    forced = rpxy_factory(_config(h2_origin.port, '"force_http2_upstream"'))
    status = "-w%{http_code}"
    assert curl("-o", "/dev/null", status, "-H", f"Host: {AUTHORITY}", f"{plain.url}/x").stdout == b"502"
    result = curl("-H", f"Host: {AUTHORITY}", "--data-binary", "hello", f"{forced.url}/path?q=1")
    seen = json.loads(result.stdout)
    assert seen["method"] == "POST" and seen["path"] == "/path?q=1" and seen["scheme"] == "http"
    assert seen["authority"] == AUTHORITY and seen["body"] == 5
    names = [name for name, _ in seen["headers"]]
    assert "host" not in names and "connection" not in names and "x-forwarded-for" in names
    # curl --http2-prior-knowledge to rpxy (h2c front end), response trailers relayed.
    result = curl("--http2-prior-knowledge", "-H", f"Host: {AUTHORITY}", f"{forced.url}/trailers")
    assert json.loads(result.stdout)["path"] == "/trailers"
    # Request trailers over an HTTP/1.1 chunked body to the HTTP/2 upstream.
    raw = (
        b"POST /t HTTP/1.1\r\nHost: grpc.test\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 42\r\n\r\n"
    )
    answer = raw_request(forced.port, raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    seen = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[1] if b"chunked" in answer.lower() else answer.split(b"\r\n\r\n", 1)[1])
    assert seen["body"] == 3 and ["x-sum", "42"] in seen["trailers"]


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is required")
def test_h2load_multiplexes_over_few_upstream_connections(rpxy_factory, h2_origin) -> None:
    forced = rpxy_factory(_config(h2_origin.port, '"force_http2_upstream"'))
    result = subprocess.run(
        ["h2load", "-n", "400", "-c", "4", "-m", "20", "-H", f":authority: {AUTHORITY}", f"{forced.url}/load"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "400 succeeded" in result.stdout, result.stdout
    assert "status codes: 400 2xx" in result.stdout, result.stdout
    # Streams share connections: 80 concurrent requests, far fewer upstream connections.
    assert 1 <= h2_origin.connections <= 4


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")
def test_http2_upstream_backpressure_both_ways(rpxy_factory, tmp_path) -> None:
    """A slow HTTP/2 upstream (upload) and a slow client (download): bounded memory."""
    origin = H2Origin(read_rate=24 * 1024 * 1024)
    try:
        proxy = rpxy_factory(_config(origin.port, '"force_http2_upstream"'))
        before = _peak_rss_kib(proxy.proc.pid)
        size = 40 * 1024 * 1024
        path = tmp_path / "upload.bin"
        with open(path, "wb") as out:
            out.truncate(size)
        result = curl("-H", f"Host: {AUTHORITY}", "--data-binary", f"@{path}", f"{proxy.url}/upload", timeout=60)
        assert json.loads(result.stdout)["body"] == size
        result = curl(
            "--limit-rate", "20M", "-o", "/dev/null", "-w", "%{size_download}", "-H", f"Host: {AUTHORITY}",
            f"{proxy.url}/big?n={size}", timeout=60,
        )
        assert result.stdout == str(size).encode()
        grown = _peak_rss_kib(proxy.proc.pid) - before
        assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB for 40 MiB each way"
    finally:
        origin.stop()


def test_grpc_over_tls(rpxy_factory, echo_server, tmp_path) -> None:
    ca = Authority()
    leaf = ca.issue(AUTHORITY)
    cert, key = leaf.write(tmp_path / "certs", "grpc")
    port_tls = _free()
    config = f"""
listen_port = {{port}}
listen_port_tls = {port_tls}
listen_address_v4 = "127.0.0.1"
[apps.g]
server_name = "grpc.test"
tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}", https_redirection = false }}
[[apps.g.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:{echo_server.port}" }}]
"""
    rpxy_factory(config)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem())
    _wait_port(port_tls)
    with grpc.secure_channel(
        f"127.0.0.1:{port_tls}",
        credentials,
        options=[("grpc.ssl_target_name_override", AUTHORITY), ("grpc.default_authority", AUTHORITY)],
    ) as channel:
        assert stub(channel, "uu", "Unary")(b"tls", timeout=10) == b"echo:tls"
        items = list(stub(channel, "us", "ServerStream")(b"3", timeout=10))
        assert items == [b"item 0", b"item 1", b"item 2"]


def _free() -> int:
    from tests.integration.conftest import free_port

    return free_port()


def _wait_port(port: int) -> None:
    from tests.integration.conftest import wait_for_port

    wait_for_port(port)
    time.sleep(0.05)


def test_grpc_to_a_tls_upstream_with_alpn_h2(rpxy_factory, tmp_path) -> None:
    ca = Authority()
    leaf = ca.issue("localhost")
    server = EchoServer(credentials=grpc.ssl_server_credentials([(leaf.key_pem(), leaf.cert_pem())]))
    try:
        ca_path = ca.write_cert(tmp_path / "ca.pem")
        config = f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[apps.g]
server_name = "grpc.test"
[[apps.g.reverse_proxy]]
upstream = [{{ location = "localhost:{server.port}", tls = true, ca_cert_path = "{ca_path}" }}]
"""
        proxy = rpxy_factory(config)
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.default_authority", AUTHORITY)]) as channel:
            assert stub(channel, "uu", "Unary")(b"over tls", timeout=10) == b"echo:over tls"
            result = stub(channel, "su", "ClientStream")(iter([b"x", b"y"]), timeout=10)
            assert result == b"x,y"
        assert f'"https://localhost:{server.port}/test.Echo/Unary"' in proxy.access_lines()[0]
    finally:
        server.stop()
