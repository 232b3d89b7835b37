"""Hardened pyOpenSSL server contexts, one per app with TLS.

Every context: TLS 1.2 and 1.3 only; TLS 1.2 ciphers ECDHE + AEAD only (Mozilla
"intermediate" minus the DHE suites); the server's cipher order wins; no
compression; no renegotiation; groups from :mod:`rpxy.tls.groups`; ALPN chosen
from a configured list in the server's order.

Session isolation. Each app has its own ``SSL_CTX`` and therefore its own
session cache, its own session-ID context (:func:`session_id_context`) and its own
random session-ticket keys (OpenSSL generates them per ``SSL_CTX``; pyOpenSSL
cannot set them, and does not need to). This only isolates apps when the
connection is *created* on the app's context (OpenSSL encrypts tickets and looks
sessions up in the context the connection started with, ``session_ctx``, which
``SSL_set_SSL_CTX`` in an SNI callback does not change): :mod:`rpxy.tls.server`
reads the SNI from the ClientHello first for that reason. Apps with client
certificates (mTLS) additionally disable resumption entirely (no tickets, no
session cache), as rpxy does, so a changed client CA applies to every new
connection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs
from OpenSSL import SSL
from cryptography import x509
from twisted.logger import Logger

from rpxy.tls import groups as _groups
from rpxy.tls.keys import CertifiedKey, TlsMaterialError, certified_key_from_pem, key_file_warning, parse_client_cas, read_file
from rpxy.tls.names import matches_server_name, normalize_server_name

__all__ = [
    "AppTls",
    "DEFAULT_ALPN",
    "TLS12_CIPHERS",
    "TLS13_CIPHERSUITES",
    "TlsOptions",
    "TlsSource",
    "build_app_tls",
    "harden",
    "refusal_context",
    "session_id_context",
]

log = Logger(namespace="rpxy.tls")

# Mozilla "intermediate" (v5.7) TLS 1.2 suites without the DHE ones: ECDHE + AEAD only.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
DEFAULT_ALPN: tuple[bytes, ...] = (b"h2", b"http/1.1")

_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_SINGLE_ECDH_USE
)
_VERIFY_CLIENT = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE
_VERIFY_DEPTH = 8


@attrs.frozen
class TlsOptions:
    """Listener-wide TLS settings.

    ``alpn``: protocols the server may select, in the server's preference order;
    one is chosen only if the client offered it. Pass ``(b"http/1.1",)`` until the
    HTTP/2 front end exists. ``groups``: an OpenSSL group list (see
    :mod:`rpxy.tls.groups`).
    """

    alpn: tuple[bytes, ...] = DEFAULT_ALPN
    groups: str = _groups.GROUPS

    def __attrs_post_init__(self) -> None:
        for proto in self.alpn:
            if not isinstance(proto, bytes) or not 0 < len(proto) < 256:
                raise ValueError(f"invalid ALPN protocol {proto!r}")


@attrs.frozen
class TlsSource:
    """Where an app's TLS material lives (paths as written in the config)."""

    cert_path: str
    key_path: str
    client_ca_path: str | None = None

    def paths(self) -> tuple[str, ...]:
        return (self.cert_path, self.key_path) + ((self.client_ca_path,) if self.client_ca_path else ())


@attrs.frozen(eq=False)
class AppTls:
    """One app's server context and what it was built from."""

    app_name: str
    server_name: str  # lower-case, may be "*.example.com"
    context: SSL.Context
    certified_key: CertifiedKey
    client_cas: tuple[x509.Certificate, ...] = ()
    source: TlsSource | None = None
    digest: bytes = b""  # SHA-256 over every file's content, for reload
    groups: str = _groups.GROUPS  # the group list actually set
    warnings: tuple[str, ...] = ()

    @property
    def client_auth(self) -> bool:
        return bool(self.client_cas)

    @property
    def leaf(self) -> x509.Certificate:
        return self.certified_key.leaf

    def matches(self, name: str) -> bool:
        return matches_server_name(self.server_name, name)


def session_id_context(app_name: str, server_name: str) -> bytes:
    """32 bytes unique to an app: sessions are only resumable in the context that made them."""
    return hashlib.sha256(b"rpxy-tls-session\0" + app_name.encode() + b"\0" + server_name.encode()).digest()


def _alpn_selector(preference: Sequence[bytes]):
    preference = tuple(preference)

    def select(connection: SSL.Connection, offered: list[bytes]):
        for proto in preference:
            if proto in offered:
                return proto
        # No overlap: continue without ALPN (the client then speaks HTTP/1.1) rather
        # than failing the handshake with no_application_protocol.
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def harden(context: SSL.Context, options: TlsOptions) -> str:
    """Apply the listener-wide policy to a server context; return the group list set."""
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(_OPTIONS)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES.encode("ascii"))
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    applied = _groups.set_context_groups(context, options.groups)
    if applied != options.groups:
        log.warn(
            "TLS: OpenSSL rejected the group list {wanted!r}; using {applied!r} (no post-quantum key exchange)",
            wanted=options.groups,
            applied=applied,
        )
    if options.alpn:
        context.set_alpn_select_callback(_alpn_selector(options.alpn))
    return applied


_REFUSAL: SSL.Context | None = None


def refusal_context() -> SSL.Context:
    """A hardened context with no certificate: a handshake switched to it cannot complete.

    Used by SNI callbacks to refuse quietly (pyOpenSSL prints a traceback when a
    servername callback raises).
    """
    global _REFUSAL
    if _REFUSAL is None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        harden(context, TlsOptions(alpn=()))
        context.set_options(SSL.OP_NO_TICKET)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_session_id(b"rpxy-tls-refused")
        _REFUSAL = context
    return _REFUSAL


def _check_sni(server_name: str):
    """Defence in depth on an app context: OpenSSL's view of the SNI must name this app."""

    def check(connection: SSL.Connection) -> None:
        name = normalize_server_name(connection.get_servername())
        if name is None or not matches_server_name(server_name, name):
            connection.set_context(refusal_context())

    return check


def app_tls_from_material(
    app_name: str,
    server_name: str,
    certified_key: CertifiedKey,
    *,
    client_cas: Sequence[x509.Certificate] = (),
    source: TlsSource | None = None,
    digest: bytes | None = None,
    options: TlsOptions = TlsOptions(),
    extra_warnings: Sequence[str] = (),
) -> AppTls:
    """Build an app's context from already parsed material (reload and ACME use this too)."""
    server_name = server_name.lower()
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    applied = harden(context, options)
    context.use_certificate(certified_key.leaf)
    for cert in certified_key.chain[1:]:
        context.add_extra_chain_cert(cert)
    context.use_privatekey(certified_key.private_key)
    context.check_privatekey()
    context.set_session_id(session_id_context(app_name, server_name))
    if client_cas:
        store = context.get_cert_store()
        assert store is not None
        from OpenSSL.crypto import X509

        for ca in client_cas:
            store.add_cert(X509.from_cryptography(ca))
            context.add_client_ca(ca)
        context.set_verify(_VERIFY_CLIENT)
        context.set_verify_depth(_VERIFY_DEPTH)
        # No resumption for mTLS apps: every connection presents and verifies a certificate.
        context.set_options(SSL.OP_NO_TICKET)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_tlsext_servername_callback(_check_sni(server_name))
    return AppTls(
        app_name=app_name,
        server_name=server_name,
        context=context,
        certified_key=certified_key,
        client_cas=tuple(client_cas),
        source=source,
        digest=digest if digest is not None else certified_key.digest,
        groups=applied,
        warnings=tuple(certified_key.warnings) + tuple(extra_warnings),
    )


def read_source(source: TlsSource) -> tuple[bytes, bytes, bytes | None]:
    """The raw bytes of the cert, key and client CA files (errors name every file)."""
    problems = []
    contents: list[bytes | None] = []
    for key, path in (("tls_cert_path", source.cert_path), ("tls_cert_key_path", source.key_path)):
        try:
            contents.append(read_file(key, path))
        except TlsMaterialError as exc:
            problems.extend(exc.problems)
            contents.append(None)
    ca = None
    if source.client_ca_path is not None:
        try:
            ca = read_file("client_ca_cert_path", source.client_ca_path)
        except TlsMaterialError as exc:
            problems.extend(exc.problems)
    if problems:
        raise TlsMaterialError(problems)
    return contents[0] or b"", contents[1] or b"", ca


def source_digest(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None) -> bytes:
    digest = hashlib.sha256()
    for part in (cert_pem, key_pem, ca_pem or b""):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def build_from_source(
    app_name: str,
    server_name: str,
    source: TlsSource,
    options: TlsOptions = TlsOptions(),
    *,
    contents: tuple[bytes, bytes, bytes | None] | None = None,
) -> AppTls:
    """Read (unless ``contents`` is given) and build; :class:`TlsMaterialError` names app and files."""
    try:
        cert_pem, key_pem, ca_pem = contents if contents is not None else read_source(source)
        problems = []
        pair = cas = None
        try:
            pair = certified_key_from_pem(
                cert_pem, key_pem, cert_path=source.cert_path, key_path=source.key_path, server_name=server_name
            )
        except TlsMaterialError as exc:
            problems.extend(exc.problems)
        if ca_pem is not None and source.client_ca_path is not None:
            try:
                cas = parse_client_cas(ca_pem, path=source.client_ca_path)
            except TlsMaterialError as exc:
                problems.extend(exc.problems)
        if problems:
            raise TlsMaterialError(problems)
        assert pair is not None
        warning = key_file_warning(source.key_path)
        return app_tls_from_material(
            app_name,
            server_name,
            pair,
            client_cas=cas or (),
            source=source,
            digest=source_digest(cert_pem, key_pem, ca_pem),
            options=options,
            extra_warnings=(warning,) if warning else (),
        )
    except TlsMaterialError as exc:
        raise TlsMaterialError(exc.problems, app=app_name) from None


def build_app_tls(app, options: TlsOptions = TlsOptions()) -> AppTls | None:
    """The context of an ``AppConfig``; None when the app has no TLS or uses ACME only.

    Raises :class:`TlsMaterialError` (``str()`` names ``apps.<app>.tls.<key>`` and
    the file) for a missing, unreadable, invalid or mismatched file.
    """
    tls = app.tls
    if tls is None or tls.tls_cert_path is None or tls.tls_cert_key_path is None:
        return None
    source = TlsSource(tls.tls_cert_path, tls.tls_cert_key_path, tls.client_ca_cert_path)
    return build_from_source(app.name, app.server_name, source, options)
