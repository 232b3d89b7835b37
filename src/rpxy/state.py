"""The immutable runtime state built from one validated :class:`~rpxy.config.model.Config`.

Every request captures the current :class:`RuntimeState` when it starts, so a reload
(swapping :attr:`StateHolder.current`) never changes a request in flight. Everything a
request needs per route is precomputed here once (byte strings, flags, pools), keeping
the per-request path free of config lookups.
"""

from __future__ import annotations

import random
import attrs

from rpxy.config.load import ConfigError
from rpxy.config.model import AppConfig, Config, ReverseProxyConfig
from rpxy.policy.trusted import TrustedProxies
from rpxy.routing import HostRouter, PathRouter
from rpxy.tls import SniContextMap, TlsMaterialError, TlsOptions
from rpxy.upstream.balance import UpstreamGroup
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

    def close(self) -> None:
        """Release idle upstream connections (after the state was replaced or on shutdown)."""
        for pool in self.pools:
            pool.close()


def _route(
    route: ReverseProxyConfig,
    app: AppConfig,
    config: Config,
    reactor,
    rng: random.Random,
    sticky: StickyCodec | None,
    checkers: list[HealthChecker],
    pools: list[UpstreamPool | H2UpstreamPool],
) -> RouteRuntime:
    states = None
    if route.health_check is not None:
        states = [HealthState.from_config(route.health_check) for _ in route.upstream]
        checkers.append(HealthChecker(route.upstream, route.health_check, states, reactor))
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
    route_pools = tuple(
        UpstreamPool(
            upstream,
            reactor,
            connect_timeout=config.upstream_connect_timeout,
        )
        for upstream in route.upstream
    )
    pools.extend(route_pools)
    options = route.upstream_options
    h2_pools = None
    if "force_http11_upstream" not in options:
        # gRPC always goes over HTTP/2 (h2c for http://), so every other route may need these.
        h2_pools = tuple(
            H2UpstreamPool(upstream, reactor, connect_timeout=config.upstream_connect_timeout)
            for upstream in route.upstream
        )
        pools.extend(h2_pools)
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
    )


def build_state(config: Config, reactor, rng: random.Random | None = None) -> RuntimeState:
    """Build everything a request needs from ``config``; nothing here touches the network."""
    rng = rng if rng is not None else random.Random()
    tls_contexts = build_tls_contexts(config)
    sticky = StickyCodec(config.sticky_cookie_secret) if config.sticky_cookie_secret else None
    checkers: list[HealthChecker] = []
    pools: list[UpstreamPool | H2UpstreamPool] = []
    apps: list[tuple[str, AppRuntime]] = []
    by_name: dict[str, AppRuntime] = {}
    for app in config.apps:
        routes = [(route.path, _route(route, app, config, reactor, rng, sticky, checkers, pools)) for route in app.reverse_proxy]
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
        health_checkers=tuple(checkers),
        pools=tuple(pools),
        tls_contexts=tls_contexts,
        ignore_sni_consistency=config.experimental.ignore_sni_consistency,
    )


#: ALPN offered on the TLS port, in the server's preference order (rpxy.front.h1 hands
#: a connection that negotiated h2 to the HTTP/2 front end).
TLS_ALPN = (b"h2", b"http/1.1")


def build_tls_contexts(config: Config) -> SniContextMap | None:
    """Load every app's certificate now, so that bad TLS files fail the start (or the reload)."""
    if config.listen_port_tls is None:
        return None
    try:
        return SniContextMap.from_apps(config.apps, TlsOptions(alpn=TLS_ALPN))
    except TlsMaterialError as error:
        raise ConfigError(error.describe()) from None


class StateHolder:
    """The one mutable reference: the state new requests start with."""

    def __init__(self, state: RuntimeState) -> None:
        self.current = state

    def swap(self, state: RuntimeState) -> RuntimeState:
        old, self.current = self.current, state
        return old
