"""Reading certificate chains, private keys and client CA bundles from PEM files.

Everything is parsed with ``cryptography`` (never by OpenSSL from a path), so the
bytes that are hashed for reload detection are exactly the bytes that are served,
and errors name the file and the config key they came from.

Accepted private keys: PKCS#8 (``BEGIN PRIVATE KEY``), PKCS#1 RSA
(``BEGIN RSA PRIVATE KEY``) and SEC1 EC (``BEGIN EC PRIVATE KEY``, also with the
``BEGIN EC PARAMETERS`` block that ``openssl ecparam -genkey`` writes first).
Encrypted keys are refused (nothing could type the passphrase).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import stat
from collections.abc import Iterable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = [
    "CertifiedKey",
    "TlsMaterialError",
    "Problem",
    "certificate_names",
    "load_certified_key",
    "load_client_cas",
    "name_is_covered",
    "parse_certificate_chain",
    "parse_client_cas",
    "parse_private_key",
    "read_file",
]

# Key types OpenSSL can serve with TLS 1.2/1.3 (for type annotations and docs).
SERVABLE_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")
_ENCRYPTED_LABELS = (b"ENCRYPTED PRIVATE KEY",)


@attrs.frozen
class Problem:
    """One thing wrong with one file: ``key`` is the config key (``tls_cert_path``...)."""

    key: str
    path: str
    message: str
    app: str | None = None  # the [apps.<name>] table key, when known

    @property
    def key_path(self) -> str:
        """``apps.<app>.tls.<key>`` (or just ``<key>`` when the app is unknown)."""
        return f"apps.{self.app}.tls.{self.key}" if self.app is not None else self.key

    def __str__(self) -> str:
        return f'{self.key_path}: "{self.path}": {self.message}'


class TlsMaterialError(ValueError):
    """Certificates or keys that cannot be served. ``problems`` name the files.

    ``str(error)`` reads like
    ``apps.app1.tls.tls_cert_key_path: "/etc/k.pem": does not match the certificate in "/etc/c.pem"``;
    ``describe()`` gives one such line per problem. ``app`` is set when every
    problem belongs to one app.
    """

    def __init__(self, problems: Iterable[Problem], app: str | None = None) -> None:
        problems = tuple(problems)
        if app is not None:
            problems = tuple(p if p.app is not None else attrs.evolve(p, app=app) for p in problems)
        self.problems = problems
        apps = {p.app for p in problems}
        self.app = apps.pop() if len(apps) == 1 else None
        super().__init__("; ".join(self.describe()))

    def describe(self) -> list[str]:
        return [str(problem) for problem in self.problems]


def read_file(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsMaterialError([Problem(key, path, f"cannot read: {exc.strerror or exc}")]) from None


def _blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def parse_certificate_chain(data: bytes, *, key: str = "tls_cert_path", path: str = "<memory>") -> list[x509.Certificate]:
    """The PEM certificates of ``data`` in file order (leaf first). At least one is required."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        if not any(label == b"CERTIFICATE" for label, _ in _blocks(data)):
            raise TlsMaterialError([Problem(key, path, "contains no PEM certificate (BEGIN CERTIFICATE)")]) from None
        raise TlsMaterialError([Problem(key, path, f"invalid PEM certificate: {exc}")]) from None
    if not certs:
        raise TlsMaterialError([Problem(key, path, "contains no PEM certificate (BEGIN CERTIFICATE)")])
    return certs


def parse_private_key(data: bytes, *, key: str = "tls_cert_key_path", path: str = "<memory>"):
    """The one private key of ``data``: PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted."""
    blocks = _blocks(data)
    if any(label in _ENCRYPTED_LABELS for label, _ in blocks) or b"Proc-Type: 4,ENCRYPTED" in data:
        raise TlsMaterialError([Problem(key, path, "is encrypted; an unencrypted key is required")])
    keys = [block for label, block in blocks if label in _KEY_LABELS]
    if not keys:
        raise TlsMaterialError(
            [Problem(key, path, "contains no PEM private key (PKCS#8 PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")]
        )
    if len(keys) > 1:
        raise TlsMaterialError([Problem(key, path, f"contains {len(keys)} private keys; exactly one is required")])
    try:
        private_key = serialization.load_pem_private_key(keys[0], password=None)
    except (ValueError, TypeError) as exc:
        raise TlsMaterialError([Problem(key, path, f"invalid private key: {exc}")]) from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise TlsMaterialError([Problem(key, path, f"unsupported private key: {exc}")]) from None
    if not isinstance(private_key, SERVABLE_KEY_TYPES):
        raise TlsMaterialError([Problem(key, path, f"{type(private_key).__name__} keys cannot be used for TLS 1.2/1.3")])
    if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size < 2048:
        raise TlsMaterialError([Problem(key, path, f"RSA key of {private_key.key_size} bits; at least 2048 are required")])
    return private_key


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_file_warning(path: str) -> str | None:
    """A warning when ``path`` is readable or writable by group or others, else None."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f'"{path}" is accessible by group or others (mode {mode:04o}); restrict it with chmod 600'
    return None


def certificate_names(cert: x509.Certificate) -> list[str]:
    """DNS names of the certificate (SAN, else the CN), lower-cased."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    return [str(n).lower().rstrip(".") for n in names]


def name_is_covered(server_name: str, cert_names: Iterable[str]) -> bool:
    """Whether a certificate naming ``cert_names`` is valid for ``server_name``.

    ``server_name`` may itself be a wildcard (``*.example.com``): it is then covered
    by the same wildcard in the certificate.
    """
    server_name = server_name.lower()
    for name in cert_names:
        if name == server_name:
            return True
        if name.startswith("*.") and not server_name.startswith("*."):
            first, dot, rest = server_name.partition(".")
            if dot and first and rest == name[2:]:
                return True
    return False


@attrs.frozen(eq=False)
class CertifiedKey:
    """A certificate chain and its private key, checked to belong together."""

    chain: tuple[x509.Certificate, ...]
    private_key: object
    cert_path: str
    key_path: str
    digest: bytes  # SHA-256 over the cert and key file contents
    warnings: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def check_pair(
    chain: list[x509.Certificate], private_key, *, cert_path: str, key_path: str
) -> None:
    if _spki(chain[0].public_key()) != _spki(private_key.public_key()):
        raise TlsMaterialError(
            [Problem("tls_cert_key_path", key_path, f'does not match the certificate in "{cert_path}"')]
        )


def certified_key_from_pem(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    cert_path: str = "<memory>",
    key_path: str = "<memory>",
    server_name: str | None = None,
    now: datetime.datetime | None = None,
) -> CertifiedKey:
    """Parse and cross-check a chain and key given as bytes (also used by reload and ACME)."""
    problems: list[Problem] = []
    chain = private_key = None
    try:
        chain = parse_certificate_chain(cert_pem, path=cert_path)
    except TlsMaterialError as exc:
        problems.extend(exc.problems)
    try:
        private_key = parse_private_key(key_pem, path=key_path)
    except TlsMaterialError as exc:
        problems.extend(exc.problems)
    if problems:
        raise TlsMaterialError(problems)
    assert chain is not None
    check_pair(chain, private_key, cert_path=cert_path, key_path=key_path)

    warnings: list[str] = []
    leaf = chain[0]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        warnings.append(f'certificate in "{cert_path}" expired on {leaf.not_valid_after_utc.isoformat()}')
    elif leaf.not_valid_before_utc > now:
        warnings.append(f'certificate in "{cert_path}" is not valid before {leaf.not_valid_before_utc.isoformat()}')
    if server_name is not None and not name_is_covered(server_name, certificate_names(leaf)):
        warnings.append(
            f'certificate in "{cert_path}" does not cover "{server_name}" (it names {", ".join(certificate_names(leaf)) or "nothing"})'
        )
    digest = hashlib.sha256(len(cert_pem).to_bytes(8, "big") + cert_pem + key_pem).digest()
    return CertifiedKey(
        chain=tuple(chain),
        private_key=private_key,
        cert_path=cert_path,
        key_path=key_path,
        digest=digest,
        warnings=tuple(warnings),
    )


def load_certified_key(cert_path: str, key_path: str, *, server_name: str | None = None) -> CertifiedKey:
    """Read ``cert_path`` (PEM chain, leaf first) and ``key_path``; check that they match.

    Raises :class:`TlsMaterialError` naming every unreadable, invalid or
    mismatched file. ``warnings`` of the result: key file readable by group/other,
    expired certificate, certificate not covering ``server_name``.
    """
    problems: list[Problem] = []
    cert_pem = key_pem = b""
    try:
        cert_pem = read_file("tls_cert_path", cert_path)
    except TlsMaterialError as exc:
        problems.extend(exc.problems)
    try:
        key_pem = read_file("tls_cert_key_path", key_path)
    except TlsMaterialError as exc:
        problems.extend(exc.problems)
    if problems:
        raise TlsMaterialError(problems)
    pair = certified_key_from_pem(cert_pem, key_pem, cert_path=cert_path, key_path=key_path, server_name=server_name)
    warning = key_file_warning(key_path)
    if warning is not None:
        pair = attrs.evolve(pair, warnings=(warning, *pair.warnings))
    return pair


def parse_client_cas(data: bytes, *, path: str = "<memory>") -> list[x509.Certificate]:
    """CA certificates trusted for client certificates (``client_ca_cert_path``)."""
    certs = parse_certificate_chain(data, key="client_ca_cert_path", path=path)
    for cert in certs:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue  # old v1 roots have none; OpenSSL decides
        if not constraints.ca:
            raise TlsMaterialError(
                [Problem("client_ca_cert_path", path, f'"{cert.subject.rfc4514_string()}" is not a CA certificate')]
            )
    return certs


def load_client_cas(path: str) -> tuple[list[x509.Certificate], bytes]:
    data = read_file("client_ca_cert_path", path)
    return parse_client_cas(data, path=path), data


