"""UpstreamPool: most-recently-used reuse, the idle bound and idle expiry on the reactor clock."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.testing import MemoryReactorClock

from rpxy.config.model import UpstreamConfig
from rpxy.upstream.pool import UpstreamPool


class FakeTransport:
    def __init__(self, sock: socket.socket | None = None) -> None:
        self.connected = True
        self.socket = sock


class FakeTLSTransport:
    """What wrapClientTLS gives: a protocol whose own ``transport`` owns the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.connected = True
        self.transport = FakeTransport(sock)


class FakeConnection:
    def __init__(self, transport=None) -> None:
        self.transport = transport or FakeTransport()
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    def close(self) -> None:
        self.closed = True
        self.transport.connected = False


def make_pool(**kwargs) -> tuple[UpstreamPool, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    upstream = UpstreamConfig(location="127.0.0.1:8080", host="127.0.0.1", port=8080)
    return UpstreamPool(upstream, reactor, **kwargs), reactor


def acquire(pool: UpstreamPool):
    got = []
    pool.acquire(got.append, got.append)
    return got[0] if got else None


def test_reuses_the_most_recently_released_connection() -> None:
    pool, _ = make_pool()
    first, second = FakeConnection(), FakeConnection()
    pool.release(first)
    pool.release(second)
    assert acquire(pool) is second
    assert second.reused
    assert acquire(pool) is first


def test_idle_connections_are_bounded() -> None:
    pool, _ = make_pool(max_idle=2)
    connections = [FakeConnection() for _ in range(3)]
    for connection in connections:
        pool.release(connection)
    assert pool.idle_count == 2
    assert [c.closed for c in connections] == [False, False, True]


def test_idle_connections_expire_on_the_clock() -> None:
    pool, reactor = make_pool(idle_timeout=10.0)
    old = FakeConnection()
    pool.release(old)
    reactor.advance(6)
    fresh = FakeConnection()
    pool.release(fresh)
    reactor.advance(5)  # old has been idle 11 s, fresh 5 s
    assert old.closed and not fresh.closed
    assert pool.idle_count == 1
    reactor.advance(10)
    assert fresh.closed
    assert pool.idle_count == 0
    assert not reactor.getDelayedCalls()  # the sweeper stops when nothing is idle


def test_a_dead_idle_connection_is_skipped_and_a_new_one_dialled() -> None:
    pool, reactor = make_pool()
    dead = FakeConnection()
    pool.release(dead)
    dead.transport.connected = False
    assert acquire(pool) is None  # nothing ready synchronously: a connect was started
    assert len(reactor.tcpClients) == 1
    host, port = reactor.tcpClients[0][:2]
    assert (host, port) == ("127.0.0.1", 8080)


def test_fresh_acquire_never_reuses() -> None:
    pool, reactor = make_pool()
    pool.release(FakeConnection())
    got = []
    pool.acquire(got.append, got.append, fresh=True)
    assert got == [] and len(reactor.tcpClients) == 1


def test_close_closes_idle_connections_and_stops_sweeping() -> None:
    pool, reactor = make_pool()
    connection = FakeConnection()
    pool.release(connection)
    pool.close()
    assert connection.closed
    assert not reactor.getDelayedCalls()
    late = FakeConnection()
    pool.release(late)  # an exchange finishing after shutdown
    assert late.closed


@pytest.fixture
def socket_pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_probe_skips_a_connection_the_upstream_closed_unnoticed(socket_pair) -> None:
    # The upstream's FIN is in the kernel but the reactor has not read it yet: a POST must
    # not be sent there (it could not be retried), a GET may (its failure is retried).
    ours, theirs = socket_pair
    pool, reactor = make_pool()
    closed = FakeConnection(FakeTransport(ours))
    theirs.close()
    pool.release(closed)
    got = []
    pool.acquire(got.append, got.append, probe=True)
    assert got == [] and closed.closed
    assert len(reactor.tcpClients) == 1


def test_probe_keeps_a_quiet_live_connection(socket_pair) -> None:
    ours, _ = socket_pair
    pool, reactor = make_pool()
    alive = FakeConnection(FakeTransport(ours))
    pool.release(alive)
    got = []
    pool.acquire(got.append, got.append, probe=True)
    assert got == [alive] and not alive.closed and not reactor.tcpClients


def test_probe_drops_a_cleartext_connection_with_unasked_bytes(socket_pair) -> None:
    ours, theirs = socket_pair
    pool, _ = make_pool()
    chatty = FakeConnection(FakeTransport(ours))
    theirs.sendall(b"HTTP/1.1 200 OK\r\n")
    pool.release(chatty)
    got = []
    pool.acquire(got.append, got.append, probe=True)
    assert got == [] and chatty.closed


def test_probe_under_tls_keeps_a_connection_with_pending_records(socket_pair) -> None:
    # A TLS 1.3 upstream may send session tickets after the handshake: not a sign of death.
    ours, theirs = socket_pair
    pool, _ = make_pool()
    tls = FakeConnection(FakeTLSTransport(ours))
    theirs.sendall(b"\x17\x03\x03\x00\x10")
    pool.release(tls)
    got = []
    pool.acquire(got.append, got.append, probe=True)
    assert got == [tls]


def test_probe_under_tls_notices_eof(socket_pair) -> None:
    ours, theirs = socket_pair
    pool, _ = make_pool()
    tls = FakeConnection(FakeTLSTransport(ours))
    theirs.close()
    pool.release(tls)
    got = []
    pool.acquire(got.append, got.append, probe=True)
    assert got == [] and tls.closed
