"""TLS settings that need their own proxy process: ``ignore_sni_consistency``,
``public_https_port``, certificate reload without restart (``certificate_poll_interval``),
and certificate/key files that are bad when the proxy starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import RPXY, Origin, Rpxy, curl, free_port, wait_for_port
from tests.support.http import echo_json
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsclient import TlsConnection, https_get, served_certificate, stdlib_context, wait_for_log
from tests.support.tlssite import Pki, tls_app


@pytest.fixture(scope="module")
def origins():
    started = {}
    try:
        for name in ("a", "b", "m"):
            started[name] = Origin(name)
        yield started
    finally:
        for origin in started.values():
            origin.stop()


def start_proxy(directory: Path, top: str, apps: str) -> Rpxy:
    tls_port = free_port()
    config = f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n{top}\n{apps}'
    directory.mkdir(parents=True, exist_ok=True)
    proxy = Rpxy(directory, config)
    proxy.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=proxy.proc)
    except Exception:
        proxy.stop()
        raise
    return proxy


# -- ignore_sni_consistency and public_https_port ------------------------------------------------


@pytest.fixture(scope="module")
def lenient(origins, tmp_path_factory):
    """A proxy with ignore_sni_consistency = true and public_https_port = 443."""
    pki = Pki(tmp_path_factory.mktemp("lenient-pki"))
    a, b = pki.site("site_a", "a.test"), pki.site("site_b", "b.test")
    secure = pki.site("secure", "mtls.test")
    apps = (
        tls_app(a, origins["a"].location)
        + tls_app(b, origins["b"].location)
        + tls_app(secure, origins["m"].location, client_ca=pki.client_ca_file)
    )
    proxy = start_proxy(
        tmp_path_factory.mktemp("lenient"), "public_https_port = 443\n[experimental]\nignore_sni_consistency = true", apps
    )
    proxy.pki = pki
    yield proxy
    proxy.stop()
    assert_no_tracebacks(proxy.system_log())


def test_ignore_sni_consistency_serves_the_host_not_the_sni(lenient):
    ctx = stdlib_context(lenient.pki.ca_file)
    response = https_get(lenient.tls_port, "a.test", ctx, host="b.test")
    assert response.status == 200
    assert echo_json(response.body)["origin"] == "b"  # routed by Host
    response = https_get(lenient.tls_port, "b.test", ctx, host="a.test")
    assert echo_json(response.body)["origin"] == "a"
    # An unknown Host is then an ordinary unknown host: 503, never the default app.
    assert https_get(lenient.tls_port, "a.test", ctx, host="nobody.test").status == 503


def test_ignore_sni_consistency_never_reaches_an_mtls_app_over_another_handshake(lenient):
    ctx = stdlib_context(lenient.pki.ca_file)
    # The a.test handshake asked for no client certificate: the mTLS app stays out of reach.
    assert https_get(lenient.tls_port, "a.test", ctx, host="mtls.test").status == 421
    # Its own handshake, with a certificate, still works (and may even name another app).
    cert_key = lenient.pki.client("carol", lenient.pki.client_ca)
    with_cert = stdlib_context(lenient.pki.ca_file, client_cert=cert_key)
    response = https_get(lenient.tls_port, "mtls.test", with_cert, host="mtls.test")
    assert (response.status, echo_json(response.body)["origin"]) == (200, "m")
    assert https_get(lenient.tls_port, "mtls.test", with_cert, host="a.test").status == 200


def test_public_https_port_443_is_left_out_of_the_redirect(lenient):
    result = curl("-i", "-H", "Host: a.test", f"http://127.0.0.1:{lenient.port}/p?q")
    head = result.stdout.decode("latin-1").lower()
    assert head.startswith("http/1.1 301 ")
    assert "\r\nlocation: https://a.test/p?q\r\n" in head


# -- certificate reload ----------------------------------------------------------------------------


def wait_for_serial(port: int, ctx, sni: str, serial: int, timeout: float = 20.0) -> int:
    """Handshake until the served certificate has ``serial`` (bounded); returns the last serial seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = served_certificate(port, sni, ctx).serial_number
        if seen == serial or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_certificate_reload_without_restart(origins, tmp_path):
    pki = Pki(tmp_path / "pki")
    a, b = pki.site("site_a", "a.test"), pki.site("site_b", "b.test")
    apps = tls_app(a, origins["a"].location) + tls_app(b, origins["b"].location)
    proxy = start_proxy(tmp_path / "proxy", "certificate_poll_interval = 0.5", apps)
    try:
        ctx = stdlib_context(pki.ca_file)
        first = a.leaf.cert.serial_number
        assert served_certificate(proxy.tls_port, "a.test", ctx).serial_number == first
        with TlsConnection(proxy.tls_port, "a.test", ctx) as before:
            # A connection made before the reload...
            new = pki.reissue(a, kind="rsa")  # another key type, too
            assert new.cert.serial_number != first
            assert wait_for_serial(proxy.tls_port, ctx, "a.test", new.cert.serial_number) == new.cert.serial_number
            # ...keeps working on its old certificate.
            assert before.peer_certificate.serial_number == first
            assert before.get("/echo", host="a.test").status == 200
        wait_for_log(proxy.system_log, r"reloaded the certificate of app site_a")
        assert https_get(proxy.tls_port, "a.test", ctx).status == 200
        # The other app was not touched.
        assert served_certificate(proxy.tls_port, "b.test", ctx).serial_number == b.leaf.cert.serial_number

        # A broken certificate file: the last good certificate stays, and the log names the file.
        a.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        # (A poll between the key and the certificate writes above may have logged a mismatch
        # already: look for the line about this file.)
        wait_for_log(
            proxy.system_log,
            r"ERROR .*keeping the previous certificate of app site_a: "
            + re.escape(f'apps.site_a.tls.tls_cert_path: "{a.cert}": invalid PEM certificate'),
        )
        for _ in range(3):
            assert served_certificate(proxy.tls_port, "a.test", ctx).serial_number == new.cert.serial_number
        assert https_get(proxy.tls_port, "a.test", ctx).status == 200

        # Repaired: picked up again.
        newest = pki.reissue(a)
        assert wait_for_serial(proxy.tls_port, ctx, "a.test", newest.cert.serial_number) == newest.cert.serial_number
        assert proxy.proc.poll() is None
        assert_no_tracebacks(proxy.system_log())
    finally:
        proxy.stop()


# -- bad certificate or key files at start ------------------------------------------------------------


def _write_config(tmp_path: Path, cert: Path, key: Path, client_ca: Path | None = None) -> Path:
    ca_line = f', client_ca_cert_path = "{client_ca}"' if client_ca else ""
    config = tmp_path / "config.toml"
    config.write_text(
        f'listen_port = {free_port()}\nlisten_port_tls = {free_port()}\nlisten_address_v4 = "127.0.0.1"\n'
        "[apps.site_a]\n"
        'server_name = "a.test"\n'
        f'tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}"{ca_line} }}\n'
        'reverse_proxy = [{ upstream = [{ location = "127.0.0.1:9" }] }]\n'
    )
    return config


def _bad_input_cases(pki: Pki, tmp_path: Path):
    a = pki.site("site_a", "a.test")
    other = pki.site("other", "a.test")
    missing = tmp_path / "missing.crt"
    directory_key = tmp_path / "key-is-a-directory"
    directory_key.mkdir()
    garbage_key = tmp_path / "garbage.key"
    garbage_key.write_bytes(b"this is not a key\n")
    os.chmod(garbage_key, 0o600)
    garbage_cert = tmp_path / "garbage.crt"
    garbage_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    not_a_ca = tmp_path / "leaf-as-ca.pem"
    not_a_ca.write_bytes(a.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    unreadable_key = tmp_path / "unreadable.key"
    unreadable_key.write_bytes(a.key.read_bytes())
    os.chmod(unreadable_key, 0)
    return {
        # name: (cert, key, client_ca, key path in the message, file in the message)
        "key without read permission": (a.cert, unreadable_key, None, "apps.site_a.tls.tls_cert_key_path", unreadable_key),
        "missing cert": (missing, a.key, None, "apps.site_a.tls.tls_cert_path", missing),
        "missing key": (a.cert, tmp_path / "missing.key", None, "apps.site_a.tls.tls_cert_key_path", tmp_path / "missing.key"),
        "unreadable key": (a.cert, directory_key, None, "apps.site_a.tls.tls_cert_key_path", directory_key),
        "garbage key": (a.cert, garbage_key, None, "apps.site_a.tls.tls_cert_key_path", garbage_key),
        "garbage cert": (garbage_cert, a.key, None, "apps.site_a.tls.tls_cert_path", garbage_cert),
        "key of another certificate": (a.cert, other.key, None, "apps.site_a.tls.tls_cert_key_path", other.key),
        "client CA not a CA": (a.cert, a.key, not_a_ca, "apps.site_a.tls.client_ca_cert_path", not_a_ca),
    }


CASES = [
    pytest.param("key without read permission", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-0 files")),
    "missing cert", "missing key", "unreadable key", "garbage key", "garbage cert", "key of another certificate",
    "client CA not a CA",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["run", "check"])
def test_bad_tls_files_fail_the_start_naming_app_key_and_file(tmp_path, case, mode):
    pki = Pki(tmp_path / "pki")
    cert, key, client_ca, key_path, filename = _bad_input_cases(pki, tmp_path)[case]
    config = _write_config(tmp_path, cert, key, client_ca)
    args = [str(RPXY), "--config", str(config)] + (["--check"] if mode == "check" else ["--log-dir", str(tmp_path / "logs")])
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if key_path in line]
    assert lines, result.stderr
    assert any(str(filename) in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr


def test_valid_tls_files_pass_the_check(tmp_path):
    pki = Pki(tmp_path / "pki")
    a = pki.site("site_a", "a.test", kind="rsa", key_format="pkcs1")
    result = subprocess.run(
        [str(RPXY), "--config", str(_write_config(tmp_path, a.cert, a.key, pki.client_ca_file)), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
