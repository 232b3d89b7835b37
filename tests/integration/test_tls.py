"""TLS termination through the real ``rpxy`` process (issue 3's proof).

One proxy (module scope) serves, on one TLS port:

=========  ===================  ===================================================
app        server_name          certificate / notes
=========  ===================  ===================================================
site_a     a.test               EC key, PKCS#8; /ws goes to a WebSocket echo
site_b     b.test               RSA key, PKCS#1
site_c     c.test               EC key, SEC1, key file mode 0644 (warned about)
secure     mtls.test            client certificates from the client CA required
wild       *.example.test       wildcard certificate
exact      a.example.test       its own certificate (an exact name beats the wildcard)
sticky     sticky.test          sticky load balancing, no https_redirection
=========  ===================  ===================================================

Every app has its own origin process, so the origin's name in ``/echo`` proves which
app served a request. Clients: Python ``ssl`` (system OpenSSL), curl, pyOpenSSL
(cryptography's OpenSSL, for ML-KEM and exact versions/suites) and ``websockets``.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from websockets.sync.client import connect as ws_connect

from tests.integration.conftest import Origin, Rpxy, curl, free_port, raw_request, wait_for_port
from tests.support.bad_upstream import BadUpstream
from tests.support.http import echo_json, header_values
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsclient import (
    TlsConnection,
    dns_names,
    handshake_failure_pattern,
    https_get,
    pyopenssl_context,
    pyopenssl_handshake,
    retry,
    stdlib_context,
    wait_for_log,
)
from tests.support.tlssite import Pki, tls_app

STICKY_SECRET = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("tls-pki"))
    pki.sites = {
        "a": pki.site("site_a", "a.test", kind="ec", key_format="pkcs8"),
        "b": pki.site("site_b", "b.test", kind="rsa", key_format="pkcs1"),
        "c": pki.site("site_c", "c.test", kind="ec", key_format="sec1", key_mode=0o644),
        "secure": pki.site("secure", "mtls.test"),
        "wild": pki.site("wild", "*.example.test"),
        "exact": pki.site("exact", "a.example.test"),
        "sticky": pki.site("sticky", "sticky.test"),
    }
    return pki


@pytest.fixture(scope="module")
def origins():
    started = {}
    try:
        for name in ("a", "b", "c", "m", "w", "x"):
            started[name] = Origin(name)
        yield started
    finally:
        for origin in started.values():
            origin.stop()


@pytest.fixture(scope="module")
def ws_upstream():
    with BadUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(pki, origins, ws_upstream, tmp_path_factory):
    tls_port = free_port()
    s, o = pki.sites, origins
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        f'sticky_cookie_secret = "{STICKY_SECRET}"\n'
        + tls_app(
            s["a"],
            o["a"].location,
            routes=f'[[apps.site_a.reverse_proxy]]\npath = "/ws"\nupstream = [{{ location = "{ws_upstream.location}" }}]',
        )
        + tls_app(s["b"], o["b"].location)
        + tls_app(s["c"], o["c"].location)
        + tls_app(s["secure"], o["m"].location, client_ca=pki.client_ca_file)
        + tls_app(s["wild"], o["w"].location)
        + tls_app(s["exact"], o["x"].location)
        + tls_app(s["sticky"], o["a"].location, o["b"].location, https_redirection=False, route_options='load_balance = "sticky"')
    )
    started = Rpxy(tmp_path_factory.mktemp("tls-proxy"), config)
    started.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=started.proc)
        yield started
    finally:
        started.stop()
    assert_no_tracebacks(started.system_log())


@pytest.fixture(scope="module")
def verifying(pki) -> ssl.SSLContext:
    """Python ssl trusting only the test server CA (checks chain and host name)."""
    return stdlib_context(pki.ca_file)


def curl_https(proxy: Rpxy, pki: Pki, name: str, path: str = "/echo", *extra: str) -> subprocess.CompletedProcess:
    port = proxy.tls_port
    return curl(
        "--cacert", str(pki.ca_file), "--resolve", f"{name}:{port}:127.0.0.1", *extra, f"https://{name}:{port}{path}"
    )


def refused(proxy: Rpxy, pki: Pki, sni: str | None, category: str) -> None:
    """A Python ssl handshake with ``sni`` fails, and rpxy.log names this peer, the SNI and ``category``."""
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as raw:
        local_port = raw.getsockname()[1]
        ctx = stdlib_context(None) if sni is None else stdlib_context(pki.ca_file)
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            ctx.wrap_socket(raw, server_hostname=sni)
    wait_for_log(proxy.system_log, handshake_failure_pattern(local_port=local_port, sni=sni, category=category))


# -- 1. several domains on one port, each with its own certificate ---------------------------


@pytest.mark.parametrize(
    ("site", "origin", "key_type", "pem_label"),
    [
        ("a", "a", ec.EllipticCurvePublicKey, b"-----BEGIN PRIVATE KEY-----"),
        ("b", "b", rsa.RSAPublicKey, b"-----BEGIN RSA PRIVATE KEY-----"),
        ("c", "c", ec.EllipticCurvePublicKey, b"-----BEGIN EC PRIVATE KEY-----"),
    ],
)
def test_each_server_name_gets_its_own_certificate_and_origin(proxy, pki, verifying, site, origin, key_type, pem_label):
    served = pki.sites[site]
    assert served.key.read_bytes().startswith(pem_label)  # the key format under test was loaded
    with TlsConnection(proxy.tls_port, served.server_name, verifying) as conn:
        cert = conn.peer_certificate
        assert cert == served.leaf.cert  # exactly this app's certificate, not just "a valid one"
        assert dns_names(cert) == [served.server_name]
        assert isinstance(cert.public_key(), key_type)
        response = conn.get("/echo/hello", host=served.server_name)
    assert response.status == 200
    assert echo_json(response.body)["origin"] == origin
    # An independent client (curl, system OpenSSL) verifies the same chain and name.
    result = curl_https(proxy, pki, served.server_name, "/echo/curl")
    assert result.returncode == 0, result.stderr
    assert echo_json(result.stdout)["origin"] == origin


@pytest.mark.parametrize(("sni", "host"), [("A.TEST", "a.test"), ("a.test.", "a.test."), ("a.test.", "A.Test")])
def test_sni_is_matched_case_insensitively_and_without_trailing_dot(proxy, pki, sni, host):
    negotiated = pyopenssl_handshake(
        proxy.tls_port,
        sni,  # sent exactly as written (Python's ssl would normalise it first)
        pyopenssl_context(ca=pki.ca.cert),
        send=f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
    )
    assert negotiated.certificate == pki.sites["a"].leaf.cert
    assert negotiated.answer.startswith(b"HTTP/1.1 200 OK\r\n")


def test_key_readable_by_group_or_others_is_warned_about(proxy, pki):
    log = proxy.system_log()
    line = wait_for_log(proxy.system_log, r"^.*apps\.site_c\.tls\.tls_cert_key_path.*$").group(0)
    assert str(pki.sites["c"].key) in line
    assert "WARN" in line and "group or others" in line and "0644" in line
    for private in ("a", "b", "secure"):  # mode 0600: no warning
        assert str(pki.sites[private].key) not in log


# -- 2. unknown and missing SNI, non-TLS bytes -----------------------------------------------


def test_unknown_sni_is_refused_and_logged(proxy, pki):
    refused(proxy, pki, "nobody.test", "unknown_sni")
    # curl sees the refusal as an "unrecognized name" alert.
    result = curl_https(proxy, pki, "nobody.test")
    assert result.returncode == 35, result
    assert b"unrecognized name" in result.stderr


def test_missing_sni_is_refused_and_logged(proxy, pki):
    refused(proxy, pki, None, "no_sni")
    # curl to an IP literal sends no SNI at all.
    result = curl("--cacert", str(pki.ca_file), f"https://127.0.0.1:{proxy.tls_port}/echo")
    assert result.returncode == 35, result


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x01\x02garbage" * 50,
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello cut short, then the close
    ],
)
def test_non_tls_bytes_on_the_tls_port_are_dropped_without_harm(proxy, pki, verifying, payload):
    answer = raw_request(proxy.tls_port, payload, timeout=10)
    assert b"HTTP/" not in answer  # never answered as HTTP
    assert proxy.proc.poll() is None
    response = https_get(proxy.tls_port, "a.test", verifying)
    assert response.status == 200  # the listener still works
    wait_for_log(proxy.system_log, r"TLS handshake failed: peer=127\.0\.0\.1:\d+ sni=- category=handshake: .+")


def test_plain_http_on_the_tls_port_is_logged_as_such(proxy):
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert sock.recv(100) == b""  # closed, no bytes (no TLS alert to a non-TLS client)
    line = wait_for_log(proxy.system_log, handshake_failure_pattern(local_port=local_port, sni=None, category="handshake"))
    assert "plain HTTP" in line.group(0)


# -- 3. Host / SNI consistency: 421 -----------------------------------------------------------


def test_host_differing_from_sni_is_421(proxy, pki, verifying):
    response = https_get(proxy.tls_port, "a.test", verifying, host="b.test")
    assert response.status == 421
    assert response.body == b""
    # Both names are served: only the mismatch is refused.
    assert https_get(proxy.tls_port, "a.test", verifying, host="a.test").status == 200
    assert https_get(proxy.tls_port, "b.test", verifying, host="b.test").status == 200
    # A port in Host and another case are the same name.
    assert https_get(proxy.tls_port, "a.test", verifying, host=f"A.Test:{proxy.tls_port}").status == 200
    # curl with a forged Host header.
    result = curl_https(proxy, pki, "a.test", "/echo", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: b.test")
    assert result.stdout == b"421"


def test_421_applies_per_request_on_a_keep_alive_connection(proxy, verifying):
    with TlsConnection(proxy.tls_port, "a.test", verifying) as conn:
        assert conn.get("/echo", host="a.test").status == 200
        assert conn.get("/echo", host="b.test").status == 421
        ok = conn.get("/echo", host="a.test")
        assert ok.status == 200 and echo_json(ok.body)["origin"] == "a"


def test_host_unknown_to_every_app_over_tls_is_421_not_the_default(proxy, verifying):
    assert https_get(proxy.tls_port, "a.test", verifying, host="nobody.test").status == 421


# -- 4. 301 to https ----------------------------------------------------------------------------


def test_cleartext_request_is_redirected_to_the_tls_port(proxy):
    result = curl("-i", "-H", "Host: a.test", f"http://127.0.0.1:{proxy.port}/p?q")
    assert result.returncode == 0, result.stderr
    head = result.stdout.decode("latin-1")
    assert head.startswith("HTTP/1.1 301 ")
    assert f"\r\nlocation: https://a.test:{proxy.tls_port}/p?q\r\n" in head.lower()


def test_following_the_redirect_reaches_the_origin_over_tls(proxy, pki):
    result = curl(
        "-L",
        "--cacert", str(pki.ca_file),
        "--resolve", f"a.test:{proxy.port}:127.0.0.1",
        "--resolve", f"a.test:{proxy.tls_port}:127.0.0.1",
        "-w", "\n%{url_effective} %{num_redirects} %{scheme}",
        f"http://a.test:{proxy.port}/echo/p?q=1",
    )
    assert result.returncode == 0, result.stderr
    body, _, trailer = result.stdout.rpartition(b"\n")
    assert trailer.decode() == f"https://a.test:{proxy.tls_port}/echo/p?q=1 1 HTTPS"
    echo = echo_json(body)
    assert (echo["origin"], echo["uri"]) == ("a", "/echo/p?q=1")
    assert header_values(echo, "x-forwarded-proto") == ["https"]


def test_app_without_https_redirection_is_served_in_cleartext(proxy):
    result = curl("-H", "Host: sticky.test", f"http://127.0.0.1:{proxy.port}/echo")
    assert result.returncode == 0, result.stderr
    assert echo_json(result.stdout)["origin"] in ("a", "b")


# -- 5. mTLS ------------------------------------------------------------------------------------


def test_mtls_app_refuses_a_client_without_certificate(proxy, pki):
    result = curl_https(proxy, pki, "mtls.test")
    assert result.returncode != 0  # curl: handshake (35) or read (56) error
    assert result.stdout == b""
    # Python ssl, so that the peer in the log line is known.
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as raw:
        local_port = raw.getsockname()[1]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with stdlib_context(pki.ca_file).wrap_socket(raw, server_hostname="mtls.test") as tls:
                tls.sendall(b"GET /echo HTTP/1.1\r\nHost: mtls.test\r\n\r\n")
                tls.recv(1)  # TLS 1.3: the server's alert arrives after the client's Finished
    wait_for_log(proxy.system_log, handshake_failure_pattern(local_port=local_port, sni="mtls.test", category="client_cert"))


def test_mtls_app_serves_a_client_certificate_from_its_ca(proxy, pki):
    cert, key = pki.client("alice", pki.client_ca)
    result = curl_https(proxy, pki, "mtls.test", "/echo/me", "--cert", str(cert), "--key", str(key))
    assert result.returncode == 0, result.stderr
    assert echo_json(result.stdout)["origin"] == "m"
    response = https_get(proxy.tls_port, "mtls.test", stdlib_context(pki.ca_file, client_cert=(cert, key)))
    assert response.status == 200


def test_mtls_app_refuses_a_certificate_from_another_ca(proxy, pki):
    cert, key = pki.client("mallory", pki.foreign_ca)
    result = curl_https(proxy, pki, "mtls.test", "/echo", "--cert", str(cert), "--key", str(key))
    assert result.returncode != 0
    assert result.stdout == b""
    foreign = pki.foreign_ca.issue(client=True, common_name="mallory")
    negotiated = pyopenssl_handshake(
        proxy.tls_port,
        "mtls.test",
        pyopenssl_context(ca=pki.ca.cert, client_cert=(foreign.cert, foreign.key)),
        send=b"GET /echo HTTP/1.1\r\nHost: mtls.test\r\n\r\n",
    )
    assert b"200 OK" not in negotiated.answer
    wait_for_log(
        proxy.system_log,
        handshake_failure_pattern(local_port=negotiated.local_port, sni="mtls.test", category="client_cert"),
    )


def test_other_apps_on_the_port_need_no_client_certificate(proxy, pki, verifying):
    # Interleaved with refused mTLS handshakes: the refusals do not leak into other apps.
    assert curl_https(proxy, pki, "mtls.test").returncode != 0
    result = curl_https(proxy, pki, "a.test")
    assert result.returncode == 0, result.stderr
    assert echo_json(result.stdout)["origin"] == "a"
    assert https_get(proxy.tls_port, "b.test", verifying).status == 200


def test_no_resumption_across_apps_and_never_into_the_mtls_app(proxy, pki):
    ctx = pyopenssl_context(ca=pki.ca.cert, max_version=SSL.TLS1_2_VERSION)  # sessions usable at once
    first = pyopenssl_handshake(proxy.tls_port, "a.test", ctx)
    assert first.ok, first.error
    again = pyopenssl_handshake(proxy.tls_port, "a.test", ctx, session=first.session)
    assert again.ok and again.resumed  # control: resumption works within an app
    other = pyopenssl_handshake(proxy.tls_port, "b.test", ctx, session=first.session)
    assert other.ok and not other.resumed
    assert other.certificate == pki.sites["b"].leaf.cert
    # a.test's session offered to the mTLS app: a full handshake, which needs a certificate.
    into_mtls = pyopenssl_handshake(
        proxy.tls_port, "mtls.test", ctx, session=first.session, send=b"GET /echo HTTP/1.1\r\nHost: mtls.test\r\n\r\n"
    )
    assert not into_mtls.resumed
    assert b"200 OK" not in into_mtls.answer


def test_host_of_the_mtls_app_over_another_apps_handshake_is_421(proxy, verifying):
    response = https_get(proxy.tls_port, "a.test", verifying, host="mtls.test")
    assert response.status == 421


# -- 6. post-quantum key exchange -----------------------------------------------------------------


def test_client_offering_only_x25519mlkem768_completes_the_handshake(proxy, pki):
    negotiated = pyopenssl_handshake(
        proxy.tls_port,
        "a.test",
        pyopenssl_context(ca=pki.ca.cert, groups="X25519MLKEM768"),
        send=b"GET /echo HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    assert negotiated.ok, negotiated.error
    assert (negotiated.version, negotiated.group) == ("TLSv1.3", "X25519MLKEM768")
    assert negotiated.answer.startswith(b"HTTP/1.1 200 OK\r\n")


def test_x25519mlkem768_is_preferred_over_a_classical_key_share(proxy, pki):
    # The client lists X25519 first (so it sends only an X25519 key share) but also supports
    # ML-KEM: the server asks for the ML-KEM share (HelloRetryRequest) rather than settle.
    negotiated = pyopenssl_handshake(
        proxy.tls_port, "b.test", pyopenssl_context(ca=pki.ca.cert, groups="X25519:X25519MLKEM768")
    )
    assert negotiated.group == "X25519MLKEM768"


@pytest.mark.parametrize(("groups", "expected"), [("X25519", "x25519"), ("P-256", "secp256r1"), ("P-384", "secp384r1")])
def test_classical_groups_still_work(proxy, pki, groups, expected):
    negotiated = pyopenssl_handshake(proxy.tls_port, "a.test", pyopenssl_context(ca=pki.ca.cert, groups=groups))
    assert negotiated.ok, negotiated.error
    assert negotiated.group == expected  # OpenSSL's names


def test_groups_outside_the_list_are_refused(proxy, pki):
    negotiated = pyopenssl_handshake(proxy.tls_port, "a.test", pyopenssl_context(ca=pki.ca.cert, groups="P-521"))
    assert not negotiated.ok


def test_default_clients_still_connect(proxy, pki, verifying):
    # curl and Python ssl use the system OpenSSL (3.0: no ML-KEM).
    result = curl_https(proxy, pki, "a.test", "/echo", "-w", "\n%{ssl_verify_result}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\n0")
    assert https_get(proxy.tls_port, "b.test", verifying).status == 200
    # pyOpenSSL with its defaults gets the post-quantum group.
    negotiated = pyopenssl_handshake(proxy.tls_port, "a.test", pyopenssl_context(ca=pki.ca.cert))
    assert negotiated.group == "X25519MLKEM768"


# -- 7. hardened defaults --------------------------------------------------------------------------

OLD = "DEFAULT:@SECLEVEL=0"  # lets the client itself offer what the server must refuse


TLS12 = SSL.TLS1_2_VERSION


@pytest.mark.parametrize(
    ("label", "sni", "options", "reason"),
    [
        ("TLS 1.0", "a.test", dict(min_version=SSL.TLS1_VERSION, max_version=SSL.TLS1_VERSION, ciphers=OLD), "unsupported protocol"),
        ("TLS 1.1", "a.test", dict(min_version=SSL.TLS1_1_VERSION, max_version=SSL.TLS1_1_VERSION, ciphers=OLD), "unsupported protocol"),
        ("ECDHE-ECDSA CBC", "a.test", dict(max_version=TLS12, ciphers="ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"), "no shared cipher"),
        ("ECDHE-ECDSA CBC SHA-384", "a.test", dict(max_version=TLS12, ciphers="ECDHE-ECDSA-AES256-SHA384"), "no shared cipher"),
        ("ECDHE-RSA CBC", "b.test", dict(max_version=TLS12, ciphers="ECDHE-RSA-AES128-SHA256"), "no shared cipher"),
        ("RSA key exchange", "b.test", dict(max_version=TLS12, ciphers="AES128-GCM-SHA256"), "no shared cipher"),
        ("DHE", "b.test", dict(max_version=TLS12, ciphers="DHE-RSA-AES128-GCM-SHA256"), "no shared cipher"),
    ],
)
def test_weak_protocols_and_ciphers_are_refused(proxy, pki, label, sni, options, reason):
    negotiated = pyopenssl_handshake(proxy.tls_port, sni, pyopenssl_context(ca=pki.ca.cert, **options))
    assert not negotiated.ok, f"{label} was accepted: {negotiated}"
    # The server refused it (not the client): its log says why.
    line = wait_for_log(
        proxy.system_log, handshake_failure_pattern(local_port=negotiated.local_port, sni=sni, category="handshake")
    )
    assert reason in line.group(0)


@pytest.mark.parametrize(
    ("sni", "cipher"),
    [("a.test", "ECDHE-ECDSA-AES128-GCM-SHA256"), ("a.test", "ECDHE-ECDSA-CHACHA20-POLY1305"), ("b.test", "ECDHE-RSA-AES256-GCM-SHA384")],
)
def test_tls12_with_ecdhe_aead_is_accepted(proxy, pki, sni, cipher):
    negotiated = pyopenssl_handshake(
        proxy.tls_port,
        sni,
        pyopenssl_context(ca=pki.ca.cert, max_version=SSL.TLS1_2_VERSION, ciphers=cipher),
        send=f"GET /echo HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode(),
    )
    assert negotiated.ok, negotiated.error
    assert (negotiated.version, negotiated.cipher) == ("TLSv1.2", cipher)
    assert negotiated.answer.startswith(b"HTTP/1.1 200 OK\r\n")


def test_tls13_is_accepted(proxy, pki):
    negotiated = pyopenssl_handshake(
        proxy.tls_port, "a.test", pyopenssl_context(ca=pki.ca.cert, min_version=SSL.TLS1_3_VERSION)
    )
    assert negotiated.ok, negotiated.error
    assert negotiated.version == "TLSv1.3"


def test_server_cipher_order_wins_in_tls12(proxy, pki):
    client_order = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
    negotiated = pyopenssl_handshake(
        proxy.tls_port, "a.test", pyopenssl_context(ca=pki.ca.cert, max_version=SSL.TLS1_2_VERSION, ciphers=client_order)
    )
    assert negotiated.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_client_initiated_renegotiation_is_refused(proxy, pki):
    ctx = pyopenssl_context(ca=pki.ca.cert, max_version=SSL.TLS1_2_VERSION)
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"a.test")
        conn.set_connect_state()
        deadline = time.monotonic() + 10
        retry(conn.do_handshake, sock, deadline)
        assert conn.get_protocol_version_name() == "TLSv1.2"
        assert conn.renegotiate()
        with pytest.raises(SSL.Error, match="no renegotiation"):
            retry(conn.do_handshake, sock, deadline)  # the new ClientHello; the server refuses it
    assert proxy.proc.poll() is None
    assert https_get(proxy.tls_port, "a.test", stdlib_context(pki.ca_file)).status == 200


# -- 10. headers sent upstream and the sticky cookie ------------------------------------------------


def test_origin_sees_https_forwarding_headers(proxy, verifying):
    response = https_get(proxy.tls_port, "a.test", verifying)
    echo = echo_json(response.body)
    assert header_values(echo, "x-forwarded-proto") == ["https"]
    assert header_values(echo, "x-forwarded-ssl") == ["on"]
    assert header_values(echo, "x-forwarded-port") == [str(proxy.tls_port)]


def test_origin_sees_http_forwarding_headers_in_cleartext(proxy):
    result = curl("-H", "Host: sticky.test", f"http://127.0.0.1:{proxy.port}/echo")
    echo = echo_json(result.stdout)
    assert header_values(echo, "x-forwarded-proto") == ["http"]
    assert header_values(echo, "x-forwarded-ssl") == ["off"]
    assert header_values(echo, "x-forwarded-port") == [str(proxy.port)]


def test_sticky_cookie_is_secure_over_tls_only(proxy, verifying):
    over_tls = https_get(proxy.tls_port, "sticky.test", verifying).all("set-cookie")
    assert len(over_tls) == 1 and over_tls[0].startswith("rpxy_sticky_token=")
    assert over_tls[0].endswith("; Secure"), over_tls
    result = curl("-i", "-H", "Host: sticky.test", f"http://127.0.0.1:{proxy.port}/echo")
    cookies = [line for line in result.stdout.decode("latin-1").split("\r\n") if line.lower().startswith("set-cookie:")]
    assert len(cookies) == 1 and "rpxy_sticky_token=" in cookies[0]
    assert "secure" not in cookies[0].lower()


# -- 11. wildcard server names ----------------------------------------------------------------------


def test_wildcard_app_serves_one_label_with_the_wildcard_certificate(proxy, pki, verifying):
    with TlsConnection(proxy.tls_port, "x.example.test", verifying) as conn:  # ssl checks the wildcard
        assert conn.peer_certificate == pki.sites["wild"].leaf.cert
        response = conn.get("/echo", host="x.example.test")
    assert echo_json(response.body)["origin"] == "w"
    result = curl_https(proxy, pki, "other.example.test")
    assert result.returncode == 0, result.stderr
    assert echo_json(result.stdout)["origin"] == "w"


def test_exact_name_wins_over_the_wildcard(proxy, pki, verifying):
    with TlsConnection(proxy.tls_port, "a.example.test", verifying) as conn:
        assert conn.peer_certificate == pki.sites["exact"].leaf.cert
        response = conn.get("/echo", host="a.example.test")
    assert echo_json(response.body)["origin"] == "x"


@pytest.mark.parametrize("name", ["a.b.example.test", "example.test"])
def test_wildcard_matches_exactly_one_label(proxy, pki, name):
    refused(proxy, pki, name, "unknown_sni")


def test_wildcard_host_must_still_equal_the_sni(proxy, verifying):
    # Same app, different name: Host ≠ SNI is domain fronting all the same.
    assert https_get(proxy.tls_port, "x.example.test", verifying, host="y.example.test").status == 421


# -- 12. WebSocket over TLS ------------------------------------------------------------------------


def test_websocket_over_tls(proxy, pki, ws_upstream):
    ctx = stdlib_context(pki.ca_file)
    sock = socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10)
    with ws_connect(
        f"wss://a.test:{proxy.tls_port}/ws",
        sock=sock,
        ssl=ctx,
        server_hostname="a.test",
        proxy=None,
        compression=None,
        open_timeout=10,
        close_timeout=5,
    ) as ws:
        ws.send("hello over TLS")
        assert ws.recv(timeout=10) == "hello over TLS"
        payload = bytes(range(256)) * 64
        ws.send(payload)
        assert ws.recv(timeout=10) == payload
    upgrade = ws_upstream.wait_for_request("/ws")
    assert upgrade is not None and upgrade.upgrade
    assert ("x-forwarded-proto", "https") in upgrade.headers


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def test_tunnel_over_tls_is_closed_when_the_upstream_closes(proxy, verifying):
    """The upstream ends the WebSocket (close frame, then TCP close): the proxy must close the
    client's TLS connection too (close_notify + FIN), not leave it open until the client gives up."""
    with TlsConnection(proxy.tls_port, "a.test", verifying) as conn:
        conn.send(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        head = conn.read_head()
        assert head.status == 101
        conn.send(_masked_frame(1, b"ping?"))
        assert conn._read_exact(7) == b"\x81\x05ping?"
        conn.send(_masked_frame(8, b"\x03\xe8"))  # close, 1000
        assert conn._read_exact(4) == b"\x88\x02\x03\xe8"
        assert conn.wait_closed(timeout=5), "the proxy kept the client's TLS connection open"
