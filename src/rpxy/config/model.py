"""Frozen, validated configuration models: the one config model of the project.

Field names mirror the keys of the Rust rpxy's ``config.toml`` so that a reader of
the TOML finds the same names here. Instances are only built by
:mod:`rpxy.config.load`, which validates every value; code that receives a
``Config`` can therefore trust it and never re-checks while serving.
"""

from __future__ import annotations

from typing import Literal

import attrs

LoadBalance = Literal["none", "round_robin", "random", "sticky", "primary_backup"]
UpstreamOption = Literal[
    "keep_original_host",
    "set_upstream_host",
    "upgrade_insecure_requests",
    "force_http11_upstream",
    "force_http2_upstream",
    "forwarded_header",
    "send_proxy_protocol_v1",
    "send_proxy_protocol_v2",
]


@attrs.frozen
class HealthCheckConfig:
    """Active health check of every upstream of one route."""

    type: Literal["tcp", "http"] = "tcp"
    interval: float = 10.0
    timeout: float = 5.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    path: str | None = None
    expected_status: int = 200


@attrs.frozen
class UpstreamConfig:
    """One upstream server: ``location = "host[:port]"`` and whether it speaks TLS."""

    location: str
    host: str
    port: int
    tls: bool = False
    # Beyond rpxy: PEM file of CA certificates trusted for this upstream instead of the system store.
    ca_cert_path: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def uri(self) -> str:
        """``scheme://location``, the identity used by sticky cookies and logs."""
        return f"{self.scheme}://{self.location}"


@attrs.frozen
class ReverseProxyConfig:
    """One ``[[apps.<name>.reverse_proxy]]`` entry: a path prefix and its upstreams."""

    upstream: tuple[UpstreamConfig, ...]
    path: str | None = None
    replace_path: str | None = None
    load_balance: LoadBalance = "none"
    upstream_options: frozenset[str] = frozenset()
    health_check: HealthCheckConfig | None = None


@attrs.frozen
class TlsConfig:
    tls_cert_path: str | None = None
    tls_cert_key_path: str | None = None
    https_redirection: bool = True
    client_ca_cert_path: str | None = None
    acme: bool = False


@attrs.frozen
class AppConfig:
    """One ``[apps.<name>]`` table. ``name`` is the table key, ``server_name`` lower-cased."""

    name: str
    server_name: str
    reverse_proxy: tuple[ReverseProxyConfig, ...]
    tls: TlsConfig | None = None


@attrs.frozen
class H3Config:
    alt_svc_max_age: int = 3600
    max_concurrent_connections: int = 4096
    max_concurrent_bidistream: int = 64
    max_concurrent_unistream: int = 64
    max_idle_timeout: int = 10
    request_max_body_size: int | None = None


@attrs.frozen
class CacheConfig:
    cache_dir: str = "./cache"
    max_cache_entry: int = 1000
    max_cache_each_size: int = 65535
    max_cache_each_size_on_memory: int = 65535


@attrs.frozen
class AcmeConfig:
    email: str
    dir_url: str = "https://acme-v02.api.letsencrypt.org/directory"
    registry_path: str = "./acme_registry"
    # Beyond rpxy: "tls-alpn-01" (rpxy's only one) or "http-01" (answered on listen_port).
    challenge: str = "tls-alpn-01"
    # Beyond rpxy: renew this many days before expiry instead of when a third of the lifetime remains.
    renew_before_days: float | None = None


@attrs.frozen
class ProxyProtocolConfig:
    trusted_proxies: tuple[str, ...]
    timeout_ms: int = 50


@attrs.frozen
class MetricsConfig:
    """Beyond rpxy: ``[experimental.metrics]``, the Prometheus endpoint on its own listener."""

    listen_address: str = "127.0.0.1"
    listen_port: int = 9100
    path: str = "/metrics"


@attrs.frozen
class ExperimentalConfig:
    ignore_sni_consistency: bool = False
    connection_handling_timeout: float = 0.0
    h3: H3Config | None = None
    cache: CacheConfig | None = None
    acme: AcmeConfig | None = None
    tcp_recv_proxy_protocol: ProxyProtocolConfig | None = None
    metrics: MetricsConfig | None = None


@attrs.frozen
class Config:
    """The whole validated configuration."""

    apps: tuple[AppConfig, ...]
    listen_port: int | None = None
    listen_port_tls: int | None = None
    listen_address_v4: tuple[str, ...] = ("0.0.0.0",)
    listen_address_v6: tuple[str, ...] = ()
    listen_ipv6: bool = False
    public_https_port: int | None = None
    tcp_listen_backlog: int = 1024
    max_concurrent_streams: int = 64
    max_clients: int = 512
    max_clients_per_ip: int = 0
    # Normalised CIDR strings; aliases (cloudflare, ...) already expanded.
    trusted_forwarded_proxies: tuple[str, ...] = ()
    redact_query_in_access_log: bool = False
    # 0 = unlimited.
    request_max_body_size: int = 268435456
    # Raw 32 bytes decoded from the base64url secret.
    sticky_cookie_secret: bytes | None = None
    # App key (as written in [apps]) of the cleartext fallback app.
    default_app: str | None = None
    experimental: ExperimentalConfig = ExperimentalConfig()
    # Beyond rpxy: seconds to wait for an upstream's response head before answering 504 (0 = none).
    upstream_response_timeout: float = 60.0
    # Beyond rpxy: seconds to wait for a TCP connect to an upstream.
    upstream_connect_timeout: float = 10.0
    # Beyond rpxy: seconds between checks of the certificate files for changes (rpxy: fixed 60).
    certificate_poll_interval: float = 60.0
    # Beyond rpxy: on SIGTERM, seconds that requests in flight get to finish before their
    # connections are cut (listeners close and idle connections close at once).
    graceful_shutdown_timeout: float = 30.0
    # Beyond rpxy: worker processes sharing the listening sockets (SO_REUSEPORT); read at
    # start by the `rpxy` command (docs/operations.md#workers).
    workers: int = 1

    @property
    def https_port_for_clients(self) -> int | None:
        """The port clients see for HTTPS (301 Location, Alt-Svc)."""
        return self.public_https_port if self.public_https_port is not None else self.listen_port_tls

    def app_by_name(self, name: str) -> AppConfig | None:
        for app in self.apps:
            if app.name == name:
                return app
        return None
