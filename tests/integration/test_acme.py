"""ACME through the real ``rpxy`` process against Debian's ``pebble`` (issue 6's proof).

Each test starts its own pebble (tests/support/pebble.py) whose validator is pointed at
the proxy's ports, with real validation. The proxy trusts pebble's API through
``REQUESTS_CA_BUNDLE``; clients check the served chain against pebble's root.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.conftest import Origin, Rpxy, curl_status, free_port, wait_for_port
from tests.support.pebble import Pebble, pebble_available
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsclient import wait_for_log
from tests.support.tlsgen import Authority, write_private

pytestmark = pytest.mark.skipif(not pebble_available(), reason="Debian's pebble is not installed (apt-get install pebble)")

NAME = "acme.test"
ISSUE_TIMEOUT = 90.0  # generous: two shared cores


def acme_config(
    *, tls_port: int, origin: Origin, dir_url: str, registry: Path, challenge: str | None = None,
    renew_before_days: float | None = None,
) -> str:
    extra = ""
    if challenge is not None:
        extra += f'challenge = "{challenge}"\n'
    if renew_before_days is not None:
        extra += f"renew_before_days = {renew_before_days}\n"
    return (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        "certificate_poll_interval = 1\n"
        f'[apps.site]\nserver_name = "{NAME}"\ntls = {{ acme = true, https_redirection = false }}\n'
        f'reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]\n'
        f'[experimental.acme]\ndir_url = "{dir_url}"\nemail = "admin@acme.test"\nregistry_path = "{registry}"\n'
        + extra
    )


def served_certificate(port: int, name: str, root_pem: bytes | None) -> x509.Certificate:
    """Handshake with SNI ``name``; with ``root_pem`` the chain and name are verified."""
    if root_pem is not None:
        ctx = ssl.create_default_context(cadata=root_pem.decode())
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def wait_for_certificate(port: int, name: str, root_pem: bytes | None, timeout: float = ISSUE_TIMEOUT) -> x509.Certificate:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return served_certificate(port, name, root_pem)
        except (ssl.SSLError, OSError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"no certificate served for {name}: {error}") from None
            time.sleep(0.5)


def registry_files(registry: Path) -> dict[str, Path]:
    (ca_dir,) = [p for p in registry.iterdir() if p.is_dir()]
    return {
        "ca_dir": ca_dir,
        "account": ca_dir / "account.key",
        "cert": ca_dir / NAME / "cert.pem",
        "key": ca_dir / NAME / "key.pem",
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ports():
    return {"http": free_port(), "tls": free_port()}


@pytest.fixture
def pebble(tmp_path, ports, monkeypatch):
    started = Pebble(tmp_path / "pebble", http_port=ports["http"], tls_port=ports["tls"])
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(started.api_ca_path))  # inherited by rpxy
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    yield started
    started.stop()


@pytest.fixture
def origin():
    started = Origin("acme-origin")
    yield started
    started.stop()


def start(tmp_path: Path, label: str, config: str, http_port: int) -> Rpxy:
    directory = tmp_path / label
    directory.mkdir()
    return Rpxy(directory, config, port=http_port)


def test_tls_alpn01_issues_serves_persists_and_restart_reuses(tmp_path, ports, pebble, origin) -> None:
    registry = tmp_path / "registry"
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry)
    proxy = start(tmp_path, "first", config, ports["http"])
    try:
        wait_for_port(ports["tls"], proc=proxy.proc)
        root = pebble.root_pem()
        cert = wait_for_certificate(ports["tls"], NAME, root)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [NAME]
        log = proxy.system_log()
        assert "answering a TLS-ALPN-01 validation for acme.test" in log
        assert "serving the certificate of acme.test from the CA" in log
        assert "/authZ/" in pebble.log() or "tls-alpn-01" in pebble.log()
        # A request through the new certificate reaches the app.
        assert curl_status("--cacert", "/dev/null", "-k", "--resolve", f"{NAME}:{ports['tls']}:127.0.0.1",
                           f"https://{NAME}:{ports['tls']}/") == 200
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())

    files = registry_files(registry)
    assert mode(registry) == 0o700 and mode(files["ca_dir"]) == 0o700
    assert mode(files["account"]) == 0o600
    assert mode(files["key"]) == 0o600
    assert mode(files["cert"].parent) == 0o700
    stored = x509.load_pem_x509_certificates(files["cert"].read_bytes())
    assert stored[0].serial_number == cert.serial_number
    assert len(stored) >= 2  # leaf + pebble's intermediate

    # Restart on the same registry: the stored certificate at once, no new order.
    again = start(tmp_path, "second", config, ports["http"])
    try:
        wait_for_port(ports["tls"], proc=again.proc)
        reused = wait_for_certificate(ports["tls"], NAME, root, timeout=30)
        assert reused.serial_number == cert.serial_number
        time.sleep(2)  # a few polls (certificate_poll_interval = 1)
        log = again.system_log()
        assert "serving the certificate of acme.test from the registry" in log
        assert "ordering a certificate" not in log
    finally:
        again.stop()
    assert_no_tracebacks(again.system_log())


def test_acme_certificate_is_served_over_http3_too(tmp_path, ports, pebble, origin) -> None:
    from tests.support.h3client import H3Client, run

    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=tmp_path / "registry")
    proxy = start(tmp_path, "h3", config + "[experimental.h3]\n", ports["http"])
    try:
        wait_for_port(ports["tls"], proc=proxy.proc)
        issued = wait_for_certificate(ports["tls"], NAME, pebble.root_pem())

        async def over_h3():  # type: ignore[no-untyped-def]
            # qh3's verifier cannot load pebble's root ("empty CA store"): the served leaf is
            # compared with the one the TCP handshake verified instead.
            async with H3Client(ports["tls"], NAME, None) as client:
                response = await client.get("/echo")
                return response, client.protocol._quic.tls._peer_certificate

        response, leaf = run(over_h3())
        assert response.status == 200
        served = x509.load_der_x509_certificate(leaf.public_bytes())
        assert served.serial_number == issued.serial_number
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


def test_http01_issues_through_the_cleartext_port(tmp_path, ports, pebble, origin) -> None:
    registry = tmp_path / "registry"
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry,
                         challenge="http-01")
    proxy = start(tmp_path, "proxy", config, ports["http"])
    try:
        cert = wait_for_certificate(ports["tls"], NAME, pebble.root_pem())
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        ) == [NAME]
        log = proxy.system_log()
        assert "answering an HTTP-01 validation for acme.test" in log
        assert "TLS-ALPN-01" not in log
        # Other paths under the prefix are not ours: routed as usual (the origin answers).
        assert curl_status("-H", f"Host: {NAME}", f"{proxy.url}/.well-known/acme-challenge/unknown") == 200
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


def test_forced_renewal_replaces_the_stored_certificate(tmp_path, ports, pebble, origin) -> None:
    registry = tmp_path / "registry"
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry)
    proxy = start(tmp_path, "first", config, ports["http"])
    root = pebble.root_pem()
    try:
        first = wait_for_certificate(ports["tls"], NAME, root)
    finally:
        proxy.stop()
    # A renewal window longer than pebble's lifetime: due at once.
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry,
                         renew_before_days=100000)
    renewing = start(tmp_path, "renewing", config, ports["http"])
    try:
        wait_for_log(renewing.system_log, r"serving the certificate of acme\.test from the CA", timeout=ISSUE_TIMEOUT)
        renewed = wait_for_certificate(ports["tls"], NAME, root, timeout=30)
        assert renewed.serial_number != first.serial_number
        log = renewing.system_log()
        assert log.index("from the registry") < log.index("from the CA")  # old one served meanwhile
        stored = x509.load_pem_x509_certificate(registry_files(registry)["cert"].read_bytes())
        assert stored.serial_number == renewed.serial_number
    finally:
        renewing.stop()
    assert_no_tracebacks(renewing.system_log())


def test_failed_renewal_keeps_the_certificate_and_logs_the_acme_error(tmp_path, ports, pebble, origin) -> None:
    registry = tmp_path / "registry"
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry)
    proxy = start(tmp_path, "first", config, ports["http"])
    root = pebble.root_pem()
    try:
        first = wait_for_certificate(ports["tls"], NAME, root)
    finally:
        proxy.stop()
    # Renewal due at once, by HTTP-01, but pebble's validator is pointed at a port nobody
    # listens on (pebble's httpPort is the proxy's listen_port; the proxy now listens elsewhere).
    # A new account: pebble 2.4 hands an account its still-valid authorization again
    # (whatever PEBBLE_AUTHZREUSE says), which would skip the validation altogether.
    registry_files(registry)["account"].unlink()
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry,
                         challenge="http-01", renew_before_days=100000)
    failing = start(tmp_path, "failing", config, free_port())
    try:
        match = wait_for_log(failing.system_log, r"ordering a certificate for acme\.test failed: .*", timeout=ISSUE_TIMEOUT)
        line = match.group(0)
        assert "ACME error document:" in line
        assert "urn:ietf:params:acme:error:" in line  # the CA's problem type
        assert "keeping the current certificate" in line
        assert "next attempt in 60 s" in line
        still = served_certificate(ports["tls"], NAME, root)
        assert still.serial_number == first.serial_number
        assert failing.proc.poll() is None
    finally:
        failing.stop()
    assert_no_tracebacks(failing.system_log())


def test_unreachable_ca_leaves_the_proxy_serving_and_logging(tmp_path, ports, origin) -> None:
    registry = tmp_path / "registry"
    dead = f"https://127.0.0.1:{free_port()}/dir"
    config = acme_config(tls_port=ports["tls"], origin=origin, dir_url=dead, registry=registry)
    proxy = start(tmp_path, "proxy", config, ports["http"])
    try:
        wait_for_port(ports["tls"], proc=proxy.proc)
        wait_for_log(proxy.system_log, r"ordering a certificate for acme\.test failed: .*the name has no certificate yet",
                     timeout=60)
        with socket.create_connection(("127.0.0.1", ports["tls"]), timeout=10) as raw:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                ctx.wrap_socket(raw, server_hostname=NAME)
        wait_for_log(proxy.system_log, r"app site has no certificate yet \(ACME order pending; last error: ")
        # Cleartext keeps working.
        assert curl_status("-H", f"Host: {NAME}", f"{proxy.url}/") == 200
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())


def test_acme_tls_alpn_is_refused_for_names_not_under_validation(tmp_path, ports, origin) -> None:
    registry = tmp_path / "registry"
    dead = f"https://127.0.0.1:{free_port()}/dir"
    proxy = start(tmp_path, "proxy", acme_config(tls_port=ports["tls"], origin=origin, dir_url=dead, registry=registry),
                  ports["http"])
    try:
        wait_for_port(ports["tls"], proc=proxy.proc)
        for name in (NAME, "other.test"):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["acme-tls/1"])
            with socket.create_connection(("127.0.0.1", ports["tls"]), timeout=10) as raw:
                with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                    ctx.wrap_socket(raw, server_hostname=name)
        wait_for_log(proxy.system_log, r"acme-tls/1 offered for a name with no ACME validation in progress")
    finally:
        proxy.stop()


def test_instances_sharing_a_registry_wait_for_the_lock_holder(tmp_path, ports, origin) -> None:
    """Another instance holds the lock: this one does not order, and serves what the holder stores."""
    from rpxy.acme.registry import OrderLock, Registry

    registry = tmp_path / "registry"
    dir_url = f"https://127.0.0.1:{free_port()}/dir"  # never reached: the lock is taken
    reg = Registry(str(registry), dir_url)
    reg.ensure()
    lock = OrderLock(os.path.join(reg.path, "lock"))
    # flock locks belong to the open file: a child process holds it, as another instance would.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT, 0o600); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'other-host 4242'); print('locked', flush=True); time.sleep(120)",
         lock.path],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proxy = start(tmp_path, "proxy", acme_config(tls_port=ports["tls"], origin=origin, dir_url=dir_url,
                                                     registry=registry), ports["http"])
        try:
            wait_for_log(proxy.system_log, r"another instance \(other-host 4242\) is ordering", timeout=30)
            ca = Authority("other instance's CA")
            leaf = ca.issue(NAME)
            os.makedirs(reg.domain_path(NAME), mode=0o700, exist_ok=True)
            write_private(Path(reg.key_path(NAME)), leaf.key_pem())
            Path(reg.cert_path(NAME)).write_bytes(leaf.cert_pem() + ca.cert_pem())
            cert = wait_for_certificate(ports["tls"], NAME, ca.cert_pem(), timeout=30)
            assert cert.serial_number == leaf.cert.serial_number
            assert "ordering a certificate for acme.test failed" not in proxy.system_log()
        finally:
            proxy.stop()
        assert_no_tracebacks(proxy.system_log())
    finally:
        holder.kill()
        holder.wait()


def test_a_reload_that_adds_acme_orders_without_restart(tmp_path, ports, pebble, origin) -> None:
    registry = tmp_path / "registry"
    full = acme_config(tls_port=ports["tls"], origin=origin, dir_url=pebble.dir_url, registry=registry)
    without = (
        f'listen_port = {{port}}\nlisten_port_tls = {ports["tls"]}\nlisten_address_v4 = "127.0.0.1"\n'
        f'[apps.plain]\nserver_name = "plain.test"\n'
        f'reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]\n'
    )
    proxy = start(tmp_path, "proxy", without, ports["http"])
    try:
        wait_for_port(ports["tls"], proc=proxy.proc)
        proxy.config_path.write_text(full.replace("{port}", str(ports["http"])))
        os.kill(proxy.proc.pid, signal.SIGHUP)
        cert = wait_for_certificate(ports["tls"], NAME, pebble.root_pem())
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        ) == [NAME]
        assert "answering a TLS-ALPN-01 validation for acme.test" in proxy.system_log()
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())
