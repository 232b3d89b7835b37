"""HTTP/1.1 limits through the real proxy: request line, header block and count, body size,
client counts and connection_handling_timeout.

The 20 s header-read deadline and idle timeout are rpxy's hard-coded values and are
tested with a fake clock in tests/unit/test_h1_frontend.py instead of by waiting.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.conftest import Rpxy
from tests.support.bad_upstream import BadUpstream
from tests.support.rawhttp import RawConnection, assert_no_tracebacks, proxy_config, request

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def upstream():
    with BadUpstream() as started:
        yield started


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    started = Rpxy(tmp_path_factory.mktemp("limits"), proxy_config(upstream.location, top=f"request_max_body_size = {MAX_BODY}\n"))
    yield started
    started.stop()
    assert_no_tracebacks(started.system_log())


def exchange(port: int, data: bytes):
    with RawConnection(port) as conn:
        conn.send(data)
        response = conn.read_response()
        closed = response.header("connection") == "close" and conn.wait_closed()
        return response, closed


# -- request head ------------------------------------------------------------------------


def test_request_line_at_8k_is_accepted(proxy, upstream):
    path = "/ok?" + "a" * (8 * 1024 - 4)
    assert len(path) == 8 * 1024
    response, _ = exchange(proxy.port, request("GET", path, close=True))
    assert response.status == 200


def test_request_line_over_8k_is_414(proxy, upstream):
    path = "/ok?long=" + "a" * (8 * 1024)
    response, closed = exchange(proxy.port, request("GET", path))
    assert response.status == 414
    assert closed
    assert not [p for p in upstream.paths() if p.startswith("/ok?long=")]


def test_request_line_sent_in_small_pieces_is_still_capped(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /ok?")
        for _ in range(20):
            conn.send(b"b" * 1024)  # never a complete line
        response = conn.read_response()
        assert response.status == 414
        assert conn.wait_closed()


def test_huge_request_line_is_414_not_buffered(proxy):
    response, closed = exchange(proxy.port, b"GET /ok?" + b"c" * (1024 * 1024) + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert response.status == 414
    assert closed


def test_header_block_just_under_64k_is_accepted(proxy):
    headers = [(f"X-Fill-{i}", "v" * 1000) for i in range(60)]  # ~61 KiB
    response, _ = exchange(proxy.port, request("GET", "/ok?fill", headers=headers, close=True))
    assert response.status == 200


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Big", "v" * (65 * 1024))],
        [(f"X-Fill-{i}", "v" * 1000) for i in range(70)],
    ],
    ids=["one-big-field", "many-fields"],
)
def test_header_block_over_64k_is_431(proxy, upstream, headers):
    response, closed = exchange(proxy.port, request("GET", "/ok?bighead", headers=headers))
    assert response.status == 431
    assert closed
    assert "/ok?bighead" not in upstream.paths()


def test_header_block_dribbled_without_end_is_431(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /ok HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        for _ in range(80):
            conn.send(b"v" * 1024)
        response = conn.read_response()
        assert response.status == 431
        assert conn.wait_closed()


def test_100_header_fields_accepted_101_rejected(proxy, upstream):
    # request() adds Host (and Connection with close=True): 98 more fields make 100.
    ok = [(f"X-F{i}", "v") for i in range(98)]
    response, _ = exchange(proxy.port, request("GET", "/ok?fields=100", headers=ok, close=True))
    assert response.status == 200
    too_many = [(f"X-F{i}", "v") for i in range(99)]
    response, closed = exchange(proxy.port, request("GET", "/ok?fields=101", headers=too_many, close=True))
    assert response.status == 431
    assert closed
    assert "/ok?fields=101" not in upstream.paths()


# -- request body size -------------------------------------------------------------------------


def test_body_at_the_limit_is_forwarded(proxy):
    body = b"q" * MAX_BODY
    response, _ = exchange(proxy.port, request("POST", "/sink?at-limit", body=body, close=True))
    assert response.status == 200
    assert b'"length": %d' % MAX_BODY in response.body


def test_content_length_over_the_limit_is_413_with_close(proxy, upstream):
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink?cl-over HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        response = conn.read_response()  # answered from the head alone
        assert response.status == 413
        assert response.header("connection") == "close"
        assert conn.wait_closed()
    assert "/sink?cl-over" not in upstream.paths()


def test_content_length_over_the_limit_with_expect_gets_no_100(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST /sink?expect-over HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (10 * MAX_BODY)
        )
        response = conn.read_response(skip_interim=False)
        assert response.status == 413
        assert conn.wait_closed()


def test_chunked_body_over_the_limit_is_cut_off(proxy, upstream):
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink?chunked-over HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"w" * 16 * 1024)
        status = None
        try:
            for _ in range(8):  # 128 KiB, twice the limit
                conn.send(chunk)
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.read_response()
        status = response.status
        assert conn.wait_closed()
    assert status == 413
    forwarded = upstream.wait_for_request("/sink?chunked-over")
    if forwarded is not None:
        # The head may have been forwarded before the limit was hit; the body never completes.
        time.sleep(0.3)
        assert not forwarded.complete
        assert forwarded.body_length <= MAX_BODY


def test_chunked_body_under_the_limit_is_forwarded(proxy):
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink?chunked-under HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            conn.send(b"%x\r\n%s\r\n" % (16 * 1024, b"w" * 16 * 1024))
        conn.send(b"0\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200
        assert b'"length": %d' % (64 * 1024) in response.body


# -- client counts -------------------------------------------------------------------------------


def refused_without_response(port: int, source: str = "127.0.0.1") -> bool:
    """True when a new connection is closed by the proxy without any response."""
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(request("GET", "/ok?probe", close=True))
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        return data == b""
    finally:
        sock.close()


def served(port: int, source: str = "127.0.0.1") -> bool:
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(request("GET", "/ok?probe", close=True))
        data = sock.recv(65536)
        return data.startswith(b"HTTP/1.1 200")
    except (ConnectionResetError, BrokenPipeError):
        return False
    finally:
        sock.close()


def open_counted(port: int) -> RawConnection:
    """A connection the proxy has certainly accepted and counted (it answered on it)."""
    conn = RawConnection(port)
    conn.send(request("GET", "/ok?hold"))
    assert conn.read_response().status == 200
    return conn


def eventually(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def busy(port: int, n: int) -> RawConnection:
    """A counted connection with a request in flight (the upstream never answers /never)."""
    conn = RawConnection(port)
    conn.send(request("GET", f"/never?busy-{n}"))
    return conn


def test_max_clients(upstream, tmp_path):
    proxy = Rpxy(tmp_path, proxy_config(upstream.location, top="max_clients = 3\n"))
    try:
        held = [busy(proxy.port, n) for n in range(3)]
        assert all(upstream.wait_for_request(f"/never?busy-{n}") is not None for n in range(3))
        assert refused_without_response(proxy.port)
        # The refused attempt did not use up a slot; closing a held one frees one.
        held.pop().close()
        assert eventually(lambda: served(proxy.port))
        for conn in held:
            conn.close()
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


def test_idle_clients_make_room_at_max_clients(upstream, tmp_path):
    # Idle keep-alive connections (and slow-header ones) are closed to admit new clients.
    proxy = Rpxy(tmp_path, proxy_config(upstream.location, top="max_clients = 3\n"))
    try:
        held = [open_counted(proxy.port) for _ in range(3)]  # answered, now idle
        assert served(proxy.port)
        assert sum(conn.wait_closed(timeout=5) for conn in held) == 1  # the oldest idle one went
        for conn in held:
            conn.close()
    finally:
        proxy.stop()
    assert "closed to admit a new client (max_clients reached)" in proxy.system_log()
    assert_no_tracebacks(proxy.system_log())


def test_max_clients_per_ip(upstream, tmp_path):
    proxy = Rpxy(tmp_path, proxy_config(upstream.location, top="max_clients_per_ip = 2\n"))
    try:
        held = [open_counted(proxy.port) for _ in range(2)]
        assert refused_without_response(proxy.port)
        # Another loopback address is another client (127.0.0.0/8 is all loopback on Linux).
        assert served(proxy.port, source="127.0.0.2")
        held.pop().close()
        assert eventually(lambda: served(proxy.port))
        for conn in held:
            conn.close()
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


def test_connection_handling_timeout(upstream, tmp_path):
    proxy = Rpxy(tmp_path, proxy_config(upstream.location, top="[experimental]\nconnection_handling_timeout = 1\n"))
    try:
        with RawConnection(proxy.port) as idle, RawConnection(proxy.port) as busy:
            idle.send(request("GET", "/ok?before-timeout"))
            assert idle.read_response().status == 200  # served normally first
            busy.send(request("GET", "/never?handling-timeout"))
            assert upstream.wait_for_request("/never?handling-timeout") is not None
            # Both are cut at the hard limit: the idle keep-alive one and the one waiting.
            assert idle.wait_closed(timeout=10)
            assert busy.wait_closed(timeout=10)
            assert busy.buffer == b""
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())
