"""Per-SNI certificates for QUIC, and the key exchange group actually negotiated.

``qh3`` takes one certificate per :class:`QuicConfiguration`; rpxy serves one per app.
:class:`ServerQuicConnection` reads the ClientHello just before qh3 answers it, asks a
:class:`CertificateChooser` for the app named by the SNI (the same
:class:`~rpxy.tls.SniContextMap` the TCP port uses, so certificate reloads apply to new
QUIC handshakes at once) and installs that app's chain and key. An unknown or missing
SNI fails the handshake, as on TCP. Apps with client certificates (mTLS) are refused:
qh3's server cannot request a client certificate (rpxy also disables HTTP/3 for them).

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
from qh3.quic.connection import QuicConnection
from qh3.tls import load_pem_private_key, load_pem_x509_certificates

from rpxy.tls.contexts import AppTls
from rpxy.tls.names import normalize_server_name
from rpxy.tls.sni import SniContextMap

__all__ = ["CertificateChooser", "QuicMaterial", "ServerQuicConnection", "UnusableSni", "group_name"]

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
    "client_cert_unsupported_over_quic": "the app requires client certificates, which HTTP/3 does not serve",
}


class UnusableSni(qtls.Alert):
    """The handshake names no app this QUIC port can serve: the TLS alert the client gets.

    ``unrecognized_name`` (as on TCP) for a missing or unknown SNI, ``handshake_failure``
    for an mTLS app.
    """

    def __init__(self, category: str, sni: str | None) -> None:
        super().__init__(f"{category}: {sni!r}")
        self.category = category
        self.sni = sni
        self.reason = _REASONS.get(category, category)
        self.description = (
            qtls.AlertDescription.handshake_failure
            if category == "client_cert_unsupported_over_quic"
            else qtls.AlertDescription.unrecognized_name
        )


def to_quic_material(entry: AppTls) -> QuicMaterial:
    """qh3's view of an app's certificate chain and key (PEM round trip, done once per entry)."""
    chain_pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in entry.certified_key.chain)
    key_pem = entry.certified_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    certs = load_pem_x509_certificates(chain_pem)
    return certs[0], certs[1:], load_pem_private_key(key_pem)


class CertificateChooser:
    """SNI -> qh3 certificate material, read from the current TLS map at each handshake."""

    def __init__(self, contexts: Callable[[], SniContextMap | None]) -> None:
        self._contexts = contexts
        self._cache: weakref.WeakKeyDictionary[AppTls, QuicMaterial] = weakref.WeakKeyDictionary()
        #: The ACME service (``rpxy.acme.AcmeService``) once there is one: names it manages
        #: are served with its certificates, as on the TLS port.
        self.acme = None

    def choose(self, sni: str | None) -> tuple[str, QuicMaterial]:
        """``(normalized server name, material)``; raises :class:`UnusableSni`."""
        name = normalize_server_name(sni) if sni else None
        if name is None:
            raise UnusableSni("no_sni", sni)
        acme = self.acme
        if acme is not None:
            managed = acme.lookup(name)
            if managed is not None:
                return name, self.material(managed)
            if acme.missing(name) is not None:
                raise UnusableSni("unknown_sni", sni)  # a managed name without a certificate yet
        contexts = self._contexts()
        entry = contexts.lookup_normalized(name) if contexts is not None else None
        if entry is None:
            raise UnusableSni("unknown_sni", sni)
        if entry.client_auth:
            raise UnusableSni("client_cert_unsupported_over_quic", sni)
        return name, self.material(entry)

    def material(self, entry: AppTls) -> QuicMaterial:
        material = self._cache.get(entry)
        if material is None:
            material = self._cache[entry] = to_quic_material(entry)
        return material

    def any_material(self) -> QuicMaterial | None:
        """Some app's material: qh3 insists on a certificate in the configuration up front."""
        contexts = self._contexts()
        for entry in contexts if contexts is not None else ():
            if not entry.client_auth:
                return self.material(entry)
        acme = self.acme
        for domain in getattr(acme, "domains", {}).values():
            if domain.entry is not None:
                return self.material(domain.entry)
        return None


class ServerQuicConnection(QuicConnection):
    """A server-side qh3 connection that picks its certificate by the ClientHello's SNI."""

    def __init__(self, *, chooser: CertificateChooser, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.chooser = chooser
        #: The normalized SNI of the handshake (set once the ClientHello was read).
        self.sni: str | None = None
        #: The name of the key exchange group negotiated, e.g. ``"X25519MLKEM768"``.
        self.group: str | None = None
        #: Why the handshake was refused (a failure category, as on TCP), if it was.
        self.refusal: UnusableSni | None = None

    def _create_tls(self, remote_source_cid):  # type: ignore[no-untyped-def]
        bridge = super()._create_tls(remote_source_cid)
        context = bridge.tls
        original = context._server_handle_hello

        def handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf):  # type: ignore[no-untyped-def]
            hello = qtls.pull_client_hello(Buffer(data=input_buf.raw_data))
            try:
                name, (leaf, chain, key) = self.chooser.choose(hello.server_name)
            except UnusableSni as refusal:
                self.refusal = refusal
                raise
            self.sni = name
            context.certificate = leaf
            context.certificate_chain = list(chain)
            context.certificate_private_key = key
            offered = [share[0] for share in hello.key_share or ()]
            original(input_buf, initial_buf, handshake_buf, onertt_buf)
            self.group = group_name(_chosen_group(context, offered))

        context._server_handle_hello = handle_hello
        return bridge


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
