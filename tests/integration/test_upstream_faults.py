"""Upstream failures through the real proxy: each maps to the documented status, never to
garbage or a silently truncated body reaching the client.

A threaded misbehaving upstream (tests/support/bad_upstream.py) picks its fault by path.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.integration.conftest import Rpxy, curl, free_port
from tests.support.bad_upstream import BadUpstream
from tests.support.rawhttp import RawConnection, assert_no_tracebacks, proxy_config, request


@pytest.fixture(scope="module")
def upstream():
    with BadUpstream() as started:
        yield started


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    started = Rpxy(tmp_path_factory.mktemp("faults"), proxy_config(upstream.location, top="upstream_response_timeout = 1\n"))
    yield started
    started.stop()
    assert_no_tracebacks(started.system_log())


def get(proxy: Rpxy, path: str, *args: str) -> subprocess.CompletedProcess:
    return curl("-H", "Host: localhost", "-o", "-", "-w", "\n%{http_code}", *args, f"{proxy.url}{path}", timeout=15)


def status_of(result: subprocess.CompletedProcess) -> int:
    return int(result.stdout.rsplit(b"\n", 1)[1])


def test_connect_refused_is_502(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    proxy = Rpxy(tmp_path, proxy_config(dead))
    try:
        with RawConnection(proxy.port) as conn:
            conn.send(request("GET", "/x"))
            response = conn.read_response()
            assert response.status == 502
            assert response.body == b""
            # A failed upstream is not the client's fault: the connection stays usable.
            conn.send(request("GET", "/y", close=True))
            assert conn.read_response().status == 502
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


@pytest.mark.parametrize("path", ["/garbage", "/http09", "/badstatus", "/clte", "/dupcl"])
def test_malformed_upstream_response_is_502(proxy, path):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", path))
        response = conn.read_response()
        assert response.status == 502
        assert response.body == b""
        conn.send(request("GET", "/ok", close=True))
        ok = conn.read_response()
        assert (ok.status, ok.body) == (200, b"ok")


def test_upstream_that_never_answers_is_504(proxy, upstream):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/never?timeout"))
        response = conn.read_response()
        assert response.status == 504
        assert response.body == b""
        conn.send(request("GET", "/ok", close=True))
        assert conn.read_response().status == 200
    assert upstream.wait_for_request("/never?timeout") is not None


def test_response_timeout_does_not_cut_a_slow_body(upstream, origin_factory, tmp_path):
    # upstream_response_timeout bounds the wait for the response head only.
    origin = origin_factory("slow")
    proxy = Rpxy(tmp_path, proxy_config(origin.location, top="upstream_response_timeout = 1\n"))
    try:
        result = get(proxy, "/bytes/1000")
        assert status_of(result) == 200
        # /slow/S sends its head only after S seconds: over the limit -> 504; under -> 200.
        assert status_of(get(proxy, "/slow/2")) == 504
        assert status_of(get(proxy, "/slow/0.2")) == 200
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


@pytest.mark.parametrize("path", ["/truncate-cl", "/truncate-chunked"])
def test_upstream_closing_mid_body_aborts_the_client(proxy, path):
    result = get(proxy, path)
    # curl reports the broken transfer (18: partial file, 56: recv failure) instead of success.
    assert result.returncode in (18, 56), (result.returncode, result.stderr)
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", path))
        head = conn.read_head()
        assert head.status == 200
        data = conn.read_until_close()
        if head.header("transfer-encoding") == "chunked":
            assert not data.endswith(b"0\r\n\r\n")
        else:
            assert len(data) < int(head.header("content-length"))


def test_close_delimited_upstream_response_is_complete(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/close-delimited"))
        response = conn.read_response()
        assert response.status == 200
        assert response.header("transfer-encoding") == "chunked"
        assert response.body == b"y" * 100000
        conn.send(request("GET", "/ok", close=True))
        assert conn.read_response().body == b"ok"


def test_connect_failure_retried_on_next_upstream(origin_factory, tmp_path):
    origin = origin_factory("alive")
    dead = f"127.0.0.1:{free_port()}"
    for balance in ("none", "round_robin"):
        directory = tmp_path / balance
        directory.mkdir()
        proxy = Rpxy(directory, proxy_config(dead, origin.location, route=f'load_balance = "{balance}"'))
        try:
            for _ in range(4):  # round robin lands on the dead one every other time
                result = get(proxy, "/echo")
                assert status_of(result) == 200, (balance, result.stdout, result.stderr)
                assert b'"origin": "alive"' in result.stdout
        finally:
            proxy.stop()
        assert_no_tracebacks(proxy.system_log())


def test_stale_pooled_connection_is_retried_for_get(proxy, upstream):
    before = upstream.connections
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/stale?1"))
        assert conn.read_response().body == b"fresh"
        # The pooled connection is reused and the upstream drops it on this request.
        conn.send(request("GET", "/stale?2"))
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"fresh")
    assert upstream.connections - before == 2
    assert upstream.paths().count("/stale?2") == 2  # sent twice: once on the stale connection


def test_stale_pooled_connection_is_not_retried_for_post(proxy, upstream):
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/stale?post-1"))
        assert conn.read_response().body == b"fresh"
        conn.send(request("POST", "/stale?post-2", body=b"not idempotent"))
        assert conn.read_response().status == 502
    assert upstream.paths().count("/stale?post-2") == 1


def test_upstream_closing_idle_connection_is_noticed(proxy, upstream):
    before = upstream.connections
    for n in range(3):
        with RawConnection(proxy.port) as conn:
            conn.send(request("GET", f"/ok-then-close?{n}", close=True))
            response = conn.read_response()
            assert (response.status, response.body) == (200, b"ok")
    assert upstream.connections - before == 3


def test_upstream_answering_before_the_body_small_upload(proxy):
    # An early final answer: the rest of a small body is read and discarded, and the client
    # connection stays usable.
    body = b"u" * 100000
    with RawConnection(proxy.port) as conn:
        conn.send(request("POST", "/early?small", body=body) + request("GET", "/ok", close=True))
        early = conn.read_response()
        assert (early.status, early.body) == (403, b"nope")
        ok = conn.read_response()
        assert (ok.status, ok.body) == (200, b"ok")


def test_upstream_answering_before_the_body_large_upload(proxy, tmp_path):
    # Too much to discard: the proxy answers and closes, but lingers so that the client
    # reads the answer instead of a reset.
    path = tmp_path / "big.bin"
    path.write_bytes(b"u" * (8 * 1024 * 1024))
    result = get(proxy, "/early?large", "--data-binary", f"@{path}", "-H", "Expect:")
    assert status_of(result) == 403, result.stderr
    assert result.stdout.startswith(b"nope")


def wait_closed_by_proxy(upstream: BadUpstream, before: int) -> bool:
    deadline = time.monotonic() + 5
    while upstream.closed_by_peer == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return upstream.closed_by_peer == before + 1


def test_client_leaving_aborts_the_upstream_request(upstream, tmp_path):
    # Default (60 s) response timeout: only the client's leaving can close the upstream side.
    proxy = Rpxy(tmp_path, proxy_config(upstream.location))
    try:
        before = upstream.closed_by_peer
        conn = RawConnection(proxy.port)
        conn.send(request("GET", "/never?client-left"))
        assert upstream.wait_for_request("/never?client-left") is not None
        conn.close()
        assert wait_closed_by_proxy(upstream, before)

        # Mid-upload: the upstream never sees the request complete.
        before = upstream.closed_by_peer
        conn = RawConnection(proxy.port)
        conn.send(b"POST /sink?half HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" + b"h" * 5000)
        forwarded = upstream.wait_for_request("/sink?half")
        assert forwarded is not None
        conn.close()
        assert wait_closed_by_proxy(upstream, before)
        assert not forwarded.complete
        assert forwarded.body_length <= 5000
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is required to read socket timers")
def test_pooled_upstream_connections_have_tcp_keepalive(proxy, upstream):
    # rpxy's upstream TCP keepalive (20 s): a silently dead upstream is noticed even when idle.
    with RawConnection(proxy.port) as conn:
        conn.send(request("GET", "/ok?keepalive"))
        assert conn.read_response().status == 200
    listing = subprocess.run(
        ["ss", "-tnoH", "state", "established", "dst", f"127.0.0.1:{upstream.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [line for line in listing.splitlines() if f"127.0.0.1:{upstream.port}" in line]
    assert lines, listing
    assert all("timer:(keepalive," in line for line in lines), listing
