"""PROXY protocol v1/v2: the parser, and the listener wrapper (trusted peers, timeout, carried address)."""

from __future__ import annotations

import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rpxy.config.model import ProxyProtocolConfig
from rpxy.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyProtocolFactory,
    encode_v1,
    encode_v2,
    parse_header,
)

# -- parser ------------------------------------------------------------------------------------


def test_v1_tcp4_and_tcp6():
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    assert parse_header(line + b"GET /") == (ProxyHeader(1, ("203.0.113.7", 56324), ("192.0.2.1", 443)), len(line))
    line6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"
    assert parse_header(line6) == (ProxyHeader(1, ("2001:db8::1", 1), ("2001:db8::2", 65535)), len(line6))


def test_v1_unknown_keeps_the_real_peer():
    assert parse_header(b"PROXY UNKNOWN\r\n") == (ProxyHeader(1, None, None), 15)
    assert parse_header(b"PROXY UNKNOWN ff:ff 1.2.3.4 1 2\r\n")[0].source is None


def test_v2_tcp4_tcp6_local_and_tlvs():
    header = encode_v2(("198.51.100.9", 1234), ("192.0.2.1", 443))
    assert parse_header(header + b"\x16\x03") == (ProxyHeader(2, ("198.51.100.9", 1234), ("192.0.2.1", 443)), len(header))
    header6 = encode_v2(("2001:db8::5", 9), ("2001:db8::1", 80))
    assert parse_header(header6)[0].source == ("2001:db8::5", 9)
    local = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)
    assert parse_header(local) == (ProxyHeader(2, None, None), 16)
    # TLVs after the addresses are skipped (their length is part of the header's).
    body = struct.pack("!4s4sHH", bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 1, 2) + b"\x04\x00\x02ab"
    with_tlv = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body
    assert parse_header(with_tlv) == (ProxyHeader(2, ("10.0.0.1", 1), ("10.0.0.2", 2)), len(with_tlv))


@pytest.mark.parametrize("header", [encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)), encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))])
def test_every_prefix_asks_for_more(header):
    for size in range(len(header)):
        assert parse_header(header[:size]) is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed PROXY v1 line"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "invalid address"),
        (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "is not IPv4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "invalid port 65536"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "invalid port"),
        (b"PROXY " + b"x" * 120, "longer than 107"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "version 3"),
        (V2_SIGNATURE + b"\x2f\x11\x00\x0c" + b"\x00" * 12, "command 15"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "TCP4 addresses cut short"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(data, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(data)


# -- the listener wrapper ---------------------------------------------------------------------


class Inner(Protocol):
    def __init__(self) -> None:
        self.peer = None
        self.data = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


def connect(settings: ProxyProtocolConfig | None, peer: str = "10.0.0.5"):
    clock = MemoryReactorClock()
    inner_factory = Factory.forProtocol(Inner)
    factory = ProxyProtocolFactory(inner_factory, lambda: settings, reactor=clock)
    address = IPv4Address("TCP", peer, 40000)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "10.0.0.1", 80))
    protocol.makeConnection(transport)
    return protocol, transport, clock


SETTINGS = ProxyProtocolConfig(trusted_proxies=("10.0.0.0/8",), timeout_ms=50)


def inner_of(protocol) -> Inner:
    return protocol.wrappedProtocol if hasattr(protocol, "wrappedProtocol") else protocol


def test_the_carried_address_is_the_client_and_the_rest_passes_through():
    protocol, transport, _ = connect(SETTINGS)
    inner = inner_of(protocol)
    assert inner.peer is None  # nothing connected before the header
    protocol.dataReceived(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n")
    assert (inner.peer.host, inner.peer.port) == ("203.0.113.7", 5555)
    assert inner.data == b"GET / HTTP/1.1\r\n"
    protocol.dataReceived(b"Host: x\r\n\r\n")
    assert inner.data.endswith(b"Host: x\r\n\r\n")
    inner.transport.write(b"HTTP/1.1 200 OK\r\n")
    assert transport.value() == b"HTTP/1.1 200 OK\r\n"


def test_header_split_over_reads_and_v2():
    protocol, _, _ = connect(SETTINGS)
    header = encode_v2(("2001:db8::7", 7), ("2001:db8::1", 443))
    for byte in header:
        protocol.dataReceived(bytes([byte]))
    inner = inner_of(protocol)
    assert inner.peer.host == "2001:db8::7" and inner.peer.type == "TCP"


def test_local_command_keeps_the_real_peer():
    protocol, _, _ = connect(SETTINGS)
    protocol.dataReceived(V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0))
    assert inner_of(protocol).peer.host == "10.0.0.5"


def test_untrusted_peers_are_refused_before_anything_is_read():
    protocol, transport, _ = connect(SETTINGS, peer="192.0.2.50")
    assert transport.disconnecting or getattr(transport, "aborting", False) or transport.disconnected


def test_a_missing_header_times_out_and_garbage_is_refused():
    protocol, transport, clock = connect(SETTINGS)
    clock.advance(0.049)
    assert not transport.disconnecting
    clock.advance(0.002)
    assert transport.disconnecting and inner_of(protocol).peer is None
    protocol, transport, clock = connect(SETTINGS)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    assert transport.disconnecting and inner_of(protocol).peer is None and not clock.getDelayedCalls()


def test_without_settings_there_is_no_wrapper():
    protocol, _, _ = connect(None, peer="192.0.2.50")
    assert isinstance(protocol, Inner) and protocol.peer.host == "192.0.2.50"
