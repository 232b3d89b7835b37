"""Per-SNI certificates for QUIC, and the key exchange group actually negotiated.

``qh3`` takes one certificate per :class:`QuicConfiguration`; rpxy serves one per app.
:class:`ServerQuicConnection` reads the ClientHello just before qh3 answers it, asks a
:class:`CertificateChooser` for the app named by the SNI (the same
:class:`~rpxy.tls.SniContextMap` the TCP port uses, so certificate reloads apply to new
QUIC handshakes at once) and installs that app's chain and key. An unknown or missing
SNI fails the handshake, as on TCP. Apps with client certificates (mTLS) are served
too, beyond rpxy (which disables HTTP/3 for them): :mod:`rpxy.quic.client_auth` adds the
CertificateRequest and the client-certificate checks qh3's server lacks.

Groups: qh3 answers the first key share the client offers that it supports; clients
that offer X25519MLKEM768 (qh3, Chrome, Firefox, curl with OpenSSL 3.5) put it first.
:attr:`ServerQuicConnection.group` names the one negotiated.
"""

from __future__ import annotations

import weakref
from typing import Callable

from cryptography.hazmat.primitives import serialization
from qh3 import tls as qtls
from qh3._hazmat import Buffer
from qh3.quic import connection as qconnection
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters
from qh3.tls import load_pem_private_key, load_pem_x509_certificates

from rpxy.quic.client_auth import ClientVerifier, QuicRefusal, require_client_certificate
from rpxy.tls.contexts import AppTls
from rpxy.tls.names import normalize_server_name
from rpxy.tls.sni import SniContextMap

__all__ = ["CertificateChooser", "QuicMaterial", "ServerQuicConnection", "UnusableSni", "group_name", "with_stream_limits"]

QuicMaterial = tuple  # (leaf, [chain...], private key), qh3 objects

_GROUP_NAMES = {
    int(qtls.Group.X25519ML768): "X25519MLKEM768",
    int(qtls.Group.X25519): "X25519",
    int(qtls.Group.SECP256R1): "secp256r1",
    int(qtls.Group.SECP384R1): "secp384r1",
    int(qtls.Group.SECP521R1): "secp521r1",
}


def group_name(group: int | None) -> str | None:
    if group is None:
        return None
    return _GROUP_NAMES.get(int(group), hex(int(group)))


_REASONS = {
    "no_sni": "the client sent no server name",
    "unknown_sni": "no app has this server name",
}


class UnusableSni(QuicRefusal):
    """The handshake names no app this QUIC port can serve: ``unrecognized_name``, as on TCP."""

    def __init__(self, category: str, sni: str | None) -> None:
        super().__init__(category, sni, _REASONS.get(category, category), qtls.AlertDescription.unrecognized_name)


def to_quic_material(entry: AppTls) -> QuicMaterial:
    """qh3's view of an app's certificate chain and key (PEM round trip, done once per entry)."""
    chain_pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in entry.certified_key.chain)
    key_pem = entry.certified_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    certs = load_pem_x509_certificates(chain_pem)
    return certs[0], certs[1:], load_pem_private_key(key_pem)


class CertificateChooser:
    """SNI -> qh3 certificate material (and client verifier), read from the current TLS map at each handshake."""

    def __init__(self, contexts: Callable[[], SniContextMap | None]) -> None:
        self._contexts = contexts
        self._cache: weakref.WeakKeyDictionary[AppTls, QuicMaterial] = weakref.WeakKeyDictionary()
        self._verifiers: weakref.WeakKeyDictionary[AppTls, ClientVerifier] = weakref.WeakKeyDictionary()
        #: The ACME service (``rpxy.acme.AcmeService``) once there is one: names it manages
        #: are served with its certificates, as on the TLS port.
        self.acme = None

    def choose(self, sni: str | None) -> tuple[str, QuicMaterial, ClientVerifier | None]:
        """``(normalized server name, material, client verifier or None)``; raises :class:`UnusableSni`."""
        name = normalize_server_name(sni) if sni else None
        if name is None:
            raise UnusableSni("no_sni", sni)
        acme = self.acme
        if acme is not None:
            managed = acme.lookup(name)
            if managed is not None:
                return name, self.material(managed), None
            if acme.missing(name) is not None:
                raise UnusableSni("unknown_sni", sni)  # a managed name without a certificate yet
        contexts = self._contexts()
        entry = contexts.lookup_normalized(name) if contexts is not None else None
        if entry is None:
            raise UnusableSni("unknown_sni", sni)
        return name, self.material(entry), self.verifier(entry)

    def material(self, entry: AppTls) -> QuicMaterial:
        material = self._cache.get(entry)
        if material is None:
            material = self._cache[entry] = to_quic_material(entry)
        return material

    def verifier(self, entry: AppTls) -> ClientVerifier | None:
        """The app's client-certificate check (None without mTLS); one per TLS entry, so reloads apply."""
        if not entry.client_auth:
            return None
        verifier = self._verifiers.get(entry)
        if verifier is None:
            verifier = self._verifiers[entry] = ClientVerifier(entry.client_cas)
        return verifier

    def any_material(self) -> QuicMaterial | None:
        """Some app's material: qh3 insists on a certificate in the configuration up front."""
        contexts = self._contexts()
        for entry in contexts if contexts is not None else ():
            return self.material(entry)
        acme = self.acme
        for domain in getattr(acme, "domains", {}).values():
            if domain.entry is not None:
                return self.material(domain.entry)
        return None


# Positions of local_max_streams_bidi/uni among QuicConnectionCore's 28 arguments (qh3 2.1).
_CORE_ARGUMENTS = 28
_LOCAL_MAX_STREAMS_BIDI = 21
_LOCAL_MAX_STREAMS_UNI = 22


def with_stream_limits(parameters: bytes, bidi: int, uni: int) -> bytes:
    """Encoded QUIC transport parameters with our ``initial_max_streams_bidi/uni``."""
    decoded = pull_quic_transport_parameters(Buffer(data=parameters))
    decoded.initial_max_streams_bidi = bidi
    decoded.initial_max_streams_uni = uni
    buf = Buffer(capacity=len(parameters) + 32)
    push_quic_transport_parameters(buf, decoded)
    return buf.data


class ServerQuicConnection(QuicConnection):
    """A server-side qh3 connection that picks its certificate by the ClientHello's SNI.

    ``stream_limits`` = ``(max_concurrent_bidistream, max_concurrent_unistream)``: how many
    streams of each kind the client may have open. qh3 fixes them at 100 and 103, both in
    the transport parameters it sends and in its native core, which enforces them and
    extends them as streams end; both places get ours.
    """

    def __init__(  # type: ignore[no-untyped-def]
        self, *, chooser: CertificateChooser, stream_limits: tuple[int, int] | None = None, **kwargs
    ) -> None:
        self.stream_limits = stream_limits
        super().__init__(**kwargs)
        self.chooser = chooser
        #: The normalized SNI of the handshake (set once the ClientHello was read).
        self.sni: str | None = None
        #: The name of the key exchange group negotiated, e.g. ``"X25519MLKEM768"``.
        self.group: str | None = None
        #: Why the handshake was refused (a failure category, as on TCP), if it was.
        self.refusal: QuicRefusal | None = None
        #: The client certificate an mTLS app verified (cryptography ``x509.Certificate``).
        self.client_certificate = None

    def _create_tls(self, remote_source_cid):  # type: ignore[no-untyped-def]
        bridge = super()._create_tls(remote_source_cid)
        context = bridge.tls
        original = context._server_handle_hello

        def handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf):  # type: ignore[no-untyped-def]
            hello = qtls.pull_client_hello(Buffer(data=input_buf.raw_data))
            try:
                name, (leaf, chain, key), verifier = self.chooser.choose(hello.server_name)
            except UnusableSni as refusal:
                self.refusal = refusal
                raise
            self.sni = name
            context.certificate = leaf
            context.certificate_chain = list(chain)
            context.certificate_private_key = key
            if verifier is not None:
                require_client_certificate(
                    context, handshake_buf, verifier, sni=name, on_verified=self._verified, on_refused=self._refused
                )
            offered = [share[0] for share in hello.key_share or ()]
            original(input_buf, initial_buf, handshake_buf, onertt_buf)
            self.group = group_name(_chosen_group(context, offered))

        context._server_handle_hello = handle_hello
        if self.stream_limits is not None:
            bidi, uni = self.stream_limits
            serialize = bridge.serialize_transport_parameters

            def limited() -> bytes:  # qh3 calls it again when it changes the QUIC version
                return with_stream_limits(serialize(), bidi, uni)

            bridge.serialize_transport_parameters = limited  # type: ignore[method-assign]
            context.handshake_extensions = [(qtls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, limited())]
        return bridge

    def _create_core(self, remote_addr, initial_dcid, now):  # type: ignore[no-untyped-def]
        if self.stream_limits is None:
            return super()._create_core(remote_addr, initial_dcid, now)
        bidi, uni = self.stream_limits
        native = qconnection.QuicConnectionCore

        def core(*arguments):  # type: ignore[no-untyped-def]
            if len(arguments) != _CORE_ARGUMENTS:
                raise RuntimeError(f"qh3's QuicConnectionCore takes {len(arguments)} arguments, rpxy knows 28")
            arguments = list(arguments)
            arguments[_LOCAL_MAX_STREAMS_BIDI] = bidi
            arguments[_LOCAL_MAX_STREAMS_UNI] = uni
            return native(*arguments)

        # The reactor thread is the only one creating connections: the swap is not seen elsewhere.
        qconnection.QuicConnectionCore = core
        try:
            return super()._create_core(remote_addr, initial_dcid, now)
        finally:
            qconnection.QuicConnectionCore = native

    def _verified(self, leaf) -> None:  # type: ignore[no-untyped-def]
        self.client_certificate = leaf

    def _refused(self, refusal: QuicRefusal) -> None:
        self.refusal = refusal


def _chosen_group(context, offered: list[int]) -> int | None:  # type: ignore[no-untyped-def]
    """The group qh3 answered with: the first offered share whose private key it made."""
    attributes = {
        int(qtls.Group.X25519): "_x25519_private_key",
        int(qtls.Group.X25519ML768): "_x25519_kyber_768_private_key",
        int(qtls.Group.SECP256R1): "_ec_p256_private_key",
        int(qtls.Group.SECP384R1): "_ec_p384_private_key",
        int(qtls.Group.SECP521R1): "_ec_p521_private_key",
    }
    for group in offered:
        attribute = attributes.get(int(group))
        if attribute is not None and getattr(context, attribute, None) is not None:
            return int(group)
    return None
