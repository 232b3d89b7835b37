"""The one function that builds rpxy's service, used by every entry point.

``rpxy``, ``twist rpxy``, ``twistd -n rpxy`` and ``example.tac`` all call
:func:`make_service`, so they run exactly the same thing: a ``MultiService`` holding
the listeners and the health checkers, sharing one pipeline and one state holder.
"""

from __future__ import annotations

import socket

from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.logger import Logger

from rpxy.config.load import LoadedConfig, load_config_file
from rpxy.config.model import Config
from rpxy.front.h1 import H1Factory
from rpxy.logs import AccessLog, open_access_log
from rpxy.pipeline import Pipeline
from rpxy.state import StateHolder, build_state
from rpxy.tls import HANDSHAKE_TIMEOUT, CertificateWatcher, HandshakeFailure, TlsServerFactory

log = Logger()


class _V6OnlyPort(tcp.Port):
    """An IPv6 listening socket that never also takes IPv4 (as rpxy binds ``::``)."""

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock


class TCPListener(Service):
    """Listens synchronously in startService so that a port in use fails the start loudly."""

    def __init__(self, reactor, port: int, factory, *, interface: str, backlog: int, kind: str = "http") -> None:
        self.reactor = reactor
        self.kind = kind
        self.port = port
        self.factory = factory
        self.interface = interface
        self.backlog = backlog
        self.listening_port = None

    def startService(self) -> None:
        if ":" in self.interface:
            listener = _V6OnlyPort(self.port, self.factory, self.backlog, self.interface, self.reactor)
            listener.startListening()
        else:
            listener = self.reactor.listenTCP(self.port, self.factory, self.backlog, self.interface)
        self.listening_port = listener
        log.info(
            "listening on {interface}:{port} ({kind})",
            interface=self.interface,
            port=listener.getHost().port,
            kind=self.kind,
        )
        super().startService()

    def stopService(self):
        super().stopService()
        if self.listening_port is not None:
            port, self.listening_port = self.listening_port, None
            return port.stopListening()
        return None


class RpxyService(MultiService):
    """The whole proxy: listeners, health checkers, the state holder and the access log."""

    def __init__(self, config: Config, holder: StateHolder, access_log: AccessLog) -> None:
        super().__init__()
        self.config = config
        self.holder = holder
        self.access_log = access_log

    def stopService(self):
        deferred = super().stopService()
        self.holder.current.close()
        self.access_log.close()
        return deferred


def make_service(
    config_path: str,
    *,
    reactor,
    log_dir: str | None = None,
    loaded: LoadedConfig | None = None,
) -> RpxyService:
    """Build the service from a config file (raises ``ConfigError`` before anything listens)."""
    if loaded is None:
        loaded = load_config_file(config_path)
    config = loaded.config
    for warning in loaded.warnings:
        log.warn("config: {warning}", warning=warning)
    access_stream = open_access_log(log_dir)
    access_log = AccessLog(access_stream, reactor, redact=config.redact_query_in_access_log)
    state = build_state(config, reactor)
    holder = StateHolder(state)
    pipeline = Pipeline(holder, reactor, access_log)
    top = RpxyService(config, holder, access_log)
    for checker in state.health_checkers:
        checker.setServiceParent(top)
    interfaces = (*config.listen_address_v4, *config.listen_address_v6)
    if config.listen_port is not None:
        factory = H1Factory(pipeline, holder, reactor, tls=False)
        for interface in interfaces:
            TCPListener(
                reactor, config.listen_port, factory, interface=interface, backlog=config.tcp_listen_backlog
            ).setServiceParent(top)
    if config.listen_port_tls is not None:
        tls_factory = TlsServerFactory(
            lambda: holder.current.tls_contexts,
            H1Factory(pipeline, holder, reactor, tls=True),
            reactor=reactor,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            on_failure=_log_handshake_failure,
        )
        for interface in interfaces:
            TCPListener(
                reactor,
                config.listen_port_tls,
                tls_factory,
                interface=interface,
                backlog=config.tcp_listen_backlog,
                kind="https",
            ).setServiceParent(top)
        CertificateWatcher(
            lambda: holder.current.tls_contexts, reactor, interval=config.certificate_poll_interval
        ).setServiceParent(top)
    return top


def _log_handshake_failure(failure: HandshakeFailure) -> None:
    if failure.category == "closed" and failure.bytes_received == 0:
        return  # a bare TCP probe (health checkers, port scanners): not worth a line
    log.info("{failure}", failure=str(failure))
