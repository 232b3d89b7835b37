"""One keep-alive connection pool per upstream.

Idle connections are reused most-recently-used first (the warmest socket, and the
least likely to have been closed by the upstream's own idle timer) and expire after
``idle_timeout`` by a periodic sweep rather than a timer per connection, which would
cost a heap operation on every request. The pool is bounded: beyond ``max_idle`` a
returned connection is closed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Callable

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from rpxy.config.model import UpstreamConfig
from rpxy.netio import socket_below
from rpxy.upstream.h1client import UpstreamConnection

log = Logger()


@implementer(IStreamClientEndpoint)
class _PreambleEndpoint:
    """Writes ``preamble`` (a PROXY protocol header) on the raw TCP connection first.

    It sits under TLS (``wrapClientTLS`` wraps this endpoint), so the header precedes the
    ClientHello as the PROXY protocol requires; the protocol ``connect`` fires with is the
    caller's own, not the wrapper.
    """

    def __init__(self, inner: IStreamClientEndpoint, preamble: bytes) -> None:
        self.inner = inner
        self.preamble = preamble

    def connect(self, factory):  # type: ignore[no-untyped-def]
        wrapping = _PreambleFactory(factory, self.preamble)
        return self.inner.connect(wrapping).addCallback(lambda wrapper: wrapper.wrappedProtocol)


class _PreambleProtocol(ProtocolWrapper):
    def makeConnection(self, transport) -> None:  # type: ignore[no-untyped-def]
        transport.write(self.factory.preamble)
        super().makeConnection(transport)


class _PreambleFactory(WrappingFactory):
    protocol = _PreambleProtocol
    noisy = False

    def __init__(self, wrapped, preamble: bytes) -> None:  # type: ignore[no-untyped-def]
        super().__init__(wrapped)
        self.preamble = preamble


def _endpoint(
    reactor,
    upstream: UpstreamConfig,
    connect_timeout: float,
    alpn: list[bytes] | None = None,
    preamble: bytes | None = None,
) -> IStreamClientEndpoint:
    try:
        address = ipaddress.ip_address(upstream.host)
    except ValueError:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, upstream.host, upstream.port, timeout=connect_timeout)
    else:
        if address.version == 4:
            endpoint = TCP4ClientEndpoint(reactor, upstream.host, upstream.port, timeout=connect_timeout)
        else:
            endpoint = TCP6ClientEndpoint(reactor, upstream.host, upstream.port, timeout=connect_timeout)
    if preamble:
        endpoint = _PreambleEndpoint(endpoint, preamble)
    if upstream.tls:
        trust_root = None
        if upstream.ca_cert_path:
            with open(upstream.ca_cert_path, "rb") as ca_file:
                trust_root = ssl.Certificate.loadPEM(ca_file.read())
        creator = ssl.optionsForClientTLS(
            upstream.host,
            trustRoot=trust_root if trust_root is not None else ssl.platformTrust(),
            acceptableProtocols=alpn or [b"http/1.1"],
        )
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


def _still_open(connection: UpstreamConnection) -> bool:
    """False when the upstream has closed (or reset) an idle connection.

    On cleartext, bytes waiting on an idle connection also mean it is out of step (an
    answer nobody asked for). Under TLS they may be a session ticket or a close_notify,
    which the reactor will handle; only EOF is conclusive there.
    """
    sock, tls = socket_below(connection.transport)
    if sock is None:
        return True
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read: alive and quiet, as an idle connection should be
    except OSError as error:
        return error.errno == errno.EINTR
    return bool(data) and tls


class _ConnectionFactory(Factory):
    noisy = False
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> UpstreamConnection:  # type: ignore[override]
        return UpstreamConnection(self.pool)


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        reactor,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 15.0,
        max_idle: int = 128,
        preamble: bytes | None = None,
    ) -> None:
        self.upstream = upstream
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self._endpoint = _endpoint(reactor, upstream, connect_timeout, preamble=preamble)
        self._factory = _ConnectionFactory(self)
        self._sweeper = None
        self._closed = False

    def acquire(
        self,
        on_ready: Callable[[UpstreamConnection], None],
        on_error: Callable[[Failure], None],
        *,
        fresh: bool = False,
        probe: bool = False,
    ) -> None:
        """Hand a connection to ``on_ready`` (reused when possible) or a failure to ``on_error``.

        ``probe`` is for requests that cannot be retried if a pooled connection turns out
        to be dead (a POST, a request with a body): the socket is checked without blocking
        first, so an upstream's close that the reactor has not processed yet is noticed
        here instead of costing the client a 502. Retryable requests skip the syscall.
        """
        idle = self._idle
        while idle and not fresh:
            connection = idle.pop()
            if connection.transport is not None and connection.transport.connected:
                if probe and not _still_open(connection):
                    connection.close()
                    continue
                connection.reused = True
                on_ready(connection)
                return
        deferred = self._endpoint.connect(self._factory)
        deferred.addCallbacks(on_ready, on_error)

    def release(self, connection: UpstreamConnection) -> None:
        """Take back a connection whose exchange finished cleanly."""
        if self._closed or len(self._idle) >= self.max_idle:
            connection.close()
            return
        connection.idle_since = self.reactor.seconds()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle_timeout / 2, self._sweep)

    def connection_lost(self, connection: UpstreamConnection) -> None:
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.reactor.seconds() - self.idle_timeout
        keep = []
        for connection in self._idle:
            if connection.idle_since <= deadline:
                connection.close()
            else:
                keep.append(connection)
        self._idle = keep
        if keep and not self._closed:
            self._sweeper = self.reactor.callLater(self.idle_timeout / 2, self._sweep)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close idle connections and stop sweeping; busy ones close when their exchange ends."""
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
