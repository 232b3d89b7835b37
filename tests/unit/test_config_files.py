"""Loading from disk: TOML errors, files the config points at, and config-example.toml."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from rpxy.config import load as load_module
from rpxy.config.load import ConfigError, load_config_file, parse_config
from rpxy.config.model import TlsConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config-example.toml"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def errors_of_file(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    return caught.value.errors


# ---- the file itself -------------------------------------------------------------------


def tomllib_message(text: str) -> str:
    """tomllib's own wording (it differs between Python versions), to compare against exactly."""
    with pytest.raises(tomllib.TOMLDecodeError) as caught:
        tomllib.loads(text)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("listen_port = 8080\n[apps\n", "(at line 2, column 6)"),
        # Duplicate keys are a TOML error, not something the validator sees.
        ("listen_port = 8080\nlisten_port = 8081\n", "(at line 2, column 19)"),
    ],
)
def test_toml_syntax_error_names_the_file_line_and_column(tmp_path: Path, text: str, position: str) -> None:
    path = write(tmp_path / "config.toml", text)
    message = tomllib_message(text)
    assert message.endswith(position)
    assert errors_of_file(path) == [f"{path}: invalid TOML: {message}"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert errors_of_file(path) == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert errors_of_file(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"listen_port = 8080\n# caf\xe9\n")
    assert errors_of_file(path) == [f"{path}: invalid TOML: not UTF-8 (byte 24)"]


def test_validation_errors_from_a_file_keep_key_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        "listen_port = 0\n[apps.a]\nserver_name = 'a.example'\nreverse_proxy = [{ upstream = [] }]\n",
    )
    assert errors_of_file(path) == [
        "listen_port: must be an integer between 1 and 65535",
        "apps.a.reverse_proxy[0].upstream: must not be empty",
    ]


# ---- config-example.toml -------------------------------------------------------------------


def test_example_config_loads_without_errors_or_warnings() -> None:
    loaded = load_config_file(EXAMPLE)
    assert loaded.warnings == ()
    config = loaded.config
    assert [app.name for app in config.apps] == ["localhost", "another_localhost"]
    assert config.default_app == "another_localhost"
    assert config.request_max_body_size == 256 * 1024 * 1024


def _documented_keys() -> set[str]:
    """Every key written in the example, commented out or not (``key =`` or ``[table]``)."""
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^[#\s]*([a-z0-9_]+)\s*=", text, re.MULTILINE))
    keys |= set(re.findall(r"\b([a-z0-9_]+)\s*=", text))  # keys of inline tables
    keys |= {
        part for table in re.findall(r"^[#\s]*\[+([a-z0-9_.]+)\]+", text, re.MULTILINE) for part in table.split(".")
    }
    return keys


@pytest.mark.parametrize(
    "known",
    [
        "_TOP_KEYS",
        "_APP_KEYS",
        "_TLS_KEYS",
        "_ROUTE_KEYS",
        "_UPSTREAM_KEYS",
        "_HEALTH_CHECK_KEYS",
        "_EXPERIMENTAL_KEYS",
        "_H3_KEYS",
        "_CACHE_KEYS",
        "_ACME_KEYS",
        "_PROXY_PROTOCOL_KEYS",
    ],
)
def test_example_documents_every_key(known: str) -> None:
    missing = set(getattr(load_module, known)) - _documented_keys()
    assert missing == set()


def test_commented_out_examples_are_valid_once_enabled(tmp_path: Path) -> None:
    """Uncomment the example's optional sections (with real cert files) and load the result."""
    cert = write(tmp_path / "server.crt", "cert")
    key = write(tmp_path / "server.key", "key")
    ca = write(tmp_path / "ca.pem", "ca")
    text = EXAMPLE.read_text()
    enable = [
        "listen_port_tls = 8443",
        "public_https_port = 443",
        "max_concurrent_streams = 64",
        "[experimental.h3]",
        "[experimental.cache]",
        "[experimental.acme]",
        "[experimental.tcp_recv_proxy_protocol]",
        "[apps.with_acme]",
        "ignore_sni_consistency = false",
    ]
    lines = []
    in_enabled_table = False
    for line in text.splitlines():
        stripped = line.lstrip("# ")
        if line.startswith("# [") or line.startswith("# [["):
            in_enabled_table = stripped in enable
        if line.startswith("#") and (stripped in enable or (in_enabled_table and re.match(r"[a-z_]+ *=", stripped))):
            line = stripped
        elif not line.startswith("#"):
            in_enabled_table = False
        lines.append(line)
    text = "\n".join(lines).replace(
        "[[apps.localhost.reverse_proxy]]",
        f"tls = {{ tls_cert_path = '{cert}', tls_cert_key_path = '{key}', client_ca_cert_path = '{ca}' }}\n"
        "[[apps.localhost.reverse_proxy]]",
        1,
    )
    text = text.replace("[apps.another_localhost]", "[apps.another_localhost]\ntls = { acme = true }")
    loaded = parse_config(tomllib.loads(text))
    config = loaded.config
    assert config.listen_port_tls == 8443
    assert config.public_https_port == 443
    exp = config.experimental
    assert exp.h3 is not None and exp.cache is not None and exp.acme is not None
    assert exp.cache.max_cache_each_size_on_memory == 4096
    assert exp.tcp_recv_proxy_protocol is not None
    assert [app.name for app in config.apps] == ["localhost", "another_localhost", "with_acme"]
    assert config.apps[0].tls == TlsConfig(str(cert), str(key), True, str(ca), False)
    assert config.apps[2].tls == TlsConfig(https_redirection=True, acme=True)
    assert not [w for w in loaded.warnings if w.startswith("unknown key")]


# ---- files referenced by the config ---------------------------------------------------------------


def tls_config(cert: Path, key: Path, ports: str = "listen_port = 80\nlisten_port_tls = 443", extra: str = "") -> str:
    return f"""
{ports}
[apps.app1]
server_name = "app1.example.com"
tls = {{ tls_cert_path = '{cert}', tls_cert_key_path = '{key}'{extra} }}
reverse_proxy = [{{ upstream = [{{ location = "a" }}] }}]
"""


def test_tls_files_that_exist_are_accepted(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "c")
    key = write(tmp_path / "k.pem", "k", 0o600)
    loaded = parse_config(tomllib.loads(tls_config(cert, key)))
    assert loaded.config.apps[0].tls == TlsConfig(str(cert), str(key), https_redirection=True)
    assert not [w for w in loaded.warnings if "tls_cert_key_path" in w]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_others_warns(tmp_path: Path, mode: int) -> None:
    cert = write(tmp_path / "c.pem", "c")
    key = write(tmp_path / "k.pem", "k", mode)
    loaded = parse_config(tomllib.loads(tls_config(cert, key)))
    assert (
        f'apps.app1.tls.tls_cert_key_path: "{key}" is accessible by group or others (mode {mode:04o}); '
        "restrict it with chmod 600"
    ) in loaded.warnings


def test_https_redirection_defaults_follow_the_ports(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "c")
    key = write(tmp_path / "k.pem", "k")
    only_tls = parse_config(tomllib.loads(tls_config(cert, key, ports="listen_port_tls = 443"))).config
    assert only_tls.apps[0].tls is not None and only_tls.apps[0].tls.https_redirection is False
    explicit_off = parse_config(tomllib.loads(tls_config(cert, key, extra=", https_redirection = false"))).config
    assert explicit_off.apps[0].tls is not None and explicit_off.apps[0].tls.https_redirection is False
    # Explicitly false with one port is harmless, so it is accepted.
    off_one_port = parse_config(
        tomllib.loads(tls_config(cert, key, ports="listen_port_tls = 443", extra=", https_redirection = false"))
    ).config
    assert off_one_port.apps[0].tls is not None and off_one_port.apps[0].tls.https_redirection is False


def test_tls_table_without_tls_port_warns(tmp_path: Path) -> None:
    cert = write(tmp_path / "c.pem", "c")
    key = write(tmp_path / "k.pem", "k")
    loaded = parse_config(tomllib.loads(tls_config(cert, key, ports="listen_port = 80")))
    assert loaded.config.apps[0].tls is not None
    assert loaded.config.apps[0].tls.https_redirection is False
    assert "apps.app1.tls: has no effect without listen_port_tls" in loaded.warnings


def test_cert_path_that_is_a_directory(tmp_path: Path) -> None:
    key = write(tmp_path / "k.pem", "k")
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(tls_config(tmp_path, key)))
    assert caught.value.errors == [f'apps.app1.tls.tls_cert_path: cannot read "{tmp_path}": Is a directory']


def test_upstream_ca_cert_path(tmp_path: Path) -> None:
    ca = write(tmp_path / "ca.pem", "ca")
    text = f"""
listen_port = 80
[apps.app1]
server_name = "app1.example.com"
reverse_proxy = [{{ upstream = [{{ location = "a", tls = true, ca_cert_path = '{ca}' }}, {{ location = "b", ca_cert_path = '{ca}' }}] }}]
"""
    loaded = parse_config(tomllib.loads(text))
    first, second = loaded.config.apps[0].reverse_proxy[0].upstream
    assert (first.ca_cert_path, first.port, first.scheme) == (str(ca), 443, "https")
    assert second.ca_cert_path == str(ca)
    assert loaded.warnings == ("apps.app1.reverse_proxy[0].upstream[1].ca_cert_path: has no effect without tls = true",)


def test_relative_paths_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "c.pem", "c")
    write(tmp_path / "k.pem", "k")
    monkeypatch.chdir(tmp_path)
    config = parse_config(tomllib.loads(tls_config(Path("c.pem"), Path("k.pem")))).config
    assert config.apps[0].tls is not None and config.apps[0].tls.tls_cert_path == "c.pem"
    assert os.path.exists(config.apps[0].tls.tls_cert_path)
