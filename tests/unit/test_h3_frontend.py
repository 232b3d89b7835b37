"""The HTTP/3 front end in memory: a qh3 client and rpxy's H3Endpoint joined by a fake UDP wire.

No sockets and no real time: the endpoint runs on a ``twisted.internet.task.Clock``, the
client is qh3's sans-IO ``QuicConnection`` + ``H3Connection``, and a stub pipeline
stands in for routing so that each test controls the exchange (pausing the request
body, streaming a response, answering early).
"""

from __future__ import annotations


import pytest
from qh3.h3.connection import H3Connection
from qh3.h3.events import DataReceived, HeadersReceived
from qh3.h3.events import StreamReset as H3StreamReset
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import QuicProtocolVersion
from qh3.tls import load_pem_private_key, load_pem_x509_certificates
from twisted.internet.task import Clock

from rpxy.config.model import H3Config
from rpxy.front import h3 as h3mod
from rpxy.front.h3 import H3Endpoint
from rpxy.message import ConnectionInfo, RequestHead
from rpxy.tls.contexts import app_tls_from_material
from rpxy.tls.keys import certified_key_from_pem
from rpxy.tls.sni import SniContextMap
from tests.support.tlsgen import Authority

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 50000)


class Wire:
    """A UDP transport that records what the endpoint sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []
        self.fail = False

    def write(self, data: bytes, addr: tuple) -> None:
        if self.fail:
            raise OSError(105, "No buffer space available")
        self.sent.append((data, addr))


class Exchange:
    def __init__(self, sink, head: RequestHead, conn: ConnectionInfo) -> None:
        self.sink = sink
        self.head = head
        self.conn = conn
        self.body = bytearray()
        self.ended = False
        self.trailers = None
        self.gone = False

    def request_data(self, data: bytes) -> None:
        self.body += data

    def request_end(self, trailers=None) -> None:
        self.ended = True
        self.trailers = trailers

    def client_gone(self) -> None:
        self.gone = True


class AccessLog:
    def __init__(self) -> None:
        self.records = []

    def record(self, conn, head, host, status, *, upstream) -> None:
        self.records.append((head.method, status))


class Pipeline:
    """Answers nothing by itself: tests drive each exchange's sink."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.access_log = AccessLog()
        self.on_request = None

    def handle(self, conn, head, sink, *, content_length, body_expected):
        exchange = Exchange(sink, head, conn)
        self.exchanges.append(exchange)
        if self.on_request is not None:
            self.on_request(exchange)
        return exchange


class Holder:
    def __init__(self, contexts) -> None:
        self.current = type("State", (), {"tls_contexts": contexts})()


@pytest.fixture(scope="module")
def material():
    ca = Authority("h3 unit CA")
    leaves = {name: ca.issue(name) for name in ("a.test", "b.test", "m.test")}
    return ca, leaves


def contexts_for(material) -> SniContextMap:
    ca, leaves = material
    entries = []
    for app, name in (("a", "a.test"), ("b", "b.test"), ("m", "m.test")):
        leaf = leaves[name]
        key = certified_key_from_pem(leaf.cert_pem(), leaf.key_pem())
        cas = [ca.cert] if app == "m" else ()
        entries.append(app_tls_from_material(app, name, key, client_cas=cas))
    return SniContextMap(entries)


class Harness:
    def __init__(self, material, *, h3: H3Config | None = None, retry: bool = False, max_clients: int = 0) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.pipeline = Pipeline()
        self.endpoint = H3Endpoint(
            self.pipeline, Holder(contexts_for(material)), self.clock, h3 or H3Config(), local_port=SERVER[1],
            retry=retry, max_clients=max_clients,
        )
        self.wire = Wire()
        self.endpoint.transport = self.wire
        self.ca = material[0]
        self.to_client_blocked = False

    def client(self, name: str = "a.test", *, versions=None, tickets=None, cert=None, quic_class=None) -> Client:
        return Client(self, name, versions=versions, tickets=tickets, cert=cert, quic_class=quic_class)

    def step(self, client: Client, rounds: int = 50) -> None:
        """Move datagrams both ways until nothing moves (or ``rounds``)."""
        for _ in range(rounds):
            moved = False
            # Pacing and ACK delays need time to pass: a millisecond per round.
            self.clock.advance(0.001)
            timer = client.quic.get_timer()
            if timer is not None and timer <= self.clock.seconds():
                client.quic.handle_timer(self.clock.seconds())
                client.process()
            for data, _addr in client.quic.datagrams_to_send(self.clock.seconds()):
                self.endpoint.datagramReceived(data, CLIENT)
                moved = True
            self.clock.advance(0)  # the endpoint's write_soon calls
            sent, self.wire.sent = self.wire.sent, []
            if not self.to_client_blocked:
                for data, _addr in sent:
                    client.quic.receive_datagram(data, SERVER, self.clock.seconds())
                    moved = True
                client.process()
            if not moved:
                return


class Client:
    def __init__(self, harness: Harness, name: str, *, versions=None, tickets=None, cert=None, quic_class=None) -> None:
        self.harness = harness
        configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=name)
        configuration.cadata = harness.ca.cert_pem()
        if cert is not None:  # a tests.support.tlsgen.Leaf: the client certificate for mTLS apps
            certs = load_pem_x509_certificates(cert.cert_pem())
            configuration.certificate, configuration.certificate_chain = certs[0], certs[1:]
            configuration.private_key = load_pem_private_key(cert.key_pem())
        if versions is not None:
            configuration.supported_versions = versions
        self.quic = (quic_class or QuicConnection)(configuration=configuration, session_ticket_handler=tickets)
        self.quic.connect(SERVER, harness.clock.seconds())
        self.h3 = H3Connection(self.quic)
        self.events: list = []
        self.terminated = None
        self.handshake = False

    def process(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, qevents.ConnectionTerminated):
                self.terminated = event
            if isinstance(event, qevents.HandshakeCompleted):
                self.handshake = True
            self.events.extend(self.h3.handle_event(event))

    def request(self, method: bytes, path: bytes, *, body: bytes | None = None, end: bool = True, headers=()) -> int:
        sid = self.quic.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", path), *headers]
        self.h3.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self.h3.send_data(sid, body, end_stream=end)
        return sid

    def response(self, sid: int):
        status = None
        body = b""
        ended = False
        reset = None
        trailers = None
        for event in self.events:
            if getattr(event, "stream_id", None) != sid:
                continue
            if isinstance(event, HeadersReceived):
                if status is None:
                    status = int(dict(event.headers)[b":status"])
                else:
                    trailers = event.headers
                ended = ended or event.stream_ended
            elif isinstance(event, DataReceived):
                body += event.data
                ended = ended or event.stream_ended
            elif isinstance(event, H3StreamReset):
                reset = event.error_code
        return status, body, ended, reset, trailers


def connected(material, **kwargs) -> tuple[Harness, Client]:
    harness = Harness(material, **kwargs)
    client = harness.client()
    harness.step(client)
    assert client.handshake
    return harness, client


def test_request_reaches_the_pipeline_and_response_streams_back(material):
    harness, client = connected(material)
    sid = client.request(b"POST", b"/up?x=1", body=b"hello", headers=[(b"content-length", b"5"), (b"user-agent", b"t")])
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    assert (exchange.head.method, exchange.head.path, exchange.head.version, exchange.head.authority) == (
        b"POST", b"/up?x=1", b"3", b"a.test"
    )
    assert (b"user-agent", b"t") in exchange.head.headers
    assert exchange.conn.tls and exchange.conn.sni == "a.test" and exchange.conn.local_port == SERVER[1]
    assert bytes(exchange.body) == b"hello" and exchange.ended
    exchange.sink.send_head(200, [(b"content-type", b"text/plain"), (b"connection", b"close")])
    exchange.sink.send_data(b"world")
    exchange.sink.send_end([(b"x-checksum", b"42")])
    harness.step(client)
    status, body, ended, reset, trailers = client.response(sid)
    assert (status, body, ended, reset) == (200, b"world", True, None)
    assert trailers == [(b"x-checksum", b"42")]
    assert not harness.endpoint.sessions.pop().streams  # forgotten once answered


def test_request_trailers_reach_the_exchange(material):
    harness, client = connected(material)
    sid = client.request(b"POST", b"/grpc", body=b"x", end=False, headers=[(b"te", b"trailers")])
    client.h3.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    assert exchange.ended and exchange.trailers == [(b"grpc-status", b"0")]


def test_malformed_request_is_reset_and_never_forwarded(material):
    # (Upper-case names never get here: qh3's H3 layer closes the connection for them.)
    harness, client = connected(material)
    sids = [
        client.request(b"GET", b"/x", headers=[(b"te", b"gzip")]),
        client.request(b"GET", b"/x", headers=[(b"connection", b"close")]),
        client.request(b"GET", b"no-slash"),
        client.request(b"GET", b"/x", headers=[(b"x", b" padded")]),
    ]
    harness.step(client)
    assert harness.pipeline.exchanges == []
    assert [client.response(sid)[3] for sid in sids] == [h3mod.H3_MESSAGE_ERROR] * 4
    sid = client.request(b"GET", b"/ok")
    harness.step(client)
    assert len(harness.pipeline.exchanges) == 1  # the connection goes on


def test_content_length_mismatch_is_a_message_error(material):
    harness, client = connected(material)
    sid = client.request(b"POST", b"/x", body=b"abc", headers=[(b"content-length", b"5")])
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    assert exchange.gone and not exchange.ended
    assert client.response(sid)[3] == h3mod.H3_MESSAGE_ERROR


def test_connect_is_405_locally(material):
    harness, client = connected(material)
    sid = client.quic.get_next_available_stream_id()
    client.h3.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")], end_stream=True)
    harness.step(client)
    assert client.response(sid)[0] == 405
    assert harness.pipeline.access_log.records == [(b"CONNECT", 405)]


def test_max_concurrent_streams_are_the_quic_stream_limits(material):
    """Both limits reach the client as QUIC transport parameters (qh3 alone would say 100/103)."""
    harness, client = connected(material, h3=H3Config(max_concurrent_bidistream=2, max_concurrent_unistream=4))
    assert client.quic._core.stream_limits[:2] == (2, 4)  # what the client may open
    sids = [client.request(b"GET", f"/{i}".encode()) for i in range(2)]
    harness.step(client)
    assert len(harness.pipeline.exchanges) == 2
    # As streams end, QUIC extends the limit: "concurrent", not "per connection".
    for round_ in range(3):
        for exchange in harness.pipeline.exchanges[-2:]:
            exchange.sink.send_head(204, [])
            exchange.sink.send_end(None)
        for _ in range(10):  # acknowledgements (delayed) let QUIC count the streams as closed
            harness.step(client)
            harness.clock.advance(0.05)
        assert all(client.response(sid)[0] == 204 for sid in sids)
        sids = [client.request(b"GET", f"/again{round_}-{i}".encode()) for i in range(2)]
        harness.step(client)
        assert len(harness.pipeline.exchanges) == 4 + 2 * round_
    harness, client = connected(material, h3=H3Config(max_concurrent_bidistream=2))
    client.request(b"GET", b"/0")
    client.request(b"GET", b"/1")
    with pytest.raises(ValueError, match="stream limit 2"):
        client.request(b"GET", b"/2")  # a compliant client cannot open a third


class GreedyQuic(QuicConnection):
    """A client that believes it may open 50 request streams whatever the server said."""

    def _create_tls(self, remote_source_cid):  # type: ignore[no-untyped-def]
        bridge = super()._create_tls(remote_source_cid)
        parse = bridge.parse_transport_parameters

        def greedy(data, **kwargs):  # type: ignore[no-untyped-def]
            parse(data, **kwargs)
            bridge.remote_transport_parameters.initial_max_streams_bidi = 50

        bridge.parse_transport_parameters = greedy
        return bridge


def test_a_client_opening_streams_beyond_the_limit_is_closed_with_stream_limit_error(material):
    harness = Harness(material, h3=H3Config(max_concurrent_bidistream=2))
    client = harness.client(quic_class=GreedyQuic)
    harness.step(client)
    for i in range(3):
        client.request(b"GET", f"/{i}".encode())
    for _ in range(10):
        harness.step(client)
        harness.clock.advance(0.5)
    assert client.terminated is not None and client.terminated.error_code == 0x4  # STREAM_LIMIT_ERROR
    assert not harness.endpoint.sessions


def test_streams_beyond_max_concurrent_bidistream_are_refused_by_http3_too(material):
    """The HTTP/3 layer's own check (kept for reloads that lower the limit on open connections)."""
    harness, client = connected(material, h3=H3Config(max_concurrent_bidistream=3))
    harness.endpoint.max_streams = 2  # a reload lowered it; this connection's QUIC limit stays 3
    sids = [client.request(b"GET", f"/{i}".encode()) for i in range(3)]
    harness.step(client)
    assert len(harness.pipeline.exchanges) == 2
    assert client.response(sids[2])[3] == h3mod.H3_REQUEST_REJECTED


def test_deprecated_h3_body_limit_answers_413(material):
    harness, client = connected(material, h3=H3Config(request_max_body_size=4))
    sid = client.request(b"POST", b"/x", body=b"12345", headers=[(b"content-length", b"5")])
    sid2 = client.request(b"POST", b"/y", body=b"123456")  # no content-length: cut off mid-stream
    harness.step(client)
    assert client.response(sid)[0] == 413
    assert client.response(sid2)[0] == 413
    (exchange,) = harness.pipeline.exchanges  # only the streamed one reached the pipeline
    assert exchange.gone


def test_slow_upstream_stops_reading_then_catches_up(material):
    """Request backpressure: bytes given to a paused upstream past the threshold stop the reads."""
    harness, client = connected(material)
    harness.pipeline.on_request = lambda exchange: exchange.sink.request_producer.pauseProducing()
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB
    sid = client.request(b"PUT", b"/big", body=payload)
    for _ in range(40):
        harness.step(client)
        harness.clock.advance(0.05)
    (exchange,) = harness.pipeline.exchanges
    (session,) = harness.endpoint.sessions
    assert session.held is not None  # reading stopped
    assert h3mod.RECV_HOLD_THRESHOLD <= len(exchange.body) < len(payload)
    assert not exchange.ended
    exchange.sink.request_producer.resumeProducing()  # the upstream took it all
    for _ in range(200):
        harness.step(client)
        harness.clock.advance(0.05)
        if exchange.ended:
            break
    assert exchange.ended and bytes(exchange.body) == payload
    exchange.sink.send_head(204, [])
    exchange.sink.send_end(None)
    harness.step(client)
    assert client.response(sid)[0] == 204


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_client_that_does_not_read_pauses_the_upstream(material):
    """Response backpressure: what QUIC cannot send yet (congestion/flow control) pauses the producer."""
    harness, client = connected(material)
    sid = client.request(b"GET", b"/big")
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    producer = Producer()
    sink = exchange.sink
    sink.send_head(200, [])
    sink.register_producer(producer)
    harness.to_client_blocked = True  # nothing reaches the client: no ACKs, no credit
    chunk = b"x" * 65536
    sent = 0
    while not producer.paused and sent < 64 * len(chunk):
        sink.send_data(chunk)
        sink.flush()
        sent += len(chunk)
        harness.step(client, rounds=2)
    assert producer.paused
    harness.to_client_blocked = False
    for _ in range(400):
        harness.clock.advance(0.05)
        harness.step(client)
        if not producer.paused:
            break
    assert not producer.paused
    sink.unregister_producer()
    sink.send_end(None)
    for _ in range(100):
        harness.clock.advance(0.05)
        harness.step(client)
        if client.response(sid)[2]:
            break
    status, body, ended, _reset, _ = client.response(sid)
    assert (status, len(body), ended) == (200, sent, True)


def test_client_reset_tells_the_exchange(material):
    harness, client = connected(material)
    sid = client.request(b"POST", b"/x", body=b"abc", end=False)
    harness.step(client)
    client.quic.reset_stream(sid, h3mod.H3_REQUEST_CANCELLED)
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    assert exchange.gone


def test_unknown_sni_fails_the_handshake(material):
    harness = Harness(material)
    client = harness.client("nobody.test")
    for _ in range(20):
        harness.step(client)
        harness.clock.advance(0.5)  # both sides drain before the connection is forgotten
    assert not client.handshake and client.terminated is not None
    assert not harness.endpoint.sessions and not harness.endpoint.cids


def test_mtls_app_needs_a_client_certificate_over_quic(material):
    harness = Harness(material)
    client = harness.client("m.test")
    for _ in range(20):
        harness.step(client)
        harness.clock.advance(0.5)  # both sides drain before the connection is forgotten
    # TLS 1.3: the client is done once it sent its Finished; the server's answer is the close.
    assert client.terminated is not None and client.terminated.error_code == 0x100 + 116  # certificate_required
    assert not harness.endpoint.sessions

    ca = material[0]
    harness = Harness(material)
    client = harness.client("m.test", cert=ca.issue(client=True, common_name="unit-client"))
    harness.step(client)
    assert client.handshake
    (session,) = harness.endpoint.sessions
    assert session.quic.client_certificate.subject.rfc4514_string() == "CN=unit-client"
    sid = client.request(b"GET", b"/m")
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    assert exchange.conn.sni == "m.test" and exchange.head.path == b"/m"
    assert sid == 0


def test_second_app_gets_its_own_certificate(material):
    harness = Harness(material)
    client = harness.client("b.test")
    harness.step(client)
    assert client.handshake  # verified against the CA for the name b.test
    leaf = client.quic.get_peercert()
    assert material[1]["b.test"].cert.public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.DER) == leaf.public_bytes()


def test_negotiated_group_is_recorded(material):
    harness, client = connected(material)
    (session,) = harness.endpoint.sessions
    assert session.quic.group == "X25519MLKEM768"


def test_idle_timeout_closes_and_forgets_the_connection(material):
    harness, client = connected(material, h3=H3Config(max_idle_timeout=2))
    assert harness.endpoint.sessions
    harness.clock.advance(10)
    harness.clock.advance(10)
    assert not harness.endpoint.sessions and not harness.endpoint.cids


def test_connection_ids_are_tracked(material):
    harness, client = connected(material)
    (session,) = harness.endpoint.sessions
    assert len(session.cids) >= 2
    assert all(harness.endpoint.cids[cid] is session for cid in session.cids)


def test_unknown_version_gets_version_negotiation(material):
    harness = Harness(material)
    client = harness.client(versions=[0x1A2A3A4A])
    for data, _ in client.quic.datagrams_to_send(harness.clock.seconds()):
        harness.endpoint.datagramReceived(data, CLIENT)
    assert harness.wire.sent  # one answer per Initial datagram (an ML-KEM ClientHello takes two)
    for reply, addr in harness.wire.sent:
        assert addr == CLIENT and reply[1:5] == b"\x00\x00\x00\x00"  # a Version Negotiation packet
        assert QuicProtocolVersion.VERSION_1.to_bytes(4, "big") in reply[5:]
    assert not harness.endpoint.sessions


def test_small_or_garbage_datagrams_are_ignored(material):
    harness = Harness(material)
    harness.endpoint.datagramReceived(b"\xc0" + b"\x00" * 50, CLIENT)
    harness.endpoint.datagramReceived(b"", CLIENT)
    harness.endpoint.datagramReceived(b"\x40" + b"\x01" * 1300, CLIENT)
    assert harness.wire.sent == [] and not harness.endpoint.sessions


def test_retry_validates_the_address_first(material):
    harness = Harness(material, retry=True)
    client = harness.client()
    harness.step(client)
    assert client.handshake
    (session,) = harness.endpoint.sessions
    assert session.quic._retry_source_connection_id is not None


def test_max_concurrent_connections(material):
    harness = Harness(material, h3=H3Config(max_concurrent_connections=1))
    first = harness.client()
    harness.step(first)
    second = harness.client()
    harness.step(second, rounds=3)
    assert first.handshake and not second.handshake
    assert len(harness.endpoint.sessions) == 1


def test_send_errors_are_tolerated(material):
    harness = Harness(material)
    client = harness.client()
    harness.wire.fail = True
    harness.step(client, rounds=3)
    assert harness.endpoint.send_errors > 0
    harness.wire.fail = False
    for _ in range(50):
        harness.clock.advance(0.5)  # retransmissions after the lost flight
        harness.step(client)
        if client.handshake:
            break
    assert client.handshake


def test_max_clients_counts_request_streams(material):
    harness, client = connected(material, max_clients=1)
    sids = [client.request(b"GET", b"/1"), client.request(b"GET", b"/2")]
    harness.step(client)
    assert len(harness.pipeline.exchanges) == 1
    assert client.response(sids[1])[3] == h3mod.H3_REQUEST_REJECTED


def test_quic_configuration_from_config(material):
    from rpxy.quic.tls import CertificateChooser

    chooser = CertificateChooser(lambda: contexts_for(material))
    configuration = h3mod.quic_configuration(H3Config(max_idle_timeout=0), chooser.any_material())
    assert configuration.idle_timeout > 86400  # 0 = no idle timeout
    assert configuration.alpn_protocols == ["h3"] and not configuration.is_client
    assert h3mod.quic_configuration(H3Config(max_idle_timeout=7), chooser.any_material()).idle_timeout == 7


def test_no_session_tickets_so_no_resumption_and_no_0rtt(material):
    harness = Harness(material)
    tickets = []
    client = harness.client(tickets=tickets.append)
    harness.step(client)
    sid = client.request(b"GET", b"/x")
    harness.step(client)
    exchange = harness.pipeline.exchanges[0]
    exchange.sink.send_head(204, [])
    exchange.sink.send_end(None)
    harness.step(client)
    assert client.response(sid)[0] == 204
    assert tickets == []  # 0-RTT needs a ticket: never issued, so early data is never accepted
    (session,) = harness.endpoint.sessions
    assert not session.quic.tls.early_data_accepted


def test_quic_v2_is_served(material):
    harness = Harness(material)
    client = harness.client(versions=[QuicProtocolVersion.VERSION_2])
    harness.step(client)
    assert client.handshake
    sid = client.request(b"GET", b"/v2")
    harness.step(client)
    assert harness.pipeline.exchanges[0].head.path == b"/v2"


def test_retry_is_required_only_while_many_handshakes_are_pending(material, monkeypatch):
    monkeypatch.setattr(h3mod, "RETRY_WHEN_HANDSHAKING", 1)
    harness = Harness(material, retry=None)
    pending = harness.client()
    for data, _ in pending.quic.datagrams_to_send(harness.clock.seconds()):
        harness.endpoint.datagramReceived(data, CLIENT)  # a handshake left hanging (spoofed, say)
    harness.wire.sent.clear()
    assert harness.endpoint.handshaking == 1
    client = harness.client()
    harness.step(client)
    assert client.handshake
    validated = [s for s in harness.endpoint.sessions if s.conn is not None]
    assert len(validated) == 1 and validated[0].quic._retry_source_connection_id is not None
    assert harness.endpoint.handshaking == 1  # the hanging one


def test_no_retry_by_default_when_few_handshakes_are_pending(material):
    harness, client = connected(material)
    (session,) = harness.endpoint.sessions
    assert session.quic._retry_source_connection_id is None and harness.endpoint.handshaking == 0


class UpstreamEnd:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def register_producer(self, producer) -> None:
        self.producer = producer


def test_websocket_extended_connect_becomes_a_tunnel(material):
    harness, client = connected(material)
    sid = client.quic.get_next_available_stream_id()
    client.h3.send_headers(
        sid,
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":authority", b"a.test"),
         (b":path", b"/chat"), (b"sec-websocket-version", b"13")],
    )  # fmt: skip
    client.h3.send_data(sid, b"early", end_stream=False)
    harness.step(client)
    assert client.h3.received_settings.get(0x8) == 1  # SETTINGS_ENABLE_CONNECT_PROTOCOL
    (exchange,) = harness.pipeline.exchanges
    head = exchange.head
    assert (head.method, head.path, head.protocol) == (b"GET", b"/chat", b"websocket")
    assert len(dict(head.headers)[b"sec-websocket-key"]) == 24
    assert exchange.body == b""  # held until the upstream switched
    exchange.sink.send_head(101, [(b"upgrade", b"websocket"), (b"sec-websocket-accept", b"x")])
    upstream = UpstreamEnd()
    end = exchange.sink.start_tunnel(upstream)
    assert upstream.written == b"early" and upstream.producer is exchange.sink
    client.h3.send_data(sid, b"more", end_stream=False)
    end.write(b"back")
    harness.step(client)
    assert upstream.written == b"earlymore"
    status, body, ended, reset, _ = client.response(sid)
    assert (status, body, ended, reset) == (200, b"back", False, None)
    assert all(name != b"sec-websocket-accept" for event in client.events if isinstance(event, HeadersReceived) for name, _ in event.headers)
    client.h3.send_data(sid, b"", end_stream=True)  # the client closes its side
    harness.step(client)
    assert exchange.gone
    assert client.response(sid)[2]  # and our side ended too


def test_extended_connect_for_another_protocol_is_501(material):
    harness, client = connected(material)
    sid = client.quic.get_next_available_stream_id()
    client.h3.send_headers(
        sid,
        [(b":method", b"CONNECT"), (b":protocol", b"webtransport"), (b":scheme", b"https"), (b":authority", b"a.test"),
         (b":path", b"/x")],
    )  # fmt: skip
    harness.step(client)
    assert client.response(sid)[0] == 501 and harness.pipeline.exchanges == []


def test_connection_handling_timeout_cuts_off_each_stream(material):
    harness = Harness(material, h3=H3Config(max_idle_timeout=0))  # the connection itself never idles out
    harness.endpoint.stream_timeout = 30.0
    client = harness.client()
    harness.step(client)
    first = client.request(b"GET", b"/slow")
    harness.step(client)
    harness.clock.advance(20)
    second = client.request(b"GET", b"/later")
    harness.step(client)
    harness.clock.advance(11)  # the first is 31 s old, the second 11 s
    harness.step(client)
    old, young = harness.pipeline.exchanges
    assert old.gone and not young.gone
    assert client.response(first)[3] == h3mod.H3_REQUEST_CANCELLED
    young.sink.send_head(200, [])
    young.sink.send_end(None)
    harness.step(client)
    assert client.response(second)[0] == 200
    harness.clock.advance(60)  # nothing left to cut off; the timer does not fire into a forgotten stream


def test_reload_applies_new_limits_to_running_listeners(material):
    from twisted.application.service import MultiService

    from rpxy.config.model import ExperimentalConfig

    class Parent(MultiService):
        on_reload: list

    parent = Parent()
    parent.on_reload = []
    config = type("Config", (), {})()
    config.experimental = ExperimentalConfig(h3=H3Config(max_concurrent_bidistream=5), connection_handling_timeout=0.0)
    config.listen_port_tls = 8443
    config.listen_address_v4 = ("127.0.0.1",)
    config.listen_address_v6 = ()
    config.max_clients = 10
    holder = Holder(contexts_for(material))
    (endpoint,) = h3mod.add_h3_listeners(parent, config, Pipeline(), holder, Clock())
    assert endpoint.max_streams == 5 and len(parent.on_reload) == 1
    new = type("Config", (), {})()
    new.__dict__.update(config.__dict__)
    new.experimental = ExperimentalConfig(h3=H3Config(max_concurrent_bidistream=7, max_idle_timeout=3), connection_handling_timeout=9.0)
    new.max_clients = 20
    parent.on_reload[0](type("Event", (), {"new": type("State", (), {"config": new})()})())
    assert (endpoint.max_streams, endpoint.max_clients, endpoint.stream_timeout) == (7, 20, 9.0)
    assert endpoint.configuration().idle_timeout == 3


def test_expect_100_continue_is_answered_here_and_not_forwarded(material):
    harness, client = connected(material)
    sid = client.request(b"PUT", b"/x", end=False, headers=[(b"expect", b"100-continue"), (b"content-length", b"3")])
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges
    assert all(name != b"expect" for name, _ in exchange.head.headers)
    from qh3.h3.events import InformationalHeadersReceived

    informational = [e for e in client.events if isinstance(e, InformationalHeadersReceived) and e.stream_id == sid]
    assert informational and dict(informational[0].headers)[b":status"] == b"100"


def test_rapid_reset_closes_the_connection(material):
    harness, client = connected(material)
    for index in range(h3mod.RESET_BURST + 20):
        if client.quic._close_event is not None:
            break
        sid = client.request(b"POST", b"/x", body=b"a", end=False)
        client.quic.reset_stream(sid, h3mod.H3_REQUEST_CANCELLED)
        if index % 20 == 19:
            harness.step(client)  # our resets close the streams: QUIC credit comes back
    for _ in range(10):
        harness.step(client)
        harness.clock.advance(0.01)
    assert client.quic._close_event is not None
    assert client.quic._close_event.error_code == h3mod.H3_EXCESSIVE_LOAD


def test_header_list_over_64k_is_431(material):
    harness, client = connected(material)
    sid = client.request(b"GET", b"/x", headers=[(b"x-big-%d" % i, b"a" * 1000) for i in range(80)])
    harness.step(client)
    assert client.response(sid)[0] == 431 and harness.pipeline.exchanges == []


def test_refused_sni_gets_unrecognized_name_and_a_log_line(material):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        harness = Harness(material)
        client = harness.client("nobody.test")
        for _ in range(20):
            harness.step(client)
            harness.clock.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert client.quic._close_event.error_code == 0x100 + 112  # CRYPTO_ERROR + unrecognized_name, as on TCP
    lines = [e for e in events if e.get("log_format", "").startswith("QUIC handshake failed")]
    assert len(lines) == 1
    assert (lines[0]["sni"], lines[0]["category"]) == ("nobody.test", "unknown_sni")
    assert lines[0]["peer"] == CLIENT[0] and lines[0]["port"] == CLIENT[1]


def test_graceful_shutdown_goaway_then_waits_for_streams(material):
    from qh3.h3.events import GoawayReceived

    harness, client = connected(material)
    in_flight = client.request(b"GET", b"/slow")
    harness.step(client)
    (exchange,) = harness.pipeline.exchanges

    class Port:
        stopped = False

        def stopListening(self):
            Port.stopped = True

    listener = h3mod.UDPListener(harness.clock, 0, harness.endpoint, interface="127.0.0.1")
    listener.running = True
    listener.listening_port = Port()
    harness.endpoint.start_drain(harness.clock.seconds() + 30)
    harness.step(client)
    goaways = [e for e in client.events if isinstance(e, GoawayReceived)]
    assert goaways and goaways[0].stream_id == in_flight + 4
    late = client.request(b"GET", b"/late")  # past the GOAWAY: refused
    harness.step(client)
    assert client.response(late)[3] == h3mod.H3_REQUEST_REJECTED and len(harness.pipeline.exchanges) == 1
    newcomer = harness.client()
    harness.step(newcomer, rounds=3)
    assert not newcomer.handshake  # no new connections while draining
    stopped = listener.stopService()
    fired = []
    stopped.addCallback(fired.append)
    harness.clock.advance(1)
    assert not fired and not Port.stopped  # the request in flight still runs
    exchange.sink.send_head(200, [])
    exchange.sink.send_data(b"done")
    exchange.sink.send_end(None)
    harness.step(client)
    harness.clock.advance(1)
    assert fired and Port.stopped
    assert client.response(in_flight)[:3] == (200, b"done", True)


def test_graceful_shutdown_gives_up_at_the_deadline(material):
    harness, client = connected(material)
    client.request(b"GET", b"/forever")
    harness.step(client)
    listener = h3mod.UDPListener(harness.clock, 0, harness.endpoint, interface="127.0.0.1")
    listener.running = True
    harness.endpoint.start_drain(harness.clock.seconds() + 5)
    fired = []
    listener.stopService().addCallback(fired.append)
    harness.clock.advance(3)
    assert not fired
    harness.clock.advance(3)
    assert fired and not harness.endpoint.sessions
    assert harness.pipeline.exchanges[0].gone


def test_a_batch_of_datagrams_is_fed_to_its_connection_at_once(material):
    """recvmmsg batches: runs for one connection go to QUIC in one call, the rest one by one."""
    harness, client = connected(material)
    other = harness.client("b.test")  # a second connection, still handshaking
    sids = [client.request(b"GET", f"/batch{i}".encode()) for i in range(8)]
    harness.clock.advance(0.001)
    batch = [data for data, _addr in client.quic.datagrams_to_send(harness.clock.seconds())]
    first_flight = [data for data, _addr in other.quic.datagrams_to_send(harness.clock.seconds())]
    assert len(batch) >= 2 and first_flight
    (session,) = harness.endpoint.sessions
    fed = []
    original = session.quic.receive_many_datagrams
    session.quic.receive_many_datagrams = lambda datagrams, addr, now: (fed.append(len(datagrams)), original(datagrams, addr, now))
    # The same peer address for both connections (one NAT): the Initial is split out by its CID.
    harness.endpoint.datagrams_received([b"\x40garbage"] + batch + first_flight, CLIENT)
    harness.step(client)
    assert sorted(exchange.head.path for exchange in harness.pipeline.exchanges) == sorted(
        f"/batch{i}".encode() for i in range(8)
    )
    assert len(harness.endpoint.sessions) == 2  # the other client's Initial opened its connection
    assert fed == [len(batch)]  # one QUIC call for the connection's run
    for exchange in harness.pipeline.exchanges:
        exchange.sink.send_head(204, [])
        exchange.sink.send_end(None)
    harness.step(client)
    assert [client.response(sid)[0] for sid in sids] == [204] * 8


def test_responses_leave_once_a_couple_of_datagrams_are_waiting_not_at_the_end_of_the_turn(material):
    harness, client = connected(material)
    sids = [client.request(b"GET", f"/t{i}".encode()) for i in range(12)]
    harness.step(client)
    harness.wire.sent.clear()
    exchanges = harness.pipeline.exchanges
    exchanges[0].sink.send_head(200, [])
    exchanges[0].sink.send_data(b"x" * 300)
    exchanges[0].sink.send_end(None)
    assert harness.wire.sent == []  # one small response: sent after this reactor turn (coalescing)
    for exchange in exchanges[1:]:
        exchange.sink.send_head(200, [])
        exchange.sink.send_data(b"x" * 300)
        exchange.sink.send_end(None)
    # 12 x 300 bytes is past h3mod.TRANSMIT_AT: datagrams left during the turn already.
    assert 12 * 300 > h3mod.TRANSMIT_AT and harness.wire.sent
    harness.step(client)
    assert [client.response(sid)[0] for sid in sids] == [200] * 12
