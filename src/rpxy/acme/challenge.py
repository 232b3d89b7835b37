"""ACME challenge material, sans-IO: key authorizations and TLS-ALPN-01 certificates.

TLS-ALPN-01 (RFC 8737): the CA connects to the name on port 443, offers only the ALPN
protocol ``acme-tls/1`` and expects a self-signed certificate whose only SAN is the
name and that carries the *critical* extension id-pe-acmeIdentifier
(1.3.6.1.5.5.7.1.31) whose value is the DER ``OCTET STRING`` of
SHA-256(key authorization). The extension value is built by hand here because
``cryptography`` has no type for it; :func:`acme_identifier_value` is what a unit test
pins byte for byte.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

__all__ = [
    "ACME_IDENTIFIER_OID",
    "ACME_TLS_ALPN",
    "HTTP01_PREFIX",
    "acme_identifier_value",
    "jwk_thumbprint",
    "key_authorization",
    "tls_alpn01_certificate",
]

#: id-pe-acmeIdentifier (RFC 8737 section 6.1).
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: The ALPN protocol a TLS-ALPN-01 validator offers (and the only one it offers).
ACME_TLS_ALPN = b"acme-tls/1"
#: Where HTTP-01 tokens are fetched (RFC 8555 section 8.3).
HTTP01_PREFIX = b"/.well-known/acme-challenge/"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(public_jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a public JWK given as a dict.

    Only the required members, lexicographically ordered, no whitespace: that is what
    the CA hashes too, so any other serialisation would fail every validation.
    """
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}[public_jwk["kty"]]
    canonical = json.dumps({k: public_jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def key_authorization(token: str, thumbprint: str) -> str:
    """``token || '.' || base64url(thumbprint)`` (RFC 8555 section 8.1)."""
    return f"{token}.{thumbprint}"


def acme_identifier_value(key_authz: str) -> bytes:
    """The DER value of the acmeIdentifier extension: OCTET STRING(SHA-256(key authorization)).

    ``04 20`` (OCTET STRING, 32 bytes) followed by the digest.
    """
    digest = hashlib.sha256(key_authz.encode("ascii")).digest()
    return b"\x04" + bytes([len(digest)]) + digest


def tls_alpn01_certificate(
    name: str, key_authz: str, *, now: datetime.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh key and the self-signed challenge certificate for ``name``.

    Valid for a week around ``now`` (validators do not check dates, but some clients
    sanity-check them); the key is never written to disk.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, acme_identifier_value(key_authz)), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def private_key_pem(key) -> bytes:
    """PKCS#8 PEM, unencrypted (the registry protects it with file modes)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def http01_token(path: bytes) -> str | None:
    """The token of a ``/.well-known/acme-challenge/<token>`` request path, else None.

    Tokens are base64url (RFC 8555 section 8.3): anything else is not ours to answer.
    """
    if not path.startswith(HTTP01_PREFIX):
        return None
    token = path[len(HTTP01_PREFIX):].split(b"?", 1)[0]
    if not token or not all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in token):
        return None
    return token.decode("ascii")
