"""ACME, sans network: challenge encoding, renewal timing, registry layout, the service's
scheduling with a Clock and a fake CA, and the TLS listener's ``acme-tls/1`` hook."""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
import time

import josepy as jose
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.task import Clock

from rpxy.acme.challenge import (
    ACME_IDENTIFIER_OID,
    acme_identifier_value,
    http01_token,
    jwk_thumbprint,
    key_authorization,
    private_key_pem,
    tls_alpn01_certificate,
)
from rpxy.acme.client import OrderFailed, OrderResult, _EmptyResponse, describe_error
from rpxy.acme.manager import AcmeService
from rpxy.acme.registry import OrderLock, Registry, directory_id
from rpxy.acme.schedule import BACKOFF_MAX, backoff_delay, renewal_time
from rpxy.config.load import load_config_bytes


def parse_config(text: str):
    return load_config_bytes(text.encode(), "config.toml")
from rpxy.tls.sni import SniContextMap
from tests.support.tlsgen import TlsHarness

UTC = datetime.timezone.utc
NAME = "acme.test"


# -- challenge material ----------------------------------------------------------------------


def test_acme_identifier_is_an_octet_string_of_the_sha256_of_the_key_authorization() -> None:
    key_authz = "token123.thumbprint456"
    value = acme_identifier_value(key_authz)
    assert value == bytes.fromhex("0420") + hashlib.sha256(key_authz.encode()).digest()
    assert len(value) == 34


def test_tls_alpn01_certificate_has_the_name_and_the_critical_extension() -> None:
    cert, key = tls_alpn01_certificate(NAME, "tok.thumb")
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [NAME]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical is True
    assert ext.oid.dotted_string == "1.3.6.1.5.5.7.1.31"
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # self-signed


def test_jwk_thumbprint_matches_rfc7638_and_josepy() -> None:
    # RFC 7638 section 3.1's example key and thumbprint.
    rfc_jwk = {
        "kty": "RSA",
        "e": "AQAB",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    }
    assert jwk_thumbprint(rfc_jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    public = key.public_key().to_json()
    assert jwk_thumbprint(public) == jose.b64encode(key.thumbprint()).decode()
    assert key_authorization("tok", "thumb") == "tok.thumb"


def test_http01_token_accepts_only_base64url_tokens() -> None:
    assert http01_token(b"/.well-known/acme-challenge/abc-DEF_123") == "abc-DEF_123"
    assert http01_token(b"/.well-known/acme-challenge/abc?x=1") == "abc"
    for path in (b"/.well-known/acme-challenge/", b"/.well-known/acme-challenge/../x", b"/other/abc",
                 b"/.well-known/acme-challenge/a/b"):
        assert http01_token(path) is None


def test_challenge_answer_is_a_non_empty_payload_of_empty_json() -> None:
    # acme's ClientNetwork sends a POST-as-GET (no validation!) for a falsy payload.
    response = _EmptyResponse()
    assert bool(response) is True
    assert response.json_dumps() == "{}"


def test_describe_error_keeps_the_ca_problem_document() -> None:
    from acme import messages

    error = messages.Error.with_code("rejectedIdentifier", detail="no such name")
    failed = describe_error(error)
    assert isinstance(failed, OrderFailed)
    assert "urn:ietf:params:acme:error:rejectedIdentifier" in failed.document
    assert "no such name" in failed.document
    assert describe_error(ConnectionRefusedError("nope")).document is None


# -- renewal timing ----------------------------------------------------------------------------


def test_renewal_when_a_third_of_the_lifetime_remains() -> None:
    start = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    assert renewal_time(start, start + datetime.timedelta(days=90)) == start + datetime.timedelta(days=60)
    assert renewal_time(start, start + datetime.timedelta(days=6)) == start + datetime.timedelta(days=4)


def test_renew_before_overrides_the_third() -> None:
    start = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    end = start + datetime.timedelta(days=90)
    assert renewal_time(start, end, renew_before=datetime.timedelta(days=7)) == end - datetime.timedelta(days=7)


def test_backoff_doubles_from_a_minute_to_a_day() -> None:
    assert backoff_delay(0) == 0
    assert [backoff_delay(n) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert backoff_delay(11) == 61440
    assert backoff_delay(12) == BACKOFF_MAX
    assert backoff_delay(1000) == BACKOFF_MAX


# -- registry ------------------------------------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)  # the modes must not depend on the caller's umask
    yield
    os.umask(previous)


def test_registry_layout_and_permissions(tmp_path, umask_022) -> None:
    reg = Registry(str(tmp_path / "reg"), "https://acme.example:14000/dir")
    assert os.path.basename(reg.path) == directory_id("https://acme.example:14000/dir")
    assert os.path.basename(reg.path).startswith("acme.example-")
    pem = reg.account_key_pem()
    assert pem == reg.account_key_pem()  # created once, then read back
    assert mode(reg.account_key_path) == 0o600
    assert mode(reg.root) == 0o700 and mode(reg.path) == 0o700
    reg.store(NAME, b"CERT", b"KEY")
    assert open(reg.cert_path(NAME), "rb").read() == b"CERT"
    assert mode(reg.key_path(NAME)) == 0o600
    assert mode(reg.cert_path(NAME)) == 0o644
    assert mode(reg.domain_path(NAME)) == 0o700
    assert sorted(os.listdir(reg.domain_path(NAME))) == ["cert.pem", "key.pem"]  # no temporary files left
    loaded = reg.load(NAME)
    assert (loaded.cert_pem, loaded.key_pem) == (b"CERT", b"KEY")
    before = reg.signature(NAME)
    time.sleep(0.01)
    reg.store(NAME, b"CERT2", b"KEY2")
    assert reg.signature(NAME) != before
    assert reg.load("other.test") is None


def test_registry_tightens_loose_folders_and_rejects_unsafe_names(tmp_path) -> None:
    root = tmp_path / "reg"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    reg = Registry(str(root), "https://ca/dir")
    reg.ensure()
    assert mode(root) == 0o700
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError):
            reg.domain_path(bad)


def test_a_second_lock_holder_is_refused_until_release(tmp_path) -> None:
    reg = Registry(str(tmp_path / "reg"), "https://ca/dir")
    first, second = reg.lock(), reg.lock()
    assert first.acquire()
    assert not second.acquire()
    assert str(os.getpid()) in second.holder()
    first.release()
    assert second.acquire()
    second.release()
    assert mode(first.path) == 0o600


# -- the service with a Clock and a fake CA -------------------------------------------------------


def issue_cert(name: str, *, days: float = 90, start: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = start or datetime.datetime.now(UTC) - datetime.timedelta(minutes=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


class FakeCa:
    """Stands in for :func:`rpxy.acme.client.order_certificate`; records what it saw."""

    def __init__(self, service_ref: list) -> None:
        self.calls: list[str] = []
        self.fail: OrderFailed | None = None
        self.seen_challenge = None
        self.seen_http01 = None
        self.service_ref = service_ref
        self.challenge_type = None

    def __call__(self, registry, *, dir_url, email, domain, challenge_type, install, uninstall):
        self.calls.append(domain)
        self.challenge_type = challenge_type
        install(domain, challenge_type, "tok_en", "tok_en.thumb")
        service = self.service_ref[0]
        try:
            self.seen_challenge = service.challenge(domain)
            self.seen_http01 = service.http01(domain, b"/.well-known/acme-challenge/tok_en")
            if self.fail is not None:
                raise self.fail
            cert, key = issue_cert(domain)
            return OrderResult(cert_pem=cert, key_pem=key)
        finally:
            uninstall(domain, "tok_en")


def make_service(tmp_path, *, extra: str = "", challenge: str | None = None):
    text = f"""
listen_port = 8080
listen_port_tls = 8443
certificate_poll_interval = 10
[apps.site]
server_name = "{NAME}"
tls = {{ acme = true }}
reverse_proxy = [{{ upstream = [{{ location = "127.0.0.1:1" }}] }}]
[experimental.acme]
email = "a@acme.test"
dir_url = "https://ca.test/dir"
registry_path = "{tmp_path / 'reg'}"
{f'challenge = "{challenge}"' if challenge else ''}
{extra}
"""
    config = parse_config(text).config
    clock = Clock()
    clock.advance(time.time())
    ref: list = []
    ca = FakeCa(ref)
    service = AcmeService(
        config, clock, issue=ca, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a), wall_clock=clock.seconds
    )
    ref.append(service)
    return service, clock, ca


def test_first_start_orders_serves_and_schedules_renewal(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path)
    assert service.missing(NAME) is not None
    service.startService()
    clock.advance(0)
    assert ca.calls == [NAME]
    entry = service.lookup(NAME)
    assert entry is not None and entry.app_name == "site"
    assert service.missing(NAME) is None
    assert service.lookup("other.test") is None
    # Challenge material existed during the order only, and only for the managed name.
    assert ca.seen_challenge is not None
    assert ca.seen_challenge.leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID).critical
    assert service.challenge(NAME) is None and service.challenges == {}
    # Renewal at two thirds of 90 days: nothing before.
    domain = service.domains[NAME]
    assert domain.next_check == pytest.approx(clock.seconds() + 60 * 86400, abs=120)
    clock.advance(59 * 86400)
    assert ca.calls == [NAME]
    clock.advance(2 * 86400)
    assert ca.calls == [NAME, NAME]
    service.stopService()


def test_failures_back_off_and_keep_the_last_good_certificate(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path, extra="renew_before_days = 100")  # due at once
    cert, key = issue_cert(NAME, days=90)
    Registry(str(tmp_path / "reg"), "https://ca.test/dir").store(NAME, cert, key)
    ca.fail = OrderFailed("the CA refused", '{"type": "urn:ietf:params:acme:error:rejectedIdentifier"}')
    service.startService()
    stored = service.lookup(NAME)
    assert stored is not None  # served from the registry before any order
    clock.advance(0)
    assert ca.calls == [NAME]
    assert service.lookup(NAME) is stored
    assert service.domains[NAME].failures == 1
    clock.advance(59)
    assert len(ca.calls) == 1
    clock.advance(1)
    assert len(ca.calls) == 2  # 60 s
    clock.advance(119)
    assert len(ca.calls) == 2
    clock.advance(1)
    assert len(ca.calls) == 3  # then 120 s
    ca.fail = None
    clock.advance(240)
    assert len(ca.calls) == 4
    assert service.lookup(NAME) is not stored
    assert service.domains[NAME].failures == 0
    # A success never re-orders within the minimum gap, even with a window that says "now".
    clock.advance(1800)
    assert len(ca.calls) == 4
    service.stopService()


def test_a_valid_stored_certificate_is_used_without_ordering(tmp_path) -> None:
    cert, key = issue_cert(NAME, days=90)
    Registry(str(tmp_path / "reg"), "https://ca.test/dir").store(NAME, cert, key)
    service, clock, ca = make_service(tmp_path)
    service.startService()
    clock.advance(0)
    clock.advance(3600)
    assert ca.calls == []
    assert service.lookup(NAME).leaf.serial_number == x509.load_pem_x509_certificate(cert).serial_number
    service.stopService()


def test_an_expired_stored_certificate_is_replaced(tmp_path) -> None:
    cert, key = issue_cert(NAME, days=1, start=datetime.datetime.now(UTC) - datetime.timedelta(days=3))
    Registry(str(tmp_path / "reg"), "https://ca.test/dir").store(NAME, cert, key)
    service, clock, ca = make_service(tmp_path)
    service.startService()
    clock.advance(0)
    assert ca.calls == [NAME]
    service.stopService()


def test_another_instance_holding_the_lock_is_waited_for(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path)
    reg = Registry(str(tmp_path / "reg"), "https://ca.test/dir")
    held = OrderLock(reg.lock().path)
    # flock conflicts between two open files of one process too: this stands for another instance.
    assert held.acquire()
    service.startService()
    clock.advance(0)
    assert ca.calls == [] and service.lookup(NAME) is None
    cert, key = issue_cert(NAME)
    reg.store(NAME, cert, key)
    held.release()
    clock.advance(10)  # the next poll picks the holder's certificate up
    assert ca.calls == []
    assert service.lookup(NAME).leaf.serial_number == x509.load_pem_x509_certificate(cert).serial_number
    service.stopService()


def test_http01_answers_only_the_pending_token_of_a_managed_name(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path, challenge="http-01")
    service.startService()
    clock.advance(0)
    assert ca.challenge_type == "http-01"
    assert ca.seen_http01 == b"tok_en.thumb"
    assert ca.seen_challenge is None  # no TLS-ALPN-01 certificate for an HTTP-01 order
    assert service.http01(NAME, b"/.well-known/acme-challenge/tok_en") is None  # order over
    service.stopService()


def test_wildcard_acme_apps_are_refused_with_a_log_line(tmp_path) -> None:
    text = f"""
listen_port_tls = 8443
[apps.site]
server_name = "*.acme.test"
tls = {{ acme = true }}
reverse_proxy = [{{ upstream = [{{ location = "127.0.0.1:1" }}] }}]
[experimental.acme]
email = "a@acme.test"
registry_path = "{tmp_path / 'reg'}"
"""
    service = AcmeService(parse_config(text).config, Clock(), run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    assert service.domains == {}


def test_config_keys() -> None:
    base = """
listen_port = 80
listen_port_tls = 443
[apps.site]
server_name = "acme.test"
tls = { acme = true }
reverse_proxy = [{ upstream = [{ location = "127.0.0.1:1" }] }]
[experimental.acme]
email = "a@acme.test"
"""
    loaded = parse_config(base)
    acme = loaded.config.experimental.acme
    assert (acme.challenge, acme.renew_before_days) == ("tls-alpn-01", None)
    assert acme.dir_url == "https://acme-v02.api.letsencrypt.org/directory"
    assert acme.registry_path == "./acme_registry"
    assert not any("not yet supported" in w for w in loaded.warnings)
    acme = parse_config(base + 'challenge = "http-01"\nrenew_before_days = 30\n').config.experimental.acme
    assert (acme.challenge, acme.renew_before_days) == ("http-01", 30.0)
    from rpxy.config.load import ConfigError

    with pytest.raises(ConfigError, match="experimental.acme.challenge: must be one of tls-alpn-01, http-01"):
        parse_config(base + 'challenge = "dns-01"\n')
    with pytest.raises(ConfigError, match="experimental.acme.renew_before_days"):
        parse_config(base + "renew_before_days = 0\n")


# -- the TLS listener's acme-tls/1 hook, in memory --------------------------------------------------


def acme_client_context(alpn: bytes = b"acme-tls/1") -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    ctx.set_alpn_protos([alpn])
    return ctx


def test_listener_serves_the_challenge_certificate_on_acme_tls_1(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path)
    service._install(NAME, "tls-alpn-01", "tok", "tok.thumb")
    harness = TlsHarness(SniContextMap())
    harness.factory.acme = service
    conn = harness.connect(NAME, acme_client_context())
    assert conn.client_error is None
    assert conn.client.get_alpn_proto_negotiated() == b"acme-tls/1"
    cert = conn.client.get_peer_certificate(as_cryptography=True)
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical and ext.value.value == acme_identifier_value("tok.thumb")
    assert harness.apps.built == []  # the HTTP application never saw this connection
    # Not under validation: refused, never a challenge certificate for another name.
    refused = harness.connect("other.test", acme_client_context())
    assert refused.client_error is not None
    assert harness.failures[-1].reason == "acme-tls/1 offered for a name with no ACME validation in progress"


def test_listener_refuses_a_managed_name_without_certificate_with_a_clear_reason(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path)
    harness = TlsHarness(SniContextMap())
    harness.factory.acme = service
    conn = harness.connect(NAME, acme_client_context(b"http/1.1"))
    assert conn.client_error is not None
    assert harness.failures[-1].reason == "app site has no certificate yet (ACME order pending)"
    assert harness.failures[-1].category == "unknown_sni"


def test_reload_adds_and_removes_managed_names(tmp_path) -> None:
    service, clock, ca = make_service(tmp_path)
    service.startService()
    clock.advance(0)
    assert ca.calls == [NAME]
    kept = service.domains[NAME]
    text = f"""
listen_port_tls = 8443
certificate_poll_interval = 10
[apps.site]
server_name = "{NAME}"
tls = {{ acme = true }}
reverse_proxy = [{{ upstream = [{{ location = "127.0.0.1:1" }}] }}]
[apps.new]
server_name = "new.test"
tls = {{ acme = true }}
reverse_proxy = [{{ upstream = [{{ location = "127.0.0.1:1" }}] }}]
[experimental.acme]
email = "a@acme.test"
dir_url = "https://ca.test/dir"
registry_path = "{tmp_path / 'reg'}"
"""
    service.update(parse_config(text).config)
    clock.advance(0)
    assert ca.calls == [NAME, "new.test"]  # the kept name is not ordered again
    assert service.domains[NAME] is kept and service.lookup("new.test") is not None
    service.update(parse_config(text.replace('[apps.site]\nserver_name = "acme.test"', '[apps.site]\nserver_name = "b.test"')).config)
    assert service.lookup(NAME) is None  # removed from the config: no longer served
    service.stopService()
