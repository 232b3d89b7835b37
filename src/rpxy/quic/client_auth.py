"""Client certificates (mTLS) over QUIC: the server half of TLS 1.3 client authentication.

rpxy refuses HTTP/3 for apps with ``client_ca_cert_path`` because its QUIC stack cannot
ask for a client certificate; qh3's server cannot either. This module adds what is
missing to one qh3 server handshake, at the points where RFC 8446 puts it:

1. a CertificateRequest right after EncryptedExtensions (section 4.3.2), offering the
   signature schemes we verify and naming the app's client CAs (``certificate_authorities``);
2. the client's Certificate and CertificateVerify, read before its Finished
   (sections 4.4.2, 4.4.3): the chain must verify against the app's client CAs alone
   (OpenSSL's verifier, as on the TCP port), and the signature must cover the transcript;
3. the client's Finished checked over that longer transcript, and no session ticket, so
   that every connection presents a certificate (the TCP port disables resumption too).

qh3 hashes each handshake message through ``context.key_schedule.update_hash`` as it
writes it, and anticipates the client's Finished unless ALPS was negotiated. So the
request is written by a transient transcript tap on the key schedule (removed once it
has written), the anticipation is skipped through the ALPS flag, and the client's second
flight is read by a front for ``handle_message`` until its Finished. A failure is a TLS
alert (``certificate_required``, ``unknown_ca``, ``certificate_expired``,
``bad_certificate``, ``decrypt_error``) carrying a ``client_cert`` category for the log,
as on TCP. These are qh3 2.1 internals: setup.cfg pins the minor version, and the
tests in tests/unit/test_quic_client_auth.py drive whole handshakes against qh3's client.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from OpenSSL import crypto
from qh3 import tls as qtls
from qh3._hazmat import Buffer, BufferReadError

__all__ = [
    "MAX_CHAIN_LENGTH",
    "ClientCertificateRefused",
    "ClientVerifier",
    "QuicRefusal",
    "certificate_request",
    "require_client_certificate",
]

#: Certificates a client may send (leaf + 8 intermediates: OpenSSL's verify depth 8 on TCP).
MAX_CHAIN_LENGTH = 9
#: Largest client Certificate (or other) message read while authenticating the client.
MAX_MESSAGE_SIZE = 64 * 1024
#: The ``certificate_authorities`` extension is left out above this many bytes of names
#: (it shares a 16 KiB buffer with our certificate chain; clients then offer any cert).
MAX_AUTHORITY_NAMES = 4096

_CLIENT_CONTEXT = b"TLS 1.3, client CertificateVerify"
_EXT_SIGNATURE_ALGORITHMS = 13
_EXT_CERTIFICATE_AUTHORITIES = 47

_ECDSA = {0x0403: ("secp256r1", hashes.SHA256), 0x0503: ("secp384r1", hashes.SHA384), 0x0603: ("secp521r1", hashes.SHA512)}
_RSA_PSS_RSAE = {0x0804: hashes.SHA256, 0x0805: hashes.SHA384, 0x0806: hashes.SHA512}
_ED25519 = 0x0807
#: The schemes offered in the CertificateRequest: every one :func:`check_signature` verifies
#: (TLS 1.3 forbids RSA PKCS#1 v1.5 in CertificateVerify).
OFFERED_SCHEMES = (*_ECDSA, *_RSA_PSS_RSAE, _ED25519)

# OpenSSL X509_V_ERR codes that mean "not from a CA this app trusts" / "expired".
_UNKNOWN_CA_ERRORS = frozenset((2, 18, 19, 20, 21))
_EXPIRED_ERRORS = frozenset((9, 10))  # not yet valid, expired


class QuicRefusal(qtls.Alert):
    """A handshake the proxy refused on purpose: the alert the client gets, and a log category."""

    def __init__(self, category: str, sni: str | None, reason: str, description: qtls.AlertDescription) -> None:
        super().__init__(f"{category}: {reason}")
        self.category = category
        self.sni = sni
        self.reason = reason
        self.description = description


class ClientCertificateRefused(QuicRefusal):
    """An mTLS app got no client certificate, or one that does not verify (category ``client_cert``)."""

    def __init__(self, sni: str | None, reason: str, description: qtls.AlertDescription) -> None:
        super().__init__("client_cert", sni, reason, description)


def check_signature(public_key: Any, scheme: int, data: bytes, signature: bytes) -> None:
    """Verify a TLS 1.3 CertificateVerify signature; raises ``InvalidSignature``.

    The scheme must fit the key (an ECDSA scheme names its curve, RFC 8446 section 4.2.3).
    """
    if scheme == _ED25519 and isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
        return
    if scheme in _ECDSA and isinstance(public_key, ec.EllipticCurvePublicKey):
        curve, digest = _ECDSA[scheme]
        if public_key.curve.name != curve:
            raise InvalidSignature(f"scheme {scheme:#06x} does not fit a {public_key.curve.name} key")
        public_key.verify(signature, data, ec.ECDSA(digest()))
        return
    if scheme in _RSA_PSS_RSAE and isinstance(public_key, rsa.RSAPublicKey):
        digest = _RSA_PSS_RSAE[scheme]()
        public_key.verify(signature, data, padding.PSS(padding.MGF1(digest), digest.digest_size), digest)
        return
    raise InvalidSignature(f"scheme {scheme:#06x} does not fit the certificate's {type(public_key).__name__}")


class ClientVerifier:
    """The trust decision of one mTLS app: its client CAs are the only anchors, as on TCP.

    Uses OpenSSL's chain verification (the TCP port's), plus the leaf checks OpenSSL's
    ``sslclient`` purpose makes there: an extended key usage, when present, must allow
    client authentication; a key usage, when present, must allow signatures.
    """

    def __init__(self, authorities: Sequence[x509.Certificate]) -> None:
        if not authorities:
            raise ValueError("an mTLS app needs at least one client CA")
        self.authorities = tuple(authorities)
        self._store = crypto.X509Store()
        for authority in self.authorities:
            self._store.add_cert(crypto.X509.from_cryptography(authority))
        self.request = certificate_request(self.authorities)

    def verify(self, chain_der: Sequence[bytes], sni: str | None = None) -> x509.Certificate:
        """The verified leaf of ``chain_der`` (leaf first); raises :class:`ClientCertificateRefused`."""
        alert = qtls.AlertDescription
        if not chain_der:
            raise ClientCertificateRefused(sni, "the client sent no certificate", alert.certificate_required)
        if len(chain_der) > MAX_CHAIN_LENGTH:
            raise ClientCertificateRefused(
                sni, f"certificate chain of {len(chain_der)} exceeds {MAX_CHAIN_LENGTH}", alert.bad_certificate
            )
        try:
            certificates = [x509.load_der_x509_certificate(der) for der in chain_der]
        except ValueError as error:
            raise ClientCertificateRefused(sni, f"unreadable client certificate: {error}", alert.bad_certificate) from None
        leaf = certificates[0]
        context = crypto.X509StoreContext(
            self._store,
            crypto.X509.from_cryptography(leaf),
            [crypto.X509.from_cryptography(cert) for cert in certificates[1:]],
        )
        try:
            context.verify_certificate()
        except crypto.X509StoreContextError as error:
            code = error.errors[0] if error.errors else 0
            description = (
                alert.unknown_ca
                if code in _UNKNOWN_CA_ERRORS
                else alert.certificate_expired
                if code in _EXPIRED_ERRORS
                else alert.bad_certificate
            )
            raise ClientCertificateRefused(sni, f"certificate verify failed: {error}", description) from None
        _check_client_usage(leaf, sni)
        return leaf


def _check_client_usage(leaf: x509.Certificate, sni: str | None) -> None:
    bad = qtls.AlertDescription.bad_certificate
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        allowed = (x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
        if not any(usage in allowed for usage in usages):
            raise ClientCertificateRefused(sni, "unsupported certificate purpose: not for client authentication", bad)
    try:
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not key_usage.digital_signature:
        raise ClientCertificateRefused(sni, "unsupported certificate purpose: key usage forbids signatures", bad)


def certificate_request(authorities: Sequence[x509.Certificate]) -> bytes:
    """A TLS 1.3 CertificateRequest handshake message (RFC 8446 section 4.3.2), wire bytes.

    Empty request context (the main handshake), the schemes we verify, and the DER
    subjects of the app's client CAs so that clients holding several certificates pick
    the right one (left out when they would not fit, see :data:`MAX_AUTHORITY_NAMES`).
    """
    schemes = b"".join(scheme.to_bytes(2, "big") for scheme in OFFERED_SCHEMES)
    extensions = _extension(_EXT_SIGNATURE_ALGORITHMS, _vector(2, schemes))
    names = b"".join(_vector(2, authority.subject.public_bytes()) for authority in authorities)
    if 0 < len(names) <= MAX_AUTHORITY_NAMES:
        extensions += _extension(_EXT_CERTIFICATE_AUTHORITIES, _vector(2, names))
    body = _vector(1, b"") + _vector(2, extensions)
    return bytes([qtls.HandshakeType.CERTIFICATE_REQUEST]) + len(body).to_bytes(3, "big") + body


def _vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def _extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + _vector(2, data)


class _TranscriptTap:
    """Stands in for qh3's key schedule until EncryptedExtensions is hashed, then writes our request.

    Everything but ``update_hash`` goes to the real schedule; once the request is written
    the context gets the real schedule back.
    """

    def __init__(self, inner: Any, context: qtls.Context, handshake_buf: Buffer, request: bytes) -> None:
        self._inner = inner
        self._context = context
        self._handshake_buf = handshake_buf
        self._request = request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def update_hash(self, data: bytes) -> None:
        self._inner.update_hash(data)
        if data[:1] == bytes([qtls.HandshakeType.ENCRYPTED_EXTENSIONS]):
            self._handshake_buf.push_bytes(self._request)
            self._inner.update_hash(self._request)
            self._context.key_schedule = self._inner


class _ClientAuthentication:
    """Reads the client's Certificate and CertificateVerify in front of qh3's ``handle_message``."""

    _CERTIFICATE, _VERIFY, _FINISHED = range(3)

    def __init__(
        self,
        context: qtls.Context,
        verifier: ClientVerifier,
        sni: str | None,
        on_verified: Callable[[x509.Certificate], None],
        on_refused: Callable[[QuicRefusal], None],
    ) -> None:
        self._context = context
        self._on_refused = on_refused
        self._verifier = verifier
        self._sni = sni
        self._on_verified = on_verified
        self._stage = self._CERTIFICATE
        self._pending = b""
        self._public_key: Any = None
        self._leaf: x509.Certificate | None = None

    def handle_message(self, input_data: bytes, output_buf: dict, epoch: int = -1) -> None:
        try:
            self._handle(input_data, output_buf, epoch)
        except QuicRefusal as refusal:
            self._on_refused(refusal)
            raise

    def _handle(self, input_data: bytes, output_buf: dict, epoch: int) -> None:
        context = self._context
        if context.state != qtls.State.SERVER_EXPECT_FINISHED:
            # Not our part of the handshake (qh3 failed it or never got there): qh3 decides.
            del context.handle_message
            context.handle_message(input_data, output_buf, epoch)
            return
        self._pending += input_data
        while len(self._pending) >= 4:
            length = 4 + int.from_bytes(self._pending[1:4], "big")
            if length > MAX_MESSAGE_SIZE:
                raise ClientCertificateRefused(
                    self._sni, f"handshake message of {length} bytes", qtls.AlertDescription.bad_certificate
                )
            if len(self._pending) < length:
                return
            message, self._pending = self._pending[:length], self._pending[length:]
            if epoch not in (-1, qtls.Epoch.HANDSHAKE):
                raise qtls.AlertUnexpectedMessage("client authentication outside the handshake epoch")
            kind = message[0]
            if self._stage == self._CERTIFICATE and kind == qtls.HandshakeType.CERTIFICATE:
                self._certificate(message)
            elif self._stage == self._VERIFY and kind == qtls.HandshakeType.CERTIFICATE_VERIFY:
                self._certificate_verify(message)
            elif self._stage == self._FINISHED and kind == qtls.HandshakeType.FINISHED:
                rest, self._pending = self._pending, b""
                del context.handle_message  # qh3's own from here on
                context.handle_message(message, output_buf, epoch)
                if rest:
                    context.handle_message(rest, output_buf, epoch)
                return
            else:
                raise qtls.AlertUnexpectedMessage(f"handshake message {kind} while authenticating the client")

    def _certificate(self, message: bytes) -> None:
        buf = Buffer(data=message)
        try:
            certificate = qtls.pull_certificate(buf)
        except (BufferReadError, ValueError) as error:
            raise qtls.AlertDecodeError(f"malformed client Certificate: {error}") from None
        if not buf.eof():
            raise qtls.AlertDecodeError("extra bytes after the client Certificate")
        if certificate.request_context:
            raise qtls.AlertIllegalParameter("client Certificate with a request context we never sent")
        leaf = self._verifier.verify([der for der, _extensions in certificate.certificates], self._sni)
        self._leaf = leaf
        self._public_key = leaf.public_key()
        self._context.key_schedule.update_hash(message)
        self._stage = self._VERIFY

    def _certificate_verify(self, message: bytes) -> None:
        buf = Buffer(data=message)
        try:
            verify = qtls.pull_certificate_verify(buf)
        except (BufferReadError, ValueError) as error:
            raise qtls.AlertDecodeError(f"malformed client CertificateVerify: {error}") from None
        if not buf.eof():
            raise qtls.AlertDecodeError("extra bytes after the client CertificateVerify")
        schedule = self._context.key_schedule
        if verify.algorithm not in OFFERED_SCHEMES:
            raise ClientCertificateRefused(
                self._sni, f"signature scheme {verify.algorithm:#06x} was not offered", qtls.AlertDescription.illegal_parameter
            )
        try:
            check_signature(self._public_key, verify.algorithm, schedule.certificate_verify_data(_CLIENT_CONTEXT), verify.signature)
        except InvalidSignature as error:
            reason = str(error) or "the CertificateVerify signature does not match the client certificate"
            raise ClientCertificateRefused(self._sni, reason, qtls.AlertDescription.decrypt_error) from None
        schedule.update_hash(message)
        self._stage = self._FINISHED
        assert self._leaf is not None
        self._on_verified(self._leaf)


def require_client_certificate(
    context: qtls.Context,
    handshake_buf: Buffer,
    verifier: ClientVerifier,
    *,
    sni: str | None = None,
    on_verified: Callable[[x509.Certificate], None] = lambda leaf: None,
    on_refused: Callable[[QuicRefusal], None] = lambda refusal: None,
) -> None:
    """Make this qh3 server handshake require a client certificate ``verifier`` accepts.

    Call it with the ClientHello in hand, just before qh3's ``_server_handle_hello`` runs,
    passing that call's handshake-epoch output buffer.
    """
    # No PSK resumption or tickets: a resumed handshake would skip the certificate.
    context.get_session_ticket_cb = None
    context.new_session_ticket_cb = None
    # qh3 precomputes the client's Finished over a transcript without client certificates
    # unless ALPS was negotiated; the flag only makes it wait for the Finished itself here
    # (no ALPS extension is sent: the server does not support ALPS, and our front below
    # passes nothing but the Finished to qh3).
    context._alps_negotiated = True
    set_key = context.update_traffic_key_cb

    def traffic_key(direction, epoch, cipher_suite, secret):  # type: ignore[no-untyped-def]
        # The first key qh3 installs is the handshake key, right after it created the
        # schedule and before EncryptedExtensions: the moment to tap the transcript.
        context.update_traffic_key_cb = set_key
        context.key_schedule = _TranscriptTap(context.key_schedule, context, handshake_buf, verifier.request)
        set_key(direction, epoch, cipher_suite, secret)

    context.update_traffic_key_cb = traffic_key
    context.handle_message = _ClientAuthentication(context, verifier, sni, on_verified, on_refused).handle_message

