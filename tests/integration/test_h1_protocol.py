"""HTTP/1.1 on the wire through the real proxy: keep-alive, pipelining, HTTP/1.0,
absolute-form targets, request/response bodies, 100-continue, HEAD, strict parsing
and flat memory while streaming a gigabyte each way.

One proxy process in front of the twisted.web test origin serves most tests (module
scope); the strict-parsing tests use a recording upstream so that "never forwarded"
is checked against every request head the upstream parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time

import pytest

from tests.integration.conftest import Origin, Rpxy, curl
from tests.support.bad_upstream import BadUpstream
from tests.support.rawhttp import RawConnection, assert_no_tracebacks, proxy_config, request


@pytest.fixture(scope="module")
def origin():
    started = Origin("a")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def origin_b():
    started = Origin("b")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def proxy(origin, origin_b, tmp_path_factory):
    config = proxy_config(origin.location, top='request_max_body_size = "unlimited"\n') + f"""
[apps.other]
server_name = "b.example"
reverse_proxy = [{{ upstream = [{{ location = "{origin_b.location}" }}] }}]
"""
    started = Rpxy(tmp_path_factory.mktemp("h1proto"), config)
    yield started
    started.stop()
    assert_no_tracebacks(started.system_log())


def echo(body: bytes) -> dict:
    return json.loads(body)


def hcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """curl with ``Host: localhost`` (the app's server_name) on 127.0.0.1 URLs."""
    return curl("-H", "Host: localhost", *args, timeout=timeout)


# -- keep-alive, pipelining, HTTP/1.0, absolute-form ---------------------------------


def test_curl_reuses_one_connection_for_several_urls(proxy):
    result = hcurl("-v", f"{proxy.url}/echo?n=1", f"{proxy.url}/echo?n=2", f"{proxy.url}/echo?n=3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(b"Re-using existing connection") == 2, result.stderr.decode()
    assert result.stderr.count(b"Connected to") == 1
    for n in (1, 2, 3):
        assert f'"uri": "/echo?n={n}"'.encode() in result.stdout


def test_sequential_requests_on_one_socket(proxy):
    with RawConnection(proxy.port) as conn:
        for n in range(5):
            body = b"b" * (n * 1000)
            conn.send(request("POST", f"/echo?n={n}", body=body))
            response = conn.read_response()
            assert response.status == 200
            assert response.header("connection") is None
            data = echo(response.body)
            assert data["uri"] == f"/echo?n={n}"
            assert data["body_length"] == len(body)
        # Still open and usable: a last request that closes it.
        conn.send(request("GET", "/echo?last", close=True))
        response = conn.read_response()
        assert echo(response.body)["uri"] == "/echo?last"
        assert response.header("connection") == "close"
        assert conn.wait_closed()


def test_pipelined_requests_answered_in_order(proxy):
    # The first answer is the slowest: the responses must still come back in request order.
    pipelined = (
        request("GET", "/slow/0.3")
        + request("POST", "/echo?n=2", body=b"second body")
        + request("GET", "/bytes/70000")
        + request("GET", "/echo?n=4", close=True)
    )
    with RawConnection(proxy.port) as conn:
        conn.send(pipelined)
        first = conn.read_response()
        assert (first.status, first.body) == (200, b"slow")
        second = echo(conn.read_response().body)
        assert second["uri"] == "/echo?n=2"
        assert second["body_sha256"] == hashlib.sha256(b"second body").hexdigest()
        third = conn.read_response()
        assert third.body == b"x" * 70000
        fourth = conn.read_response()
        assert echo(fourth.body)["uri"] == "/echo?n=4"
        assert conn.wait_closed()


def test_http10_without_keep_alive_closes(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /echo?v=10 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200
        assert echo(response.body)["uri"] == "/echo?v=10"
        assert conn.wait_closed()


def test_http10_keep_alive(proxy):
    result = hcurl("-v", "--http1.0", "-H", "Connection: keep-alive", f"{proxy.url}/echo?n=1", f"{proxy.url}/echo?n=2")
    assert result.returncode == 0, result.stderr
    assert b"Re-using existing connection" in result.stderr, result.stderr.decode()
    assert b"< connection: keep-alive" in result.stderr.lower()
    assert b'"uri": "/echo?n=2"' in result.stdout


def test_http10_plain_curl(proxy):
    result = hcurl("-v", "--http1.0", f"{proxy.url}/echo?n=1", f"{proxy.url}/echo?n=2")
    assert result.returncode == 0, result.stderr
    assert b"Re-using existing connection" not in result.stderr
    assert b'"uri": "/echo?n=1"' in result.stdout and b'"uri": "/echo?n=2"' in result.stdout


def test_http10_client_gets_unframed_stream_delimited_by_close(proxy):
    # The origin streams chunked; an HTTP/1.0 client cannot read chunks, so the proxy must
    # send the raw bytes and close.
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /bytes/200000 HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        response = conn.read_response()
        assert response.header("transfer-encoding") is None
        assert response.body == b"x" * 200000


def test_absolute_form_routes_by_authority(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET http://b.example/echo?abs=1 HTTP/1.1\r\nHost: b.example\r\n\r\n")
        data = echo(conn.read_response().body)
        assert data["origin"] == "b"
        assert data["uri"] == "/echo?abs=1"  # origin-form upstream
        # HTTP/1.0 with no Host header at all: the authority alone routes it.
        conn.send(b"GET http://B.Example:80/echo?abs=2 HTTP/1.1\r\nHost: b.example\r\n\r\n")
        data = echo(conn.read_response().body)
        assert (data["origin"], data["uri"]) == ("b", "/echo?abs=2")
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET http://b.example/echo?abs=3 HTTP/1.0\r\n\r\n")
        data = echo(conn.read_response().body)
        assert (data["origin"], data["uri"]) == ("b", "/echo?abs=3")
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET http://localhost/echo?abs=4 HTTP/1.0\r\n\r\n")
        assert echo(conn.read_response().body)["origin"] == "a"


# -- bodies -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upload_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "body.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), len(data)


def test_content_length_upload_intact(proxy, upload_file):
    path, digest, size = upload_file
    result = hcurl("-v", "--data-binary", f"@{path}", "-H", "Expect:", f"{proxy.url}/echo")
    assert result.returncode == 0, result.stderr
    assert f"> Content-Length: {size}".encode() in result.stderr
    data = echo(result.stdout)
    assert (data["body_length"], data["body_sha256"]) == (size, digest)
    assert ["Content-Length", str(size)] in data["headers"]


def test_chunked_upload_intact(proxy, upload_file):
    path, digest, size = upload_file
    result = hcurl("-v", "-H", "Transfer-Encoding: chunked", "-H", "Expect:", "--data-binary", f"@{path}", f"{proxy.url}/echo")
    assert result.returncode == 0, result.stderr
    assert b"> Transfer-Encoding: chunked" in result.stderr
    data = echo(result.stdout)
    assert (data["body_length"], data["body_sha256"]) == (size, digest)


def test_raw_chunked_upload_with_extensions_and_trailers(proxy):
    body = (
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    with RawConnection(proxy.port) as conn:
        conn.send(body)
        data = echo(conn.read_response().body)
        assert data["body_length"] == 12
        assert data["body_sha256"] == hashlib.sha256(b"hello world!").hexdigest()


def test_chunked_download(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/bytes/1000000"))
        response = conn.read_response()
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("content-length") is None
        assert response.body == b"x" * 1000000
        conn.send(request("GET", "/bytes/1000?cl=1"))
        response = conn.read_response()
        assert response.header("content-length") == "1000"
        assert response.header("transfer-encoding") is None
        assert response.body == b"x" * 1000


def test_expect_100_continue_with_curl(proxy, upload_file):
    path, digest, size = upload_file
    result = hcurl("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{path}", f"{proxy.url}/echo")
    assert result.returncode == 0, result.stderr
    assert b"< HTTP/1.1 100 Continue" in result.stderr, result.stderr.decode()
    data = echo(result.stdout)
    assert (data["body_length"], data["body_sha256"]) == (size, digest)
    # The expectation is the proxy's business: it is not forwarded.
    assert not [name for name, _ in data["headers"] if name.lower() == "expect"]


def test_expect_100_continue_waits_for_the_body(proxy):
    body = b"z" * 5000
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
        interim = conn.read_head()
        assert interim.status == 100
        conn.send(body)
        response = conn.read_response()
        assert response.status == 200
        assert echo(response.body)["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_head_has_no_body_and_connection_stays_usable(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(request("HEAD", "/bytes/50000?cl=1"))
        head = conn.read_response(head_request=True)
        assert head.status == 200
        assert head.header("content-length") == "50000"
        conn.send(request("HEAD", "/echo"))
        assert conn.read_response(head_request=True).status == 200
        conn.send(request("GET", "/echo?after-head", close=True))
        response = conn.read_response()
        # Had any HEAD answer carried body bytes, this response would be garbled.
        assert response.status == 200
        assert echo(response.body)["uri"] == "/echo?after-head"
        assert conn.wait_closed()


def test_head_and_get_pipelined(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(request("HEAD", "/bytes/3000") + request("GET", "/bytes/3000", close=True))
        head = conn.read_response(head_request=True)
        assert head.status == 200
        response = conn.read_response()
        assert response.body == b"x" * 3000
        assert conn.read_until_close() == b""


# -- streaming with flat memory -------------------------------------------------------------


GIB = 1024 * 1024 * 1024
RSS_LIMIT_KIB = 100 * 1024


class RssSampler:
    def __init__(self, proxy: Rpxy) -> None:
        self.proxy = proxy
        self.peak = proxy.rss_kib()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proxy.rss_kib())
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_gigabyte_download_streams_in_flat_memory(proxy):
    with RssSampler(proxy) as rss:
        result = hcurl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"{proxy.url}/bytes/{GIB}", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"200 {GIB}".encode()
    assert rss.samples > 5
    assert rss.peak < RSS_LIMIT_KIB, f"proxy RSS peaked at {rss.peak} KiB"


def test_slow_client_pauses_the_upstream(proxy):
    # The client reads nothing for a while: the proxy must stop reading from the origin
    # instead of buffering the 256 MiB the origin is ready to send.
    size = 256 * 1024 * 1024
    with RawConnection(proxy.port) as conn, RssSampler(proxy) as rss:
        conn.send(request("GET", f"/bytes/{size}?cl=1"))
        time.sleep(1.5)
        head = conn.read_head()
        assert head.header("content-length") == str(size)
        received = len(conn.buffer)
        conn.buffer = b""
        while received < size:
            chunk = conn.sock.recv(1 << 20)
            assert chunk
            received += len(chunk)
    assert received == size
    assert rss.peak < RSS_LIMIT_KIB, f"proxy RSS peaked at {rss.peak} KiB"


@pytest.fixture(scope="module")
def sink_proxy(tmp_path_factory):
    with BadUpstream() as upstream:
        started = Rpxy(tmp_path_factory.mktemp("sink"), proxy_config(upstream.location, top='request_max_body_size = "2g"\n'))
        yield started, upstream
        started.stop()
        assert_no_tracebacks(started.system_log())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_gigabyte_upload_streams_in_flat_memory(sink_proxy, tmp_path, chunked):
    proxy, _upstream = sink_proxy
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(GIB)  # a hole: reads as zeros, costs no disk
    expected = hashlib.sha256()
    zeros = bytes(1024 * 1024)
    for _ in range(1024):
        expected.update(zeros)
    args = ["-T", str(sparse), "-X", "POST", "-H", "Expect:"]
    if chunked:
        args += ["-H", "Transfer-Encoding: chunked"]
    with RssSampler(proxy) as rss:
        result = hcurl(*args, f"{proxy.url}/sink", timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"length": GIB, "sha256": expected.hexdigest()}
    assert rss.samples > 5
    assert rss.peak < RSS_LIMIT_KIB, f"proxy RSS peaked at {rss.peak} KiB"


def test_slow_upstream_pauses_the_client(sink_proxy, tmp_path):
    # The upstream reads nothing for a while: the proxy must stop reading the client's
    # upload instead of buffering it.
    proxy, _upstream = sink_proxy
    size = 256 * 1024 * 1024
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(size)
    with RssSampler(proxy) as rss:
        result = hcurl("-T", str(sparse), "-X", "POST", "-H", "Expect:", f"{proxy.url}/sink?delay=1.5", timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["length"] == size
    assert rss.peak < RSS_LIMIT_KIB, f"proxy RSS peaked at {rss.peak} KiB"


# -- strict parsing: 400 and never forwarded ------------------------------------------------------

H = b"Host: localhost\r\n"

MALFORMED = {
    "cl-and-te": b"POST /ok?m=cl-and-te HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"POST /ok?m=te-and-cl HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST /ok?m=duplicate-cl HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl-list": b"POST /ok?m=cl-list HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl-not-a-number": b"POST /ok?m=cl-not-a-number HTTP/1.1\r\n" + H + b"Content-Length: 5x\r\n\r\nhello",
    "cl-signed": b"POST /ok?m=cl-signed HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "cl-negative": b"POST /ok?m=cl-negative HTTP/1.1\r\n" + H + b"Content-Length: -5\r\n\r\nhello",
    "cl-empty": b"POST /ok?m=cl-empty HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\nhello",
    "te-chunked-identity": b"POST /ok?m=te-chunked-identity HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-identity-chunked": b"POST /ok?m=te-identity-chunked HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    "te-xchunked": b"POST /ok?m=te-xchunked HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-quoted": b'POST /ok?m=te-quoted HTTP/1.1\r\n' + H + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
    "te-twice": b"POST /ok?m=te-twice HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-split-lines": b"POST /ok?m=te-split-lines HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /ok?m=te-space-before-colon HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-leading-space-line": b"POST /ok?m=te-leading-space-line HTTP/1.1\r\n" + H + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-trailing-space": b"POST /ok?m=te-trailing-space HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked \r\n\r\n0\r\n\r\n",
    "te-vertical-tab": b"POST /ok?m=te-vertical-tab HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "te-http10": b"POST /ok?m=te-http10 HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /ok?m=obs-fold HTTP/1.1\r\n" + H + b"X-Folded: one\r\n two\r\n\r\n",
    "obs-fold-tab": b"GET /ok?m=obs-fold-tab HTTP/1.1\r\n" + H + b"X-Folded: one\r\n\ttwo\r\n\r\n",
    "bare-cr-in-value": b"GET /ok?m=bare-cr-in-value HTTP/1.1\r\n" + H + b"X-A: one\rtwo\r\n\r\n",
    "bare-lf-line-end": b"GET /ok?m=bare-lf-line-end HTTP/1.1\r\n" + H + b"X-A: one\nX-B: two\r\n\r\n",
    "nul-in-value": b"GET /ok?m=nul-in-value HTTP/1.1\r\n" + H + b"X-A: one\x00two\r\n\r\n",
    "nul-in-name": b"GET /ok?m=nul-in-name HTTP/1.1\r\n" + H + b"X-\x00A: one\r\n\r\n",
    "space-before-colon": b"GET /ok?m=space-before-colon HTTP/1.1\r\n" + H + b"X-A : one\r\n\r\n",
    "space-in-name": b"GET /ok?m=space-in-name HTTP/1.1\r\n" + H + b"X A: one\r\n\r\n",
    "non-token-name": b"GET /ok?m=non-token-name HTTP/1.1\r\n" + H + b"X(A): one\r\n\r\n",
    "non-ascii-name": b"GET /ok?m=non-ascii-name HTTP/1.1\r\n" + H + b"X-\xc3\xa9: one\r\n\r\n",
    "empty-name": b"GET /ok?m=empty-name HTTP/1.1\r\n" + H + b": one\r\n\r\n",
    "missing-host": b"GET /ok?m=missing-host HTTP/1.1\r\nX-A: one\r\n\r\n",
    "empty-host": b"GET /ok?m=empty-host HTTP/1.1\r\nHost:\r\n\r\n",
    "duplicate-host": b"GET /ok?m=duplicate-host HTTP/1.1\r\n" + H + H + b"\r\n",
    "duplicate-host-different": b"GET /ok?m=duplicate-host-different HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n",
    "host-authority-mismatch": b"GET http://evil.example/ok?m=host-authority-mismatch HTTP/1.1\r\n" + H + b"\r\n",
    "host-with-userinfo": b"GET /ok?m=host-with-userinfo HTTP/1.1\r\nHost: user@localhost\r\n\r\n",
    "authority-with-userinfo": b"GET http://user@localhost/ok?m=authority-with-userinfo HTTP/1.1\r\n" + H + b"\r\n",
}


@pytest.fixture(scope="module")
def recording_proxy(tmp_path_factory):
    with BadUpstream() as upstream:
        started = Rpxy(tmp_path_factory.mktemp("strict"), proxy_config(upstream.location))
        yield started, upstream
        started.stop()
        assert_no_tracebacks(started.system_log())


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_rejected_and_never_forwarded(recording_proxy, name):
    proxy, upstream = recording_proxy
    with RawConnection(proxy.port) as conn:
        conn.send(MALFORMED[name])
        response = conn.read_response()
        assert response.status == 400, name
        assert response.header("connection") == "close"
        assert response.body == b""
        assert conn.wait_closed()
    # A good request on a new connection is forwarded: once it arrived, the bad one would have too.
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", f"/ok?after={name}", close=True))
        assert conn.read_response().status == 200
    assert upstream.wait_for_request(f"/ok?after={name}") is not None
    assert not [path for path in upstream.paths() if path.startswith(f"/ok?m={name}")]


def test_malformed_pipelined_request_stops_the_connection(recording_proxy):
    proxy, upstream = recording_proxy
    with RawConnection(proxy.port) as conn:
        conn.send(
            request("GET", "/ok?pipe=1")
            + b"GET /ok?pipe=2 HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            + request("GET", "/ok?pipe=3")
        )
        assert conn.read_response().status == 200
        assert conn.read_response().status == 400
        assert conn.read_until_close() == b""
    assert upstream.wait_for_request("/ok?pipe=1") is not None
    paths = upstream.paths()
    assert "/ok?pipe=2" not in paths and "/ok?pipe=3" not in paths


def test_malformed_chunked_body_after_forwarding_started(recording_proxy):
    # The head is fine and already forwarded when the body turns out to be malformed: the
    # client gets 400 and the upstream never sees a complete request.
    proxy, upstream = recording_proxy
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink?m=late-bad-chunk HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert upstream.wait_for_request("/sink?m=late-bad-chunk") is not None
        conn.send(b"zz\r\nhello\r\n0\r\n\r\n")
        response = conn.read_response()
        assert response.status == 400
        assert conn.wait_closed()
    forwarded = upstream.wait_for_request("/sink?m=late-bad-chunk")
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and not forwarded.complete:
        time.sleep(0.05)
    assert not forwarded.complete
