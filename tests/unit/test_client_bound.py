"""Sending the PROXY protocol upstream: the header for a client, per-client pools, the preamble endpoint."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rpxy.message import ConnectionInfo
from rpxy.proxy_protocol import parse_header
from rpxy.upstream.client_bound import ClientBoundPools, proxy_header_for
from rpxy.upstream.pool import _PreambleEndpoint


def test_header_names_the_client_and_the_local_end():
    conn = ConnectionInfo("203.0.113.7", 5555, 443, local_ip="192.0.2.1")
    header = proxy_header_for(conn, 1)
    assert header == b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r\n"
    parsed, _ = parse_header(proxy_header_for(conn, 2))
    assert (parsed.version, parsed.source, parsed.destination) == (2, ("203.0.113.7", 5555), ("192.0.2.1", 443))


def test_header_with_an_unknown_or_other_family_local_address():
    carried6 = ConnectionInfo("2001:db8::7", 1, 80, local_ip="10.0.0.1")  # PROXY-carried IPv6 on IPv4
    assert proxy_header_for(carried6, 1) == b"PROXY TCP6 2001:db8::7 :: 1 80\r\n"
    unknown = ConnectionInfo("10.0.0.9", 2, 80)
    assert parse_header(proxy_header_for(unknown, 2))[0].destination == ("0.0.0.0", 80)


class FakePool:
    def __init__(self, preamble: bytes) -> None:
        self.preamble = preamble
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_one_pool_per_client_connection():
    clock = MemoryReactorClock()
    pools = ClientBoundPools(FakePool, 2, clock)
    a1 = pools.for_client(ConnectionInfo("10.0.0.1", 1000, 80, local_ip="10.0.0.254"))
    assert pools.for_client(ConnectionInfo("10.0.0.1", 1000, 80, local_ip="10.0.0.254")) is a1
    other_port = pools.for_client(ConnectionInfo("10.0.0.1", 1001, 80, local_ip="10.0.0.254"))
    assert other_port is not a1 and pools.client_count == 2
    assert parse_header(a1.preamble)[0].source == ("10.0.0.1", 1000)
    assert parse_header(other_port.preamble)[0].source == ("10.0.0.1", 1001)


def test_quiet_clients_pools_are_closed_and_the_count_is_bounded():
    clock = MemoryReactorClock()
    pools = ClientBoundPools(FakePool, 1, clock, idle_timeout=10.0, max_clients=2)
    first = pools.for_client(ConnectionInfo("10.0.0.1", 1, 80))
    second = pools.for_client(ConnectionInfo("10.0.0.2", 1, 80))
    third = pools.for_client(ConnectionInfo("10.0.0.3", 1, 80))  # over the bound: the oldest goes
    assert first.closed and not second.closed and pools.client_count == 2
    clock.advance(15)
    pools.for_client(ConnectionInfo("10.0.0.3", 1, 80))  # the third stays in use
    clock.advance(10)  # second unused for 25 s > 2 x idle
    assert second.closed and not third.closed
    pools.close()
    assert third.closed and pools.client_count == 0 and not clock.getDelayedCalls()


class Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.1\r\n")


class FakeEndpoint:
    def __init__(self) -> None:
        self.transport = StringTransport()

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        return succeed(protocol)


def test_preamble_endpoint_writes_the_header_first_and_returns_the_callers_protocol():
    inner = FakeEndpoint()
    got = []
    _PreambleEndpoint(inner, b"PROXY UNKNOWN\r\n").connect(Factory.forProtocol(Hello)).addCallback(got.append)
    assert isinstance(got[0], Hello)
    assert inner.transport.value() == b"PROXY UNKNOWN\r\nGET / HTTP/1.1\r\n"
