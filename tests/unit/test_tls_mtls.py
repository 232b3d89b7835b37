"""Client certificates per app, and session resumption that never crosses apps."""

from __future__ import annotations


import pytest
from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOFactory

from rpxy.tls import SniConnectionCreator, SniContextMap, tls_info
from rpxy.tls.connections import connection_state


from tests.support.tlsgen import Authority, TlsHarness, client_context, make_app_tls  # noqa: E402

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtls")
    server_ca = Authority("server CA")
    client_ca = Authority("client CA")
    rogue_ca = Authority("rogue CA")
    contexts = SniContextMap(
        [
            make_app_tls(d, server_ca, "alpha", "alpha.test"),
            make_app_tls(d, server_ca, "beta", "beta.test"),
            make_app_tls(d, server_ca, "secure", "secure.test", client_ca=client_ca),
            make_app_tls(d, server_ca, "wild", "*.wild.test", names=("*.wild.test",)),
        ]
    )
    return {
        "contexts": contexts,
        "server_ca": server_ca,
        "good": client_ca.issue(client=True, common_name="alice"),
        "rogue": rogue_ca.issue(client=True, common_name="mallory"),
        "client_ca": client_ca,
    }


@pytest.fixture
def harness(pki) -> TlsHarness:
    return TlsHarness(pki["contexts"])


# -- mTLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_mtls_app_requires_a_client_certificate(harness, pki, version):
    session = harness.connect("secure.test", client_context(trust=pki["server_ca"], max_version=version))
    assert not session.established
    assert harness.apps.built == [] or not session.app.handshake_done
    [failure] = harness.failures
    assert failure.category == "client_cert"
    assert failure.app == "secure"
    assert "did not return a certificate" in failure.reason


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_mtls_accepts_a_certificate_from_its_ca(harness, pki, version):
    client = client_context(trust=pki["server_ca"], cert=pki["good"], max_version=version)
    session = harness.connect("secure.test", client)
    assert session.established, session.client_error
    assert session.request(b"hi") == b"echo:hi"
    info = tls_info(session.app.transport)
    assert info.client_auth and info.app_name == "secure"
    assert info.client_certificate == pki["good"].cert
    assert harness.failures == []


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_mtls_refuses_a_certificate_from_another_ca(harness, pki, version):
    client = client_context(trust=pki["server_ca"], cert=pki["rogue"], max_version=version)
    session = harness.connect("secure.test", client)
    assert not session.established
    [failure] = harness.failures
    assert failure.category == "client_cert"
    assert "certificate verify failed" in failure.reason


def test_server_certificate_as_client_certificate_refused(harness, pki):
    # Signed by the server CA, which the mTLS app does not trust for clients.
    leaf = pki["server_ca"].issue(client=True, common_name="server-ca-client")
    session = harness.connect("secure.test", client_context(cert=leaf))
    assert not session.established
    assert harness.failure_categories() == ["client_cert"]


def test_only_the_mtls_app_asks_for_certificates(harness, pki):
    plain = harness.connect("alpha.test", client_context(trust=pki["server_ca"]))
    assert plain.established
    assert plain.client.get_client_ca_list() == []
    assert tls_info(plain.app.transport).client_certificate is None

    secure = harness.connect("secure.test", client_context(cert=pki["good"]))
    assert secure.established
    [ca_name] = secure.client.get_client_ca_list()
    assert ca_name.CN == "client CA"


def test_other_apps_unaffected_by_a_failed_mtls_handshake(harness, pki):
    assert not harness.connect("secure.test", client_context()).established
    for name in ("alpha.test", "beta.test", "x.wild.test"):
        assert harness.connect(name, client_context(trust=pki["server_ca"])).established
    assert harness.failure_categories() == ["client_cert"]


# -- resumption -------------------------------------------------------------------------------


def _first_session(harness, sni, client, *, request=True):
    session = harness.connect(sni, client)
    assert session.established, session.client_error
    if request:
        assert session.request(b"x") == b"echo:x"  # delivers TLS 1.3 tickets
    ticket = session.client.get_session()
    session.close()
    return ticket


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_resumption_works_within_one_app(harness, pki, version):
    """Control: the harness can observe a resumed session."""
    client = client_context(trust=pki["server_ca"], max_version=version)
    ticket = _first_session(harness, "alpha.test", client)
    again = harness.connect("alpha.test", client, session=ticket)
    assert again.established
    assert again.reused()
    assert tls_info(again.app.transport).resumed


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_session_from_one_app_does_not_resume_on_another(harness, pki, version):
    client = client_context(trust=pki["server_ca"], max_version=version)
    ticket = _first_session(harness, "alpha.test", client)
    other = harness.connect("beta.test", client, session=ticket)
    assert other.established
    assert not other.reused()
    assert other.server_names() == ["beta.test"]
    assert tls_info(other.app.transport).app_name == "beta"


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_session_without_client_auth_never_enters_the_mtls_app(harness, pki, version):
    client = client_context(trust=pki["server_ca"], max_version=version)
    ticket = _first_session(harness, "alpha.test", client)
    attack = harness.connect("secure.test", client, session=ticket)
    assert not attack.reused()
    assert not attack.established
    assert harness.failure_categories() == ["client_cert"]


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_mtls_app_never_resumes(harness, pki, version):
    client = client_context(trust=pki["server_ca"], cert=pki["good"], max_version=version)
    ticket = _first_session(harness, "secure.test", client)
    again = harness.connect("secure.test", client, session=ticket)
    assert again.established
    assert not again.reused()  # every connection verifies a certificate again


def test_wildcard_app_resumes_across_its_names_and_reports_the_new_sni(harness, pki):
    client = client_context(trust=pki["server_ca"], max_version=TLS12)
    ticket = _first_session(harness, "one.wild.test", client)
    again = harness.connect("two.wild.test", client, session=ticket)
    assert again.reused()
    info = tls_info(again.app.transport)
    # OpenSSL's get_servername() reports the original name on a resumed TLS 1.2 session;
    # the proxy reports what this ClientHello asked for.
    assert again.app.transport.getHandle().get_servername() == b"one.wild.test"
    assert info.sni == "two.wild.test"


def test_apps_have_distinct_session_id_contexts(pki):
    from rpxy.tls.contexts import session_id_context

    ids = {session_id_context(e.app_name, e.server_name) for e in pki["contexts"]}
    assert len(ids) == len(pki["contexts"])


# -- the SNI-callback path (plain TLSMemoryBIOFactory + SniConnectionCreator) ----------------


class RecordingCreator(SniConnectionCreator):
    def __init__(self, contexts) -> None:
        super().__init__(contexts)
        self.created: list[SSL.Connection] = []

    def serverConnectionForTLS(self, tlsProtocol):
        connection = super().serverConnectionForTLS(tlsProtocol)
        self.created.append(connection)
        return connection


@pytest.fixture
def plain_factory(pki, harness):
    factory = TLSMemoryBIOFactory(RecordingCreator(pki["contexts"]), False, harness.apps, clock=harness.clock)
    return factory


def test_callback_path_serves_the_right_certificate(harness, pki, plain_factory):
    for sni, names, app in (("alpha.test", ["alpha.test"], "alpha"), ("z.wild.test", ["*.wild.test"], "wild")):
        session = harness.connect(sni, client_context(trust=pki["server_ca"]), factory=plain_factory)
        assert session.established, session.client_error
        assert session.server_names() == names
        assert tls_info(session.app.transport).app_name == app
        assert session.request(b"q") == b"echo:q"


@pytest.mark.parametrize(("sni", "category"), [("nobody.test", "unknown_sni"), (None, "no_sni")])
def test_callback_path_refuses_unknown_and_missing_sni(harness, pki, sni, category):
    creator = RecordingCreator(pki["contexts"])
    factory = TLSMemoryBIOFactory(creator, False, harness.apps, clock=harness.clock)
    session = harness.connect(sni, client_context(), factory=factory)
    assert not session.established
    app = session.app
    assert app is not None and app.lost is not None  # Twisted built the app; it saw the failure
    [connection] = creator.created
    state = connection_state(connection)
    assert state.failure_category == category
    assert state.entry is None


def test_callback_path_enforces_mtls(harness, pki, plain_factory):
    without = harness.connect("secure.test", client_context(), factory=plain_factory)
    assert not without.established
    assert "certificate" in str(without.app.lost.value)
    rogue = harness.connect("secure.test", client_context(cert=pki["rogue"]), factory=plain_factory)
    assert not rogue.established
    good = harness.connect("secure.test", client_context(cert=pki["good"]), factory=plain_factory)
    assert good.established, good.client_error
    assert tls_info(good.app.transport).client_certificate == pki["good"].cert


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_callback_path_disables_resumption(harness, pki, plain_factory, version):
    client = client_context(trust=pki["server_ca"], max_version=version)
    first = harness.connect("alpha.test", client, factory=plain_factory)
    assert first.request(b"x") == b"echo:x"
    ticket = first.client.get_session()
    first.close()
    for sni in ("alpha.test", "beta.test"):
        again = harness.connect(sni, client, session=ticket, factory=plain_factory)
        assert again.established and not again.reused()
    attack = harness.connect("secure.test", client, session=ticket, factory=plain_factory)
    assert not attack.reused() and not attack.established
