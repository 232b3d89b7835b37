"""Client certificates over QUIC: whole TLS 1.3 handshakes between qh3's client and a qh3
server context with :func:`rpxy.quic.client_auth.require_client_certificate`, in memory.

The client is qh3's own (its client half does answer a CertificateRequest); each case
checks what the server decided and, for refusals, which alert the client would get.
"""

from __future__ import annotations

import datetime
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from qh3 import tls as qtls
from qh3._hazmat import Buffer
from qh3.tls import Epoch, load_pem_private_key, load_pem_x509_certificates

from rpxy.quic.client_auth import (
    OFFERED_SCHEMES,
    ClientCertificateRefused,
    ClientVerifier,
    certificate_request,
    check_signature,
    require_client_certificate,
)
from tests.support.tlsgen import Authority, Leaf

SERVER_NAME = "mtls.test"


@pytest.fixture(scope="module")
def pki():
    server_ca = Authority("server CA")
    client_ca = Authority("client CA")
    other_ca = Authority("other CA")
    return {
        "server_ca": server_ca,
        "server": server_ca.issue(SERVER_NAME),
        "client_ca": client_ca,
        "client": client_ca.issue(client=True, common_name="alice"),
        "client_rsa": client_ca.issue(client=True, common_name="bob", kind="rsa"),
        "stranger": other_ca.issue(client=True, common_name="mallory"),
        "server_purpose": client_ca.issue("x.test"),  # serverAuth EKU only
    }


def _qh3_material(leaf: Leaf):
    certs = load_pem_x509_certificates(leaf.cert_pem())
    return certs[0], certs[1:], load_pem_private_key(leaf.key_pem())


def _buffers() -> dict:
    return {epoch: Buffer(capacity=16384) for epoch in (Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ONE_RTT)}


class Handshake:
    """A qh3 client and an mTLS-requiring qh3 server context, stepped by hand."""

    def __init__(self, pki, client_leaf: Leaf | None, *, verifier: ClientVerifier | None = None) -> None:
        self.verified: list[x509.Certificate] = []
        self.refusals: list[ClientCertificateRefused] = []
        self.verifier = verifier or ClientVerifier([pki["client_ca"].cert])
        server = qtls.Context(is_client=False, alpn_protocols=["h3"])
        server.certificate, server.certificate_chain, server.certificate_private_key = _qh3_material(pki["server"])
        original = server._server_handle_hello

        def handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf):  # type: ignore[no-untyped-def]
            require_client_certificate(
                server,
                handshake_buf,
                self.verifier,
                sni=SERVER_NAME,
                on_verified=self.verified.append,
                on_refused=self.refusals.append,
            )
            original(input_buf, initial_buf, handshake_buf, onertt_buf)

        server._server_handle_hello = handle_hello
        # The server's certificate is not what these tests are about (tests/integration/test_h3.py
        # verifies it): the client skips that check.
        client = qtls.Context(is_client=True, alpn_protocols=["h3"], server_name=SERVER_NAME, verify_mode=ssl.CERT_NONE)
        if client_leaf is not None:
            client.certificate, client.certificate_chain, client.certificate_private_key = _qh3_material(client_leaf)
        self.server, self.client = server, client

    def server_flight(self) -> dict:
        hello = _buffers()
        self.client.handle_message(b"", hello)
        flight = _buffers()
        self.server.handle_message(hello[Epoch.INITIAL].data, flight, Epoch.INITIAL)
        return flight

    def run(self) -> None:
        flight = self.server_flight()
        second = _buffers()
        self.client.handle_message(flight[Epoch.INITIAL].data, second, Epoch.INITIAL)
        self.client.handle_message(flight[Epoch.HANDSHAKE].data, second, Epoch.HANDSHAKE)
        self.second_flight = second[Epoch.HANDSHAKE].data
        self.server.handle_message(self.second_flight, _buffers(), Epoch.HANDSHAKE)


def _messages(data: bytes) -> list[bytes]:
    out = []
    while data:
        length = 4 + int.from_bytes(data[1:4], "big")
        out.append(data[:length])
        data = data[length:]
    return out


def test_a_client_certificate_from_the_apps_ca_completes_the_handshake(pki):
    for name in ("client", "client_rsa"):
        handshake = Handshake(pki, pki[name])
        handshake.run()
        assert handshake.server.state == qtls.State.SERVER_POST_HANDSHAKE
        assert handshake.client.state == qtls.State.CLIENT_POST_HANDSHAKE
        assert [cert.serial_number for cert in handshake.verified] == [pki[name].cert.serial_number]
        # The client did answer a CertificateRequest: Certificate, CertificateVerify, Finished.
        kinds = [message[0] for message in _messages(handshake.second_flight)]
        assert kinds == [qtls.HandshakeType.CERTIFICATE, qtls.HandshakeType.CERTIFICATE_VERIFY, qtls.HandshakeType.FINISHED]
        # The server's qh3 code carries on with its own handle_message afterwards.
        assert "handle_message" not in vars(handshake.server)


def test_the_request_names_the_client_ca_and_the_schemes_we_verify(pki):
    handshake = Handshake(pki, pki["client"])
    flight = handshake.server_flight()
    kinds = [message[0] for message in _messages(flight[Epoch.HANDSHAKE].data)]
    assert kinds[:3] == [
        qtls.HandshakeType.ENCRYPTED_EXTENSIONS,
        qtls.HandshakeType.CERTIFICATE_REQUEST,
        qtls.HandshakeType.CERTIFICATE,
    ]
    request = qtls.pull_certificate_request(Buffer(data=_messages(flight[Epoch.HANDSHAKE].data)[1]))
    assert request.request_context == b""
    assert tuple(request.signature_algorithms) == OFFERED_SCHEMES
    authorities = dict(request.other_extensions)[47]
    subject = pki["client_ca"].cert.subject.public_bytes()
    assert authorities == (len(subject) + 2).to_bytes(2, "big") + len(subject).to_bytes(2, "big") + subject
    # No session ticket: every connection to an mTLS app presents a certificate.
    assert flight[Epoch.ONE_RTT].data == b""


def _refusal(pki, leaf: Leaf | None) -> ClientCertificateRefused:
    handshake = Handshake(pki, leaf)
    with pytest.raises(ClientCertificateRefused) as caught:
        handshake.run()
    assert handshake.refusals == [caught.value]
    assert handshake.verified == []
    assert handshake.server.state != qtls.State.SERVER_POST_HANDSHAKE
    assert caught.value.category == "client_cert"
    assert caught.value.sni == SERVER_NAME
    return caught.value


def test_no_client_certificate_is_certificate_required(pki):
    refusal = _refusal(pki, None)
    assert refusal.description == qtls.AlertDescription.certificate_required
    assert "no certificate" in refusal.reason


def test_a_certificate_from_another_ca_is_unknown_ca(pki):
    refusal = _refusal(pki, pki["stranger"])
    assert refusal.description == qtls.AlertDescription.unknown_ca
    assert "certificate verify failed" in refusal.reason


def test_a_server_only_certificate_is_refused_for_its_purpose(pki):
    refusal = _refusal(pki, pki["server_purpose"])
    assert refusal.description == qtls.AlertDescription.bad_certificate
    assert "purpose" in refusal.reason


def test_an_expired_client_certificate_is_certificate_expired(pki):
    ca = pki["client_ca"]
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "late")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=3))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    refusal = _refusal(pki, Leaf(cert=cert, key=key, chain=(ca.cert,)))
    assert refusal.description == qtls.AlertDescription.certificate_expired


def test_a_signature_by_another_key_is_decrypt_error(pki):
    """A client presenting a valid certificate without its private key fails CertificateVerify."""
    thief = Leaf(cert=pki["client"].cert, key=ec.generate_private_key(ec.SECP256R1()), chain=pki["client"].chain)
    refusal = _refusal(pki, thief)
    assert refusal.description == qtls.AlertDescription.decrypt_error


def test_messages_out_of_order_or_oversized_are_refused(pki):
    handshake = Handshake(pki, pki["client"])
    handshake.run()
    certificate, verify, finished = _messages(handshake.second_flight)
    for second_flight in (finished, verify + finished, certificate + finished):
        again = Handshake(pki, pki["client"])
        flight = again.server_flight()
        with pytest.raises(qtls.Alert) as caught:
            again.server.handle_message(second_flight, _buffers(), Epoch.HANDSHAKE)
        assert caught.value.description in (qtls.AlertDescription.unexpected_message, qtls.AlertDescription.decrypt_error)
        assert again.server.state != qtls.State.SERVER_POST_HANDSHAKE
        assert flight  # the server did send its flight
    huge = Handshake(pki, pki["client"])
    huge.server_flight()
    with pytest.raises(ClientCertificateRefused, match="bytes"):
        huge.server.handle_message(bytes([11]) + (1 << 20).to_bytes(3, "big"), _buffers(), Epoch.HANDSHAKE)


def test_a_certificate_in_pieces_is_read_whole(pki):
    handshake = Handshake(pki, pki["client"])
    flight = handshake.server_flight()
    second = _buffers()
    handshake.client.handle_message(flight[Epoch.INITIAL].data, second, Epoch.INITIAL)
    handshake.client.handle_message(flight[Epoch.HANDSHAKE].data, second, Epoch.HANDSHAKE)
    data = second[Epoch.HANDSHAKE].data
    for start in range(0, len(data), 100):
        handshake.server.handle_message(data[start : start + 100], _buffers(), Epoch.HANDSHAKE)
    assert handshake.server.state == qtls.State.SERVER_POST_HANDSHAKE
    assert len(handshake.verified) == 1


def test_verifier_limits_and_usage(pki):
    verifier = ClientVerifier([pki["client_ca"].cert])
    der = pki["client"].cert.public_bytes(serialization.Encoding.DER)
    assert verifier.verify([der]).serial_number == pki["client"].cert.serial_number
    with pytest.raises(ClientCertificateRefused, match="exceeds"):
        verifier.verify([der] * 10)
    with pytest.raises(ClientCertificateRefused, match="unreadable"):
        verifier.verify([b"not a certificate"])
    with pytest.raises(ValueError):
        ClientVerifier([])


def test_check_signature_matches_scheme_to_key():
    data = b"transcript"
    keys = {
        0x0403: ec.generate_private_key(ec.SECP256R1()),
        0x0503: ec.generate_private_key(ec.SECP384R1()),
        0x0804: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        0x0807: ed25519.Ed25519PrivateKey.generate(),
    }
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import padding

    signatures = {
        0x0403: keys[0x0403].sign(data, ec.ECDSA(hashes.SHA256())),
        0x0503: keys[0x0503].sign(data, ec.ECDSA(hashes.SHA384())),
        0x0804: keys[0x0804].sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()),
        0x0807: keys[0x0807].sign(data),
    }
    for scheme, key in keys.items():
        check_signature(key.public_key(), scheme, data, signatures[scheme])
        with pytest.raises(InvalidSignature):
            check_signature(key.public_key(), scheme, data + b"!", signatures[scheme])
    with pytest.raises(InvalidSignature, match="does not fit"):
        check_signature(keys[0x0503].public_key(), 0x0403, data, signatures[0x0503])  # P-384 key, P-256 scheme
    with pytest.raises(InvalidSignature, match="does not fit"):
        check_signature(keys[0x0804].public_key(), 0x0403, data, signatures[0x0804])


def test_certificate_request_leaves_out_names_that_do_not_fit():
    many = [Authority(f"client CA {i} " + "x" * 40).cert for i in range(80)]
    request = qtls.pull_certificate_request(Buffer(data=certificate_request(many)))
    assert request.other_extensions == []
    assert tuple(request.signature_algorithms) == OFFERED_SCHEMES
