"""TlsServerFactory behaviour around the handshake: timeout, odd clients, hooks, map swaps."""

from __future__ import annotations


import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from rpxy.tls import HANDSHAKE_TIMEOUT, SniContextMap, TlsServerFactory, categorize_error, connection_sni
from rpxy.tls.failures import HandshakeFailure


from tests.support.tlsgen import Authority, EchoApp, EchoFactory, TlsHarness, client_context, make_app_tls  # noqa: E402


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority("server test CA")


@pytest.fixture(scope="module")
def contexts(ca, tmp_path_factory) -> SniContextMap:
    return SniContextMap([make_app_tls(tmp_path_factory.mktemp("c"), ca, "alpha", "alpha.test")])


def test_handshake_timeout_constant():
    assert HANDSHAKE_TIMEOUT == 15.0


def test_stalled_handshake_times_out(contexts):
    harness = TlsHarness(contexts)
    session = harness.open("alpha.test", client_context())
    harness.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not session.transport.disconnecting and harness.failures == []
    harness.clock.advance(0.2)
    assert session.transport.disconnected  # aborted
    [failure] = harness.failures
    assert failure.category == "timeout"
    assert failure.bytes_received == 0


def test_timeout_after_a_partial_client_hello(contexts):
    harness = TlsHarness(contexts)
    session = harness.open("alpha.test", client_context())
    try:
        session.client.do_handshake()
    except Exception:
        pass
    hello = session.client.bio_read(65536)
    session.front.dataReceived(hello[:100])
    harness.clock.advance(HANDSHAKE_TIMEOUT)
    assert harness.failure_categories() == ["timeout"]
    session.front.connectionLost(Failure(ConnectionDone()))
    assert harness.failure_categories() == ["timeout"]  # reported once


def test_timeout_while_the_tls_handshake_runs(contexts):
    """ClientHello answered, but the client never sends its Finished."""
    harness = TlsHarness(contexts)
    session = harness.open("alpha.test", client_context())
    try:
        session.client.do_handshake()
    except Exception:
        pass
    session.front.dataReceived(session.client.bio_read(65536))
    assert session.transport.value()  # ServerHello... sent
    assert session.app is not None and session.app.made and not session.app.handshake_done
    harness.clock.advance(HANDSHAKE_TIMEOUT)
    assert harness.failure_categories() == ["timeout"]
    assert session.transport.disconnected
    session.front.connectionLost(Failure(ConnectionDone()))
    assert session.app.lost is not None
    assert harness.failure_categories() == ["timeout"]


def test_completed_handshake_cancels_the_timeout(contexts):
    harness = TlsHarness(contexts)
    session = harness.connect("alpha.test", client_context())
    assert session.established
    harness.clock.advance(HANDSHAKE_TIMEOUT * 10)
    assert harness.failures == [] and not session.transport.disconnecting
    assert harness.clock.getDelayedCalls() == []
    assert session.request(b"still here") == b"echo:still here"


def test_bare_tcp_probe_is_reported_as_closed(contexts):
    harness = TlsHarness(contexts)
    session = harness.open("alpha.test", client_context())
    session.front.connectionLost(Failure(ConnectionDone()))
    [failure] = harness.failures
    assert failure.category == "closed" and failure.bytes_received == 0
    assert harness.clock.getDelayedCalls() == []


def test_plain_http_on_the_tls_port(contexts):
    harness = TlsHarness(contexts)
    session = harness.open("alpha.test", client_context())
    session.front.dataReceived(b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
    assert session.transport.disconnecting
    assert session.transport.value() == b""  # no TLS alert to a non-TLS client
    [failure] = harness.failures
    assert failure.category == "handshake" and "plain HTTP" in failure.reason


def test_peer_closing_mid_handshake_is_reported_once(contexts):
    harness = TlsHarness(contexts)
    session = harness.open("alpha.test", client_context())
    try:
        session.client.do_handshake()
    except Exception:
        pass
    session.front.dataReceived(session.client.bio_read(65536))
    session.front.connectionLost(Failure(ConnectionDone()))
    [failure] = harness.failures
    assert failure.category == "closed"
    assert failure.app == "alpha" and failure.sni == "alpha.test"


def test_sni_available_when_the_app_protocol_is_made(contexts):
    seen = []

    class SniApp(EchoApp):
        def connectionMade(self):
            seen.append(connection_sni(self.transport))

    class SniFactory(EchoFactory):
        def buildProtocol(self, addr):
            app = SniApp()
            self.built.append(app)
            return app

    harness = TlsHarness(contexts)
    harness.factory.app_factory = harness.apps = SniFactory()
    harness.factory.tls_factory.wrappedFactory = harness.apps
    assert harness.connect("Alpha.Test", client_context()).established
    assert seen == ["alpha.test"]


def test_app_factory_refusing_closes_the_connection(contexts):
    class Refusing(EchoFactory):
        def buildProtocol(self, addr):
            return None

    harness = TlsHarness(contexts)
    harness.factory.app_factory = harness.apps = Refusing()
    session = harness.connect("alpha.test", client_context())
    assert not session.established
    assert session.transport.disconnecting
    assert harness.failures == []  # a refusal by the application is not a TLS failure


def test_failure_hook_errors_do_not_break_the_listener(contexts):
    harness = TlsHarness(contexts)

    def broken(failure):
        raise RuntimeError("logger down")

    harness.factory.on_failure = broken
    assert not harness.connect("unknown.test", client_context()).established
    assert harness.connect("alpha.test", client_context()).established


def test_contexts_can_be_a_callable_read_per_connection(ca, tmp_path):
    first = SniContextMap([make_app_tls(tmp_path / "1", ca, "alpha", "alpha.test")])
    second = SniContextMap([make_app_tls(tmp_path / "2", ca, "beta", "beta.test")])
    current = [first]
    harness = TlsHarness(lambda: current[0])
    assert harness.connect("alpha.test", client_context()).established
    current[0] = second  # a config reload swaps the whole map
    assert harness.connect("beta.test", client_context()).established
    assert not harness.connect("alpha.test", client_context()).established
    assert harness.failure_categories() == ["unknown_sni"]


def test_default_failure_reporter_logs(contexts):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 1234))
        factory = TlsServerFactory(contexts, EchoFactory(), reactor=TlsHarness(contexts).clock)
        front = factory.buildProtocol(transport.getPeer())
        front.makeConnection(transport)
        front.dataReceived(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")
    finally:
        globalLogPublisher.removeObserver(events)
    failures = [e["handshake_failure"] for e in events if isinstance(e.get("handshake_failure"), HandshakeFailure)]
    assert [f.category for f in failures] == ["handshake"]
    assert "192.0.2.9:1234" in str(failures[0])


def test_categorize_error():
    from OpenSSL import SSL

    assert categorize_error(SSL.Error([("SSL routines", "", "peer did not return a certificate")])) == "client_cert"
    assert categorize_error(SSL.Error([("SSL routines", "", "certificate verify failed")])) == "client_cert"
    assert categorize_error(SSL.Error([("SSL routines", "", "no shared cipher")])) == "handshake"
    assert categorize_error(SSL.Error([("SSL routines", "", "unexpected eof while reading")])) == "closed"
    assert categorize_error(SSL.SysCallError(-1, "Unexpected EOF")) == "closed"
    assert categorize_error(ConnectionDone()) == "closed"
    assert categorize_error(ValueError("x")) == "handshake"
