"""HTTP/2 through the real rpxy process: curl (--http2 over TLS with ALPN, and
--http2-prior-knowledge on the cleartext port), h2load, and raw frames from an h2
client for the stream errors and floods, each followed by proof that the proxy still
serves other connections.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame

from tests.integration.conftest import curl, free_port
from tests.support.canned import CannedOrigin
from tests.support.h2client import H2Client
from tests.support.slow_sink import SlowSink
from tests.support.tlsgen import Authority

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")

CONFIG = """
listen_port = {port}
listen_port_tls = {tls_port}
max_concurrent_streams = 32
[apps.app]
server_name = "localhost"
tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}", https_redirection = false }}
[[apps.app.reverse_proxy]]
upstream = [{{ location = "{upstream}" }}]
"""


class Setup:
    def __init__(self, proxy, tls_port: int, ca_file, origin) -> None:
        self.proxy = proxy
        self.port = proxy.port
        self.tls_port = tls_port
        self.ca_file = ca_file
        self.origin = origin

    @property
    def h2c(self) -> str:
        return f"http://localhost:{self.port}"

    @property
    def https(self) -> str:
        return f"https://localhost:{self.tls_port}"

    def curl_tls(self, *args: str, timeout: float = 30):
        return curl("--http2", "--cacert", str(self.ca_file), *args, timeout=timeout)

    def curl_h2c(self, *args: str, timeout: float = 30):
        return curl("--http2-prior-knowledge", *args, timeout=timeout)

    def origin_count(self) -> int:
        result = curl(f"http://127.0.0.1:{self.origin.port}/count")
        return int(result.stdout)

    def still_serving(self) -> None:
        for result in (self.curl_h2c("-w", " %{http_version}", f"{self.h2c}/echo"), self.curl_tls("-w", " %{http_version}", f"{self.https}/echo")):
            assert result.returncode == 0, result.stderr
            assert result.stdout.endswith(b" 2"), result.stdout[-40:]


def start(rpxy_factory, tmp_path, upstream: str, origin=None) -> Setup:
    authority = Authority("h2 test CA")
    cert, key = authority.issue("localhost").write(tmp_path, "localhost")
    ca_file = authority.write_cert(tmp_path / "ca.pem")
    tls_port = free_port()
    config = CONFIG.format(port="{port}", tls_port=tls_port, cert=cert, key=key, upstream=upstream)
    proxy = rpxy_factory(config)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            H2Client(tls_port, ca_file=ca_file).close()
            break
        except OSError:
            time.sleep(0.05)
    return Setup(proxy, tls_port, ca_file, origin)


@pytest.fixture
def setup(rpxy_factory, origin, tmp_path) -> Setup:
    return start(rpxy_factory, tmp_path, origin.location, origin)


def echo(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def header(data: dict, name: str) -> list[str]:
    return [value for key, value in data["headers"] if key.lower() == name]


# -- curl over TLS (ALPN h2) and h2c prior knowledge ------------------------------------------


def test_get_over_tls_negotiates_h2(setup):
    result = setup.curl_tls("-sS", "-D", "-", "-w", "\n%{http_version}", f"{setup.https}/echo?q=1")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("HTTP/2 200")
    assert text.rstrip().endswith("\n2")
    assert re.search(r"(?im)^server: rpxy\r?$", text)
    data = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert data["uri"] == "/echo?q=1"
    assert header(data, "host") == [f"localhost:{setup.tls_port}"]  # from :authority
    assert header(data, "x-forwarded-proto") == ["https"]


def test_get_over_h2c_prior_knowledge(setup):
    result = setup.curl_h2c("-w", "\n%{http_version}", f"{setup.h2c}/echo")
    text = result.stdout.decode()
    assert text.rstrip().endswith("\n2"), result.stderr
    data = json.loads(text[: text.rindex("}") + 1])
    assert header(data, "host") == [f"localhost:{setup.port}"]
    assert header(data, "x-forwarded-proto") == ["http"]


def test_http11_still_served_on_both_ports(setup):
    for url, extra in ((f"{setup.https}/echo", ["--cacert", str(setup.ca_file)]), (f"{setup.h2c}/echo", [])):
        result = curl("--http1.1", *extra, "-o", "/dev/null", "-w", "%{http_version} %{http_code}", url)
        assert result.stdout == b"1.1 200", (url, result.stderr)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_post_body_arrives_intact(setup, tmp_path, tls):
    body = bytes(range(256)) * 12000 + b"tail"  # ~3 MiB: many windows' worth
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    run = setup.curl_tls if tls else setup.curl_h2c
    base = setup.https if tls else setup.h2c
    data = echo(run("--data-binary", f"@{path}", "-H", "content-type: application/octet-stream", f"{base}/echo"))
    assert data["method"] == "POST"
    assert data["body_length"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_style_post_without_length(setup, tmp_path):
    body = b"0123456789" * 50000
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    # -T - with a pipe: curl sends DATA without a content-length over HTTP/2.
    result = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-T", "-", "-X", "POST", f"{setup.h2c}/echo"],
        input=body,
        capture_output=True,
        timeout=30,
    )
    data = echo(result)
    assert data["body_length"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_ten_mib_download(setup, tls):
    size = 10 * 1024 * 1024
    run = setup.curl_tls if tls else setup.curl_h2c
    base = setup.https if tls else setup.h2c
    result = run(f"{base}/bytes/{size}")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == size
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(b"x" * size).hexdigest()


def test_slow_client_download_is_not_buffered(setup):
    """64 MiB to a client reading at 32 MiB/s: the proxy's peak RSS grows far less than the body."""

    def peak_kib() -> int:
        with open(f"/proc/{setup.proxy.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    setup.still_serving()
    before = peak_kib()
    size = 64 * 1024 * 1024
    result = setup.curl_h2c("--limit-rate", "32M", "-o", "/dev/null", "-w", "%{size_download}", f"{setup.h2c}/bytes/{size}", timeout=60)
    assert result.stdout == str(size).encode(), result.stderr
    grown = peak_kib() - before
    assert grown < 24 * 1024, f"peak RSS grew by {grown} KiB for a 64 MiB body"


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_slow_upstream_upload_is_not_buffered(rpxy_factory, tmp_path):
    """48 MiB to an upstream reading 24 MiB/s: windows hold the client back, the proxy buffers little."""
    sink = SlowSink(rate=24 * 1024 * 1024)
    try:
        setup = start(rpxy_factory, tmp_path, sink.location)
        before = _peak_rss_kib(setup.proxy.proc.pid)
        size = 48 * 1024 * 1024
        path = tmp_path / "upload.bin"
        with open(path, "wb") as out:
            out.truncate(size)
        result = setup.curl_h2c("--data-binary", f"@{path}", f"{setup.h2c}/upload", timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout == str(size).encode()
        grown = _peak_rss_kib(setup.proxy.proc.pid) - before
        assert grown < 24 * 1024, f"peak RSS grew by {grown} KiB for a 48 MiB upload"
    finally:
        sink.stop()


def test_parallel_streams_share_one_connection(setup):
    # Over TLS: curl 7.88's --parallel with --http2-prior-knowledge fails its own framing
    # layer before sending (against nginx too); h2c multiplexing is covered by h2load below.
    urls = [f"{setup.https}/echo?n={i}" for i in range(20)]
    outputs = [arg for url in urls for arg in ("-o", "/dev/null", url)]
    result = setup.curl_tls("--parallel", "--parallel-max", "10", "-w", "%{http_code} %{http_version}\\n", *outputs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split()
    assert lines.count("200") == 20 and lines.count("2") == 20
    access = [line for line in setup.proxy.access_lines() if "/echo?n=" in line]
    assert len(access) == 20
    peers = {re.search(r"<- (\S+) --", line).group(1) for line in access}
    assert len(peers) == 1  # one client port: one connection, multiplexed


def test_concurrent_streams_on_one_h2c_connection(setup):
    with H2Client(setup.port) as client:
        ids = [client.request(f"/slow/0.5?i={i}") for i in range(10)]
        started = time.monotonic()
        assert client.read_until(lambda c: all(c.ended(i) for i in ids), timeout=10)
        assert time.monotonic() - started < 3  # served side by side, not one after the other
        assert all(client.status(i) == 200 and client.body(i) == b"slow" for i in ids)


def test_responses_larger_than_a_small_client_window_complete(rpxy_factory, tmp_path):
    # The whole upstream response arrives in one read and ends there, and only part of it
    # fits the client's window: that part must leave at once (the client acknowledges only
    # what it received), the rest on each WINDOW_UPDATE.
    canned = CannedOrigin(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"w" * 5000)
    try:
        setup = start(rpxy_factory, tmp_path, canned.location)
        with H2Client(setup.tls_port, ca_file=setup.ca_file) as client:
            client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
            client.flush()  # SETTINGS before the HEADERS below: the server applies it first
            streams = [client.request(f"/w{n}") for n in range(3)]
            for stream_id in streams:
                assert client.wait_response(stream_id, timeout=10), f"stream {stream_id} stalled"
                assert (client.status(stream_id), client.body(stream_id)) == (200, b"w" * 5000)
    finally:
        canned.stop()


def test_access_log_says_http2(setup):
    setup.curl_tls("-o", "/dev/null", f"{setup.https}/echo?logged=1")
    lines = [line for line in setup.proxy.access_lines() if "/echo?logged=1" in line]
    assert len(lines) == 1
    assert " -- GET /echo?logged=1 HTTP/2 -- 200 OK -- " in lines[0]


def test_authority_used_as_host_and_conflicts_refused(setup):
    with H2Client(setup.port, validate=False) as client:
        ok = client.request("/echo", authority="localhost")
        assert client.wait_response(ok)
        assert client.status(ok) == 200
        assert header(json.loads(client.body(ok)), "host") == ["localhost"]
        same = client.request("/echo", authority=None, headers=[(b"host", b"localhost")])
        assert client.wait_response(same) and client.status(same) == 200
        conflict = client.request("/echo", authority="localhost", headers=[(b"host", b"other.example")])
        assert client.wait_response(conflict) and client.status(conflict) == 400
        neither = client.request("/echo", authority=None)
        assert client.wait_response(neither) and client.status(neither) == 400


def test_split_cookies_are_merged_for_the_upstream(setup):
    with H2Client(setup.port) as client:
        stream_id = client.request("/echo", headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
        assert client.wait_response(stream_id)
        assert header(json.loads(client.body(stream_id)), "cookie") == ["a=1; b=2"]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_h2load_has_no_failures(setup, tls):
    if shutil.which("h2load") is None:
        pytest.skip("h2load (nghttp2-client) is not installed")
    url = f"{setup.https}/echo" if tls else f"{setup.h2c}/echo"
    result = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "10", url], capture_output=True, text=True, timeout=60)
    assert "requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed, 0 errored, 0 timeout" in result.stdout, result.stdout
    assert "status codes: 400 2xx" in result.stdout


# -- trailers --------------------------------------------------------------------------------------


def test_response_trailers_reach_the_client(rpxy_factory, tmp_path):
    canned = CannedOrigin(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
        b"trailer: grpc-status\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n"
    )
    try:
        setup = start(rpxy_factory, tmp_path, canned.location)
        for port, ca in ((setup.port, None), (setup.tls_port, setup.ca_file)):
            with H2Client(port, ca_file=ca) as client:
                stream_id = client.request("/svc/Method", method="POST", body=b"\x00\x00\x00\x00\x00", headers=[(b"te", b"trailers")])
                assert client.wait_response(stream_id)
                assert client.status(stream_id) == 200
                assert client.body(stream_id) == b"hello"
                assert client.trailers(stream_id) == [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
                assert b"trailer" not in client.headers(stream_id)
        # the request reached the upstream with te: trailers and a chunked body
        assert any(b"te: trailers" in head.lower() for head in canned.requests)
    finally:
        canned.stop()


def test_request_trailers_are_forwarded(rpxy_factory, tmp_path):
    import socket
    import threading

    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(5)
        data = b""
        while not data.endswith(b"\r\n\r\n") or b"0\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        received.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        setup = start(rpxy_factory, tmp_path, f"127.0.0.1:{server.getsockname()[1]}")
        with H2Client(setup.port) as client:
            stream_id = client.request("/up", method="POST", end=False)
            client.send_body(stream_id, b"abc", end=False)
            client.h2.send_headers(stream_id, [(b"x-digest", b"123")], end_stream=True)
            client.flush()
            assert client.wait_response(stream_id) and client.status(stream_id) == 200
        thread.join(5)
        assert received and received[0].endswith(b"3\r\nabc\r\n0\r\nx-digest: 123\r\n\r\n")
        assert b"transfer-encoding: chunked" in received[0]
    finally:
        server.close()


# -- stream errors: never forwarded, connection and process go on ------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        [(b"X-Upper", b"1")],
        [(b"connection", b"keep-alive")],
        [(b"transfer-encoding", b"chunked")],
        [(b"x-bad", b"a\r\nx-injected: 1")],
    ],
    ids=["uppercase", "connection", "transfer-encoding", "crlf"],
)
def test_malformed_header_is_rst_stream(setup, bad):
    before = setup.origin_count()
    with H2Client(setup.port, validate=False) as client:
        stream_id = client.request("/echo", headers=bad)
        assert client.wait_response(stream_id)
        assert client.resets() == {stream_id: ErrorCodes.PROTOCOL_ERROR}
        good = client.request("/echo")  # same connection still works
        assert client.wait_response(good) and client.status(good) == 200
    assert setup.origin_count() == before + 2  # only the good request and this count
    setup.still_serving()


def test_content_length_mismatch_is_rst_stream(setup):
    before = setup.origin_count()
    with H2Client(setup.port, validate=False) as client:
        short = client.request("/echo", method="POST", headers=[(b"content-length", b"10")], end=False)
        client.send_body(short, b"12345", end=True)
        assert client.wait_response(short)
        assert client.resets().get(short) == ErrorCodes.PROTOCOL_ERROR
        long = client.request("/echo", method="POST", headers=[(b"content-length", b"3")], end=False)
        client.send_body(long, b"12345", end=True)
        assert client.wait_response(long)
        assert client.resets().get(long) == ErrorCodes.PROTOCOL_ERROR
        good = client.request("/echo")
        assert client.wait_response(good) and client.status(good) == 200
    # The upstream may have seen the start of a body, never a complete request.
    time.sleep(0.2)
    assert setup.origin_count() == before + 2
    setup.still_serving()


def test_oversized_header_list_is_goaway(setup):
    with H2Client(setup.port, validate=False) as client:
        stream_id = client.request("/echo", headers=[(b"x-h%d" % i, b"v" * 1000) for i in range(70)])
        client.read_until(lambda c: c.goaway() is not None or stream_id in c.resets() or c.ended(stream_id))
        assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    setup.still_serving()


def test_too_many_fields_is_431(setup):
    with H2Client(setup.port) as client:
        stream_id = client.request("/echo", headers=[(b"x-h%d" % i, b"v") for i in range(150)])
        assert client.wait_response(stream_id) and client.status(stream_id) == 431
    setup.still_serving()


def test_continuation_flood_is_goaway(setup):
    with H2Client(setup.port) as client:
        block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"localhost")])
        frames = [HeadersFrame(1, block[:3])] + [ContinuationFrame(1, b"") for _ in range(100)]
        client.send_raw(b"".join(f.serialize() for f in frames))
        client.read_until(lambda c: c.goaway() is not None or c.eof)
        assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    setup.still_serving()


def test_rapid_reset_is_goaway_enhance_your_calm(setup):
    with H2Client(setup.port) as client:
        client.read_until(lambda c: c.h2.remote_settings.max_concurrent_streams == 32)
        for _ in range(400):
            if client.h2.state_machine.state.name == "CLOSED":
                break
            stream_id = client.request("/slow/5")
            client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            try:
                client.flush()
            except OSError:
                break
        client.read_until(lambda c: c.goaway() is not None or c.eof)
        assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    setup.still_serving()
    assert "rapid reset" in setup.proxy.system_log()


def test_ping_flood_is_goaway_enhance_your_calm(setup):
    with H2Client(setup.port) as client:
        pings = b"".join(PingFrame(0, b"%08d" % i).serialize() for i in range(3000))
        try:
            client.send_raw(pings)
        except OSError:
            pass
        client.read_until(lambda c: c.goaway() is not None or c.eof, timeout=10)
        assert client.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
    setup.still_serving()


def test_idle_h2_connection_is_kept_while_a_stream_is_open(setup):
    with H2Client(setup.port) as client:
        stream_id = client.request("/slow/1")
        assert client.wait_response(stream_id, timeout=5)
        assert client.body(stream_id) == b"slow" and client.goaway() is None
