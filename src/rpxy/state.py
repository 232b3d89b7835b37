"""The immutable runtime state built from one validated :class:`~rpxy.config.model.Config`.

Every request captures the current :class:`RuntimeState` when it starts, so a reload
(swapping :attr:`StateHolder.current`) never changes a request in flight. Everything a
request needs per route is precomputed here once (byte strings, flags, pools), keeping
the per-request path free of config lookups.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable

import attrs

from rpxy.config.load import ConfigError
from rpxy.cache.relay import ResponseCache
from rpxy.config.model import AppConfig, Config, ReverseProxyConfig, UpstreamConfig
from rpxy.policy.trusted import TrustedProxies
from rpxy.proxy_protocol import LOCAL_V2
from rpxy.routing import HostRouter, PathRouter
from rpxy.tls import AppTls, SniContextMap, TlsMaterialError, TlsOptions, TlsSource
from rpxy.tls.contexts import build_from_source, read_source, source_digest
from rpxy.upstream.balance import UpstreamGroup
from rpxy.upstream.client_bound import ClientBoundPools
from rpxy.upstream.health import HealthChecker, HealthState
from rpxy.upstream.h2client import H2UpstreamPool
from rpxy.upstream.pool import UpstreamPool
from rpxy.upstream.sticky import StickyCodec


@attrs.define(slots=True, eq=False)
class RouteRuntime:
    """One ``reverse_proxy`` entry ready to serve."""

    config: ReverseProxyConfig
    group: UpstreamGroup
    pools: tuple[UpstreamPool, ...]
    replace_path: bytes | None
    keep_original_host: bool
    set_upstream_host: bool
    upgrade_insecure: bool
    forwarded_header: bool
    sticky: bool
    upstream_hosts: tuple[bytes, ...]
    upstream_uris: tuple[str, ...]
    #: HTTP/2 pools per upstream (gRPC, force_http2_upstream); None with force_http11_upstream.
    h2_pools: tuple[H2UpstreamPool, ...] | None = None
    #: force_http2_upstream: every request goes over HTTP/2.
    force_http2: bool = False
    #: send_proxy_protocol_v1/v2 (1 or 2): the pools are ClientBoundPools, used per client.
    proxy_protocol: int = 0


@attrs.define(slots=True, eq=False)
class AppRuntime:
    config: AppConfig
    server_name: str
    server_name_bytes: bytes
    paths: PathRouter[RouteRuntime]
    https_redirection: bool


@attrs.define(eq=False)
class RuntimeState:
    config: Config
    apps: HostRouter[AppRuntime]
    default_app: AppRuntime | None
    trusted: TrustedProxies
    max_body: int
    https_port_for_clients: int | None
    health_checkers: tuple[HealthChecker, ...]
    pools: tuple[UpstreamPool | H2UpstreamPool, ...]
    #: Per-app TLS contexts by server name; None when there is no TLS listener.
    tls_contexts: SniContextMap | None = None
    ignore_sni_consistency: bool = False
    #: The response cache ([experimental.cache]); a new state starts with an empty one.
    cache: ResponseCache | None = None
    #: Carry-over keys (see :func:`pool_key`, :func:`checker_key`): a reload's
    #: ``build_state(..., previous=state)`` reuses these objects for unchanged upstreams.
    pool_index: dict[Hashable, UpstreamPool | H2UpstreamPool] = attrs.field(factory=dict)
    checker_index: dict[Hashable, list[HealthChecker]] = attrs.field(factory=dict)

    def close(self) -> None:
        """Release idle upstream connections (after the state was replaced or on shutdown)."""
        for pool in self.pools:
            pool.close()
        if self.cache is not None:
            self.cache.close()


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError as error:
        return f"unreadable:{error.errno}"


def pool_key(kind: str, upstream: UpstreamConfig, config: Config) -> Hashable:
    """What makes two upstream pools interchangeable: the upstream's identity (scheme,
    host, port, and the content of its CA file) plus the options that shape its
    connections. A reload keeps a pool whose key did not change, warm connections included.
    """
    return (kind, upstream, _file_digest(upstream.ca_cert_path), config.upstream_connect_timeout)


def checker_key(route: ReverseProxyConfig) -> Hashable:
    """A health checker is kept by a reload when its route's upstreams (CA file contents
    included: TLS checks verify with them) and its check are unchanged."""
    return (
        route.upstream,
        route.health_check,
        tuple(_file_digest(u.ca_cert_path) for u in route.upstream),
        _proxy_protocol_version(route),
    )


def _proxy_protocol_version(route: ReverseProxyConfig) -> int:
    """1 or 2 with send_proxy_protocol_v1/v2 (beyond rpxy), else 0."""
    options = route.upstream_options
    return 1 if "send_proxy_protocol_v1" in options else 2 if "send_proxy_protocol_v2" in options else 0


class _Carry:
    """Pools and checkers for one :func:`build_state`, reusing those of ``previous``.

    One pool per key within a state (routes to the same upstream share it), so the
    carry-over is a plain lookup by key.
    """

    def __init__(self, config: Config, reactor, previous: RuntimeState | None) -> None:
        self.config = config
        self.reactor = reactor
        self._old_pools = dict(previous.pool_index) if previous is not None else {}
        self._old_checkers = {k: list(v) for k, v in previous.checker_index.items()} if previous is not None else {}
        self.pool_index: dict[Hashable, UpstreamPool | H2UpstreamPool] = {}
        self.checker_index: dict[Hashable, list[HealthChecker]] = {}
        self.checkers: list[HealthChecker] = []

    def pool(self, kind: str, upstream: UpstreamConfig, proxy_protocol: int = 0):
        key = pool_key(f"{kind}+proxy-v{proxy_protocol}" if proxy_protocol else kind, upstream, self.config)
        pool = self.pool_index.get(key)
        if pool is None:
            pool = self._old_pools.pop(key, None)
            if pool is None:
                pool = self._new_pool(kind, upstream, proxy_protocol)
            self.pool_index[key] = pool
        return pool

    def _new_pool(self, kind: str, upstream: UpstreamConfig, proxy_protocol: int):
        timeout = self.config.upstream_connect_timeout
        reactor = self.reactor
        if kind == "h1":
            def make(preamble: bytes | None = None):  # type: ignore[no-untyped-def]
                return UpstreamPool(upstream, reactor, connect_timeout=timeout, preamble=preamble)
        else:
            def make(preamble: bytes | None = None):  # type: ignore[no-untyped-def]
                return H2UpstreamPool(upstream, reactor, connect_timeout=timeout, preamble=preamble)
        if proxy_protocol:
            # send_proxy_protocol_v1/v2: connections announce their client, one pool per client.
            return ClientBoundPools(make, proxy_protocol, reactor)
        return make()

    def checker(self, route: ReverseProxyConfig) -> list[HealthState]:
        assert route.health_check is not None
        key = checker_key(route)
        kept = self._old_checkers.get(key)
        if kept:
            checker = kept.pop(0)
        else:
            states = [HealthState.from_config(route.health_check) for _ in route.upstream]
            version = _proxy_protocol_version(route)
            preamble = b"" if not version else b"PROXY UNKNOWN\r\n" if version == 1 else LOCAL_V2
            checker = HealthChecker(route.upstream, route.health_check, states, self.reactor, preamble=preamble)
        self.checker_index.setdefault(key, []).append(checker)
        self.checkers.append(checker)
        return list(checker.states)


def _route(
    route: ReverseProxyConfig,
    app: AppConfig,
    config: Config,
    reactor,
    rng: random.Random,
    sticky: StickyCodec | None,
    carry: _Carry,
) -> RouteRuntime:
    states = None
    if route.health_check is not None:
        states = carry.checker(route)
    cookie_path = route.path or "/"
    group = UpstreamGroup(
        route.upstream,
        route.load_balance,
        rng=rng,
        states=states,
        sticky=sticky if route.load_balance == "sticky" else None,
        domain=app.server_name,
        cookie_path=cookie_path,
    )
    options = route.upstream_options
    proxy_protocol = _proxy_protocol_version(route)
    route_pools = tuple(carry.pool("h1", upstream, proxy_protocol) for upstream in route.upstream)
    h2_pools = None
    if "force_http11_upstream" not in options:
        # gRPC always goes over HTTP/2 (h2c for http://), so every other route may need these.
        h2_pools = tuple(carry.pool("h2", upstream, proxy_protocol) for upstream in route.upstream)
    return RouteRuntime(
        config=route,
        group=group,
        pools=route_pools,
        replace_path=route.replace_path.encode() if route.replace_path is not None else None,
        keep_original_host="keep_original_host" in options,
        set_upstream_host="set_upstream_host" in options and "keep_original_host" not in options,
        upgrade_insecure="upgrade_insecure_requests" in options,
        forwarded_header="forwarded_header" in options,
        sticky=route.load_balance == "sticky",
        upstream_hosts=tuple(upstream.location.encode() for upstream in route.upstream),
        upstream_uris=tuple(upstream.uri for upstream in route.upstream),
        h2_pools=h2_pools,
        force_http2="force_http2_upstream" in options,
        proxy_protocol=proxy_protocol,
    )


def build_state(
    config: Config,
    reactor,
    rng: random.Random | None = None,
    *,
    previous: RuntimeState | None = None,
) -> RuntimeState:
    """Build everything a request needs from ``config``; nothing here touches the network.

    With ``previous`` (a reload), the upstream pools and health checkers whose key
    (:func:`pool_key`, :func:`checker_key`) is unchanged are taken over instead of
    rebuilt, so warm connections and health knowledge survive; see :func:`retired`
    for what the new state leaves behind. The pools and checkers of ``previous`` are left
    as they are: the reload drains what was not taken over only once the swap is done.
    """
    rng = rng if rng is not None else random.Random()
    tls_contexts = build_tls_contexts(config, previous.tls_contexts if previous is not None else None)
    sticky = StickyCodec(config.sticky_cookie_secret) if config.sticky_cookie_secret else None
    carry = _Carry(config, reactor, previous)
    apps: list[tuple[str, AppRuntime]] = []
    by_name: dict[str, AppRuntime] = {}
    for app in config.apps:
        routes = [(route.path, _route(route, app, config, reactor, rng, sticky, carry)) for route in app.reverse_proxy]
        tls = app.tls
        runtime = AppRuntime(
            config=app,
            server_name=app.server_name,
            server_name_bytes=app.server_name.encode(),
            paths=PathRouter(routes),
            https_redirection=bool(
                tls is not None
                and tls.https_redirection
                and config.listen_port is not None
                and config.listen_port_tls is not None
            ),
        )
        apps.append((app.server_name, runtime))
        by_name[app.name.lower()] = runtime
    default_app = by_name.get(config.default_app.lower()) if config.default_app else None
    return RuntimeState(
        config=config,
        apps=HostRouter(apps),
        default_app=default_app,
        trusted=TrustedProxies(config.trusted_forwarded_proxies),
        max_body=config.request_max_body_size,
        https_port_for_clients=config.https_port_for_clients,
        health_checkers=tuple(carry.checkers),
        pools=tuple(carry.pool_index.values()),
        tls_contexts=tls_contexts,
        ignore_sni_consistency=config.experimental.ignore_sni_consistency,
        pool_index=carry.pool_index,
        checker_index=carry.checker_index,
        cache=build_cache(config, reactor, previous),
    )


@attrs.frozen
class Retired:
    """What a reload leaves behind: pools to drain and health checkers to stop."""

    pools: tuple[UpstreamPool | H2UpstreamPool, ...]
    checkers: tuple[HealthChecker, ...]
    #: Pools and checkers taken over by the new state (for the reload's log line).
    kept_pools: int = 0
    kept_checkers: int = 0


def retired(old: RuntimeState, new: RuntimeState) -> Retired:
    """The pools and checkers of ``old`` that ``new`` did not take over (by identity)."""
    new_pools = {id(pool) for pool in new.pools}
    new_checkers = {id(checker) for checker in new.health_checkers}
    return Retired(
        pools=tuple(pool for pool in old.pools if id(pool) not in new_pools),
        checkers=tuple(checker for checker in old.health_checkers if id(checker) not in new_checkers),
        kept_pools=sum(1 for pool in old.pools if id(pool) in new_pools),
        kept_checkers=sum(1 for checker in old.health_checkers if id(checker) in new_checkers),
    )


def build_cache(config: Config, reactor, previous: RuntimeState | None = None) -> ResponseCache | None:
    """The response cache of a new state, empty: rpxy empties the cache on start and reload.

    ``cache_dir`` loses the files of earlier runs (and of ``previous``, whose entries are
    dropped here too, as the new state replaces it).
    """
    settings = config.experimental.cache
    cache = None
    if settings is not None:
        try:
            cache = ResponseCache(settings, reactor)
        except OSError as error:
            # The running state keeps its cache: only a state that replaces it empties it.
            raise ConfigError([f"experimental.cache.cache_dir: cannot be used ({error})"]) from None
    if previous is not None and previous.cache is not None:
        previous.cache.close()
    return cache


#: ALPN offered on the TLS port, in the server's preference order (rpxy.front.h1 hands
#: a connection that negotiated h2 to the HTTP/2 front end).
TLS_ALPN = (b"h2", b"http/1.1")


def build_tls_contexts(config: Config, previous: SniContextMap | None = None) -> SniContextMap | None:
    """Load every app's certificate now, so that bad TLS files fail the start (or the reload).

    With ``previous`` (a reload), an app whose server name, file paths and file contents
    are unchanged keeps its context: no rebuild, and its TLS sessions stay resumable.
    """
    if config.listen_port_tls is None:
        return None
    options = TlsOptions(alpn=TLS_ALPN)
    try:
        if previous is None:
            return SniContextMap.from_apps(config.apps, options)
        return _reuse_tls_contexts(config, previous, options)
    except TlsMaterialError as error:
        raise ConfigError(error.describe()) from None


def _reuse_tls_contexts(config: Config, previous: SniContextMap, options: TlsOptions) -> SniContextMap:
    built: list[AppTls] = []
    problems: list[TlsMaterialError] = []
    for app in config.apps:
        tls = app.tls
        old = previous.get(app.name)
        if tls is None or tls.tls_cert_path is None or tls.tls_cert_key_path is None:
            if tls is not None and old is not None and old.source is None and old.server_name == app.server_name:
                built.append(old)  # built from memory (ACME) and added at run time: still valid
            continue
        source = TlsSource(tls.tls_cert_path, tls.tls_cert_key_path, tls.client_ca_cert_path)
        try:
            contents = read_source(source)
            if (
                old is not None
                and old.source == source
                and old.server_name == app.server_name
                and old.digest == source_digest(*contents)
            ):
                built.append(old)
            else:
                built.append(build_from_source(app.name, app.server_name, source, options, contents=contents))
        except TlsMaterialError as error:
            problems.append(TlsMaterialError(error.problems, app=app.name))
    if problems:
        raise TlsMaterialError([problem for error in problems for problem in error.problems])
    return SniContextMap(built, options=options)


class StateHolder:
    """The one mutable reference: the state new requests start with."""

    def __init__(self, state: RuntimeState) -> None:
        self.current = state

    def swap(self, state: RuntimeState) -> RuntimeState:
        old, self.current = self.current, state
        return old
