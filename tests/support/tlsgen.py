"""TLS test support: a tiny certificate authority and in-memory handshakes.

``Authority`` signs leaf certificates (server or client) and writes PEM files
in the formats the proxy must accept: PKCS#8, PKCS#1 RSA ("BEGIN RSA PRIVATE
KEY") and SEC1 EC ("BEGIN EC PRIVATE KEY") keys. ``TlsHarness`` runs real
handshakes between pyOpenSSL clients (memory BIOs) and ``rpxy.tls``'s
``TlsServerFactory`` on a ``StringTransport`` with a ``Clock`` as reactor.

    ca = Authority("Test CA")
    leaf = ca.issue("example.com")                # EC P-256 key, SAN = example.com
    cert_path, key_path = leaf.write(tmp_path, "example")     # chain: leaf + CA
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

KeyKind = Literal["ec", "rsa"]
KeyFormat = Literal["pkcs8", "pkcs1", "sec1"]

_ONE_DAY = datetime.timedelta(days=1)


def new_key(kind: KeyKind = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key, key_format: KeyFormat = "pkcs8") -> bytes:
    """The private key as PEM: PKCS#8, or the traditional form (PKCS#1 for RSA, SEC1 for EC)."""
    fmt = serialization.PrivateFormat.PKCS8 if key_format == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


@attrs.frozen
class Leaf:
    cert: x509.Certificate
    key: object
    chain: tuple[x509.Certificate, ...]  # issuers, leaf excluded

    @property
    def common_name(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))

    def key_pem(self, key_format: KeyFormat = "pkcs8") -> bytes:
        return key_pem(self.key, key_format)

    def write(
        self, directory: Path, stem: str, *, key_format: KeyFormat = "pkcs8", key_mode: int = 0o600
    ) -> tuple[Path, Path]:
        """Write ``<stem>.crt`` (leaf + issuers) and ``<stem>.key``; return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{stem}.crt"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem())
        write_private(key_path, self.key_pem(key_format), key_mode)
        return cert_path, key_path


class Authority:
    """A self-signed CA that issues leaf certificates valid for one day."""

    def __init__(self, name: str = "rpxy test CA", *, kind: KeyKind = "ec") -> None:
        self.key = new_key(kind)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem())
        return path

    def issue(self, *names: str, kind: KeyKind = "ec", client: bool = False, common_name: str | None = None) -> Leaf:
        """A leaf for ``names`` (DNS SANs; the first is also the CN). ``client`` → clientAuth EKU."""
        key = new_key(kind)
        cn = common_name or (names[0] if names else "client")
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return Leaf(cert=cert, key=key, chain=(self.cert,))


# ---------------------------------------------------------------------------
# In-memory TLS: a pyOpenSSL client (memory BIO) against rpxy's TlsServerFactory
# on a StringTransport, with a Clock as the reactor. No sockets, no threads.
# ---------------------------------------------------------------------------


@implementer(IHandshakeListener)
class EchoApp(Protocol):
    """The application protocol behind TLS: answers ``echo:<data>``, records its life."""

    def __init__(self) -> None:
        self.made = False
        self.handshake_done = False
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(b"echo:" + data)

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


class EchoFactory(Factory):
    def __init__(self) -> None:
        self.built: list[EchoApp] = []

    def buildProtocol(self, addr):
        app = EchoApp()
        app.factory = self
        self.built.append(app)
        return app


def client_context(
    *,
    trust: Authority | None = None,
    cert: Leaf | None = None,
    groups: str | None = None,
    min_version: int | None = None,
    max_version: int | None = None,
    ciphers: str | None = None,
    alpn: list[bytes] | None = None,
) -> SSL.Context:
    """A client context; ``trust`` makes it verify the server chain, ``cert`` presents a client cert."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if min_version is not None:
        ctx.set_min_proto_version(min_version)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers.encode())
    if groups is not None:
        from rpxy.tls.groups import set_context_groups

        set_context_groups(ctx, groups, fallback=None)
    if alpn is not None:
        ctx.set_alpn_protos(alpn)
    if trust is not None:
        ctx.get_cert_store().add_cert(X509.from_cryptography(trust.cert))
        ctx.set_verify(SSL.VERIFY_PEER)
    if cert is not None:
        ctx.use_certificate(cert.cert)
        for extra in cert.chain:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(cert.key)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


@attrs.define
class Session:
    """One client connection through the server factory."""

    client: SSL.Connection
    front: object
    transport: StringTransport
    harness: "TlsHarness"
    client_error: Exception | None = None
    closed: bool = False
    app_index: int = 0

    @property
    def established(self) -> bool:
        return self.client_error is None and self.client.get_peer_finished() is not None and not self.closed

    @property
    def app(self) -> EchoApp | None:
        built = self.harness.apps.built
        return built[self.app_index] if len(built) > self.app_index else None

    def server_cert(self):
        return self.client.get_peer_certificate(as_cryptography=True)

    def server_names(self) -> list[str]:
        cert = self.server_cert()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return san.get_values_for_type(x509.DNSName)

    def reused(self) -> bool:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(self.client._ssl))

    def request(self, data: bytes) -> bytes:
        """Send application data; return what the server application answered."""
        self.client.sendall(data)
        self.harness.pump(self)
        return self.read()

    def read(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.client.recv(65536)
            except SSL.WantReadError:
                return out
            except SSL.ZeroReturnError:
                return out
            except SSL.Error as exc:
                self.client_error = exc
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        """Clean TLS shutdown both ways (keeps sessions resumable)."""
        try:
            self.client.shutdown()
        except SSL.Error:
            pass
        self.harness.pump(self)
        self.read()


class TlsHarness:
    """Drive handshakes between pyOpenSSL clients and ``TlsServerFactory`` in memory."""

    def __init__(self, contexts, *, handshake_timeout: float = 15.0) -> None:
        from rpxy.tls.server import TlsServerFactory

        self.clock = Clock()
        self.apps = EchoFactory()
        self.failures: list = []
        self.factory = TlsServerFactory(
            contexts,
            self.apps,
            reactor=self.clock,
            handshake_timeout=handshake_timeout,
            on_failure=self.failures.append,
        )
        self._port = 40000

    def open(self, sni: bytes | str | None, client_ctx: SSL.Context, *, session=None, factory=None) -> Session:
        """Start a connection (``factory``: another server factory, e.g. a plain TLSMemoryBIOFactory)."""
        self._port += 1
        peer = IPv4Address("TCP", "192.0.2.7", self._port)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "198.51.100.1", 443), peerAddress=peer)
        app_index = len(self.apps.built)
        front = (factory or self.factory).buildProtocol(peer)
        front.makeConnection(transport)
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        if sni is not None:
            client.set_tlsext_host_name(sni.encode() if isinstance(sni, str) else sni)
        if session is not None:
            client.set_session(session)
        return Session(client=client, front=front, transport=transport, harness=self, app_index=app_index)

    def connect(self, sni: bytes | str | None, client_ctx: SSL.Context, *, session=None, factory=None) -> Session:
        conn = self.open(sni, client_ctx, session=session, factory=factory)
        self.pump(conn, handshake=True)
        if conn.client_error is None and conn.client.get_peer_finished() is not None:
            # Process post-handshake messages (TLS 1.3 tickets, a late alert).
            conn.read()
            self.pump(conn)
            conn.read()
        return conn

    def pump(self, conn: Session, *, handshake: bool = False, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            if handshake and conn.client_error is None:
                try:
                    conn.client.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error as exc:
                    conn.client_error = exc
            try:
                out = conn.client.bio_read(1 << 20)
            except SSL.WantReadError:
                out = b""
            if out and not conn.closed:
                conn.front.dataReceived(out)
                moved = True
            self.clock.advance(0)
            back = conn.transport.value()
            if back:
                conn.transport.clear()
                conn.client.bio_write(back)
                moved = True
            if conn.transport.disconnecting and not conn.closed:
                conn.closed = True
                conn.front.connectionLost(Failure(ConnectionDone("closed")))
                try:
                    conn.client.bio_shutdown()
                except SSL.Error:
                    pass
                moved = True
            if not moved:
                return

    def failure_categories(self) -> list[str]:
        return [f.category for f in self.failures]


def app_config(name: str, server_name: str, cert_path=None, key_path=None, client_ca_path=None):
    """A minimal ``AppConfig`` with TLS files (routes are irrelevant to the TLS layer)."""
    from rpxy.config.model import AppConfig, TlsConfig

    tls = TlsConfig(
        tls_cert_path=str(cert_path) if cert_path else None,
        tls_cert_key_path=str(key_path) if key_path else None,
        client_ca_cert_path=str(client_ca_path) if client_ca_path else None,
    )
    return AppConfig(name=name, server_name=server_name, reverse_proxy=(), tls=tls)


def make_app_tls(
    directory: Path,
    ca: Authority,
    app_name: str,
    server_name: str,
    *,
    names: tuple[str, ...] | None = None,
    kind: KeyKind = "ec",
    key_format: KeyFormat = "pkcs8",
    client_ca: Authority | None = None,
    options=None,
):
    """Write a leaf for ``server_name`` (or ``names``) signed by ``ca`` and build its ``AppTls``."""
    from rpxy.tls.contexts import TlsOptions, TlsSource, build_from_source

    leaf = ca.issue(*(names or (server_name,)), kind=kind)
    stem = app_name.lower()
    cert_path, key_path = leaf.write(directory, stem, key_format=key_format)
    ca_path = client_ca.write_cert(directory / f"{stem}-client-ca.crt") if client_ca is not None else None
    source = TlsSource(str(cert_path), str(key_path), str(ca_path) if ca_path else None)
    return build_from_source(app_name, server_name, source, options or TlsOptions())
