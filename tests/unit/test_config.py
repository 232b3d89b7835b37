"""Bad configurations: every problem is reported under its exact key path.

Each case is a TOML document built from the minimal valid config below plus a
few lines, and the complete list of errors it must produce, in order. Comparing
whole lists (not "contains") catches both missing and spurious errors.
"""

from __future__ import annotations

import tomllib

import pytest

from rpxy.config.load import ConfigError, parse_config


def make(top: str = "", app: str = "", route: str = "", tail: str = "", ports: str = "listen_port = 8080") -> str:
    """A config with one app and one route; the snippets go into the matching table."""
    return f"""
{ports}
{top}
[apps.app1]
server_name = "app1.example.com"
{app}
[[apps.app1.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:8081" }}]
{route}
{tail}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    return caught.value.errors


LB_CHOICES = '"none", "round_robin", "random", "sticky", "primary_backup"'
OPTIONS = (
    "keep_original_host, set_upstream_host, upgrade_insecure_requests, "
    "force_http11_upstream, force_http2_upstream, forwarded_header, "
    "send_proxy_protocol_v1, send_proxy_protocol_v2"
)
PORT_RANGE = "must be an integer between 1 and 65535"

CASES: list[tuple[str, str, list[str]]] = [
    # ---- ports -------------------------------------------------------------
    ("port zero", make(ports="listen_port = 0"), [f"listen_port: {PORT_RANGE}"]),
    ("port too big", make(ports="listen_port = 65536"), [f"listen_port: {PORT_RANGE}"]),
    ("port bool", make(ports="listen_port = true"), [f"listen_port: {PORT_RANGE}"]),
    ("port float", make(ports="listen_port = 80.0"), [f"listen_port: {PORT_RANGE}"]),
    ("port string", make(ports='listen_port = "80"'), [f"listen_port: {PORT_RANGE}"]),
    (
        "no port",
        make(ports=""),
        [
            "listen_port: at least one of listen_port and listen_port_tls is required",
            "apps.app1.tls: is required when listen_port is not set (the app would serve nothing)",
        ],
    ),
    (
        "same ports",
        make(ports="listen_port = 8080\nlisten_port_tls = 8080"),
        ["listen_port_tls: must differ from listen_port"],
    ),
    (
        "only tls port, app without tls",
        make(ports="listen_port_tls = 8443"),
        ["apps.app1.tls: is required when listen_port is not set (the app would serve nothing)"],
    ),
    # ---- listen addresses --------------------------------------------------
    (
        "v4 wildcard mixed",
        make(top='listen_address_v4 = ["0.0.0.0", "127.0.0.1"]'),
        ['listen_address_v4: must not contain "0.0.0.0" together with other addresses'],
    ),
    (
        "v6 wildcard mixed",
        make(top='listen_address_v6 = ["[::]", "::1"]'),
        ['listen_address_v6: must not contain "::" together with other addresses'],
    ),
    ("v6 in v4", make(top='listen_address_v4 = ["::1"]'), ['listen_address_v4[0]: "::1" is not an IPv4 address']),
    (
        "v4 in v6 single",
        make(top='listen_address_v6 = "127.0.0.1"'),
        ['listen_address_v6: "127.0.0.1" is not an IPv6 address'],
    ),
    (
        "v4 garbage",
        make(top='listen_address_v4 = "localhost"'),
        ['listen_address_v4: "localhost" is not an IPv4 address'],
    ),
    ("v4 empty list", make(top="listen_address_v4 = []"), ["listen_address_v4: must not be empty"]),
    ("v4 int", make(top="listen_address_v4 = 5"), ["listen_address_v4: must be a string or an array of strings"]),
    ("v4 element int", make(top='listen_address_v4 = ["127.0.0.1", 5]'), ["listen_address_v4[1]: must be a string"]),
    ("listen_ipv6 not bool", make(top='listen_ipv6 = "yes"'), ["listen_ipv6: must be true or false"]),
    # ---- public https port -------------------------------------------------
    (
        "public port without tls port",
        make(top="public_https_port = 443"),
        ["public_https_port: requires listen_port_tls"],
    ),
    (
        "alias without tls port",
        make(top="https_redirection_port = 443"),
        ["https_redirection_port: requires listen_port_tls"],
    ),
    (
        "public port and alias disagree",
        make(
            ports="listen_port = 8080\nlisten_port_tls = 8443",
            top="public_https_port = 443\nhttps_redirection_port = 4443",
        ),
        ["https_redirection_port: conflicts with public_https_port (443); remove it"],
    ),
    (
        "public port range",
        make(ports="listen_port = 80\nlisten_port_tls = 443", top="public_https_port = 0"),
        [f"public_https_port: {PORT_RANGE}"],
    ),
    # ---- limits --------------------------------------------------------------
    ("max_clients zero", make(top="max_clients = 0"), ["max_clients: must be an integer >= 1"]),
    (
        "max_clients_per_ip negative",
        make(top="max_clients_per_ip = -1"),
        ["max_clients_per_ip: must be an integer >= 0"],
    ),
    ("backlog float", make(top="tcp_listen_backlog = 10.5"), ["tcp_listen_backlog: must be an integer >= 1"]),
    ("streams zero", make(top="max_concurrent_streams = 0"), ["max_concurrent_streams: must be an integer >= 1"]),
    (
        "redact not bool",
        make(top="redact_query_in_access_log = 1"),
        ["redact_query_in_access_log: must be true or false"],
    ),
    (
        "connect timeout zero",
        make(top="upstream_connect_timeout = 0"),
        ["upstream_connect_timeout: must be a number > 0"],
    ),
    (
        "response timeout negative",
        make(top="upstream_response_timeout = -1"),
        ["upstream_response_timeout: must be a number >= 0"],
    ),
    (
        "response timeout inf",
        make(top="upstream_response_timeout = inf"),
        ["upstream_response_timeout: must be a number >= 0"],
    ),
    (
        "response timeout string",
        make(top='upstream_response_timeout = "60"'),
        ["upstream_response_timeout: must be a number >= 0"],
    ),
    (
        "certificate poll interval zero",
        make(top="certificate_poll_interval = 0"),
        ["certificate_poll_interval: must be a number > 0"],
    ),
    (
        "certificate poll interval string",
        make(top='certificate_poll_interval = "60s"'),
        ["certificate_poll_interval: must be a number > 0"],
    ),
    (
        "certificate poll interval nan",
        make(top="certificate_poll_interval = nan"),
        ["certificate_poll_interval: must be a number > 0"],
    ),
    # ---- trusted proxies -----------------------------------------------------
    (
        "trusted host bits",
        make(top='trusted_forwarded_proxies = ["10.0.0.1/8"]'),
        ['trusted_forwarded_proxies[0]: "10.0.0.1/8" has host bits set (did you mean "10.0.0.0/8"?)'],
    ),
    (
        "trusted garbage",
        make(top='trusted_forwarded_proxies = "akamai"'),
        [
            'trusted_forwarded_proxies: "akamai" is not an IP address, a CIDR or one of '
            '"cloudflare", "fastly", "cloudfront"'
        ],
    ),
    # ---- body size, secret, default app -----------------------------------------
    (
        "body size unit",
        make(top='request_max_body_size = "10x"'),
        [
            "request_max_body_size: must be a byte count (integer >= 0), a size like "
            '"256k", "10m" or "1g", or "unlimited", got \'10x\''
        ],
    ),
    (
        "body size float",
        make(top="request_max_body_size = 1.5"),
        [
            "request_max_body_size: must be a byte count (integer >= 0), a size like "
            '"256k", "10m" or "1g", or "unlimited"'
        ],
    ),
    (
        "secret alphabet",
        make(top='sticky_cookie_secret = "abc+/def"'),
        ["sticky_cookie_secret: must be base64url (A-Z a-z 0-9 - _)"],
    ),
    ("secret type", make(top="sticky_cookie_secret = 32"), ["sticky_cookie_secret: must be a string"]),
    ("default app unknown", make(top='default_app = "nope"'), ['default_app: no app named "nope" (apps: app1)']),
    (
        "default app with a bad server_name gets no second error",
        make(top='default_app = "APP1"').replace('"app1.example.com"', '"bad_name"'),
        [
            'apps.app1.server_name: "bad_name" is not a valid host name: '
            'label "bad_name" may only contain letters, digits and "-"'
        ],
    ),
    # ---- apps ------------------------------------------------------------------
    ("no apps", "listen_port = 8080\n", ["apps: is required and must define at least one app"]),
    ("empty apps", "listen_port = 8080\n[apps]\n", ["apps: is required and must define at least one app"]),
    ("apps not table", "listen_port = 8080\napps = 1\n", ["apps: must be a table"]),
    ("app not table", "listen_port = 8080\n[apps]\napp1 = 1\n", ["apps.app1: must be a table"]),
    (
        "no server_name",
        'listen_port = 8080\n[[apps.app1.reverse_proxy]]\nupstream = [{ location = "a" }]\n',
        ["apps.app1.server_name: is required"],
    ),
    (
        "duplicate server_name",
        make(
            tail='[apps.app2]\nserver_name = "APP1.example.com"\nreverse_proxy = [{ upstream = [{ location = "b" }] }]'
        ),
        ['apps.app2.server_name: "app1.example.com" is already used by apps.app1'],
    ),
    (
        "app keys differing in case",
        make(
            tail='[apps.App1]\nserver_name = "other.example.com"\nreverse_proxy = [{ upstream = [{ location = "b" }] }]'
        ),
        ["apps.App1: duplicates apps.app1 (app names are case-insensitive)"],
    ),
    (
        "quoted app key in path",
        'listen_port = 8080\n[apps."my.app"]\nserver_name = "_bad"\nreverse_proxy = [{ upstream = [{ location = "b" }] }]\n',
        [
            'apps."my.app".server_name: "_bad" is not a valid host name: label "_bad" may only contain letters, digits and "-"'
        ],
    ),
    (
        "no reverse_proxy",
        'listen_port = 8080\n[apps.app1]\nserver_name = "a.example.com"\n',
        ["apps.app1.reverse_proxy: is required"],
    ),
    (
        "empty reverse_proxy",
        'listen_port = 8080\n[apps.app1]\nserver_name = "a.example.com"\nreverse_proxy = []\n',
        ["apps.app1.reverse_proxy: must be a non-empty array of tables ([[...reverse_proxy]])"],
    ),
    (
        "reverse_proxy as a single table",
        'listen_port = 8080\n[apps.app1]\nserver_name = "a.example.com"\n[apps.app1.reverse_proxy]\n'
        'upstream = [{ location = "a" }]\n',
        ["apps.app1.reverse_proxy: must be a non-empty array of tables ([[...reverse_proxy]])"],
    ),
    (
        "reverse_proxy entry not a table",
        'listen_port = 8080\n[apps.app1]\nserver_name = "a.example.com"\nreverse_proxy = ["a"]\n',
        ["apps.app1.reverse_proxy[0]: must be a table"],
    ),
    # ---- routes ----------------------------------------------------------------
    (
        "two default routes",
        make(tail='[[apps.app1.reverse_proxy]]\nupstream = [{ location = "b" }]'),
        [
            'apps.app1.reverse_proxy[1]: has no path, so it is the "/" route, which reverse_proxy[0] '
            "already covers (at most one per app)"
        ],
    ),
    (
        "explicit slash duplicates default",
        make(tail='[[apps.app1.reverse_proxy]]\npath = "/"\nupstream = [{ location = "b" }]'),
        ['apps.app1.reverse_proxy[1].path: "/" is already routed by reverse_proxy[0]'],
    ),
    (
        "duplicate path",
        make(
            tail='[[apps.app1.reverse_proxy]]\npath = "/api"\nupstream = [{ location = "b" }]\n'
            '[[apps.app1.reverse_proxy]]\npath = "/api"\nupstream = [{ location = "c" }]'
        ),
        ['apps.app1.reverse_proxy[2].path: "/api" is already routed by reverse_proxy[1]'],
    ),
    ("path without slash", make(route='path = "api"'), ['apps.app1.reverse_proxy[0].path: must start with "/"']),
    (
        "path with query",
        make(route='path = "/a?b=1"'),
        ['apps.app1.reverse_proxy[0].path: must not contain spaces, control characters, "?" or "#"'],
    ),
    ("empty path", make(route='path = ""'), ["apps.app1.reverse_proxy[0].path: must not be empty"]),
    (
        "replace_path without slash",
        make(route='path = "/a"\nreplace_path = "b"'),
        ['apps.app1.reverse_proxy[0].replace_path: must start with "/"'],
    ),
    (
        "empty upstream (second route)",
        make(tail='[[apps.app1.reverse_proxy]]\npath = "/x"\nupstream = []'),
        ["apps.app1.reverse_proxy[1].upstream: must not be empty"],
    ),
    (
        "missing upstream",
        make(tail='[[apps.app1.reverse_proxy]]\npath = "/x"'),
        ["apps.app1.reverse_proxy[1].upstream: is required"],
    ),
    (
        "upstream not array",
        make(tail='[[apps.app1.reverse_proxy]]\npath = "/x"\nupstream = "a:80"'),
        ['apps.app1.reverse_proxy[1].upstream: must be an array of tables like [{ location = "host:port" }]'],
    ),
    (
        "load_balance unknown",
        make(route='load_balance = "fastest"'),
        [f"apps.app1.reverse_proxy[0].load_balance: must be one of {LB_CHOICES}"],
    ),
    (
        "primary_backup without health check",
        make(route='load_balance = "primary_backup"'),
        ['apps.app1.reverse_proxy[0].load_balance: "primary_backup" requires health_check'],
    ),
    (
        "primary_backup with health check off",
        make(route='load_balance = "primary_backup"\nhealth_check = false'),
        ['apps.app1.reverse_proxy[0].load_balance: "primary_backup" requires health_check'],
    ),
    (
        "sticky without secret",
        make(route='load_balance = "sticky"'),
        ['apps.app1.reverse_proxy[0].load_balance: "sticky" requires the top-level sticky_cookie_secret'],
    ),
    (
        "unknown upstream option",
        make(route='upstream_options = ["forwarded_header", "keep_host"]'),
        [f'apps.app1.reverse_proxy[0].upstream_options[1]: unknown option "keep_host" (expected one of: {OPTIONS})'],
    ),
    (
        "both proxy protocol versions",
        make(route='upstream_options = ["send_proxy_protocol_v1", "send_proxy_protocol_v2"]'),
        [
            "apps.app1.reverse_proxy[0].upstream_options: "
            "send_proxy_protocol_v1 and send_proxy_protocol_v2 are mutually exclusive"
        ],
    ),
    (
        "both force options",
        make(route='upstream_options = ["force_http11_upstream", "force_http2_upstream"]'),
        [
            "apps.app1.reverse_proxy[0].upstream_options: "
            "force_http11_upstream and force_http2_upstream are mutually exclusive"
        ],
    ),
    (
        "upstream options as string",
        make(route='upstream_options = "forwarded_header"'),
        ["apps.app1.reverse_proxy[0].upstream_options: must be an array of strings"],
    ),
    # ---- upstream locations ------------------------------------------------------
    *[
        (
            f"location {location!r}",
            make(tail=f"[[apps.app1.reverse_proxy]]\npath = '/x'\nupstream = [{{ location = '{location}' }}]"),
            [f"apps.app1.reverse_proxy[1].upstream[0].location: {problem}"],
        )
        for location, problem in [
            ("", "must not be empty"),
            ("http://backend", 'must be "host[:port]" without a scheme (use tls = true for https)'),
            ("backend/path", 'must be "host[:port]" (no path, user info or spaces)'),
            ("user@backend", 'must be "host[:port]" (no path, user info or spaces)'),
            ("::1", 'IPv6 addresses must be in brackets, e.g. "[::1]:8080"'),
            ("::1:8080", 'IPv6 addresses must be in brackets, e.g. "[::1]:8080"'),
            ("[::1", 'has an unclosed "[" (IPv6 is written "[::1]:8080")'),
            ("[::1]8080", 'must be "[ipv6]" or "[ipv6]:port"'),
            ("[zz]:80", '"zz" is not a valid IPv6 address'),
            ("backend:0", "port must be an integer between 1 and 65535"),
            ("backend:65536", "port must be an integer between 1 and 65535"),
            ("backend:http", "port must be an integer between 1 and 65535"),
            ("backend:", "port must be an integer between 1 and 65535"),
            ("-backend", 'host "-backend": label "-backend" must not start or end with "-"'),
            ("a..b:80", 'host "a..b": must not contain empty labels (a leading, trailing or doubled dot)'),
            ("300.1.1.1", 'host "300.1.1.1": is not a valid IPv4 address'),
        ]
    ],
    (
        "location missing",
        make(tail="[[apps.app1.reverse_proxy]]\npath = '/x'\nupstream = [{ tls = true }]"),
        ["apps.app1.reverse_proxy[1].upstream[0].location: is required"],
    ),
    (
        "upstream tls not bool",
        make(tail="[[apps.app1.reverse_proxy]]\npath = '/x'\nupstream = [{ location = 'a', tls = 'yes' }]"),
        ["apps.app1.reverse_proxy[1].upstream[0].tls: must be true or false"],
    ),
    (
        "upstream element not table",
        make(tail="[[apps.app1.reverse_proxy]]\npath = '/x'\nupstream = ['a:80']"),
        ['apps.app1.reverse_proxy[1].upstream[0]: must be a table like { location = "host:port" }'],
    ),
    (
        "upstream ca file missing",
        make(
            tail="[[apps.app1.reverse_proxy]]\npath = '/x'\nupstream = [{ location = 'a', tls = true, ca_cert_path = '/nonexistent/ca.pem' }]"
        ),
        [
            'apps.app1.reverse_proxy[1].upstream[0].ca_cert_path: cannot read "/nonexistent/ca.pem": No such file or directory'
        ],
    ),
    # ---- health checks -----------------------------------------------------------
    (
        "health check string",
        make(route='health_check = "yes"'),
        ["apps.app1.reverse_proxy[0].health_check: must be true, false or a table"],
    ),
    (
        "health check type",
        make(route='health_check = { type = "udp" }'),
        ['apps.app1.reverse_proxy[0].health_check.type: must be one of "tcp", "http"'],
    ),
    (
        "health interval zero",
        make(route="health_check = { interval = 0 }"),
        ["apps.app1.reverse_proxy[0].health_check.interval: must be a number > 0"],
    ),
    (
        "health timeout not below interval",
        make(route="health_check = { interval = 5, timeout = 5 }"),
        ["apps.app1.reverse_proxy[0].health_check.timeout: must be less than interval (5)"],
    ),
    (
        "health timeout above default interval",
        make(route="health_check = { timeout = 30 }"),
        ["apps.app1.reverse_proxy[0].health_check.timeout: must be less than interval (10)"],
    ),
    (
        "health thresholds",
        make(route="health_check = { unhealthy_threshold = 0, healthy_threshold = 0 }"),
        [
            "apps.app1.reverse_proxy[0].health_check.unhealthy_threshold: must be an integer >= 1",
            "apps.app1.reverse_proxy[0].health_check.healthy_threshold: must be an integer >= 1",
        ],
    ),
    (
        "http health without path",
        make(route='health_check = { type = "http" }'),
        ['apps.app1.reverse_proxy[0].health_check.path: is required when type = "http"'],
    ),
    (
        "http health relative path",
        make(route='health_check = { type = "http", path = "healthz" }'),
        ['apps.app1.reverse_proxy[0].health_check.path: must start with "/"'],
    ),
    (
        "http health status",
        make(route='health_check = { type = "http", path = "/h", expected_status = 600 }'),
        ["apps.app1.reverse_proxy[0].health_check.expected_status: must be an integer between 100 and 599"],
    ),
    # ---- tls tables ----------------------------------------------------------------
    ("tls not table", make(app="tls = true"), ["apps.app1.tls: must be a table"]),
    (
        "tls without cert paths",
        make(ports="listen_port = 80\nlisten_port_tls = 443", app="tls = { https_redirection = false }"),
        [
            "apps.app1.tls.tls_cert_path: is required (unless acme = true)",
            "apps.app1.tls.tls_cert_key_path: is required (unless acme = true)",
        ],
    ),
    (
        "tls cert files missing",
        make(
            ports="listen_port = 80\nlisten_port_tls = 443",
            app="tls = { tls_cert_path = '/nonexistent/c.pem', tls_cert_key_path = '/nonexistent/k.pem', "
            "client_ca_cert_path = '/nonexistent/ca.pem' }",
        ),
        [
            'apps.app1.tls.tls_cert_path: cannot read "/nonexistent/c.pem": No such file or directory',
            'apps.app1.tls.tls_cert_key_path: cannot read "/nonexistent/k.pem": No such file or directory',
            'apps.app1.tls.client_ca_cert_path: cannot read "/nonexistent/ca.pem": No such file or directory',
        ],
    ),
    (
        "tls cert path with NUL (found by fuzz/config)",
        make(
            ports="listen_port = 80\nlisten_port_tls = 443",
            app='tls = { tls_cert_path = "/etc/c\\u0000.pem", tls_cert_key_path = "/etc/k.pem\\u0000" }',
        ),
        [
            "apps.app1.tls.tls_cert_path: must not contain a NUL character",
            "apps.app1.tls.tls_cert_key_path: must not contain a NUL character",
        ],
    ),
    (
        "acme without experimental.acme",
        make(ports="listen_port = 80\nlisten_port_tls = 443", app="tls = { acme = true }"),
        ["apps.app1.tls.acme: requires an [experimental.acme] table"],
    ),
    (
        "acme with cert paths",
        make(
            ports="listen_port = 80\nlisten_port_tls = 443",
            app="tls = { acme = true, tls_cert_path = '/nonexistent/c.pem' }",
            tail="[experimental.acme]\nemail = 'a@example.com'",
        ),
        [
            "apps.app1.tls.acme: must not be combined with tls_cert_path or tls_cert_key_path",
            'apps.app1.tls.tls_cert_path: cannot read "/nonexistent/c.pem": No such file or directory',
        ],
    ),
    (
        "https_redirection with one port",
        make(
            app="tls = { acme = true, https_redirection = true }", tail="[experimental.acme]\nemail = 'a@example.com'"
        ),
        ["apps.app1.tls.https_redirection: requires both listen_port and listen_port_tls"],
    ),
    (
        "https_redirection with only tls port",
        make(
            ports="listen_port_tls = 443",
            app="tls = { acme = true, https_redirection = true }",
            tail="[experimental.acme]\nemail = 'a@example.com'",
        ),
        ["apps.app1.tls.https_redirection: requires both listen_port and listen_port_tls"],
    ),
    # ---- [experimental] -------------------------------------------------------------
    ("experimental not table", make(top="experimental = 1"), ["experimental: must be a table"]),
    (
        "connection_handling_timeout negative",
        make(tail="[experimental]\nconnection_handling_timeout = -1"),
        ["experimental.connection_handling_timeout: must be a number >= 0"],
    ),
    (
        "connection_handling_timeout nan",
        make(tail="[experimental]\nconnection_handling_timeout = nan"),
        ["experimental.connection_handling_timeout: must be a number >= 0"],
    ),
    (
        "ignore_sni not bool",
        make(tail="[experimental]\nignore_sni_consistency = 0"),
        ["experimental.ignore_sni_consistency: must be true or false"],
    ),
    (
        "h3 values",
        make(
            tail="[experimental.h3]\nmax_idle_timeout = -1\nalt_svc_max_age = 1.5\nmax_concurrent_connections = 0\nrequest_max_body_size = '1m'"
        ),
        [
            "experimental.h3.request_max_body_size: must be an integer >= 0",
            "experimental.h3.alt_svc_max_age: must be an integer >= 0",
            "experimental.h3.max_concurrent_connections: must be an integer >= 1",
            "experimental.h3.max_idle_timeout: must be an integer >= 0",
        ],
    ),
    (
        "cache memory above max",
        make(tail="[experimental.cache]\nmax_cache_each_size = 1000\nmax_cache_each_size_on_memory = 1001"),
        ["experimental.cache.max_cache_each_size_on_memory: must not exceed max_cache_each_size (1000)"],
    ),
    (
        "cache memory above default max",
        make(tail="[experimental.cache]\nmax_cache_each_size_on_memory = 100000"),
        ["experimental.cache.max_cache_each_size_on_memory: must not exceed max_cache_each_size (65535)"],
    ),
    (
        "cache values",
        make(tail="[experimental.cache]\ncache_dir = ''\nmax_cache_entry = 0"),
        [
            "experimental.cache.cache_dir: must not be empty",
            "experimental.cache.max_cache_entry: must be an integer >= 1",
        ],
    ),
    (
        "acme without email",
        make(tail="[experimental.acme]\ndir_url = 'https://localhost:14000/dir'"),
        ["experimental.acme.email: is required"],
    ),
    (
        "acme bad values",
        make(tail="[experimental.acme]\nemail = 'nobody'\ndir_url = 'localhost:14000/dir'"),
        ["experimental.acme.email: must be an e-mail address", "experimental.acme.dir_url: must be an http(s):// URL"],
    ),
    (
        "proxy protocol without trusted_proxies",
        make(tail="[experimental.tcp_recv_proxy_protocol]\ntimeout = 10"),
        ["experimental.tcp_recv_proxy_protocol.trusted_proxies: is required"],
    ),
    (
        "proxy protocol empty trusted_proxies",
        make(tail="[experimental.tcp_recv_proxy_protocol]\ntrusted_proxies = []"),
        ["experimental.tcp_recv_proxy_protocol.trusted_proxies: must not be empty"],
    ),
    (
        "proxy protocol no aliases, bad timeout",
        make(tail="[experimental.tcp_recv_proxy_protocol]\ntrusted_proxies = ['cloudflare']\ntimeout = -5"),
        [
            'experimental.tcp_recv_proxy_protocol.trusted_proxies[0]: "cloudflare" is not an IP address or CIDR',
            "experimental.tcp_recv_proxy_protocol.timeout: must be an integer >= 0",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_config_reports_exact_errors(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


@pytest.mark.parametrize(
    ("server_name", "problem"),
    [
        ("*", 'a wildcard needs at least two labels after "*." (e.g. "*.example.com")'),
        ("*.com", 'a wildcard needs at least two labels after "*." (e.g. "*.example.com")'),
        ("a.*.example.com", 'a wildcard "*" is only allowed as the whole first label (e.g. "*.example.com")'),
        ("*a.example.com", 'a wildcard "*" is only allowed as the whole first label (e.g. "*.example.com")'),
        ("*.*.example.com", 'a wildcard "*" is only allowed as the whole first label (e.g. "*.example.com")'),
        ("_dmarc.example.com", 'label "_dmarc" may only contain letters, digits and "-"'),
        ("foo_bar.com", 'label "foo_bar" may only contain letters, digits and "-"'),
        ("::1", "IPv6 literals are not allowed"),
        ("[::1]", "IPv6 literals are not allowed"),
        ("-a.example.com", 'label "-a" must not start or end with "-"'),
        ("a-.example.com", 'label "a-" must not start or end with "-"'),
        ("a..example.com", "must not contain empty labels (a leading, trailing or doubled dot)"),
        ("example.com.", "must not contain empty labels (a leading, trailing or doubled dot)"),
        ("bücher.example", "must be ASCII (write internationalised names in punycode, xn--...)"),
        ("a" * 64 + ".com", f'label "{"a" * 64}" is longer than 63 characters'),
        (".".join(["a" * 63] * 4), "must be at most 253 characters"),
        ("999.1.1.1", "is not a valid IPv4 address"),
        ("1.2.3", "is not a valid IPv4 address"),
        ("example.123", "the last label must not be all digits"),
        ("exa mple.com", 'label "exa mple" may only contain letters, digits and "-"'),
    ],
)
def test_bad_server_names(server_name: str, problem: str) -> None:
    text = make().replace('"app1.example.com"', f'"{server_name}"')
    assert errors_of(text) == [f'apps.app1.server_name: "{server_name}" is not a valid host name: {problem}']


def test_short_sticky_secret_names_the_length_and_never_echoes_the_secret() -> None:
    secret = "c2hvcnQtc2VjcmV0LTE2Yg"  # 16 bytes
    [error] = errors_of(make(top=f'sticky_cookie_secret = "{secret}"'))
    assert error.startswith("sticky_cookie_secret: must decode to 32 bytes, not 16 (generate one with: ")
    assert secret not in error


def test_all_errors_are_collected_in_one_pass() -> None:
    text = """
listen_port = 0
max_clients = -1
[apps.app1]
server_name = "bad_name"
[[apps.app1.reverse_proxy]]
upstream = []
[[apps.app1.reverse_proxy]]
path = "nope"
upstream = [{ location = "http://x" }]
load_balance = "fast"
"""
    assert errors_of(text) == [
        "listen_port: must be an integer between 1 and 65535",
        "max_clients: must be an integer >= 1",
        'apps.app1.server_name: "bad_name" is not a valid host name: label "bad_name" may only contain letters, digits and "-"',
        "apps.app1.reverse_proxy[0].upstream: must not be empty",
        'apps.app1.reverse_proxy[1].path: must start with "/"',
        'apps.app1.reverse_proxy[1].upstream[0].location: must be "host[:port]" without a scheme (use tls = true for https)',
        f"apps.app1.reverse_proxy[1].load_balance: must be one of {LB_CHOICES}",
    ]


def test_config_error_str_is_one_problem_per_line() -> None:
    error = ConfigError(["a: one", "b.c: two"])
    assert str(error) == "a: one\nb.c: two"
    assert error.errors == ["a: one", "b.c: two"]


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(["not", "a", "table"])  # type: ignore[arg-type]
    assert caught.value.errors == ["(config): must be a table"]
