"""Good configurations: defaults, normalisation, aliases and warnings."""

from __future__ import annotations

import base64
import tomllib

import pytest

from rpxy.config.load import NOT_YET_SUPPORTED, LoadedConfig, parse_config
from rpxy.config.model import (
    CacheConfig,
    Config,
    ExperimentalConfig,
    H3Config,
    HealthCheckConfig,
    ProxyProtocolConfig,
    UpstreamConfig,
)
from rpxy.config.proxies import CLOUDFLARE, CLOUDFRONT, FASTLY

MINIMAL = """
listen_port = 8080
[apps.app1]
server_name = "app1.example.com"
[[apps.app1.reverse_proxy]]
upstream = [{ location = "127.0.0.1:8081" }]
"""


def load(text: str) -> LoadedConfig:
    return parse_config(tomllib.loads(text))


def with_top(lines: str) -> str:
    return lines + "\n" + MINIMAL


def with_route(lines: str) -> str:
    return MINIMAL + lines + "\n"


def not_yet(key: str) -> str:
    return f"{key}: not yet supported by this version (validated, has no effect)"


def test_minimal_config_gets_every_default() -> None:
    loaded = load(MINIMAL)
    assert loaded.warnings == ()
    config = loaded.config
    upstream = UpstreamConfig(location="127.0.0.1:8081", host="127.0.0.1", port=8081)
    assert config == Config(
        apps=config.apps,
        listen_port=8080,
    )
    [app] = config.apps
    assert (app.name, app.server_name, app.tls) == ("app1", "app1.example.com", None)
    [route] = app.reverse_proxy
    assert route.upstream == (upstream,)
    assert (route.path, route.replace_path, route.load_balance) == (None, None, "none")
    assert route.upstream_options == frozenset()
    assert route.health_check is None
    # The defaults the reference documents, spelled out so a model change is noticed.
    assert config.listen_address_v4 == ("0.0.0.0",)
    assert config.listen_address_v6 == ()
    assert config.listen_port_tls is None
    assert config.public_https_port is None
    assert (config.tcp_listen_backlog, config.max_concurrent_streams) == (1024, 64)
    assert (config.max_clients, config.max_clients_per_ip) == (512, 0)
    assert config.trusted_forwarded_proxies == ()
    assert config.request_max_body_size == 268435456
    assert config.sticky_cookie_secret is None
    assert config.default_app is None
    assert config.experimental == ExperimentalConfig()
    assert (config.upstream_response_timeout, config.upstream_connect_timeout) == (60.0, 10.0)
    assert config.certificate_poll_interval == 60.0  # rpxy's fixed certificate poll period


def test_top_level_values_are_kept() -> None:
    config = load(
        with_top(
            """
tcp_listen_backlog = 2048
max_clients = 100
max_clients_per_ip = 8
redact_query_in_access_log = true
upstream_response_timeout = 0
upstream_connect_timeout = 2.5
certificate_poll_interval = 0.5
"""
        )
    ).config
    assert (config.tcp_listen_backlog, config.max_clients, config.max_clients_per_ip) == (2048, 100, 8)
    assert config.redact_query_in_access_log is True
    assert (config.upstream_response_timeout, config.upstream_connect_timeout) == (0.0, 2.5)
    assert config.certificate_poll_interval == 0.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1048576", 1048576), ('"256k"', 262144), ('"10M"', 10485760), ('"1g"', 1073741824), ('"unlimited"', 0), ("0", 0)],
)
def test_request_max_body_size(value: str, expected: int) -> None:
    assert load(with_top(f"request_max_body_size = {value}")).config.request_max_body_size == expected


# ---- listen addresses ------------------------------------------------------------


def test_listen_ipv6_defaults_to_unspecified_address() -> None:
    config = load(with_top("listen_ipv6 = true")).config
    assert (config.listen_ipv6, config.listen_address_v6, config.listen_address_v4) == (True, ("::",), ("0.0.0.0",))


def test_listen_addresses_are_normalised_and_deduplicated() -> None:
    config = load(
        with_top(
            'listen_address_v4 = ["127.0.0.1", "10.0.0.1", "127.0.0.1"]\n'
            'listen_address_v6 = ["[::1]", "0:0:0:0:0:0:0:1", "2001:DB8::1"]'
        )
    ).config
    assert config.listen_address_v4 == ("127.0.0.1", "10.0.0.1")
    assert config.listen_address_v6 == ("::1", "2001:db8::1")


def test_single_listen_address_string() -> None:
    config = load(with_top('listen_address_v4 = "127.0.0.1"\nlisten_address_v6 = "[::]"')).config
    assert (config.listen_address_v4, config.listen_address_v6) == (("127.0.0.1",), ("::",))


def test_repeated_wildcard_is_a_duplicate_not_a_mix() -> None:
    assert load(with_top('listen_address_v4 = ["0.0.0.0", "0.0.0.0"]')).config.listen_address_v4 == ("0.0.0.0",)


# ---- public https port --------------------------------------------------------------

TLS_PORTS = "listen_port = 8080\nlisten_port_tls = 8443"
TLS_MINIMAL = MINIMAL.replace("listen_port = 8080", TLS_PORTS)


def test_https_redirection_port_is_a_deprecated_alias() -> None:
    loaded = load(TLS_MINIMAL.replace(TLS_PORTS, TLS_PORTS + "\nhttps_redirection_port = 443"))
    assert loaded.config.public_https_port == 443
    assert loaded.config.https_port_for_clients == 443
    assert "https_redirection_port is deprecated; use public_https_port" in loaded.warnings


def test_alias_equal_to_public_port_is_accepted() -> None:
    loaded = load(TLS_MINIMAL.replace(TLS_PORTS, TLS_PORTS + "\npublic_https_port = 443\nhttps_redirection_port = 443"))
    assert loaded.config.public_https_port == 443


def test_public_https_port_defaults_to_listen_port_tls() -> None:
    config = load(TLS_MINIMAL).config
    assert (config.public_https_port, config.https_port_for_clients) == (None, 8443)


# ---- trusted proxies -----------------------------------------------------------------


def test_trusted_proxies_are_normalised_cidrs() -> None:
    config = load(
        with_top('trusted_forwarded_proxies = ["192.168.0.1", "10.0.0.0/8", "2001:DB8::/32", "::1", "10.0.0.0/8"]')
    ).config
    assert config.trusted_forwarded_proxies == ("192.168.0.1/32", "10.0.0.0/8", "2001:db8::/32", "::1/128")


def test_trusted_proxy_aliases_expand() -> None:
    config = load(with_top('trusted_forwarded_proxies = ["Cloudflare", "10.0.0.0/8"]')).config
    assert config.trusted_forwarded_proxies == (*CLOUDFLARE, "10.0.0.0/8")
    config = load(with_top('trusted_forwarded_proxies = "fastly"')).config
    assert config.trusted_forwarded_proxies == FASTLY
    config = load(with_top('trusted_forwarded_proxies = "cloudfront"')).config
    assert config.trusted_forwarded_proxies == CLOUDFRONT


# ---- sticky secret, default app -----------------------------------------------------

SECRET = bytes(range(32))


@pytest.mark.parametrize("padded", [False, True])
def test_sticky_secret_is_decoded(padded: bool) -> None:
    text = base64.urlsafe_b64encode(SECRET).decode()
    if not padded:
        text = text.rstrip("=")
    config = load(with_top(f'sticky_cookie_secret = "{text}"') + '\nload_balance = "sticky"\n').config
    assert config.sticky_cookie_secret == SECRET
    assert config.apps[0].reverse_proxy[0].load_balance == "sticky"


def test_default_app_matches_case_insensitively_and_stores_the_key_as_written() -> None:
    text = with_top('default_app = "APP1"').replace("apps.app1", "apps.App1")
    loaded = load(text)
    assert loaded.config.default_app == "App1"
    assert loaded.config.apps[0].name == "App1"
    assert loaded.config.app_by_name("App1") is loaded.config.apps[0]


def test_default_app_without_cleartext_port_warns() -> None:
    text = """
listen_port_tls = 8443
default_app = "app1"
[apps.app1]
server_name = "app1.example.com"
tls = { acme = true }
reverse_proxy = [{ upstream = [{ location = "a" }] }]
[experimental.acme]
email = "a@example.com"
"""
    loaded = load(text)
    assert loaded.config.default_app == "app1"
    assert "default_app: has no effect without listen_port (it only applies to cleartext HTTP)" in loaded.warnings


# ---- server names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("App1.Example.COM", "app1.example.com"),
        ("*.Example.com", "*.example.com"),
        ("*.a.b.example.com", "*.a.b.example.com"),
        ("192.168.1.1", "192.168.1.1"),
        ("localhost", "localhost"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.9c.example", "a-b.9c.example"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_server_names(written: str, stored: str) -> None:
    config = load(MINIMAL.replace('"app1.example.com"', f'"{written}"')).config
    assert config.apps[0].server_name == stored


def test_wildcard_and_exact_name_may_coexist() -> None:
    text = (
        MINIMAL + '[apps.app2]\nserver_name = "*.example.com"\nreverse_proxy = [{ upstream = [{ location = "b" }] }]\n'
    )
    config = load(text).config
    assert [app.server_name for app in config.apps] == ["app1.example.com", "*.example.com"]


# ---- routes and upstreams ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "tls", "host", "port"),
    [
        ("backend", "false", "backend", 80),
        ("backend", "true", "backend", 443),
        ("backend:8080", "true", "backend", 8080),
        ("[::1]:8080", "false", "::1", 8080),
        ("[2001:db8::1]", "true", "2001:db8::1", 443),
        ("[2001:db8::1]", "false", "2001:db8::1", 80),
        ("my_service:3000", "false", "my_service", 3000),
        ("10.0.0.5:65535", "false", "10.0.0.5", 65535),
        ("Backend.Example.com", "false", "Backend.Example.com", 80),
    ],
)
def test_upstream_locations(location: str, tls: str, host: str, port: int) -> None:
    text = MINIMAL.replace('{ location = "127.0.0.1:8081" }', f'{{ location = "{location}", tls = {tls} }}')
    [upstream] = load(text).config.apps[0].reverse_proxy[0].upstream
    assert upstream == UpstreamConfig(location=location, host=host, port=port, tls=tls == "true")
    assert upstream.uri == f"{'https' if tls == 'true' else 'http'}://{location}"


def test_routes_keep_order_and_paths() -> None:
    text = MINIMAL + (
        '[[apps.app1.reverse_proxy]]\npath = "/api"\nreplace_path = "/"\nupstream = [{ location = "a" }, { location = "b" }]\n'
        'load_balance = "round_robin"\nupstream_options = ["set_upstream_host", "forwarded_header", "forwarded_header"]\n'
    )
    routes = load(text).config.apps[0].reverse_proxy
    assert [(r.path, r.replace_path, r.load_balance) for r in routes] == [
        (None, None, "none"),
        ("/api", "/", "round_robin"),
    ]
    assert [u.location for u in routes[1].upstream] == ["a", "b"]
    assert routes[1].upstream_options == frozenset({"set_upstream_host", "forwarded_header"})


def test_keep_original_host_with_set_upstream_host_warns() -> None:
    loaded = load(with_route('upstream_options = ["keep_original_host", "set_upstream_host"]'))
    assert loaded.warnings == (
        "apps.app1.reverse_proxy[0].upstream_options: keep_original_host wins over set_upstream_host (Host is kept)",
    )


def test_health_check_forms() -> None:
    assert load(with_route("health_check = true")).config.apps[0].reverse_proxy[0].health_check == HealthCheckConfig()
    assert load(with_route("health_check = false")).config.apps[0].reverse_proxy[0].health_check is None
    hc = (
        load(
            with_route(
                'load_balance = "primary_backup"\nhealth_check = { type = "http", path = "/healthz", interval = 2.5, '
                "timeout = 1, unhealthy_threshold = 5, healthy_threshold = 1, expected_status = 204 }"
            )
        )
        .config.apps[0]
        .reverse_proxy[0]
    )
    assert hc.load_balance == "primary_backup"
    assert hc.health_check == HealthCheckConfig(
        type="http",
        interval=2.5,
        timeout=1.0,
        unhealthy_threshold=5,
        healthy_threshold=1,
        path="/healthz",
        expected_status=204,
    )


def test_tcp_health_check_ignores_http_keys_with_a_warning() -> None:
    loaded = load(with_route('health_check = { type = "tcp", path = "/x" }'))
    assert loaded.config.apps[0].reverse_proxy[0].health_check == HealthCheckConfig()
    assert loaded.warnings == ('apps.app1.reverse_proxy[0].health_check.path: is ignored when type = "tcp"',)


# ---- [experimental] -----------------------------------------------------------------------


def test_experimental_tables_get_model_defaults() -> None:
    text = MINIMAL.replace("listen_port = 8080", TLS_PORTS) + (
        "[experimental]\nconnection_handling_timeout = 30\n[experimental.h3]\n[experimental.cache]\n"
        "[experimental.tcp_recv_proxy_protocol]\ntrusted_proxies = ['127.0.0.1', '10.0.0.0/8']\n"
    )
    exp = load(text).config.experimental
    assert exp.connection_handling_timeout == 30.0
    assert exp.h3 == H3Config()
    assert exp.cache == CacheConfig()
    assert exp.acme is None
    assert exp.tcp_recv_proxy_protocol == ProxyProtocolConfig(
        trusted_proxies=("127.0.0.1/32", "10.0.0.0/8"), timeout_ms=50
    )


def test_experimental_values_are_kept() -> None:
    text = (
        MINIMAL.replace("listen_port = 8080", TLS_PORTS)
        + """
[experimental]
ignore_sni_consistency = true
[experimental.h3]
alt_svc_max_age = 60
max_concurrent_connections = 10
max_concurrent_bidistream = 20
max_concurrent_unistream = 30
max_idle_timeout = 0
request_max_body_size = 0
[experimental.cache]
cache_dir = "/tmp/c"
max_cache_entry = 5
max_cache_each_size = 4096
max_cache_each_size_on_memory = 0
[experimental.acme]
email = "ops@example.com"
dir_url = "https://localhost:14000/dir"
registry_path = "/var/lib/acme"
[experimental.tcp_recv_proxy_protocol]
trusted_proxies = "192.0.2.0/24"
timeout = 0
"""
    )
    loaded = load(text)
    exp = loaded.config.experimental
    assert exp.ignore_sni_consistency is True
    assert exp.h3 == H3Config(60, 10, 20, 30, 0, 0)
    assert exp.cache == CacheConfig("/tmp/c", 5, 4096, 0)
    assert exp.acme is not None
    assert (exp.acme.email, exp.acme.dir_url, exp.acme.registry_path) == (
        "ops@example.com",
        "https://localhost:14000/dir",
        "/var/lib/acme",
    )
    # 0 means "the rpxy fallback of 5 s", not "no timeout".
    assert exp.tcp_recv_proxy_protocol == ProxyProtocolConfig(trusted_proxies=("192.0.2.0/24",), timeout_ms=5000)
    assert "experimental.h3.request_max_body_size is deprecated; use request_max_body_size" in loaded.warnings


def test_acme_defaults() -> None:
    text = MINIMAL + "[experimental.acme]\nemail = 'a@example.com'\n"
    acme = load(text).config.experimental.acme
    assert acme is not None
    assert (acme.dir_url, acme.registry_path) == ("https://acme-v02.api.letsencrypt.org/directory", "./acme_registry")


def test_h3_without_tls_port_and_few_unistreams_warn() -> None:
    loaded = load(MINIMAL + "[experimental.h3]\nmax_concurrent_unistream = 2\n")
    assert loaded.config.experimental.h3 == H3Config(max_concurrent_unistream=2)
    assert loaded.warnings == (
        "experimental.h3: has no effect without listen_port_tls",
        "experimental.h3.max_concurrent_unistream: below 3 breaks HTTP/3 (clients need control and two QPACK streams)",
    )


# ---- warnings: unknown keys and features not built yet -----------------------------------


def test_unknown_keys_are_warnings_naming_the_full_path() -> None:
    text = """
listen_port = 8080
lissten_port_tls = 8443
[apps.app1]
server_name = "app1.example.com"
sever_name = "typo"
[[apps.app1.reverse_proxy]]
upstream = [{ location = "a", tsl = true }]
load_balancing = "random"
health_check = { type = "tcp", intervall = 3 }
[experimental]
h3_enabled = true
[experimental.cache]
dir = "/tmp"
"""
    loaded = load(text)
    assert [w for w in loaded.warnings if w.startswith("unknown key")] == [
        "unknown key lissten_port_tls (ignored)",
        "unknown key experimental.h3_enabled (ignored)",
        "unknown key experimental.cache.dir (ignored)",
        "unknown key apps.app1.sever_name (ignored)",
        "unknown key apps.app1.reverse_proxy[0].load_balancing (ignored)",
        "unknown key apps.app1.reverse_proxy[0].upstream[0].tsl (ignored)",
        "unknown key apps.app1.reverse_proxy[0].health_check.intervall (ignored)",
    ]


def test_unknown_key_in_tls_table_is_a_warning() -> None:
    text = """
listen_port = 8080
listen_port_tls = 8443
[apps.app1]
server_name = "app1.example.com"
tls = { acme = true, ocsp = true }
reverse_proxy = [{ upstream = [{ location = "a" }] }]
[experimental.acme]
email = "a@example.com"
"""
    assert "unknown key apps.app1.tls.ocsp (ignored)" in load(text).warnings


def test_features_not_built_yet_warn_once_each() -> None:
    text = """
listen_port = 8080
listen_port_tls = 8443
max_concurrent_streams = 100
[apps.app1]
server_name = "app1.example.com"
tls = { acme = true }
[[apps.app1.reverse_proxy]]
upstream = [{ location = "a" }]
upstream_options = ["force_http2_upstream"]
[[apps.app1.reverse_proxy]]
path = "/b"
upstream = [{ location = "b" }]
upstream_options = ["force_http2_upstream"]
[apps.app2]
server_name = "app2.example.com"
tls = { acme = true }
reverse_proxy = [{ upstream = [{ location = "c" }] }]
[experimental]
ignore_sni_consistency = false
[experimental.h3]
[experimental.cache]
[experimental.acme]
email = "a@example.com"
[experimental.tcp_recv_proxy_protocol]
trusted_proxies = ["127.0.0.1"]
"""
    loaded = load(text)
    expected = {not_yet(key) for key in NOT_YET_SUPPORTED}
    reported = [w for w in loaded.warnings if w.endswith("(validated, has no effect)")]
    assert sorted(reported) == sorted(expected)
    assert loaded.config.max_concurrent_streams == 100


def test_not_yet_supported_set_is_what_the_lead_listed() -> None:
    # Every key of the rpxy schema now has its feature: nothing is "validated, has no effect".
    assert set() == NOT_YET_SUPPORTED


def test_built_features_do_not_warn() -> None:
    text = """
listen_port = 8080
max_clients = 10
max_clients_per_ip = 2
trusted_forwarded_proxies = "cloudflare"
redact_query_in_access_log = true
request_max_body_size = "1m"
[apps.app1]
server_name = "app1.example.com"
[[apps.app1.reverse_proxy]]
upstream = [{ location = "a" }, { location = "b" }]
load_balance = "primary_backup"
health_check = true
upstream_options = ["force_http11_upstream", "forwarded_header", "upgrade_insecure_requests"]
[experimental]
connection_handling_timeout = 5
"""
    assert load(text).warnings == ()
