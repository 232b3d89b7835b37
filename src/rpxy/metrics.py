"""Prometheus metrics: cheap counters on the request path, formatted only when scraped.

With ``[experimental.metrics]`` the service builds one :class:`Metrics` and serves it on
its own listener (:func:`metrics_site`); without it nothing here runs on the request path:
the access log's hook stays ``None`` (one attribute test per request) and the rarer hooks
(TLS failures, cache lookups) go to :data:`NULL_METRICS`, whose methods do nothing.

Why not ``prometheus_client.Counter(...).labels(...).inc()`` per request: each ``inc`` takes
a lock, and ``labels()`` builds and hashes a label tuple under another lock. The proxy is
single-threaded, so the hot path here is a dict lookup (a cached per-(app, protocol)
series), a list increment for the status code and one for the latency bucket. The
numbers become ``prometheus_client`` metric families in :meth:`Metrics.collect`, which a
``CollectorRegistry`` of our own (never the global one) calls at scrape time. State that
the proxy already keeps (active connections, upstream health, reload counters, completed
TLS handshakes) is read at scrape time through callables, so it costs nothing per request.
See docs/metrics.md for every metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from twisted.web.server import Site

# prometheus_client and twisted.web are imported when metrics are configured, never
# otherwise: a proxy without [experimental.metrics] does not load them at all.

__all__ = [
    "LATENCY_BUCKETS",
    "Metrics",
    "NULL_METRICS",
    "NullMetrics",
    "TLS_FAILURE_CATEGORIES",
    "metrics_site",
    "protocol_label",
]

#: Upper bounds (seconds) of the request latency histogram; +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: rpxy.tls.failures.CATEGORIES, repeated here so that every series exists at 0 from the start
#: (``rate()`` needs a first sample) without importing the TLS layer.
TLS_FAILURE_CATEGORIES = ("no_sni", "unknown_sni", "client_cert", "timeout", "handshake", "closed")
CACHE_RESULTS = ("hit", "miss", "stale", "bypass")

log = Logger()

_PROTOCOLS = {b"1.1": "h1", b"1.0": "h1", b"2": "h2", b"3": "h3"}
_BUCKET_LABELS = [repr(float(bound)) if bound != int(bound) else f"{bound:.1f}" for bound in LATENCY_BUCKETS]


def protocol_label(version: bytes) -> str:
    """``h1`` / ``h2`` / ``h3`` from :attr:`rpxy.message.RequestHead.version`."""
    return _PROTOCOLS.get(version, "h1")


class _Series:
    """Counts for one (app, HTTP version): by status code, and the latency histogram."""

    __slots__ = ("app", "version", "codes", "buckets", "seconds", "timed")

    def __init__(self, app: str, version: bytes) -> None:
        self.app = app
        self.version = version
        # Indexed by status code: a list increment is cheaper than a dict get + set, and
        # status codes are three digits (the parsers refuse anything else; 499 is ours).
        self.codes = [0] * 1000
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.timed = 0


class NullMetrics:
    """What the proxy records into when metrics are off: every method does nothing."""

    enabled = False

    def request(self, app: str, version: bytes, status: int, started: float | None) -> None:
        pass

    def tls_failure(self, category: str) -> None:
        pass

    def cache_lookup(self, plan: Any) -> None:
        pass

    def reload_succeeded(self, when: float | None = None) -> None:
        pass


NULL_METRICS = NullMetrics()


class Metrics:
    """The live numbers of one rpxy process and the collector that exposes them.

    ``clock``: the same clock the pipeline stamps request starts with (the reactor's
    ``seconds``), so that durations are differences of one clock.

    Scrape-time sources, set by the service (each a zero-argument callable, or None):

    ``connections`` → ``{listener kind: open client connections}``;
    ``upstream_health`` → iterable of ``(upstream uri, healthy)``, one per health-checked
    upstream of every route (an upstream checked by several routes is healthy only if
    every check says so); ``handshakes`` → completed TLS handshakes so far;
    ``reloads`` → ``(successful, failed)`` config reloads so far; ``draining`` → True
    during a graceful shutdown; ``acme`` → iterable of ``(domain, state, not_after or
    None)`` for the ACME hook (see docs/metrics.md).
    """

    enabled = True

    def __init__(self, clock: Callable[[], float], *, process: bool = True) -> None:
        self.clock = clock
        self._series: dict[tuple[str, bytes], _Series] = {}
        self.tls_failures: dict[str, int] = {category: 0 for category in TLS_FAILURE_CATEGORIES}
        self.cache_results: dict[str, int] = {result: 0 for result in CACHE_RESULTS}
        self.last_reload: float | None = None
        self.started_at = time.time()
        self.connections: Callable[[], dict[str, int]] | None = None
        self.upstream_health: Callable[[], Iterable[tuple[str, bool]]] | None = None
        self.handshakes: Callable[[], int] | None = None
        self.reloads: Callable[[], tuple[int, int]] | None = None
        self.draining: Callable[[], bool] | None = None
        self.acme: Callable[[], Iterable[tuple[str, str, float | None]]] | None = None
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        if process:
            ProcessCollector(registry=self.registry)

    # -- recording (the request path) --------------------------------------------------------

    def request(self, app: str, version: bytes, status: int, started: float | None) -> None:
        """One finished request. ``started``: the clock when the pipeline took it (None for
        answers made before a route was chosen: they are counted, not timed)."""
        series = self._series.get((app, version))
        if series is None:
            series = self._series[(app, version)] = _Series(app, version)
        series.codes[status if 0 <= status < 1000 else 0] += 1
        if started is not None:
            elapsed = self.clock() - started
            if elapsed < 0.0:
                elapsed = 0.0
            series.buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
            series.seconds += elapsed
            series.timed += 1

    def tls_failure(self, category: str) -> None:
        failures = self.tls_failures
        failures[category] = failures.get(category, 0) + 1

    def cache_lookup(self, plan: Any) -> None:
        """A :class:`rpxy.cache.relay.CachePlan` decided: a hit, a miss (not stored), stale
        (stored but too old: revalidated or fetched again) or bypass (the client's own
        ``no-cache`` / ``max-age=0``)."""
        if plan.hit is not None:
            result = "hit"
        elif plan.fwd == "stale":
            result = "stale"
        elif plan.fwd == "request":
            result = "bypass"
        else:
            result = "miss"
        self.cache_results[result] += 1

    def reload_succeeded(self, when: float | None = None) -> None:
        self.last_reload = time.time() if when is None else when

    # -- exposition ----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client collector protocol: called by the registry at each scrape.

        Each part is built completely before it is yielded, and a part whose source raises
        is logged and left out: one broken source never costs the whole scrape."""
        parts = (
            self._own_families,
            self._request_families,
            self._connection_families,
            self._health_families,
            self._tls_families,
            self._reload_families,
            self._acme_families,
        )
        for part in parts:
            try:
                families = list(part())
            except Exception:
                log.failure("metrics: collecting {part} failed", part=part.__name__)
                continue
            yield from families

    def _own_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = GaugeMetricFamily("rpxy_info", "rpxy build information (always 1).", labels=["version"])
        info.add_metric([_version()], 1)
        yield info
        yield GaugeMetricFamily(
            "rpxy_start_time_seconds", "When this rpxy process started (Unix time).", value=self.started_at
        )
        cache = CounterMetricFamily(
            "rpxy_cache_lookups", "Response cache decisions for cacheable requests.", labels=["result"]
        )
        for result, count in self.cache_results.items():
            cache.add_metric([result], count)
        yield cache
        if self.draining is not None:
            yield GaugeMetricFamily(
                "rpxy_draining", "1 while a graceful shutdown waits for requests in flight.",
                value=1 if self.draining() else 0,
            )

    def _connection_families(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        if self.connections is None:
            return
        gauge = GaugeMetricFamily(
            "rpxy_client_connections", "Open client connections (HTTP/1.1 and HTTP/2) by listener kind.",
            labels=["listener"],
        )
        for kind, count in sorted(self.connections().items()):
            gauge.add_metric([kind], count)
        yield gauge

    def _health_families(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        if self.upstream_health is None:
            return
        health: dict[str, bool] = {}
        for uri, healthy in self.upstream_health():
            health[uri] = health.get(uri, True) and healthy
        gauge = GaugeMetricFamily(
            "rpxy_upstream_healthy", "1 if the active health checks find the upstream healthy, else 0.",
            labels=["upstream"],
        )
        for uri, healthy in sorted(health.items()):
            gauge.add_metric([uri], 1 if healthy else 0)
        yield gauge

    def _tls_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        if self.handshakes is not None:
            yield CounterMetricFamily(
                "rpxy_tls_handshakes", "Completed TLS handshakes on the TLS listeners.", value=self.handshakes()
            )
        failures = CounterMetricFamily(
            "rpxy_tls_handshake_failures", "Failed or refused TLS handshakes by category.", labels=["category"]
        )
        for category, count in sorted(self.tls_failures.items()):
            failures.add_metric([category], count)
        yield failures

    def _reload_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if self.reloads is not None:
            succeeded, failed = self.reloads()
            reloads = CounterMetricFamily("rpxy_config_reloads", "Config reloads by result.", labels=["result"])
            reloads.add_metric(["success"], succeeded)
            reloads.add_metric(["failure"], failed)
            yield reloads
        yield GaugeMetricFamily(
            "rpxy_config_last_reload_success_timestamp_seconds",
            "When the config was last applied: the start, or the last successful reload (Unix time).",
            value=self.last_reload if self.last_reload is not None else self.started_at,
        )

    def _request_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        # HTTP/1.0 and HTTP/1.1 are both "h1": merge their series.
        counts: dict[tuple[str, str, int], int] = {}
        histograms: dict[tuple[str, str], list[Any]] = {}
        for series in list(self._series.values()):
            protocol = protocol_label(series.version)
            for code, count in enumerate(series.codes):
                if count:
                    key = (series.app, protocol, code)
                    counts[key] = counts.get(key, 0) + count
            if series.timed:
                entry = histograms.get((series.app, protocol))
                if entry is None:
                    entry = histograms[(series.app, protocol)] = [[0] * len(series.buckets), 0.0]
                buckets = entry[0]
                for index, count in enumerate(series.buckets):
                    buckets[index] += count
                entry[1] += series.seconds
        requests = CounterMetricFamily(
            "rpxy_requests", "Finished requests by app, protocol and status code.", labels=["app", "protocol", "code"]
        )
        for (app, protocol, code), count in sorted(counts.items()):
            requests.add_metric([app, protocol, str(code)], count)
        yield requests
        latency = HistogramMetricFamily(
            "rpxy_request_duration_seconds",
            "Proxied request duration, from routing to the end of the response, by app and protocol.",
            labels=["app", "protocol"],
        )
        for (app, protocol), (buckets, seconds) in sorted(histograms.items()):
            cumulative = []
            running = 0
            for label, count in zip([*_BUCKET_LABELS, "+Inf"], buckets):
                running += count
                cumulative.append((label, running))
            latency.add_metric([app, protocol], cumulative, seconds)
        yield latency

    def _acme_families(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        if self.acme is None:
            return
        state = GaugeMetricFamily(
            "rpxy_acme_certificate_state", "1 for the current state of each ACME-managed domain.",
            labels=["domain", "state"],
        )
        expiry = GaugeMetricFamily(
            "rpxy_acme_certificate_expiry_timestamp_seconds", "notAfter of each ACME certificate (Unix time).",
            labels=["domain"],
        )
        rows = list(self.acme())
        if not rows:
            return  # no ACME-managed name: nothing to export
        for domain, current, not_after in rows:
            state.add_metric([domain, current], 1)
            if not_after is not None:
                expiry.add_metric([domain], not_after)
        yield state
        yield expiry

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _version() -> str:
    try:
        from rpxy import __version__

        return __version__.public()
    except Exception:  # pragma: no cover - a broken install still serves metrics
        return "unknown"


def metrics_site(metrics: Metrics, path: str = "/metrics", *, reactor: Any = None) -> Site:
    """The factory for the metrics listener: ``GET path`` → the exposition, else 404.

    It is ``twisted.web`` on purpose: this listener is off the proxy's request path and
    scrapes are rare, so the simplest correct HTTP server is the right one. Its requests
    write no access line (a scrape every few seconds would flood the system log).
    """
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    content_type = CONTENT_TYPE_LATEST.encode()
    wanted = path.encode()

    class Root(Resource):
        isLeaf = True  # every path comes here: ``path`` exactly (query ignored), else 404

        def render_GET(self, request: Any) -> bytes:
            if request.path != wanted:
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"not found\n"
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            return metrics.render()

        render_HEAD = render_GET

    class QuietSite(Site):
        noisy = False

        def log(self, request: Any) -> None:
            pass

    site = QuietSite(Root(), reactor=reactor)
    site.displayTracebacks = False
    return site
