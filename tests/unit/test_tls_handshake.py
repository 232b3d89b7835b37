"""Real in-memory handshakes through TlsServerFactory: SNI choice, protocol policy, groups, ALPN."""

from __future__ import annotations


import pytest
from OpenSSL import SSL

from rpxy.tls import GROUPS, SniContextMap, TlsOptions, connection_sni, tls_info
from rpxy.tls.contexts import TLS12_CIPHERS
from rpxy.tls.groups import set_context_groups


from tests.support.tlsgen import Authority, TlsHarness, client_context, make_app_tls  # noqa: E402


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority("handshake test CA")


@pytest.fixture(scope="module")
def contexts(ca, tmp_path_factory) -> SniContextMap:
    d = tmp_path_factory.mktemp("certs")
    return SniContextMap(
        [
            make_app_tls(d, ca, "alpha", "alpha.test"),
            make_app_tls(d, ca, "beta", "beta.test", kind="rsa"),
            make_app_tls(d, ca, "wild", "*.example.com", names=("*.example.com",)),
            make_app_tls(d, ca, "exact", "www.example.com"),
        ]
    )


@pytest.fixture
def harness(contexts) -> TlsHarness:
    return TlsHarness(contexts)


# -- SNI -> certificate ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "served", "app"),
    [
        ("alpha.test", ["alpha.test"], "alpha"),
        ("beta.test", ["beta.test"], "beta"),
        ("ALPHA.Test.", ["alpha.test"], "alpha"),  # case-insensitive, trailing dot ignored
        ("shop.example.com", ["*.example.com"], "wild"),
        ("www.example.com", ["www.example.com"], "exact"),  # exact beats the wildcard
        ("WWW.EXAMPLE.COM", ["www.example.com"], "exact"),
    ],
)
def test_certificate_chosen_by_sni(harness, ca, sni, served, app):
    session = harness.connect(sni, client_context(trust=ca))
    assert session.established, session.client_error
    assert session.server_names() == served
    info = tls_info(session.app.transport)
    assert info.app_name == app
    assert info.sni == sni.lower().rstrip(".")
    assert connection_sni(session.app.transport) == info.sni
    assert session.app.handshake_done
    assert session.request(b"ping") == b"echo:ping"
    assert harness.failures == []


@pytest.mark.parametrize("sni", ["example.com", "a.b.example.com", "gamma.test", "alpha.test.evil"])
def test_unknown_sni_refused(harness, ca, sni):
    session = harness.connect(sni, client_context(trust=ca))
    assert not session.established
    assert "unrecognized name" in str(session.client_error)
    [failure] = harness.failures
    assert failure.category == "unknown_sni"
    assert failure.sni == sni
    assert failure.peer.startswith("192.0.2.7:")
    assert harness.apps.built == []  # no application protocol for a refused name


def test_missing_sni_refused(harness, ca):
    session = harness.connect(None, client_context(trust=ca))
    assert not session.established
    assert "unrecognized name" in str(session.client_error)
    [failure] = harness.failures
    assert failure.category == "no_sni"
    assert failure.sni is None
    assert session.closed


def test_hostile_sni_is_escaped_in_the_failure(harness):
    session = harness.connect(b"evil\nname.test", client_context())
    assert not session.established
    [failure] = harness.failures
    assert failure.category == "unknown_sni"
    assert "\n" not in failure.sni and "\\x0a" in failure.sni


# -- protocol versions and ciphers -------------------------------------------------------


def test_tls13_is_default_and_tls12_works(harness, ca):
    s13 = harness.connect("alpha.test", client_context(trust=ca))
    assert s13.client.get_protocol_version_name() == "TLSv1.3"
    s12 = harness.connect("alpha.test", client_context(trust=ca, max_version=SSL.TLS1_2_VERSION))
    assert s12.established
    assert s12.client.get_protocol_version_name() == "TLSv1.2"
    assert s12.client.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"
    rsa12 = harness.connect("beta.test", client_context(trust=ca, max_version=SSL.TLS1_2_VERSION))
    assert rsa12.client.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION])
def test_old_protocol_versions_refused(harness, version):
    client = client_context(max_version=version, ciphers="DEFAULT:@SECLEVEL=0")
    session = harness.connect("alpha.test", client)
    assert not session.established
    assert "protocol version" in str(session.client_error)
    [failure] = harness.failures
    assert failure.category == "handshake"
    assert failure.app == "alpha"
    assert "unsupported protocol" in failure.reason


@pytest.mark.parametrize(
    ("sni", "ciphers"),
    [
        ("alpha.test", "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA"),  # CBC (non-AEAD)
        ("beta.test", "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA"),
        ("beta.test", "AES128-GCM-SHA256:AES256-GCM-SHA384"),  # AEAD but RSA key exchange
    ],
)
def test_tls12_non_ecdhe_aead_ciphers_refused(harness, sni, ciphers):
    session = harness.connect(sni, client_context(max_version=SSL.TLS1_2_VERSION, ciphers=ciphers))
    assert not session.established
    [failure] = harness.failures
    assert failure.category == "handshake"
    assert "no shared cipher" in failure.reason


def test_cipher_list_is_ecdhe_aead_only():
    for suite in TLS12_CIPHERS.split(":"):
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20-POLY1305" in suite)


def test_server_cipher_preference(harness):
    client = client_context(
        max_version=SSL.TLS1_2_VERSION,
        ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    assert harness.connect("alpha.test", client).client.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"
    client13 = client_context()
    client13.set_tls13_ciphersuites(b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")
    assert harness.connect("alpha.test", client13).client.get_cipher_name() == "TLS_AES_128_GCM_SHA256"


def test_context_options(tmp_path, ca):
    fresh = make_app_tls(tmp_path, ca, "fresh", "fresh.test")
    options = fresh.context.set_options(0)  # returns the current bitmask (before any connection)
    for flag in (SSL.OP_NO_COMPRESSION, SSL.OP_CIPHER_SERVER_PREFERENCE, SSL.OP_NO_RENEGOTIATION):
        assert options & flag == flag


def test_renegotiation_refused(harness):
    session = harness.connect("alpha.test", client_context(max_version=SSL.TLS1_2_VERSION))
    assert session.request(b"one") == b"echo:one"
    assert session.client.renegotiate()
    with pytest.raises(SSL.WantReadError):
        session.client.do_handshake()
    harness.pump(session)
    with pytest.raises(SSL.Error, match="no renegotiation"):
        session.client.do_handshake()


# -- key exchange groups --------------------------------------------------------------------


def test_client_offering_only_x25519mlkem768(harness, ca):
    session = harness.connect("alpha.test", client_context(trust=ca, groups="X25519MLKEM768"))
    assert session.established, session.client_error
    assert session.client.get_group_name() == "X25519MLKEM768"
    assert tls_info(session.app.transport).group == "X25519MLKEM768"  # the server's view


@pytest.mark.parametrize(
    "client_groups",
    [
        None,  # OpenSSL's default client: ML-KEM and X25519 key shares
        "X25519:X25519MLKEM768:P-256",  # prefers X25519, key share only for X25519 -> HelloRetryRequest
        "*X25519:*X25519MLKEM768",  # both key shares, X25519 first
        "P-256:P-384:X25519MLKEM768",
    ],
)
def test_post_quantum_group_is_the_servers_first_preference(harness, client_groups):
    session = harness.connect("alpha.test", client_context(groups=client_groups))
    assert session.established, session.client_error
    assert session.client.get_group_name() == "X25519MLKEM768"


@pytest.mark.parametrize(
    ("client_groups", "negotiated"),
    [("X25519", "x25519"), ("P-256", "secp256r1"), ("P-384", "secp384r1"), ("P-384:P-256", "secp384r1")],
)
def test_classical_groups_for_clients_without_ml_kem(harness, client_groups, negotiated):
    session = harness.connect("alpha.test", client_context(groups=client_groups))
    assert session.client.get_group_name() == negotiated


@pytest.mark.parametrize("client_groups", ["P-521", "X448", "ffdhe2048"])
def test_groups_outside_the_list_refused(harness, client_groups):
    # OpenSSL's default server list would accept these: the list is really set.
    session = harness.connect("alpha.test", client_context(groups=client_groups))
    assert not session.established
    assert harness.failure_categories() == ["handshake"]


def test_tls12_uses_a_classical_group(harness):
    session = harness.connect("alpha.test", client_context(max_version=SSL.TLS1_2_VERSION))
    assert session.client.get_group_name() == "x25519"


def test_group_list_is_applied_as_configured(contexts):
    assert contexts.get("alpha").groups == GROUPS == "X25519MLKEM768/X25519:P-256:P-384"
    with pytest.raises(ValueError):
        set_context_groups(SSL.Context(SSL.TLS_SERVER_METHOD), "NoSuchGroup", fallback=None)


# -- ALPN ---------------------------------------------------------------------------------------


def _alpn_contexts(tmp_path, ca, alpn):
    return SniContextMap([make_app_tls(tmp_path, ca, "alpha", "alpha.test", options=TlsOptions(alpn=alpn))],
                         options=TlsOptions(alpn=alpn))


@pytest.mark.parametrize(
    ("server", "offered", "chosen"),
    [
        ((b"h2", b"http/1.1"), [b"h2", b"http/1.1"], b"h2"),
        ((b"h2", b"http/1.1"), [b"http/1.1", b"h2"], b"h2"),  # the server's order wins
        ((b"http/1.1",), [b"h2", b"http/1.1"], b"http/1.1"),  # h2 not enabled
        ((b"h2", b"http/1.1"), [b"http/1.1"], b"http/1.1"),  # h2 not offered
        ((b"http/1.1",), [b"h2"], None),  # no overlap: no ALPN, handshake still succeeds
        ((b"http/1.1",), None, None),  # client without ALPN
    ],
)
def test_alpn_selection(tmp_path, ca, server, offered, chosen):
    harness = TlsHarness(_alpn_contexts(tmp_path, ca, server))
    session = harness.connect("alpha.test", client_context(alpn=offered))
    assert session.established, session.client_error
    assert (session.client.get_alpn_proto_negotiated() or None) == chosen
    assert tls_info(session.app.transport).alpn == chosen
    assert session.app.transport.negotiatedProtocol == chosen


def test_invalid_alpn_option():
    with pytest.raises(ValueError):
        TlsOptions(alpn=(b"",))


def test_app_context_refuses_a_name_it_does_not_serve(contexts):
    """Defence in depth: even if a connection were created on the wrong app's context,
    OpenSSL's own reading of the SNI must name that app, or the handshake fails."""
    server = SSL.Connection(contexts.get("alpha").context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context(), None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"beta.test")
    errors = []
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                errors.append(exc)
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if errors:
            break
    assert errors
    assert client.get_peer_certificate() is None
