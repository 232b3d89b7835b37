"""The Twisted side of TLS termination: one listener, many apps chosen by SNI.

Recommended wiring (one TLS listener for every app with ``tls``)::

    from rpxy.tls import SniContextMap, TlsOptions, TlsServerFactory, CertificateWatcher

    contexts = SniContextMap.from_apps(config.apps, TlsOptions(alpn=(b"http/1.1",)))
    factory = TlsServerFactory(
        lambda: holder.current.tls_contexts,   # or just `contexts`
        H1Factory(pipeline, holder, reactor, tls=True),
        reactor=reactor,
        on_failure=lambda failure: log.info("{f}", f=failure),  # HandshakeFailure
    )
    endpoint.listen(factory)        # or reactor.listenTCP(port, factory, ...)
    CertificateWatcher(contexts, reactor).setServiceParent(service)

In the application protocol, ``self.transport`` is Twisted's TLS transport
(``ISSLTransport``, ``INegotiated``): :func:`rpxy.tls.connection_sni` gives the
SNI (for the Host/SNI 421 check) as soon as ``connectionMade`` runs, and
:func:`rpxy.tls.tls_info` the app, version, group, ALPN and client certificate
once ``handshakeCompleted`` (``IHandshakeListener``) was called.

How a connection goes: :class:`TlsServerFactory` builds a small front protocol
that reads the ClientHello (:mod:`rpxy.tls.hello`), picks the app's context,
and only then creates the OpenSSL connection *on that context* and a Twisted
``TLSMemoryBIOProtocol`` around the application protocol. Creating the OpenSSL
connection on the app's own context (instead of switching in an SNI callback)
is what keeps session caches and ticket keys per app: see
:mod:`rpxy.tls.contexts`. Missing/unknown SNI is answered with a fatal
``unrecognized_name`` alert without building any protocol. A handshake not done
within ``handshake_timeout`` (15 s) is aborted. Every failure is reported once
to ``on_failure`` as a :class:`~rpxy.tls.failures.HandshakeFailure`.

The application factory's ``buildProtocol`` is called once the ClientHello named
a known app (returning None closes the connection); its protocol then sees
``connectionMade`` before the handshake completes, as with any Twisted TLS
listener.

:class:`SniConnectionCreator` alone also works as the creator of a plain
``TLSMemoryBIOFactory(creator, False, app_factory)``: connections then start on
the map's dispatch context and switch in the SNI callback. That path has no
handshake timeout, reports no failures, and disables session resumption on the
whole listener (the only safe choice there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as _TypingProtocol

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from rpxy.tls import connections
from rpxy.tls.contexts import AppTls
from rpxy.tls.failures import (
    CLOSED,
    HANDSHAKE,
    NO_SNI,
    TIMEOUT,
    UNKNOWN_SNI,
    HandshakeFailure,
    categorize_failure,
    format_peer,
)
from rpxy.tls.hello import MAX_CLIENT_HELLO, ClientHelloError, parse_client_hello
from rpxy.tls.names import display_name
from rpxy.tls.sni import SniContextMap

__all__ = ["HANDSHAKE_TIMEOUT", "SniConnectionCreator", "TlsServerFactory"]

log = Logger(namespace="rpxy.tls")

#: Seconds from TCP accept to the end of the TLS handshake (rpxy's hard-coded value).
HANDSHAKE_TIMEOUT = 15.0

# Fatal alerts written by hand before any OpenSSL connection exists (TLS record
# version 0x0303, as RFC 8446 requires of everything but the first ClientHello).
_ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
_ALERT_DECODE_ERROR = b"\x15\x03\x03\x00\x02\x02\x32"

ContextsSource = SniContextMap | Callable[[], SniContextMap]

#: RFC 8737: a ClientHello offering this ALPN protocol is an ACME TLS-ALPN-01 validation.
ACME_TLS_ALPN = b"acme-tls/1"


class AcmeHook(_TypingProtocol):
    """What the listener asks the ACME service (:class:`rpxy.acme.AcmeService`)."""

    def lookup(self, sni: str) -> AppTls | None: ...  # the served ACME certificate
    def missing(self, sni: str) -> str | None: ...  # why a managed name has none yet
    def challenge(self, sni: str) -> AppTls | None: ...  # TLS-ALPN-01 context while validating


def _provider(contexts: ContextsSource) -> Callable[[], SniContextMap]:
    if isinstance(contexts, SniContextMap):
        return lambda: contexts
    if callable(contexts):
        return contexts
    raise TypeError(f"expected a SniContextMap or a callable returning one, not {type(contexts).__name__}")


@implementer(IOpenSSLServerConnectionCreator)
class SniConnectionCreator:
    """Creates the server ``OpenSSL.SSL.Connection`` for each TLS connection.

    With :class:`TlsServerFactory` the app is already known from the ClientHello
    and the connection is created on the app's context. Used directly with
    ``TLSMemoryBIOFactory(SniConnectionCreator(contexts), False, app_factory)`` it
    creates connections on ``contexts.dispatch_context`` (SNI-callback switching,
    no session resumption; see :attr:`SniContextMap.dispatch_context`).
    """

    def __init__(self, contexts: ContextsSource) -> None:
        self._contexts = _provider(contexts)

    @property
    def contexts(self) -> SniContextMap:
        return self._contexts()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        inner = getattr(tlsProtocol, "wrappedProtocol", None)
        if isinstance(inner, _HandshakeObserver):
            connection = SSL.Connection(inner.entry.context, None)
            connections.attach(
                connection,
                connections.ConnectionTls(sni=inner.sni, raw_sni=inner.raw_sni, entry=inner.entry),
            )
            return connection
        connection = SSL.Connection(self.contexts.dispatch_context, None)
        connections.attach(connection, connections.ConnectionTls())
        return connection


class TlsServerFactory(Factory):
    """The factory to listen with on the TLS port (see the module docs for wiring).

    ``contexts``: a :class:`SniContextMap`, or a zero-argument callable returning
    the current one (read once per connection, when its ClientHello arrives).
    ``app_factory``: builds the application protocol (HTTP/1.1...).
    ``reactor``: ``IReactorTime`` for the handshake timeout and TLS write batching.
    ``on_failure``: called with a :class:`HandshakeFailure` for each failed handshake
    (default: logged at info level on the ``rpxy.tls`` namespace).
    """

    noisy = False

    def __init__(
        self,
        contexts: ContextsSource,
        app_factory,
        *,
        reactor: IReactorTime,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        on_failure: Callable[[HandshakeFailure], object] | None = None,
    ) -> None:
        self.contexts = _provider(contexts)
        self.app_factory = app_factory
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.on_failure = on_failure or _log_failure
        self.creator = SniConnectionCreator(self.contexts)
        self.tls_factory = TLSMemoryBIOFactory(self.creator, False, app_factory, clock=reactor)
        #: Set by the service when apps use ACME: serves ACME certificates and
        #: TLS-ALPN-01 challenges (names the static map does not know).
        self.acme: AcmeHook | None = None
        #: Completed handshakes so far (read by rpxy.metrics at scrape time).
        self.handshakes_completed = 0

    def doStart(self) -> None:
        super().doStart()
        self.app_factory.doStart()

    def doStop(self) -> None:
        self.app_factory.doStop()
        super().doStop()

    def buildProtocol(self, addr) -> _TlsFront:  # type: ignore[override]
        return _TlsFront(self, addr)

    def report(self, failure: HandshakeFailure) -> None:
        try:
            self.on_failure(failure)
        except Exception:
            log.failure("TLS handshake failure hook raised")


def _log_failure(failure: HandshakeFailure) -> None:
    log.info("{handshake_failure}", handshake_failure=failure)


class _TlsFront(Protocol):
    """Sits on the TCP transport: pre-reads the ClientHello, then feeds the TLS protocol."""

    def __init__(self, factory: TlsServerFactory, addr) -> None:
        self.factory = factory
        self.addr = addr
        self.tls = None  # TLSMemoryBIOProtocol once the app is known
        self.buffer = b""
        self.received = 0
        self.entry: AppTls | None = None
        self.sni_display: str | None = None
        self.timeout_call = None
        self.finished = False  # handshake done, or failed and reported

    # -- Protocol -------------------------------------------------------------------

    def connectionMade(self) -> None:
        timeout = self.factory.handshake_timeout
        if timeout and timeout > 0:
            self.timeout_call = self.factory.reactor.callLater(timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        tls = self.tls
        if tls is not None:
            tls.dataReceived(data)
            return
        if self.finished:
            return  # refused; waiting for the close
        self.received += len(data)
        buffer = self.buffer + data if self.buffer else data
        try:
            hello = parse_client_hello(buffer)
        except ClientHelloError as exc:
            alert = b"" if exc.not_tls else _ALERT_DECODE_ERROR
            self._refuse(HANDSHAKE, str(exc), alert)
            return
        if hello is None:
            if len(buffer) > MAX_CLIENT_HELLO:
                self._refuse(HANDSHAKE, "ClientHello is too large", _ALERT_DECODE_ERROR)
            else:
                self.buffer = buffer
            return
        self.buffer = b""
        self.sni_display = display_name(hello.raw_sni)
        if hello.raw_sni is None:
            self._refuse(NO_SNI, "the ClientHello has no server name (SNI)", _ALERT_UNRECOGNIZED_NAME)
            return
        acme = self.factory.acme
        if acme is not None and hello.sni is not None:
            if ACME_TLS_ALPN in hello.alpn:
                self._start_challenge(acme.challenge(hello.sni), hello.sni, hello.raw_sni, buffer)
                return
            entry = acme.lookup(hello.sni)
            if entry is None:
                entry = self.factory.contexts().lookup_normalized(hello.sni)
            if entry is None:
                missing = acme.missing(hello.sni)
                if missing is not None:
                    self._refuse(UNKNOWN_SNI, missing, _ALERT_UNRECOGNIZED_NAME)
                    return
        else:
            entry = self.factory.contexts().lookup_normalized(hello.sni) if hello.sni is not None else None
        if entry is None:
            self._refuse(UNKNOWN_SNI, "no app serves this server name", _ALERT_UNRECOGNIZED_NAME)
            return
        self.entry = entry
        self._start_tls(entry, hello.sni, hello.raw_sni, buffer)

    def connectionLost(self, reason=connectionDone) -> None:
        self._cancel_timeout()
        tls = self.tls
        if tls is not None:
            tls.connectionLost(reason)  # the observer reports a failed handshake
            self.tls = None
        elif not self.finished:
            if self.received == 0:
                text = "connection closed before any data"
            else:
                text = f"connection closed after {self.received} bytes of an incomplete ClientHello"
            self._report(CLOSED, text)

    # -- internals ------------------------------------------------------------------

    def _start_challenge(self, entry: AppTls | None, sni: str, raw_sni: bytes, buffer: bytes) -> None:
        """An ``acme-tls/1`` handshake: the challenge certificate, then nothing (RFC 8737)."""
        if entry is None:
            self._refuse(UNKNOWN_SNI, "acme-tls/1 offered for a name with no ACME validation in progress",
                         _ALERT_UNRECOGNIZED_NAME)
            return
        self.entry = entry
        self._start_tls(entry, sni, raw_sni, buffer, app_protocol=_AcmeChallengeProtocol())

    def _start_tls(self, entry: AppTls, sni: str, raw_sni: bytes, buffer: bytes, app_protocol=None) -> None:
        if app_protocol is None:
            app_protocol = self.factory.app_factory.buildProtocol(self.addr)
        if app_protocol is None:
            self.finished = True
            self._cancel_timeout()
            self.transport.loseConnection()
            return
        tls_factory = self.factory.tls_factory
        observer = _HandshakeObserver(self, app_protocol, entry, sni, raw_sni)
        tls = tls_factory.protocol(tls_factory, observer)
        self.tls = tls
        tls.makeConnection(self.transport)
        if self.tls is tls and not self.finished:
            tls.dataReceived(buffer)

    def _refuse(self, category: str, reason: str, alert: bytes) -> None:
        self._report(category, reason)
        self.buffer = b""
        if alert:
            self.transport.write(alert)
        self.transport.loseConnection()

    def _report(self, category: str, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timeout()
        try:
            peer = format_peer(self.transport.getPeer())
        except Exception:
            peer = format_peer(self.addr)
        self.factory.report(
            HandshakeFailure(
                category=category,
                reason=reason,
                peer=peer,
                sni=self.sni_display,
                app=self.entry.app_name if self.entry is not None else None,
                bytes_received=self.received,
            )
        )

    def _handshake_done(self) -> None:
        self.finished = True
        self.factory.handshakes_completed += 1
        self._cancel_timeout()

    def _tls_lost(self, reason) -> None:
        if not self.finished:
            category, text = categorize_failure(reason)
            self._report(category, text)

    def _cancel_timeout(self) -> None:
        call = self.timeout_call
        self.timeout_call = None
        if call is not None and call.active():
            call.cancel()

    def _timed_out(self) -> None:
        self.timeout_call = None
        if self.finished:
            return
        self._report(TIMEOUT, f"handshake not completed within {self.factory.handshake_timeout:g} s")
        self.transport.abortConnection()


@implementer(IHandshakeListener)
class _HandshakeObserver(Protocol):
    """Between the TLS protocol and the application protocol until the handshake ends.

    It hands the application protocol the TLS transport itself (no extra layer on
    writes), tells the front when the handshake completed or failed, then steps
    out of the read path by making the application protocol the TLS protocol's
    ``wrappedProtocol``.
    """

    def __init__(self, front: _TlsFront, app_protocol, entry: AppTls, sni: str, raw_sni: bytes) -> None:
        self.front = front
        self.app = app_protocol
        self.entry = entry
        self.sni = sni
        self.raw_sni = raw_sni

    def makeConnection(self, transport) -> None:
        self.connected = 1
        self.transport = transport
        self.app.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.app.dataReceived(data)

    def handshakeCompleted(self) -> None:
        self.front._handshake_done()
        tls = self.transport
        if getattr(tls, "wrappedProtocol", None) is self:
            tls.wrappedProtocol = self.app
        if IHandshakeListener.providedBy(self.app):
            self.app.handshakeCompleted()

    def connectionLost(self, reason=connectionDone) -> None:
        self.connected = 0
        self.front._tls_lost(reason)
        self.app.connectionLost(reason)


@implementer(IHandshakeListener)
class _AcmeChallengeProtocol(Protocol):
    """The application side of a TLS-ALPN-01 validation: close once the handshake is done."""

    def handshakeCompleted(self) -> None:
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()
