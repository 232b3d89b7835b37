"""The ACME families of the metrics endpoint, against Debian's ``pebble`` with real
TLS-ALPN-01 validation (the same setup as tests/integration/test_acme.py)."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Origin, Rpxy, free_port, wait_for_port
from tests.support.pebble import Pebble, pebble_available

pytestmark = pytest.mark.skipif(not pebble_available(), reason="Debian's pebble is not installed (apt-get install pebble)")

NAME = "acme.test"
ISSUE_TIMEOUT = 90.0  # generous: two shared cores


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def served_certificate(port: int, root_pem: bytes) -> x509.Certificate:
    context = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_acme_state_and_expiry_are_exported(tmp_path, monkeypatch):
    http_port, tls_port, metrics_port = free_port(), free_port(), free_port()
    pebble = Pebble(tmp_path / "pebble", http_port=http_port, tls_port=tls_port)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pebble.api_ca_path))  # inherited by rpxy
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    origin = Origin("acme-origin")
    directory = tmp_path / "proxy"
    directory.mkdir()
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        f'[apps.site]\nserver_name = "{NAME}"\ntls = {{ acme = true, https_redirection = false }}\n'
        f'reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]\n'
        f'[experimental.acme]\ndir_url = "{pebble.dir_url}"\nemail = "admin@acme.test"\n'
        f'registry_path = "{tmp_path / "registry"}"\n'
        f"[experimental.metrics]\nlisten_port = {metrics_port}\n"
    )
    proxy = None
    try:
        proxy = Rpxy(directory, config, port=http_port)
        wait_for_port(metrics_port, proc=proxy.proc)
        first = scrape(metrics_port)
        states = {labels for (name, labels), value in first.items() if name == "rpxy_acme_certificate_state" and value}
        assert len(states) == 1
        (state,) = states
        assert dict(state)["domain"] == NAME and dict(state)["state"] in ("ordering", "pending", "valid")
        root = pebble.root_pem()
        deadline = time.monotonic() + ISSUE_TIMEOUT
        while True:
            try:
                cert = served_certificate(tls_port, root)
                break
            except (ssl.SSLError, OSError):
                assert time.monotonic() < deadline, "no certificate issued in time"
                time.sleep(0.5)
        after = scrape(metrics_port)
        assert after[("rpxy_acme_certificate_state", (("domain", NAME), ("state", "valid")))] == 1
        expiry = after[("rpxy_acme_certificate_expiry_timestamp_seconds", (("domain", NAME),))]
        assert expiry == cert.not_valid_after_utc.timestamp()
    finally:
        if proxy is not None:
            proxy.stop()
        origin.stop()
        pebble.stop()
