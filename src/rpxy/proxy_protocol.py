"""PROXY protocol v1 and v2 (HAProxy's spec) on the TCP listeners.

With ``[experimental.tcp_recv_proxy_protocol]``, as in rpxy, every TCP connection must come
from one of ``trusted_proxies`` and start with a PROXY header within ``timeout``; any other
connection is closed. The address the header carries then *is* the client for everything
above: X-Forwarded-For, the access log, ``max_clients_per_ip``, the TLS failure log.

:func:`parse_header` is the sans-IO part; :class:`ProxyProtocolFactory` wraps a listener's
factory (cleartext ``H1Factory`` or the TLS factory: the header comes before the TLS
ClientHello) and hands its protocol a transport whose ``getPeer()`` is the carried address.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from rpxy.config.model import ProxyProtocolConfig
from rpxy.policy.trusted import TrustedProxies

__all__ = ["ProxyHeader", "ProxyHeaderError", "ProxyProtocolFactory", "parse_header", "encode_v1", "encode_v2"]

log = Logger()

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: A v2 header for the proxy's own connections (health checks): command LOCAL, no addresses.
LOCAL_V2 = V2_SIGNATURE + b"\x20\x00\x00\x00"
#: A v1 line is at most 107 bytes with its CRLF (spec section 2.1).
V1_MAX = 107
#: v2: the fixed 16 bytes plus addresses and TLVs; more than this is refused (TLVs we ignore).
V2_MAX = 16 + 2048


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header (the message says why)."""


@attrs.frozen
class ProxyHeader:
    """What a PROXY header says: the client's and the proxy's addresses, or None for LOCAL/UNKNOWN."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """``(header, bytes consumed)``, None when more bytes are needed; raises :class:`ProxyHeaderError`."""
    if data[:12] == V2_SIGNATURE:
        return _parse_v2(data)
    if data[:6] == V1_PREFIX:
        return _parse_v1(data)
    size = min(len(data), 12)
    if data[:size] == V2_SIGNATURE[:size] or data[:6] == V1_PREFIX[: min(len(data), 6)]:
        return None  # a prefix of a header: wait for more
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, None), end + 2
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    version = 4 if parts[1] == b"TCP4" else 6
    source = (_ip(parts[2], version), _port(parts[4]))
    destination = (_ip(parts[3], version), _port(parts[5]))
    return ProxyHeader(1, source, destination), end + 2


def _ip(raw: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"invalid address {raw[:45]!r} in PROXY v1 line") from None
    if address.version != version:
        raise ProxyHeaderError(f"address {raw[:45]!r} is not IPv{version}")
    return str(address)


def _port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[:1] == b"0"):
        raise ProxyHeaderError(f"invalid port {raw[:8]!r} in PROXY v1 line")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError(f"invalid port {port} in PROXY v1 line")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header with command {command}")
    total = 16 + length
    if total > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes (at most {V2_MAX})")
    if len(data) < total:
        return None
    if command == 0:  # LOCAL: the proxy's own connection (health checks): keep the real peer
        return ProxyHeader(2, None, None), total
    body = data[16:total]
    if family == 0x11:  # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("PROXY v2 TCP4 addresses cut short")
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(2, (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport)), total
    if family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("PROXY v2 TCP6 addresses cut short")
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        return ProxyHeader(2, (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport)), total
    # UNSPEC, UDP or UNIX addresses: nothing usable as a TCP client address (spec: use the real one).
    return ProxyHeader(2, None, None), total


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v1 line for a TCP connection (used by the tests and for upstreams)."""
    family = b"TCP6" if ":" in source[0] else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (
        family,
        source[0].encode("ascii"),
        destination[0].encode("ascii"),
        source[1],
        destination[1],
    )


def encode_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header (command PROXY, TCP) for the addresses."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == 4:
        body = struct.pack("!4s4sHH", src.packed, dst.packed, source[1], destination[1])
        family = 0x11
    else:
        body = struct.pack("!16s16sHH", src.packed, dst.packed, source[1], destination[1])
        family = 0x21
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


class _HeaderReceiver(ProtocolWrapper):
    """Reads the PROXY header, then becomes a plain pass-through with the carried peer address."""

    factory: ProxyProtocolFactory

    def __init__(self, factory: ProxyProtocolFactory, wrapped, trusted: TrustedProxies, timeout: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(factory, wrapped)
        self.trusted = trusted
        self.timeout = timeout
        self.buffer = b""
        self.passing = False
        self.carried: IAddress | None = None
        self.timer = None

    def makeConnection(self, transport) -> None:  # type: ignore[no-untyped-def]
        # As ProtocolWrapper, except that the wrapped protocol is connected only once the
        # header has been read (it must never see the real peer as its client).
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        host = getattr(transport.getPeer(), "host", "")
        if not self.trusted.contains(host):
            log.info("PROXY protocol: connection from {peer} refused: not in trusted_proxies", peer=host)
            transport.abortConnection()
            return
        self.timer = self.factory.reactor.callLater(self.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if not self.passing:
            host = getattr(self.transport.getPeer(), "host", "?")
            log.info("PROXY protocol: no header from {peer} in time", peer=host)
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.passing:
            self.wrappedProtocol.dataReceived(data)
            return
        self.buffer += data
        try:
            parsed = parse_header(self.buffer)
        except ProxyHeaderError as error:
            host = getattr(self.transport.getPeer(), "host", "?")
            log.info("PROXY protocol: {why} from {peer}; closing", why=str(error), peer=host)
            self._stop_timer()
            self.buffer = b""
            self.transport.abortConnection()
            return
        if parsed is None:
            return
        header, consumed = parsed
        self._stop_timer()
        rest, self.buffer = self.buffer[consumed:], b""
        if header.source is not None:
            ip, port = header.source
            self.carried = IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port)
        self.passing = True
        self.wrappedProtocol.makeConnection(self)
        if rest and self.passing and self.connected:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self) -> IAddress:
        carried = self.carried
        return carried if carried is not None else self.transport.getPeer()

    def connectionLost(self, reason) -> None:  # type: ignore[no-untyped-def]
        self._stop_timer()
        self.factory.unregisterProtocol(self)
        if self.passing:
            self.passing = False
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None  # type: ignore[assignment]

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a listener's factory; the PROXY requirement follows the current config.

    ``settings`` returns the live ``tcp_recv_proxy_protocol`` table (None when absent), read
    per connection so that a reload turns it on or off; without it a connection gets the
    wrapped factory's protocol directly, with no wrapper in its data path.
    """

    noisy = False

    def __init__(
        self, wrapped, settings: Callable[[], ProxyProtocolConfig | None], *, reactor: IReactorTime
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__(wrapped)
        self.settings = settings
        self.reactor = reactor
        self._trusted_for: tuple[ProxyProtocolConfig | None, TrustedProxies | None] = (None, None)

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        settings = self.settings()
        inner = self.wrappedFactory.buildProtocol(addr)
        if settings is None or inner is None:
            return inner
        cached, trusted = self._trusted_for
        if cached is not settings or trusted is None:
            trusted = TrustedProxies(settings.trusted_proxies)
            self._trusted_for = (settings, trusted)
        return _HeaderReceiver(self, inner, trusted, settings.timeout_ms / 1000)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return prefix() if prefix is not None else "PROXY"
