"""Certificate and key loading: formats, mismatches, unreadable files, warnings."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from rpxy.tls import SniContextMap, TlsMaterialError, load_certified_key
from rpxy.tls.keys import certified_key_from_pem, name_is_covered, parse_client_cas, parse_private_key

from tests.support.tlsgen import Authority, TlsHarness, app_config, client_context, make_app_tls, new_key, write_private


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority("keys test CA")


@pytest.mark.parametrize(
    ("kind", "key_format", "marker"),
    [
        ("ec", "pkcs8", b"-----BEGIN PRIVATE KEY-----"),
        ("rsa", "pkcs8", b"-----BEGIN PRIVATE KEY-----"),
        ("rsa", "pkcs1", b"-----BEGIN RSA PRIVATE KEY-----"),
        ("ec", "sec1", b"-----BEGIN EC PRIVATE KEY-----"),
    ],
)
def test_key_formats_load_and_serve(tmp_path, ca, kind, key_format, marker):
    leaf = ca.issue("example.com", kind=kind)
    cert_path, key_path = leaf.write(tmp_path, "site", key_format=key_format)
    assert key_path.read_bytes().startswith(marker)

    pair = load_certified_key(str(cert_path), str(key_path), server_name="example.com")
    assert pair.leaf == leaf.cert
    assert pair.chain[1] == ca.cert  # the issuer in the file is sent as the chain
    assert pair.warnings == ()

    # And the key really signs a handshake.
    contexts = SniContextMap.from_apps([app_config("site", "example.com", cert_path, key_path)])
    session = TlsHarness(contexts).connect("example.com", client_context(trust=ca))
    assert session.established, session.client_error
    assert session.server_cert() == leaf.cert


def test_sec1_key_with_ec_parameters_block(tmp_path, ca):
    """``openssl ecparam -genkey`` writes an EC PARAMETERS block before the key."""
    leaf = ca.issue("example.com")
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    pem = params + leaf.key_pem("sec1")
    assert parse_private_key(pem).private_numbers() == leaf.key.private_numbers()


def test_mismatched_key_names_both_files(tmp_path, ca):
    cert_path, _ = ca.issue("example.com").write(tmp_path, "one")
    _, other_key = ca.issue("example.com").write(tmp_path, "two")
    with pytest.raises(TlsMaterialError) as info:
        load_certified_key(str(cert_path), str(other_key))
    message = str(info.value)
    assert str(other_key) in message and str(cert_path) in message
    assert "does not match" in message
    assert info.value.problems[0].key == "tls_cert_key_path"


def test_mismatch_error_names_the_app_and_key_path(tmp_path, ca):
    cert_path, _ = ca.issue("a.example").write(tmp_path, "a")
    _, wrong_key = ca.issue("a.example").write(tmp_path, "b")
    with pytest.raises(TlsMaterialError) as info:
        SniContextMap.from_apps([app_config("app1", "a.example", cert_path, wrong_key)])
    assert info.value.app == "app1"
    assert info.value.describe() == [
        f'apps.app1.tls.tls_cert_key_path: "{wrong_key}": does not match the certificate in "{cert_path}"'
    ]


def test_missing_files_reported_together(tmp_path):
    missing_cert = tmp_path / "nope.crt"
    missing_key = tmp_path / "nope.key"
    with pytest.raises(TlsMaterialError) as info:
        load_certified_key(str(missing_cert), str(missing_key))
    keys = [p.key for p in info.value.problems]
    assert keys == ["tls_cert_path", "tls_cert_key_path"]
    assert "cannot read" in str(info.value)


def test_every_broken_app_is_reported(tmp_path, ca):
    good_cert, good_key = ca.issue("good.example").write(tmp_path, "good")
    apps = [
        app_config("good", "good.example", good_cert, good_key),
        app_config("nocert", "a.example", tmp_path / "missing.crt", good_key),
        app_config("garbage", "b.example", good_cert, good_cert),  # a cert where the key should be
    ]
    with pytest.raises(TlsMaterialError) as info:
        SniContextMap.from_apps(apps)
    lines = info.value.describe()
    assert any(line.startswith("apps.nocert.tls.tls_cert_path:") for line in lines)
    assert any(line.startswith("apps.garbage.tls.tls_cert_key_path:") and "no PEM private key" in line for line in lines)
    assert not any("apps.good." in line for line in lines)


def test_not_a_certificate(tmp_path):
    with pytest.raises(TlsMaterialError, match="no PEM certificate"):
        certified_key_from_pem(b"hello", new_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))


def test_encrypted_key_refused(ca):
    leaf = ca.issue("example.com")
    encrypted = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(TlsMaterialError, match="encrypted"):
        certified_key_from_pem(leaf.cert_pem(), encrypted)


def test_two_keys_in_one_file_refused(ca):
    pem = ca.issue("a").key_pem() + ca.issue("b").key_pem()
    with pytest.raises(TlsMaterialError, match="2 private keys"):
        parse_private_key(pem)


def test_small_rsa_key_refused():
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(TlsMaterialError, match="at least 2048"):
        parse_private_key(pem)


def test_group_readable_key_warns(tmp_path, ca):
    cert_path, key_path = ca.issue("example.com").write(tmp_path, "site", key_mode=0o644)
    os.chmod(key_path, 0o644)
    pair = load_certified_key(str(cert_path), str(key_path))
    assert any("chmod 600" in w and str(key_path) in w for w in pair.warnings)

    os.chmod(key_path, 0o600)
    assert load_certified_key(str(cert_path), str(key_path)).warnings == ()


def test_group_readable_key_warning_reaches_the_app_context(tmp_path, ca):
    from rpxy.tls.contexts import build_from_source

    app = make_app_tls(tmp_path, ca, "site", "example.com")
    assert app.warnings == ()
    os.chmod(app.source.key_path, 0o640)
    rebuilt = build_from_source("site", "example.com", app.source)
    assert any("mode 0640" in w for w in rebuilt.warnings)


def test_certificate_not_covering_the_server_name_warns(tmp_path, ca):
    cert_path, key_path = ca.issue("other.example").write(tmp_path, "x")
    pair = load_certified_key(str(cert_path), str(key_path), server_name="example.com")
    assert any('does not cover "example.com"' in w for w in pair.warnings)


def test_name_coverage_rules():
    assert name_is_covered("a.example.com", ["*.example.com"])
    assert not name_is_covered("a.b.example.com", ["*.example.com"])
    assert not name_is_covered("example.com", ["*.example.com"])
    assert name_is_covered("*.example.com", ["*.example.com"])
    assert name_is_covered("Example.COM", ["example.com"])


def test_client_ca_must_be_a_ca(ca):
    leaf = ca.issue("not-a-ca")
    with pytest.raises(TlsMaterialError, match="not a CA certificate"):
        parse_client_cas(leaf.cert_pem())
    assert parse_client_cas(ca.cert_pem()) == [ca.cert]


def test_ed25519_key_is_servable(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert isinstance(parse_private_key(pem), ed25519.Ed25519PrivateKey)


def test_write_private_mode(tmp_path):
    path = tmp_path / "k"
    write_private(path, b"x", 0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600
