"""UpstreamPool: most-recently-used reuse, the idle bound and idle expiry on the reactor clock."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from rpxy.config.model import UpstreamConfig
from rpxy.upstream.pool import UpstreamPool


class FakeTransport:
    def __init__(self) -> None:
        self.connected = True


class FakeConnection:
    def __init__(self) -> None:
        self.transport = FakeTransport()
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
