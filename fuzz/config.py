"""Config files -> the loader: only ConfigError, naming a key, ever comes out.

Half the inputs are raw file bytes (TOML syntax, encodings); the other half are
structure-aware: tables built from the real key names with values of every type, so
the validators (not only the TOML parser) see hostile input.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["rpxy"]):
    from rpxy.config.load import ConfigError, parse_config

import tomllib

from fuzz.runner import run

TOP = [
    "listen_port", "listen_port_tls", "listen_address_v4", "listen_address_v6", "https_redirection_port",
    "public_https_port", "tcp_listen_backlog", "max_concurrent_streams", "max_clients", "max_clients_per_ip",
    "trusted_forwarded_proxies", "default_app", "redact_query_in_access_log", "request_max_body_size",
    "upstream_response_timeout", "upstream_connect_timeout", "certificate_poll_interval", "apps", "experimental",
]
APP = ["server_name", "tls", "reverse_proxy", "https_redirection", "ignore_sni_consistency"]
TLS = ["tls_cert_path", "tls_cert_key_path", "https_redirection", "client_ca_cert_path", "acme"]
ROUTE = ["path", "replace_path", "upstream", "upstream_options", "load_balance", "sticky_cookie_secret"]
UPSTREAM = ["location", "tls", "ca_cert_path", "weight"]
EXPERIMENTAL = ["h3", "cache", "acme", "tcp_recv_proxy_protocol", "ignore_sni_consistency"]
OPTIONS = ["force_http2_upstream", "force_http11_upstream", "keep_original_host", "set_upstream_host",
           "upgrade_insecure_requests", "forwarded_header", "nonsense"]
STRINGS = ["", "localhost", "a.example.com", "*.example.com", "127.0.0.1:8080", "[::1]:80", "/", "/api",
           "round_robin", "sticky", "primary_backup", "10.0.0.0/8", "256k", "unlimited", "-1", "\x00", "é",
           "http://x", "a" * 300]


def _value(fdp: atheris.FuzzedDataProvider, depth: int):  # type: ignore[no-untyped-def]
    kind = fdp.ConsumeIntInRange(0, 8)
    if kind == 0:
        return fdp.ConsumeInt(4)
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.PickValueInList(STRINGS)
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(20)
    if kind == 4:
        return fdp.ConsumeFloat()
    if kind == 5 and depth < 3:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 6:
        return fdp.PickValueInList(OPTIONS)
    if kind == 7 and depth < 3:
        return {fdp.PickValueInList(TOP + APP + TLS): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    return fdp.ConsumeIntInRange(0, 70000)


def _table(fdp: atheris.FuzzedDataProvider, keys: list[str], depth: int) -> dict:
    return {fdp.PickValueInList(keys): _value(fdp, depth) for _ in range(fdp.ConsumeIntInRange(0, len(keys)))}


def _config(fdp: atheris.FuzzedDataProvider) -> dict:
    data = _table(fdp, TOP, 1)
    if fdp.ConsumeBool():
        apps = {}
        for n in range(fdp.ConsumeIntInRange(0, 3)):
            app = _table(fdp, APP, 2)
            if fdp.ConsumeBool():
                app["tls"] = _table(fdp, TLS, 3)
            routes = []
            for _ in range(fdp.ConsumeIntInRange(0, 3)):
                route = _table(fdp, ROUTE, 3)
                if fdp.ConsumeBool():
                    route["upstream"] = [_table(fdp, UPSTREAM, 3) for _ in range(fdp.ConsumeIntInRange(0, 3))]
                routes.append(route)
            app["reverse_proxy"] = routes
            apps[f"app{n}"] = app
        data["apps"] = apps
    if fdp.ConsumeBool():
        data["experimental"] = {fdp.PickValueInList(EXPERIMENTAL): _value(fdp, 2) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    return data


def test_one_input(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            try:
                table = tomllib.loads(data[1:].decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError):
                return  # the loader reports these itself, with the file name
            parse_config(table)
        else:
            parse_config(_config(atheris.FuzzedDataProvider(data[1:])))
    except ConfigError as error:
        if not error.args or not str(error):
            raise AssertionError("a ConfigError without a message") from error


if __name__ == "__main__":
    run(test_one_input)
