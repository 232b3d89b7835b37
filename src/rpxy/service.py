"""The one function that builds rpxy's service, used by every entry point.

``rpxy``, ``twist rpxy``, ``twistd -n rpxy`` and ``example.tac`` all call
:func:`make_service`, so they run exactly the same thing: a ``MultiService`` holding
the listeners and the health checkers, sharing one pipeline and one state holder.

The service also carries out live reloads (:mod:`rpxy.reload`): it opens and closes
only the listeners whose address changed, and adopts the new state's health checkers.
Other parts plug into a reload through ``RpxyService.on_reload`` (see docs/reload.md).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, tcp
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from rpxy.config.load import LoadedConfig, load_config_file
from rpxy.config.model import Config
from rpxy.front.h1 import H1Factory
from rpxy.front.h3 import add_h3_listeners
from rpxy.logs import AccessLog, open_access_log
from rpxy.metrics import NULL_METRICS
from rpxy.pipeline import Pipeline
from rpxy.proxy_protocol import ProxyProtocolFactory
from rpxy.reload import CONFIG_POLL_INTERVAL, ConfigWatcher, ReloadEvent, Reloader, listener_keys
from rpxy.shutdown import Drainer, follow as follow_deferred
from rpxy.state import StateHolder, build_state
from rpxy.tls import HANDSHAKE_TIMEOUT, CertificateWatcher, HandshakeFailure, TlsServerFactory

log = Logger()


class _V6OnlyPort(tcp.Port):
    """An IPv6 listening socket that never also takes IPv4 (as rpxy binds ``::``).

    With ``reuse_port`` (any family) the socket gets ``SO_REUSEPORT`` before it binds, so
    that every worker process (``rpxy.workers``) binds the same port and the kernel
    spreads the connections between them.
    """

    reuse_port = False

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


class TCPListener(Service):
    """Listens synchronously in startService so that a port in use fails the start loudly."""

    def __init__(
        self, reactor, port: int, factory, *, interface: str, backlog: int, kind: str = "http", reuse_port: bool = False
    ) -> None:
        self.reactor = reactor
        self.kind = kind
        self.port = port
        self.factory = factory
        self.interface = interface
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.listening_port = None

    def startService(self) -> None:
        if ":" in self.interface or self.reuse_port:
            listener = _V6OnlyPort(self.port, self.factory, self.backlog, self.interface, self.reactor)
            listener.reuse_port = self.reuse_port
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


ListenerKey = tuple[str, str, int]  # (kind, interface, port)


class RpxyService(MultiService):
    """The whole proxy: listeners, health checkers, the state holder and the access log.

    It is also the :class:`rpxy.reload.ReloadTarget` of its :class:`Reloader`: the
    listeners are kept by ``(kind, interface, port)`` so that a reload closes and opens
    only those whose address changed, and one factory per kind is shared by every
    listener of that kind (client counts for ``max_clients`` survive a port change).
    """

    def __init__(
        self,
        config: Config,
        holder: StateHolder,
        access_log: AccessLog,
        *,
        reactor=None,
        pipeline: Pipeline | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.holder = holder
        self.access_log = access_log
        self.reactor = reactor
        self.pipeline = pipeline
        self.listeners: dict[ListenerKey, TCPListener] = {}
        self.certificate_watcher: CertificateWatcher | None = None
        self.reloader: Reloader | None = None
        #: Callables taking a :class:`rpxy.reload.ReloadEvent`, run after each successful
        #: reload (the same list as ``self.reloader.on_reload``).
        self.on_reload: list[Callable[[ReloadEvent], object]] = []
        self._factories: dict[str, Factory] = {}
        self._last_tls = holder.current.tls_contexts
        #: The HTTP/1.1 (and HTTP/2) factory of each listener kind, for metrics and the drain.
        self.h1_factories: dict[str, H1Factory] = {}
        self.tls_factory: TlsServerFactory | None = None
        #: rpxy.metrics.Metrics with [experimental.metrics], else a recorder that does nothing.
        self.metrics = NULL_METRICS
        #: Graceful shutdown (docs/behaviour.md): stopService drains before stopping anything.
        self.drainer = Drainer(reactor, lambda: list(self.h1_factories.values()))
        self.draining = False
        self._stopped: defer.Deferred | None = None
        self._forced = False
        #: Callables run when a graceful shutdown starts, after the TCP listeners closed (the
        #: HTTP/3 service can stop accepting there); one may return a Deferred to wait for.
        self.on_drain: list[Callable[[], object]] = []
        #: Worker index under ``rpxy --workers N`` (rpxy.workers), else None. Workers open
        #: their listeners with SO_REUSEPORT; worker i serves metrics on the port + i.
        self.worker: int | None = None
        #: The HTTP/3 listeners (rpxy.front.h3.H3Listeners), for services that plug into them (ACME).
        self.h3_endpoints: Any = None

    def stopService(self):
        """Graceful: close the listeners, drain the client connections (up to
        ``graceful_shutdown_timeout``), then stop the health checkers, watchers and the rest."""
        if self.draining:
            return follow_deferred(self._stopped)  # already stopping: the same end
        if not self.running or self.reactor is None:
            return self._stop_now()
        self.draining = True
        closing = [defer.maybeDeferred(listener.stopService) for listener in self.listeners.values()]
        for hook in list(self.on_drain):
            closing.append(defer.maybeDeferred(hook))
        drained = defer.DeferredList(closing, consumeErrors=True)

        def drain(_: object) -> defer.Deferred:
            timeout = 0.0 if self._forced else self.holder.current.config.graceful_shutdown_timeout
            return self.drainer.drain(timeout)

        drained.addCallback(drain)
        drained.addErrback(lambda failure: log.failure("graceful shutdown failed", failure))
        drained.addCallback(lambda _: self._stop_now())
        self._stopped = drained
        return follow_deferred(drained)

    def force_stop(self) -> None:
        """A second stop signal: abort the requests still in flight now."""
        self._forced = True
        if self.drainer.active:
            self.drainer.force("second stop signal")

    def _stop_now(self):
        deferred = super().stopService()
        self.holder.current.close()
        self.access_log.close()
        return deferred

    # -- reload ------------------------------------------------------------------------------

    def reload(self, *, force: bool = True, reason: str = "SIGHUP") -> defer.Deferred:
        """Re-read the config file now (SIGHUP); see :meth:`rpxy.reload.Reloader.reload`."""
        if self.reloader is None:
            return defer.succeed(None)
        return self.reloader.reload(force=force, reason=reason)

    def _tls_contexts(self):
        # Handshakes accepted just before a reload that removed TLS still find contexts.
        current = self.holder.current.tls_contexts
        if current is not None:
            self._last_tls = current
        return self._last_tls

    def _factory(self, kind: str) -> Factory:
        factory = self._factories.get(kind)
        if factory is None:
            holder, reactor = self.holder, self.reactor
            h1 = self.h1_factories[kind] = H1Factory(self.pipeline, holder, reactor, tls=kind != "http")
            if kind == "http":
                factory = h1
            else:
                factory = self.tls_factory = TlsServerFactory(
                    self._tls_contexts,
                    h1,
                    reactor=reactor,
                    handshake_timeout=HANDSHAKE_TIMEOUT,
                    on_failure=self._handshake_failed,
                )
            # PROXY protocol (experimental.tcp_recv_proxy_protocol): the header precedes
            # everything, TLS included; followed live, so a reload can turn it on or off.
            factory = ProxyProtocolFactory(
                factory, lambda: holder.current.config.experimental.tcp_recv_proxy_protocol, reactor=reactor
            )
            self._factories[kind] = factory
        return factory

    def add_listeners(self, config: Config) -> list[str]:
        """Add a listener for every address ``config`` wants and that has none yet.

        Before the service starts, they start with it (a port in use fails the start);
        while running, each starts now and one that cannot listen is logged and skipped
        (the next reload tries it again). Returns ``interface:port (kind)`` of each.
        """
        added: list[str] = []
        if self.draining:
            return added  # a reload during a graceful shutdown opens nothing
        for key in listener_keys(config):
            if key in self.listeners:
                continue
            kind, interface, port = key
            listener = TCPListener(
                self.reactor,
                port,
                self._factory(kind),
                interface=interface,
                backlog=config.tcp_listen_backlog,
                kind=kind,
                reuse_port=self.worker is not None,
            )
            if self.running:
                try:
                    listener.setServiceParent(self)
                except CannotListenError as error:
                    log.error("reload: cannot listen on {interface}:{port} ({kind}): {error}",
                              interface=interface, port=port, kind=kind, error=error)
                    if listener.parent is not None:
                        listener.disownServiceParent()
                    continue
            else:
                listener.setServiceParent(self)
            self.listeners[key] = listener
            added.append(f"{interface}:{port} ({kind})")
        return added

    def open_listeners(self, config: Config) -> list[str]:
        return self.add_listeners(config)

    def close_listeners(self, config: Config) -> defer.Deferred:
        """Stop the listeners ``config`` does not want; fires once their sockets are closed."""
        wanted = listener_keys(config)
        closing = []
        for key in [key for key in self.listeners if key not in wanted]:
            listener = self.listeners.pop(key)
            log.info("reload: closing listener {interface}:{port} ({kind})", kind=key[0], interface=key[1], port=key[2])
            closing.append(defer.maybeDeferred(listener.disownServiceParent))
        return defer.gatherResults(closing, consumeErrors=True)

    def adopt(self, event: ReloadEvent) -> None:
        """Bring the child services in line with the state just swapped in."""
        config = event.new.config
        self.config = config
        for checker in event.retired.checkers:
            if checker.parent is not None:
                checker.disownServiceParent()
        for checker in event.new.health_checkers:
            if checker.parent is None:
                checker.setServiceParent(self)
        self.access_log.redact = config.redact_query_in_access_log
        self.sync_certificate_watcher(config)

    def _handshake_failed(self, failure: HandshakeFailure) -> None:
        self.metrics.tls_failure(failure.category)
        _log_handshake_failure(failure)

    def sync_certificate_watcher(self, config: Config) -> None:
        """One certificate watcher while there is a TLS port, polling at the configured interval."""
        watcher = self.certificate_watcher
        wanted = config.listen_port_tls is not None
        if watcher is not None and (not wanted or watcher.interval != config.certificate_poll_interval):
            watcher.disownServiceParent()
            self.certificate_watcher = watcher = None
        if wanted and watcher is None:
            watcher = CertificateWatcher(self._tls_contexts, self.reactor, interval=config.certificate_poll_interval)
            watcher.setServiceParent(self)
            self.certificate_watcher = watcher


def make_service(
    config_path: str,
    *,
    reactor,
    log_dir: str | None = None,
    loaded: LoadedConfig | None = None,
    config_watch: str = "auto",
    config_poll_interval: float = CONFIG_POLL_INTERVAL,
    worker: int | None = None,
) -> RpxyService:
    """Build the service from a config file (raises ``ConfigError`` before anything listens).

    ``config_watch``: ``"auto"`` (inotify where available, plus a ``stat`` poll every
    ``config_poll_interval`` seconds), ``"poll"`` (the poll only) or ``"none"`` (reload
    on ``service.reload()``/SIGHUP only). SIGHUP itself is installed by the entry points.
    ``worker``: this process's index under ``rpxy --workers N`` (``rpxy.workers``): the
    proxy's TCP and UDP sockets are opened with SO_REUSEPORT, shared with the other workers.
    """
    if loaded is None:
        loaded = load_config_file(config_path)
    config = loaded.config
    for warning in loaded.warnings:
        log.warn("config: {warning}", warning=warning)
    if config.workers > 1 and worker is None:
        # twistd, .tac files and `rpxy --workers 1` run one process whatever the key says.
        log.warn("config: workers = {n} is applied by the rpxy command only; this process serves alone",
                 n=config.workers)
    access_stream = open_access_log(log_dir)
    access_log = AccessLog(access_stream, reactor, redact=config.redact_query_in_access_log)
    state = build_state(config, reactor)
    holder = StateHolder(state)
    pipeline = Pipeline(holder, reactor, access_log)
    top = RpxyService(config, holder, access_log, reactor=reactor, pipeline=pipeline)
    top.worker = worker
    for checker in state.health_checkers:
        checker.setServiceParent(top)
    top.add_listeners(config)
    top.sync_certificate_watcher(config)
    top.h3_endpoints = add_h3_listeners(top, config, pipeline, holder, reactor)  # HTTP/3 over UDP (rpxy/front/h3.py)
    add_acme_service(top, config, pipeline, reactor)  # ACME certificates (rpxy/acme/, docs/acme.md)
    add_metrics_listener(top, config, reactor)  # Prometheus endpoint (rpxy/metrics.py, docs/metrics.md)
    reloader = Reloader(config_path, top, reactor)
    reloader.on_reload = top.on_reload
    top.reloader = reloader
    if config_watch != "none":
        ConfigWatcher(
            config_path,
            reactor,
            reloader.file_changed,
            poll_interval=config_poll_interval,
            use_inotify=config_watch == "auto",
        ).setServiceParent(top)
    return top


def add_acme_service(top: RpxyService, config: Config, pipeline: Pipeline, reactor) -> None:
    """With ``[experimental.acme]``: the ACME service, hooked into the TLS listener (served
    certificates, TLS-ALPN-01), the pipeline (HTTP-01) and reloads (apps added/removed;
    a reload that adds ``[experimental.acme]`` starts the service then)."""
    from rpxy.acme import AcmeService

    services: list[AcmeService] = []

    def follow(new_config: Config) -> None:
        if services:
            services[0].update(new_config)
            return
        if new_config.experimental.acme is None:
            return
        acme = AcmeService(new_config, reactor)
        services.append(acme)
        acme.setServiceParent(top)
        tls_factory = top._factory("https")
        tls_factory = getattr(tls_factory, "wrappedFactory", tls_factory)  # under the PROXY protocol wrapper
        tls_factory.acme = acme  # type: ignore[attr-defined]
        top.h3_endpoints.set_acme(acme)  # ACME certificates over HTTP/3 too
        pipeline.acme_http01 = acme.http01

    follow(config)
    top.on_reload.append(lambda event: follow(event.new.config))


def add_metrics_listener(top: RpxyService, config: Config, reactor) -> None:
    """With ``[experimental.metrics]``: one :class:`rpxy.metrics.Metrics` fed by the access
    log (requests), the pipeline (cache lookups, request start times), the TLS factory
    (failures), reloads, and read at scrape time from the service; served on its own
    listener, which is not one of ``top.listeners`` (a reload never closes it)."""
    settings = config.experimental.metrics
    if settings is None:
        return
    from rpxy.metrics import Metrics, metrics_site

    metrics = Metrics(reactor.seconds)
    top.metrics = metrics
    top.access_log.metrics = metrics
    if top.pipeline is not None:
        top.pipeline.metrics = metrics
        top.pipeline.clock = reactor.seconds

    def upstream_health():
        for checker in top.holder.current.health_checkers:
            for upstream, state in zip(checker.upstreams, checker.states):
                yield upstream.uri, state.healthy

    def connections() -> dict[str, int]:
        counts = {kind: factory.active for kind, factory in top.h1_factories.items()}
        # HTTP/3: the QUIC connections of each UDP listener's endpoint (rpxy.front.h3).
        if top.h3_endpoints:
            counts["h3"] = sum(len(endpoint.sessions) for endpoint in top.h3_endpoints)
        return counts

    metrics.connections = connections
    metrics.upstream_health = upstream_health
    metrics.handshakes = lambda: top.tls_factory.handshakes_completed if top.tls_factory is not None else 0
    metrics.reloads = lambda: (top.reloader.reloads, top.reloader.failures) if top.reloader is not None else (0, 0)
    metrics.draining = lambda: top.draining
    metrics.acme = lambda: acme_states(top)
    top.on_reload.append(lambda event: metrics.reload_succeeded())
    # Under rpxy --workers N, worker i serves its own metrics on listen_port + i (each
    # worker counts only its own requests; docs/operations.md#workers).
    port = settings.listen_port + (top.worker or 0)
    TCPListener(
        reactor,
        port,
        metrics_site(metrics, settings.path, reactor=reactor),
        interface=settings.listen_address,
        backlog=64,
        kind="metrics",
    ).setServiceParent(top)


def acme_states(top: MultiService):
    """``(domain, state, not_after)`` of each ACME-managed name, for the metrics: ``valid``
    (a certificate is served), ``renewing``, ``ordering`` (none yet), ``failed`` (none, and
    the last order failed) or ``pending``. Read from the ACME service at scrape time."""
    acme = top.namedServices.get("rpxy-acme")
    for name, domain in sorted(getattr(acme, "domains", {}).items()):
        entry = getattr(domain, "entry", None)
        in_flight = getattr(domain, "in_flight", False)
        if entry is not None:
            state = "renewing" if in_flight else "valid"
        elif in_flight:
            state = "ordering"
        else:
            state = "failed" if getattr(domain, "failures", 0) else "pending"
        not_after = entry.leaf.not_valid_after_utc.timestamp() if entry is not None else None
        yield name, state, not_after


def _log_handshake_failure(failure: HandshakeFailure) -> None:
    if failure.category == "closed" and failure.bytes_received == 0:
        return  # a bare TCP probe (health checkers, port scanners): not worth a line
    log.info("{failure}", failure=str(failure))
