"""Raw TOML -> validated, frozen :class:`~rpxy.config.model.Config`.

Validation happens once, here, so that nothing downstream re-checks a value
while serving, and so that a bad file is rejected *before* it replaces a
running configuration on reload. Every problem is reported as
``"key.path: problem"`` (``apps.app1.reverse_proxy[1].upstream: must not be
empty``), and all problems of a file are collected in one pass: fixing a config
one error per restart is miserable.

Unknown keys and keys of features this version does not implement yet are
warnings, not errors, so that a ``config.toml`` written for the Rust rpxy
keeps loading here.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar, overload

import attrs

from rpxy.config.model import (
    AcmeConfig,
    AppConfig,
    CacheConfig,
    Config,
    ExperimentalConfig,
    H3Config,
    HealthCheckConfig,
    MetricsConfig,
    ProxyProtocolConfig,
    ReverseProxyConfig,
    TlsConfig,
    UpstreamConfig,
)
from rpxy.config.proxies import PROXY_ALIASES
from rpxy.config.sizes import parse_size

__all__ = [
    "NOT_YET_SUPPORTED",
    "ConfigError",
    "load_config_bytes",
    "LoadedConfig",
    "load_config_file",
    "parse_config",
]

#: Keys (generic paths; ``*`` stands for any app / route) that are validated but
#: whose feature this version does not implement yet. Using one yields the
#: warning ``"<key>: not yet supported by this version (validated, has no
#: effect)"`` once per load. Remove an entry when its feature lands.
NOT_YET_SUPPORTED: frozenset[str] = frozenset(
    {
    }
)

LOAD_BALANCE_CHOICES = ("none", "round_robin", "random", "sticky", "primary_backup")
UPSTREAM_OPTIONS = (
    "keep_original_host",
    "set_upstream_host",
    "upgrade_insecure_requests",
    "force_http11_upstream",
    "force_http2_upstream",
    "forwarded_header",
    # beyond rpxy: each upstream connection starts with a PROXY header naming the client
    "send_proxy_protocol_v1",
    "send_proxy_protocol_v2",
)
HEALTH_CHECK_TYPES = ("tcp", "http")

# What rpxy does when tcp_recv_proxy_protocol.timeout = 0 (ms).
_PROXY_PROTOCOL_ZERO_TIMEOUT_MS = 5000
_STICKY_SECRET_BYTES = 32
#: Upper bound of ``workers`` (a typo such as 1000 should not fork-bomb the machine).
MAX_WORKERS = 256

# Known keys of every table: anything else is warned about as a probable typo.
_TOP_KEYS = frozenset(
    {
        "listen_port",
        "listen_port_tls",
        "listen_address_v4",
        "listen_address_v6",
        "listen_ipv6",
        "public_https_port",
        "https_redirection_port",
        "tcp_listen_backlog",
        "max_concurrent_streams",
        "max_clients",
        "max_clients_per_ip",
        "trusted_forwarded_proxies",
        "redact_query_in_access_log",
        "request_max_body_size",
        "sticky_cookie_secret",
        "default_app",
        "apps",
        "experimental",
        "upstream_response_timeout",
        "upstream_connect_timeout",
        "certificate_poll_interval",
        "graceful_shutdown_timeout",
        "workers",
    }
)
_APP_KEYS = frozenset({"server_name", "tls", "reverse_proxy"})
_TLS_KEYS = frozenset({"tls_cert_path", "tls_cert_key_path", "https_redirection", "client_ca_cert_path", "acme"})
_ROUTE_KEYS = frozenset({"path", "replace_path", "upstream", "load_balance", "upstream_options", "health_check"})
_UPSTREAM_KEYS = frozenset({"location", "tls", "ca_cert_path"})
_HEALTH_CHECK_KEYS = frozenset(
    {"type", "interval", "timeout", "unhealthy_threshold", "healthy_threshold", "path", "expected_status"}
)
_EXPERIMENTAL_KEYS = frozenset(
    {
        "ignore_sni_consistency",
        "connection_handling_timeout",
        "h3",
        "cache",
        "acme",
        "tcp_recv_proxy_protocol",
        "metrics",
    }
)
#: The largest QUIC stream limit (RFC 9000 section 4.6).
_MAX_QUIC_STREAMS = 1 << 60

_H3_KEYS = frozenset(
    {
        "alt_svc_max_age",
        "max_concurrent_connections",
        "max_concurrent_bidistream",
        "max_concurrent_unistream",
        "max_idle_timeout",
        "request_max_body_size",
    }
)
_CACHE_KEYS = frozenset({"cache_dir", "max_cache_entry", "max_cache_each_size", "max_cache_each_size_on_memory"})
_ACME_KEYS = frozenset({"dir_url", "email", "registry_path", "challenge", "renew_before_days"})
ACME_CHALLENGES = ("tls-alpn-01", "http-01")
_PROXY_PROTOCOL_KEYS = frozenset({"trusted_proxies", "timeout"})
_METRICS_KEYS = frozenset({"listen_address", "listen_port", "path"})

_T = TypeVar("_T")


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` lists every problem found.

    Each entry reads ``"key.path: problem"`` so the user can jump straight to
    the offending key; ``str()`` is one problem per line.
    """

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


@attrs.frozen
class LoadedConfig:
    """A valid configuration plus the warnings worth logging when it is applied."""

    config: Config
    warnings: tuple[str, ...]


def load_config_file(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read and validate the TOML file at ``path``.

    Read or syntax problems become a :class:`ConfigError` naming the file (and,
    for syntax errors, tomllib's line and column) so that a reload failure in
    the log says exactly what to fix.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from exc
    return load_config_bytes(raw, name)


def load_config_bytes(raw: bytes, name: str) -> LoadedConfig:
    """Validate the bytes of a config file already read (a reload hashes what it parses).

    ``name`` is the file name used in the error messages.
    """
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{name}: invalid TOML: not UTF-8 (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{name}: invalid TOML: {exc}"]) from exc
    return parse_config(data)


def parse_config(data: Mapping[str, Any]) -> LoadedConfig:
    """Validate already-parsed TOML ``data`` and build the frozen :class:`Config`.

    Raises :class:`ConfigError` listing every problem; returns the config with
    its warnings (unknown keys, deprecated aliases, features not built yet).
    """
    ctx = _Context()
    config = _Loader(ctx).load(data)
    if ctx.errors or config is None:  # config is None only after an error was recorded
        raise ConfigError(ctx.errors)
    return LoadedConfig(config=config, warnings=tuple(ctx.warnings))


# --------------------------------------------------------------------------
# Error collection and typed access to one TOML table
# --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(prefix: str, key: str) -> str:
    """Dotted key path, quoting keys the way TOML would need them (``apps."a.b"``)."""
    part = key if _BARE_KEY.fullmatch(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{prefix}.{part}" if prefix else part


class _Context:
    """Errors and warnings of one load, in the order they were found."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def not_yet_supported(self, key: str) -> None:
        """Warn (once) that ``key`` is accepted but has no effect in this version."""
        if key in NOT_YET_SUPPORTED:
            self.warn(f"{key}: not yet supported by this version (validated, has no effect)")


class _Section:
    """One TOML table under validation, with typed getters.

    Each getter records an error under the key's full path and returns the
    default when the value is wrong, so validation can go on and report the
    other problems too. ``failed`` remembers the keys that were wrong so that
    cross-key checks do not pile consequential errors on top.
    """

    def __init__(self, ctx: _Context, data: Mapping[str, Any], path: str, known: Collection[str]) -> None:
        self.ctx = ctx
        self.data = data
        self.path = path
        self.failed: set[str] = set()
        for key in data:
            if key not in known:
                ctx.warn(f"unknown key {_join(path, key)} (ignored)")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def key_path(self, key: str) -> str:
        return _join(self.path, key)

    def ok(self, key: str) -> bool:
        """The key is present and its value passed its own checks."""
        return key in self.data and key not in self.failed

    def error(self, key: str, problem: str) -> None:
        self.failed.add(key)
        self.ctx.error(self.key_path(key), problem)

    def warn(self, key: str, problem: str) -> None:
        self.ctx.warn(f"{self.key_path(key)}: {problem}")

    def get_bool(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            self.error(key, "must be true or false")
            return default
        return value

    def get_int(self, key: str, default: _T, *, minimum: int, maximum: int | None = None) -> int | _T:
        """An integer in ``[minimum, maximum]``; floats and booleans are refused."""
        if key not in self.data:
            return default
        value = self.data[key]
        in_range = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= minimum
            and (maximum is None or value <= maximum)
        )
        if not in_range:
            if maximum is None:
                self.error(key, f"must be an integer >= {minimum}")
            else:
                self.error(key, f"must be an integer between {minimum} and {maximum}")
            return default
        return int(value)

    def get_port(self, key: str) -> int | None:
        return self.get_int(key, None, minimum=1, maximum=65535)

    def get_number(self, key: str, default: float, *, positive: bool = False) -> float:
        """A finite, non-negative (or strictly positive) int or float, as ``float``."""
        if key not in self.data:
            return default
        value = self.data[key]
        valid = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0)
        )
        if not valid:
            self.error(key, "must be a number > 0" if positive else "must be a number >= 0")
            return default
        return float(value)

    @overload
    def get_str(self, key: str, default: str, *, required: bool = False) -> str: ...

    @overload
    def get_str(self, key: str, default: None = None, *, required: bool = False) -> str | None: ...

    def get_str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        """A non-empty string; ``required`` makes absence an error too."""
        if key not in self.data:
            if required:
                self.error(key, "is required")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            self.error(key, "must be a string")
            return default
        if not value:
            self.error(key, "must not be empty")
            return default
        return value

    def get_choice(self, key: str, default: str, choices: Collection[str]) -> str:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, str) or value not in choices:
            self.error(key, "must be one of " + ", ".join(f'"{c}"' for c in choices))
            return default
        return value

    def get_table(self, key: str) -> Mapping[str, Any] | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, Mapping):
            self.error(key, "must be a table")
            return None
        return value

    def get_str_list(self, key: str, *, allow_single: bool = True) -> list[tuple[str, str]] | None:
        """A string or an array of strings, as ``(element_path, value)`` pairs.

        Returns ``None`` when absent or when the value itself has the wrong
        type; bad elements are reported and left out.
        """
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, str) and allow_single:
            return [(self.key_path(key), value)]
        if not isinstance(value, list):
            self.error(
                key, "must be a string or an array of strings" if allow_single else "must be an array of strings"
            )
            return None
        items: list[tuple[str, str]] = []
        for index, item in enumerate(value):
            item_path = f"{self.key_path(key)}[{index}]"
            if isinstance(item, str):
                items.append((item_path, item))
            else:
                self.failed.add(key)
                self.ctx.error(item_path, "must be a string")
        return items

    def readable_file(self, key: str, filename: str) -> bool:
        """Check now that ``filename`` can be opened, instead of failing at the first handshake."""
        if "\x00" in filename:
            self.error(key, "must not contain a NUL character")
            return False
        try:
            with open(filename, "rb"):
                pass
        except OSError as exc:
            self.error(key, f'cannot read "{filename}": {exc.strerror or exc}')
            return False
        return True


# --------------------------------------------------------------------------
# Value checkers: one per kind of value, returning a problem or raising ValueError
# --------------------------------------------------------------------------

_LABEL_CHARS = re.compile(r"[a-z0-9-]+")
_LABEL_CHARS_UNDERSCORE = re.compile(r"[a-z0-9_-]+")


def _hostname_problem(name: str, *, wildcard: bool, underscore: bool) -> str | None:
    """Why ``name`` is not an acceptable DNS host name (or IPv4 literal), or ``None``.

    ``wildcard`` allows a leading ``*.`` label followed by at least two labels
    (server names); ``underscore`` allows ``_`` (upstream names such as
    docker-compose services, never server names, which must be valid in SNI).
    """
    if not name.isascii():
        return "must be ASCII (write internationalised names in punycode, xn--...)"
    if ":" in name or "[" in name or "]" in name:
        return "IPv6 literals are not allowed"
    if len(name) > 253:
        return "must be at most 253 characters"
    labels = name.lower().split(".")
    if wildcard and labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            return 'a wildcard needs at least two labels after "*." (e.g. "*.example.com")'
    if any("*" in label for label in labels):
        if wildcard:
            return 'a wildcard "*" is only allowed as the whole first label (e.g. "*.example.com")'
        return "wildcards are not allowed"
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return "is not a valid IPv4 address"
        return None
    pattern = _LABEL_CHARS_UNDERSCORE if underscore else _LABEL_CHARS
    allowed = 'letters, digits, "_" and "-"' if underscore else 'letters, digits and "-"'
    for label in labels:
        if not label:
            return "must not contain empty labels (a leading, trailing or doubled dot)"
        if len(label) > 63:
            return f'label "{label}" is longer than 63 characters'
        if not pattern.fullmatch(label):
            return f'label "{label}" may only contain {allowed}'
        if label.startswith("-") or label.endswith("-"):
            return f'label "{label}" must not start or end with "-"'
    if labels[-1].isdigit():
        return "the last label must not be all digits"
    return None


def _parse_location(location: str, tls: bool) -> tuple[str, int]:
    """Split an upstream ``"host[:port]"`` into host (brackets removed) and port.

    The default port follows the scheme (443 with ``tls = true``, else 80).
    """
    if not location:
        raise ValueError("must not be empty")
    if "://" in location:
        raise ValueError('must be "host[:port]" without a scheme (use tls = true for https)')
    if any(c in location for c in "/?#@") or any(c.isspace() for c in location):
        raise ValueError('must be "host[:port]" (no path, user info or spaces)')
    port_text: str | None = None
    if location.startswith("["):
        end = location.find("]")
        if end < 0:
            raise ValueError('has an unclosed "[" (IPv6 is written "[::1]:8080")')
        host = location[1:end]
        rest = location[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError('must be "[ipv6]" or "[ipv6]:port"')
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'"{host}" is not a valid IPv6 address') from None
    else:
        if location.count(":") > 1:
            raise ValueError('IPv6 addresses must be in brackets, e.g. "[::1]:8080"')
        host, sep, port_text_or_empty = location.partition(":")
        if sep:
            port_text = port_text_or_empty
        problem = _hostname_problem(host, wildcard=False, underscore=True)
        if problem:
            raise ValueError(f'host "{host}": {problem}')
    if port_text is None:
        return host, 443 if tls else 80
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be an integer between 1 and 65535")
    return host, int(port_text)


def _url_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a route prefix (or its replacement), or ``None``."""
    if not path.startswith("/"):
        return 'must start with "/"'
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c in "?#" for c in path):
        return 'must not contain spaces, control characters, "?" or "#"'
    return None


def _ip_address(text: str, version: int) -> str:
    """Normalised IPv4/IPv6 address (IPv6 brackets optional) or ``ValueError``."""
    candidate = text[1:-1] if version == 6 and text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        address = None
    if address is None or address.version != version:
        raise ValueError(f'"{text}" is not an IPv{version} address')
    return str(address)


def _cidr(text: str, expected: str = "an IP address or CIDR") -> str:
    """Normalised CIDR for a CIDR or bare IP; host bits set is refused, not silently masked."""
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        masked = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'"{text}" is not {expected}') from None
    raise ValueError(f'"{text}" has host bits set (did you mean "{masked}"?)')


def _sticky_secret(text: str) -> bytes:
    """Decode the base64url sticky-cookie secret (padding optional) to exactly 32 bytes."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        raise ValueError("must be base64url (A-Z a-z 0-9 - _)")
    unpadded = text.rstrip("=")
    try:
        secret = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("must be base64url (A-Z a-z 0-9 - _)") from None
    if len(secret) != _STICKY_SECRET_BYTES:
        raise ValueError(
            f"must decode to {_STICKY_SECRET_BYTES} bytes, not {len(secret)} "
            '(generate one with: python3 -c "import base64,secrets;'
            "print(base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b'=').decode())\")"
        )
    return secret


def _dedupe(values: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(values))


def _defaults(model: type) -> dict[str, Any]:
    """Field defaults of an attrs model: the model is the one place where defaults live."""
    return {f.name: f.default for f in attrs.fields(model) if f.default is not attrs.NOTHING}


# --------------------------------------------------------------------------
# The loader: one method per table
# --------------------------------------------------------------------------


class _Loader:
    """Walks the TOML document top-down; later sections read facts of earlier ones."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.has_http = False
        self.has_https = False
        self.sticky_secret_set = False
        self.acme_configured = False
        self.app_keys: list[str] = []  # every [apps.<key>], valid or not, for default_app

    def load(self, data: Mapping[str, Any]) -> Config | None:
        if not isinstance(data, Mapping):
            self.ctx.error("(config)", "must be a table")
            return None
        top = _Section(self.ctx, data, "", _TOP_KEYS)

        listen_port = top.get_port("listen_port")
        listen_port_tls = top.get_port("listen_port_tls")
        if "listen_port" not in top and "listen_port_tls" not in top:
            top.error("listen_port", "at least one of listen_port and listen_port_tls is required")
        elif listen_port is not None and listen_port == listen_port_tls:
            top.error("listen_port_tls", "must differ from listen_port")
        self.has_http = "listen_port" in top
        self.has_https = "listen_port_tls" in top

        listen_ipv6 = top.get_bool("listen_ipv6", False)
        listen_v4 = self._listen_addresses(top, "listen_address_v4", 4)
        listen_v6 = self._listen_addresses(top, "listen_address_v6", 6)
        d = _defaults(Config)
        if listen_v4 is None:
            listen_v4 = d["listen_address_v4"]
        if listen_v6 is None:
            listen_v6 = ("::",) if listen_ipv6 else ()

        public_https_port = self._public_https_port(top)

        trusted = self._cidrs(top, "trusted_forwarded_proxies", aliases=True, required=False)

        request_max_body_size = d["request_max_body_size"]
        if "request_max_body_size" in top:
            try:
                request_max_body_size = parse_size(top.data["request_max_body_size"])
            except ValueError as exc:
                top.error("request_max_body_size", str(exc))

        sticky_secret = None
        if "sticky_cookie_secret" in top:
            self.sticky_secret_set = True
            text = top.get_str("sticky_cookie_secret")
            if text is not None:
                try:
                    sticky_secret = _sticky_secret(text)
                except ValueError as exc:
                    top.error("sticky_cookie_secret", str(exc))

        limits = {
            key: top.get_int(key, d[key], minimum=minimum)
            for key, minimum in (
                ("tcp_listen_backlog", 1),
                ("max_concurrent_streams", 1),
                ("max_clients", 1),
                ("max_clients_per_ip", 0),
            )
        }
        redact = top.get_bool("redact_query_in_access_log", d["redact_query_in_access_log"])
        response_timeout = top.get_number("upstream_response_timeout", d["upstream_response_timeout"])
        connect_timeout = top.get_number("upstream_connect_timeout", d["upstream_connect_timeout"], positive=True)
        poll_interval = top.get_number("certificate_poll_interval", d["certificate_poll_interval"], positive=True)
        shutdown_timeout = top.get_number("graceful_shutdown_timeout", d["graceful_shutdown_timeout"])
        workers = top.get_int("workers", d["workers"], minimum=1, maximum=MAX_WORKERS)

        experimental = self._experimental(top)
        apps = self._apps(top)
        default_app = self._default_app(top)

        return Config(
            apps=apps,
            listen_port=listen_port,
            listen_port_tls=listen_port_tls,
            listen_address_v4=listen_v4,
            listen_address_v6=listen_v6,
            listen_ipv6=listen_ipv6,
            public_https_port=public_https_port,
            **limits,
            trusted_forwarded_proxies=trusted or (),
            redact_query_in_access_log=redact,
            request_max_body_size=request_max_body_size,
            sticky_cookie_secret=sticky_secret,
            default_app=default_app,
            experimental=experimental,
            upstream_response_timeout=response_timeout,
            upstream_connect_timeout=connect_timeout,
            certificate_poll_interval=poll_interval,
            graceful_shutdown_timeout=shutdown_timeout,
            workers=workers,
        )

    # ---- top-level helpers ------------------------------------------------

    def _listen_addresses(self, top: _Section, key: str, version: int) -> tuple[str, ...] | None:
        """Addresses to bind; a wildcard mixed with specific addresses would collide on bind."""
        items = top.get_str_list(key)
        if items is None:
            return None
        if not items:
            if key not in top.failed:
                top.error(key, "must not be empty")
            return None
        addresses = []
        for item_path, text in items:
            try:
                addresses.append(_ip_address(text, version))
            except ValueError as exc:
                top.failed.add(key)
                self.ctx.error(item_path, str(exc))
        unique = _dedupe(addresses)
        wildcard = "0.0.0.0" if version == 4 else "::"
        if len(unique) > 1 and wildcard in unique:
            top.error(key, f'must not contain "{wildcard}" together with other addresses')
        return unique if key not in top.failed else None

    def _public_https_port(self, top: _Section) -> int | None:
        """``public_https_port``, accepting rpxy's old name ``https_redirection_port``."""
        public = top.get_port("public_https_port")
        alias = top.get_port("https_redirection_port")
        if "https_redirection_port" in top:
            self.ctx.warn("https_redirection_port is deprecated; use public_https_port")
            if top.ok("public_https_port") and top.ok("https_redirection_port") and public != alias:
                top.error("https_redirection_port", f"conflicts with public_https_port ({public}); remove it")
        for key in ("public_https_port", "https_redirection_port"):
            if key in top and not self.has_https:
                top.error(key, "requires listen_port_tls")
        return public if public is not None else alias

    def _cidrs(self, section: _Section, key: str, *, aliases: bool, required: bool) -> tuple[str, ...] | None:
        """CIDR list (string or array); provider aliases expand to their snapshot ranges."""
        items = section.get_str_list(key)
        if items is None:
            if key not in section and required:
                section.error(key, "is required")
            return None
        if not items and required and key not in section.failed:
            section.error(key, "must not be empty")
            return None
        expected = "an IP address or CIDR"
        if aliases:
            expected = "an IP address, a CIDR or one of " + ", ".join(f'"{name}"' for name in PROXY_ALIASES)
        cidrs: list[str] = []
        for item_path, text in items:
            if aliases and text.lower() in PROXY_ALIASES:
                cidrs.extend(PROXY_ALIASES[text.lower()])
                continue
            try:
                cidrs.append(_cidr(text, expected))
            except ValueError as exc:
                section.failed.add(key)
                self.ctx.error(item_path, str(exc))
        return _dedupe(cidrs)

    def _default_app(self, top: _Section) -> str | None:
        """Resolve ``default_app`` case-insensitively to the app key as written."""
        name = top.get_str("default_app")
        if name is None:
            return None
        if not self.has_http:
            top.warn("default_app", "has no effect without listen_port (it only applies to cleartext HTTP)")
        for key in self.app_keys:
            if key.lower() == name.lower():
                return key
        if self.app_keys:
            top.error("default_app", f'no app named "{name}" (apps: {", ".join(self.app_keys)})')
        return None

    # ---- [experimental] ---------------------------------------------------

    def _experimental(self, top: _Section) -> ExperimentalConfig:
        table = top.get_table("experimental")
        if table is None:
            return ExperimentalConfig()
        exp = _Section(self.ctx, table, "experimental", _EXPERIMENTAL_KEYS)
        self.acme_configured = "acme" in exp
        d = _defaults(ExperimentalConfig)
        return ExperimentalConfig(
            ignore_sni_consistency=exp.get_bool("ignore_sni_consistency", d["ignore_sni_consistency"]),
            connection_handling_timeout=exp.get_number("connection_handling_timeout", d["connection_handling_timeout"]),
            h3=self._h3(exp),
            cache=self._cache(exp),
            acme=self._acme(exp),
            tcp_recv_proxy_protocol=self._proxy_protocol(exp),
            metrics=self._metrics(exp, top),
        )

    def _subsection(self, parent: _Section, key: str, known: Collection[str]) -> _Section | None:
        table = parent.get_table(key)
        if table is None:
            return None
        self.ctx.not_yet_supported(parent.key_path(key))
        return _Section(self.ctx, table, parent.key_path(key), known)

    def _h3(self, exp: _Section) -> H3Config | None:
        h3 = self._subsection(exp, "h3", _H3_KEYS)
        if h3 is None:
            return None
        if not self.has_https:
            exp.warn("h3", "has no effect without listen_port_tls")
        d = _defaults(H3Config)
        body_size = None
        if "request_max_body_size" in h3:
            self.ctx.warn("experimental.h3.request_max_body_size is deprecated; use request_max_body_size")
            body_size = h3.get_int("request_max_body_size", None, minimum=0)
        # RFC 9000 section 4.6: a stream limit above 2^60 is a protocol error at the client.
        unistreams = h3.get_int("max_concurrent_unistream", d["max_concurrent_unistream"], minimum=1, maximum=_MAX_QUIC_STREAMS)
        if unistreams < 3:
            h3.warn(
                "max_concurrent_unistream",
                "below 3 breaks HTTP/3 (clients need control and two QPACK streams)",
            )
        return H3Config(
            alt_svc_max_age=h3.get_int("alt_svc_max_age", d["alt_svc_max_age"], minimum=0),
            max_concurrent_connections=h3.get_int(
                "max_concurrent_connections", d["max_concurrent_connections"], minimum=1
            ),
            max_concurrent_bidistream=h3.get_int(
                "max_concurrent_bidistream", d["max_concurrent_bidistream"], minimum=1, maximum=_MAX_QUIC_STREAMS
            ),
            max_concurrent_unistream=unistreams,
            max_idle_timeout=h3.get_int("max_idle_timeout", d["max_idle_timeout"], minimum=0),
            request_max_body_size=body_size,
        )

    def _cache(self, exp: _Section) -> CacheConfig | None:
        cache = self._subsection(exp, "cache", _CACHE_KEYS)
        if cache is None:
            return None
        d = _defaults(CacheConfig)
        each = cache.get_int("max_cache_each_size", d["max_cache_each_size"], minimum=1)
        on_memory = cache.get_int("max_cache_each_size_on_memory", d["max_cache_each_size_on_memory"], minimum=0)
        if (
            "max_cache_each_size" not in cache.failed
            and "max_cache_each_size_on_memory" not in cache.failed
            and on_memory > each
        ):
            cache.error("max_cache_each_size_on_memory", f"must not exceed max_cache_each_size ({each})")
        return CacheConfig(
            cache_dir=cache.get_str("cache_dir", d["cache_dir"]),
            max_cache_entry=cache.get_int("max_cache_entry", d["max_cache_entry"], minimum=1),
            max_cache_each_size=each,
            max_cache_each_size_on_memory=on_memory,
        )

    def _acme(self, exp: _Section) -> AcmeConfig | None:
        acme = self._subsection(exp, "acme", _ACME_KEYS)
        if acme is None:
            return None
        d = _defaults(AcmeConfig)
        email = acme.get_str("email", "", required=True)
        if email and "@" not in email:
            acme.error("email", "must be an e-mail address")
        dir_url = acme.get_str("dir_url", d["dir_url"])
        if acme.ok("dir_url") and not re.match(r"https?://[^/\s]+", dir_url):
            acme.error("dir_url", "must be an http(s):// URL")
        challenge = acme.get_str("challenge", d["challenge"])
        if acme.ok("challenge") and challenge not in ACME_CHALLENGES:
            acme.error("challenge", f"must be one of {', '.join(ACME_CHALLENGES)}")
        elif challenge == "tls-alpn-01" and not self.has_https:
            acme.warn("challenge", "tls-alpn-01 needs listen_port_tls")
        elif challenge == "http-01" and not self.has_http:
            acme.warn("challenge", "http-01 needs listen_port (the CA fetches the token over cleartext HTTP)")
        renew_before = None
        if "renew_before_days" in acme:
            renew_before = acme.get_number("renew_before_days", 1.0, positive=True)
        return AcmeConfig(
            email=email,
            dir_url=dir_url,
            registry_path=acme.get_str("registry_path", d["registry_path"]),
            challenge=challenge,
            renew_before_days=renew_before,
        )

    def _proxy_protocol(self, exp: _Section) -> ProxyProtocolConfig | None:
        pp = self._subsection(exp, "tcp_recv_proxy_protocol", _PROXY_PROTOCOL_KEYS)
        if pp is None:
            return None
        trusted = self._cidrs(pp, "trusted_proxies", aliases=False, required=True)
        timeout_ms = pp.get_int("timeout", _defaults(ProxyProtocolConfig)["timeout_ms"], minimum=0)
        return ProxyProtocolConfig(
            trusted_proxies=trusted or (),
            timeout_ms=timeout_ms or _PROXY_PROTOCOL_ZERO_TIMEOUT_MS,
        )

    def _metrics(self, exp: _Section, top: _Section) -> MetricsConfig | None:
        """``[experimental.metrics]``: the Prometheus endpoint's own listener (docs/metrics.md)."""
        metrics = self._subsection(exp, "metrics", _METRICS_KEYS)
        if metrics is None:
            return None
        d = _defaults(MetricsConfig)
        address = metrics.get_str("listen_address", d["listen_address"])
        if metrics.ok("listen_address"):
            try:
                address = _ip_address(address, 6 if ":" in address else 4)
            except ValueError as exc:
                metrics.error("listen_address", str(exc))
                address = d["listen_address"]
        port = metrics.get_int("listen_port", d["listen_port"], minimum=1, maximum=65535)
        if metrics.ok("listen_port"):
            for key in ("listen_port", "listen_port_tls"):
                if top.ok(key) and top.data[key] == port:
                    metrics.error("listen_port", f"must differ from {key} ({port})")
        path = metrics.get_str("path", d["path"])
        if metrics.ok("path") and (not path.startswith("/") or any(c in path for c in "?# \t\r\n")):
            metrics.error("path", 'must be an absolute path such as "/metrics" (no query, no spaces)')
            path = d["path"]
        return MetricsConfig(listen_address=address, listen_port=port, path=path)

    # ---- [apps] -----------------------------------------------------------

    def _apps(self, top: _Section) -> tuple[AppConfig, ...]:
        table = top.get_table("apps")
        if table is None or not table:
            if "apps" not in top.failed:
                top.error("apps", "is required and must define at least one app")
            return ()
        apps: list[AppConfig] = []
        seen_names: dict[str, str] = {}  # lower-case key -> key as written
        seen_servers: dict[str, str] = {}  # server_name -> app key
        for name, value in table.items():
            path = _join("apps", name)
            if name.lower() in seen_names:
                self.ctx.error(
                    path,
                    f"duplicates {_join('apps', seen_names[name.lower()])} (app names are case-insensitive)",
                )
                continue
            seen_names[name.lower()] = name
            self.app_keys.append(name)
            if not isinstance(value, Mapping):
                self.ctx.error(path, "must be a table")
                continue
            app = self._app(name, _Section(self.ctx, value, path, _APP_KEYS))
            if app is None:
                continue
            if app.server_name in seen_servers:
                other = _join("apps", seen_servers[app.server_name])
                self.ctx.error(f"{path}.server_name", f'"{app.server_name}" is already used by {other}')
            else:
                seen_servers[app.server_name] = name
            apps.append(app)
        return tuple(apps)

    def _app(self, name: str, app: _Section) -> AppConfig | None:
        server_name = app.get_str("server_name", required=True)
        if server_name is not None:
            problem = _hostname_problem(server_name, wildcard=True, underscore=False)
            if problem:
                app.error("server_name", f'"{server_name}" is not a valid host name: {problem}')
            else:
                server_name = server_name.lower()
        tls = self._tls(app)
        if "tls" not in app and not self.has_http:
            app.error("tls", "is required when listen_port is not set (the app would serve nothing)")
        routes = self._routes(app)
        if server_name is None or not app.ok("server_name"):
            return None
        return AppConfig(name=name, server_name=server_name, reverse_proxy=routes, tls=tls)

    def _tls(self, app: _Section) -> TlsConfig | None:
        table = app.get_table("tls")
        if table is None:
            return None
        tls = _Section(self.ctx, table, app.key_path("tls"), _TLS_KEYS)
        if not self.has_https:
            app.warn("tls", "has no effect without listen_port_tls")
        acme = tls.get_bool("acme", False)
        cert = tls.get_str("tls_cert_path")
        key = tls.get_str("tls_cert_key_path")
        client_ca = tls.get_str("client_ca_cert_path")
        if acme:
            if "tls_cert_path" in tls or "tls_cert_key_path" in tls:
                tls.error("acme", "must not be combined with tls_cert_path or tls_cert_key_path")
            if not self.acme_configured:
                tls.error("acme", "requires an [experimental.acme] table")
        else:
            for path_key in ("tls_cert_path", "tls_cert_key_path"):
                if path_key not in tls:
                    tls.error(path_key, "is required (unless acme = true)")
        if cert is not None:
            tls.readable_file("tls_cert_path", cert)
        if key is not None and tls.readable_file("tls_cert_key_path", key):
            mode = stat.S_IMODE(os.stat(key).st_mode)
            if mode & 0o077:
                tls.warn(
                    "tls_cert_key_path",
                    f'"{key}" is accessible by group or others (mode {mode:04o}); restrict it with chmod 600',
                )
        if client_ca is not None:
            tls.readable_file("client_ca_cert_path", client_ca)

        both_ports = self.has_http and self.has_https
        https_redirection = tls.get_bool("https_redirection", both_ports)
        if https_redirection and not both_ports:
            # Only reachable when explicitly set to true: the default follows the ports.
            tls.error("https_redirection", "requires both listen_port and listen_port_tls")
        return TlsConfig(
            tls_cert_path=cert,
            tls_cert_key_path=key,
            https_redirection=https_redirection and both_ports,
            client_ca_cert_path=client_ca,
            acme=acme,
        )

    def _routes(self, app: _Section) -> tuple[ReverseProxyConfig, ...]:
        if "reverse_proxy" not in app:
            app.error("reverse_proxy", "is required")
            return ()
        value = app.data["reverse_proxy"]
        if not isinstance(value, list) or not value:
            app.error("reverse_proxy", "must be a non-empty array of tables ([[...reverse_proxy]])")
            return ()
        routes: list[ReverseProxyConfig] = []
        seen_prefixes: dict[str, int] = {}  # route prefix ("/" for no path) -> index
        for index, entry in enumerate(value):
            path = f"{app.key_path('reverse_proxy')}[{index}]"
            if not isinstance(entry, Mapping):
                self.ctx.error(path, "must be a table")
                continue
            route = _Section(self.ctx, entry, path, _ROUTE_KEYS)
            built = self._route(route)
            prefix = built.path or "/"
            if route.ok("path") or "path" not in route:
                if prefix in seen_prefixes:
                    first = f"reverse_proxy[{seen_prefixes[prefix]}]"
                    if "path" in route:
                        route.error("path", f'"{prefix}" is already routed by {first}')
                    else:
                        self.ctx.error(
                            path,
                            f'has no path, so it is the "/" route, which {first} already covers (at most one per app)',
                        )
                else:
                    seen_prefixes[prefix] = index
            routes.append(built)
        return tuple(routes)

    def _route(self, route: _Section) -> ReverseProxyConfig:
        path = self._url_path(route, "path")
        replace_path = self._url_path(route, "replace_path")
        upstreams = self._upstreams(route)
        load_balance = route.get_choice(
            "load_balance", _defaults(ReverseProxyConfig)["load_balance"], LOAD_BALANCE_CHOICES
        )
        options = self._upstream_options(route)
        health_check = self._health_check(route)

        health_enabled = "health_check" in route and route.data["health_check"] is not False
        if load_balance == "primary_backup" and not health_enabled:
            route.error("load_balance", '"primary_backup" requires health_check')
        if load_balance == "sticky" and not self.sticky_secret_set:
            route.error("load_balance", '"sticky" requires the top-level sticky_cookie_secret')
        return ReverseProxyConfig(
            upstream=upstreams,
            path=path,
            replace_path=replace_path,
            load_balance=load_balance,  # type: ignore[arg-type]  # checked against LOAD_BALANCE_CHOICES
            upstream_options=options,
            health_check=health_check,
        )

    def _url_path(self, route: _Section, key: str) -> str | None:
        value = route.get_str(key)
        if value is None:
            return None
        problem = _url_path_problem(value)
        if problem:
            route.error(key, problem)
            return None
        return value

    def _upstreams(self, route: _Section) -> tuple[UpstreamConfig, ...]:
        if "upstream" not in route:
            route.error("upstream", "is required")
            return ()
        value = route.data["upstream"]
        if not isinstance(value, list):
            route.error("upstream", 'must be an array of tables like [{ location = "host:port" }]')
            return ()
        if not value:
            route.error("upstream", "must not be empty")
            return ()
        upstreams = []
        for index, entry in enumerate(value):
            path = f"{route.key_path('upstream')}[{index}]"
            if not isinstance(entry, Mapping):
                self.ctx.error(path, 'must be a table like { location = "host:port" }')
                continue
            upstream = self._upstream(_Section(self.ctx, entry, path, _UPSTREAM_KEYS))
            if upstream is not None:
                upstreams.append(upstream)
        return tuple(upstreams)

    def _upstream(self, up: _Section) -> UpstreamConfig | None:
        tls = up.get_bool("tls", False)
        location = up.get_str("location", required=True)
        ca_cert_path = up.get_str("ca_cert_path")
        if ca_cert_path is not None:
            up.readable_file("ca_cert_path", ca_cert_path)
            if not tls:
                up.warn("ca_cert_path", "has no effect without tls = true")
        if location is None:
            return None
        try:
            host, port = _parse_location(location, tls)
        except ValueError as exc:
            up.error("location", str(exc))
            return None
        return UpstreamConfig(location=location, host=host, port=port, tls=tls, ca_cert_path=ca_cert_path)

    def _upstream_options(self, route: _Section) -> frozenset[str]:
        items = route.get_str_list("upstream_options", allow_single=False)
        if items is None:
            return frozenset()
        options = set()
        for item_path, text in items:
            if text in UPSTREAM_OPTIONS:
                options.add(text)
            else:
                route.failed.add("upstream_options")
                self.ctx.error(item_path, f'unknown option "{text}" (expected one of: {", ".join(UPSTREAM_OPTIONS)})')
        if {"send_proxy_protocol_v1", "send_proxy_protocol_v2"} <= options:
            route.error("upstream_options", "send_proxy_protocol_v1 and send_proxy_protocol_v2 are mutually exclusive")
        if {"force_http11_upstream", "force_http2_upstream"} <= options:
            route.error("upstream_options", "force_http11_upstream and force_http2_upstream are mutually exclusive")
        if {"keep_original_host", "set_upstream_host"} <= options:
            route.warn("upstream_options", "keep_original_host wins over set_upstream_host (Host is kept)")
        return frozenset(options)

    def _health_check(self, route: _Section) -> HealthCheckConfig | None:
        if "health_check" not in route:
            return None
        value = route.data["health_check"]
        if isinstance(value, bool):
            return HealthCheckConfig() if value else None
        if not isinstance(value, Mapping):
            route.error("health_check", "must be true, false or a table")
            return None
        hc = _Section(self.ctx, value, route.key_path("health_check"), _HEALTH_CHECK_KEYS)
        d = _defaults(HealthCheckConfig)
        kind = hc.get_choice("type", d["type"], HEALTH_CHECK_TYPES)
        interval = hc.get_number("interval", d["interval"], positive=True)
        timeout = hc.get_number("timeout", d["timeout"], positive=True)
        if "interval" not in hc.failed and "timeout" not in hc.failed and timeout >= interval:
            hc.error("timeout", f"must be less than interval ({interval:g})")
        path = hc.get_str("path")
        expected_status = hc.get_int("expected_status", d["expected_status"], minimum=100, maximum=599)
        if kind == "http":
            if "path" not in hc:
                hc.error("path", 'is required when type = "http"')
            elif path is not None and not path.startswith("/"):
                hc.error("path", 'must start with "/"')
        elif "type" not in hc.failed:
            for http_only in ("path", "expected_status"):
                if http_only in hc:
                    hc.warn(http_only, 'is ignored when type = "tcp"')
            path = None
        return HealthCheckConfig(
            type=kind,  # type: ignore[arg-type]  # checked against HEALTH_CHECK_TYPES
            interval=interval,
            timeout=timeout,
            unhealthy_threshold=hc.get_int("unhealthy_threshold", d["unhealthy_threshold"], minimum=1),
            healthy_threshold=hc.get_int("healthy_threshold", d["healthy_threshold"], minimum=1),
            path=path,
            expected_status=expected_status,
        )
