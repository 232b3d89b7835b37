import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from rpxy.config.model import HealthCheckConfig, UpstreamConfig
from rpxy.upstream.health import HealthChecker, HealthState, make_states

A = UpstreamConfig(location="127.0.0.1:8001", host="127.0.0.1", port=8001)
B = UpstreamConfig(location="backend.example:8443", host="backend.example", port=8443, tls=True)
ADDR = IPv4Address("TCP", "127.0.0.1", 8001)


# -- HealthState -----------------------------------------------------------------


def test_state_starts_healthy_and_thresholds():
    s = HealthState(unhealthy_threshold=3, healthy_threshold=2)
    assert s.healthy
    assert [s.record(False), s.record(False)] == [False, False]
    assert s.healthy
    s.record(True)  # resets the failure run
    assert [s.record(False), s.record(False)] == [False, False]
    assert s.record(False) is True
    assert not s.healthy
    assert s.record(False) is False  # already unhealthy
    assert s.record(True) is False
    assert s.record(False) is False  # resets the success run
    assert s.record(True) is False
    assert s.record(True) is True
    assert s.healthy
    assert s.record(True) is False


def test_state_threshold_one():
    s = HealthState(unhealthy_threshold=1, healthy_threshold=1)
    assert s.record(False) and not s.healthy
    assert s.record(True) and s.healthy


def test_state_from_config_and_validation():
    s = HealthState.from_config(HealthCheckConfig(unhealthy_threshold=5, healthy_threshold=4))
    assert (s.unhealthy_threshold, s.healthy_threshold) == (5, 4)
    assert len(make_states(None, 3)) == 3
    with pytest.raises(ValueError):
        HealthState(unhealthy_threshold=0)


# -- HealthChecker -------------------------------------------------------------------


def make(config=None, upstreams=(A,), **state_kw):
    config = config or HealthCheckConfig(interval=10, timeout=5, unhealthy_threshold=2, healthy_threshold=2)
    reactor = MemoryReactorClock()
    states = [HealthState.from_config(config) for _ in upstreams]
    events = []
    checker = HealthChecker(upstreams, config, states, reactor, log=Logger(observer=events.append))
    return checker, reactor, states, events


def connect_ok(factory):
    proto = factory.buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def refuse(reactor, factory):
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))


def test_schedules_first_check_at_start_then_every_interval():
    checker, reactor, states, _ = make()
    assert reactor.tcpClients == []
    checker.startService()
    reactor.advance(0)
    assert len(reactor.tcpClients) == 1
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8001, 5)
    reactor.advance(1)
    connect_ok(factory)
    assert states[0].consecutive_successes == 1
    reactor.advance(8.9)
    assert len(reactor.tcpClients) == 1
    reactor.advance(0.1)  # 10 s after the first check started
    assert len(reactor.tcpClients) == 2
    checker.stopService()


def test_tcp_success_closes_connection():
    checker, reactor, states, _ = make()
    checker.startService()
    reactor.advance(0)
    _, transport = connect_ok(reactor.tcpClients[0][2])
    assert transport.disconnecting
    assert states[0].healthy
    # only the next interval is pending, the timeout was cancelled
    assert [c.getTime() for c in reactor.getDelayedCalls()] == [10]
    checker.stopService()


def test_tcp_failure_transitions_and_logs():
    checker, reactor, states, events = make()
    checker.startService()
    reactor.advance(0)
    refuse(reactor, reactor.tcpClients[-1][2])
    assert states[0].healthy and states[0].consecutive_failures == 1
    reactor.advance(10)
    refuse(reactor, reactor.tcpClients[-1][2])
    assert not states[0].healthy
    warn = [e for e in events if e["log_level"].name == "warn"]
    assert len(warn) == 1 and warn[0]["location"] == "127.0.0.1:8001"
    # recovery needs healthy_threshold = 2 successes
    reactor.advance(10)
    connect_ok(reactor.tcpClients[-1][2])
    assert not states[0].healthy
    reactor.advance(10)
    connect_ok(reactor.tcpClients[-1][2])
    assert states[0].healthy
    info = [e for e in events if e["log_level"].name == "info"]
    assert len(info) == 1 and info[0]["location"] == "127.0.0.1:8001"
    assert "healthy again" in info[0]["log_format"]
    assert len(reactor.tcpClients) == 4
    checker.stopService()


def test_timeout_counts_as_failure_and_stops_connecting():
    checker, reactor, states, _ = make()
    checker.startService()
    reactor.advance(0)
    connector = reactor.connectors[-1]
    reactor.advance(4.9)
    assert states[0].consecutive_failures == 0
    reactor.advance(0.1)
    assert states[0].consecutive_failures == 1
    assert connector.stoppedConnecting
    # a late failure report from the reactor is ignored
    refuse(reactor, reactor.tcpClients[-1][2])
    assert states[0].consecutive_failures == 1
    # next check 10 s after the previous one started
    reactor.advance(4.9)
    assert len(reactor.tcpClients) == 1
    reactor.advance(0.1)
    assert len(reactor.tcpClients) == 2
    checker.stopService()


def test_no_overlapping_checks():
    config = HealthCheckConfig(type="http", path="/h", interval=10, timeout=5)
    checker, reactor, states, _ = make(config)
    checker.startService()
    reactor.advance(0)
    proto, transport = connect_ok(reactor.tcpClients[0][2])
    reactor.advance(4)
    assert len(reactor.tcpClients) == 1
    reactor.advance(1)  # timeout while connected: aborted
    assert transport.disconnected and states[0].consecutive_failures == 1
    proto.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")  # too late: ignored
    assert states[0].consecutive_failures == 1
    reactor.advance(5)
    assert len(reactor.tcpClients) == 2
    checker.stopService()


def test_stop_service_cancels_everything():
    checker, reactor, states, _ = make(upstreams=(A, A))
    checker.startService()
    assert len(reactor.getDelayedCalls()) == 2
    checker.stopService()
    assert reactor.getDelayedCalls() == []
    reactor.advance(100)
    assert reactor.tcpClients == []

    checker.startService()
    reactor.advance(0)
    assert len(reactor.tcpClients) == 2
    assert len(reactor.getDelayedCalls()) == 2  # the two timeouts
    connect_ok(reactor.tcpClients[0][2])
    checker.stopService()
    assert reactor.getDelayedCalls() == []
    assert reactor.connectors[1].stoppedConnecting
    # a late outcome of the cancelled attempt records nothing, schedules nothing
    refuse(reactor, reactor.tcpClients[1][2])
    assert states[1].consecutive_failures == 0
    assert reactor.getDelayedCalls() == []


# -- http ---------------------------------------------------------------------------


def http_checker(expected=200, upstreams=(A,)):
    config = HealthCheckConfig(type="http", path="/healthz", expected_status=expected, interval=10, timeout=5,
                               unhealthy_threshold=1, healthy_threshold=1)
    checker, reactor, states, events = make(config, upstreams)
    checker.startService()
    reactor.advance(0)
    return checker, reactor, states


def test_http_request_bytes():
    checker, reactor, _ = http_checker()
    _, transport = connect_ok(reactor.tcpClients[0][2])
    assert transport.value() == (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nConnection: close\r\n"
        b"User-Agent: rpxy-health-check\r\nAccept: */*\r\n\r\n"
    )
    checker.stopService()


@pytest.mark.parametrize(
    "chunks, expected, ok",
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 200, True),
        ([b"HTTP/1.1 200 OK\r\n"], 200, True),
        ([b"HTTP/1.0 200 OK\r\n"], 200, True),
        ([b"HTT", b"P/1.1 2", b"00 OK", b"\r\n"], 200, True),
        ([b"HTTP/1.1 200\r\n"], 200, True),
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], 204, True),
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], 200, False),
        ([b"HTTP/1.1 503 Service Unavailable\r\n\r\n"], 200, False),
        ([b"HTTP/1.1 2000 OK\r\n"], 200, False),
        ([b"HTTP/2 200\r\n"], 200, False),
        ([b"garbage\r\n"], 200, False),
        ([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"], 200, True),
        ([b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n", b"\r\nHTTP/1.1 500 x\r\n"], 200, False),
        ([b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 200 OK\r\n"], 200, True),
    ],
)
def test_http_status_parsing(chunks, expected, ok):
    checker, reactor, states = http_checker(expected)
    proto, transport = connect_ok(reactor.tcpClients[0][2])
    for chunk in chunks:
        proto.dataReceived(chunk)
    assert states[0].healthy is ok
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionLost()))  # after the verdict: no second outcome
    assert states[0].consecutive_successes + states[0].consecutive_failures == 1
    checker.stopService()


def test_http_connection_lost_before_status():
    checker, reactor, states = http_checker()
    proto, _ = connect_ok(reactor.tcpClients[0][2])
    proto.dataReceived(b"HTTP/1.1 20")
    proto.connectionLost(Failure(ConnectionLost()))
    assert not states[0].healthy
    checker.stopService()


def test_http_endless_line_fails():
    checker, reactor, states = http_checker()
    proto, transport = connect_ok(reactor.tcpClients[0][2])
    proto.dataReceived(b"x" * 20000)
    assert not states[0].healthy and transport.disconnecting
    checker.stopService()


def _write_ca(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) * 2)
    return str(path)


def test_http_over_tls_uses_connect_ssl(tmp_path):
    upstream = UpstreamConfig(location="backend.example:8443", host="backend.example", port=8443, tls=True,
                              ca_cert_path=_write_ca(tmp_path))
    checker, reactor, states = http_checker(upstreams=(upstream,))
    assert reactor.tcpClients == []
    host, port, factory, options, timeout, _ = reactor.sslClients[0]
    assert (host, port, timeout) == ("backend.example", 8443, 5)
    assert options._hostname == "backend.example"
    proto, transport = connect_ok(factory)
    assert b"Host: backend.example:8443\r\n" in transport.value()
    proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert states[0].healthy and states[0].consecutive_successes == 1
    # options are built once and reused
    reactor.advance(10)
    assert reactor.sslClients[1][3] is options
    checker.stopService()


def test_tls_system_store_options():
    checker, reactor, _ = http_checker(upstreams=(B,))
    assert reactor.sslClients[0][3]._hostname == "backend.example"
    checker.stopService()


def test_bad_ca_file_is_a_failed_check(tmp_path):
    upstream = UpstreamConfig(location="b:1", host="b", port=1, tls=True, ca_cert_path=str(tmp_path / "missing.pem"))
    checker, reactor, states = http_checker(upstreams=(upstream,))
    assert not states[0].healthy
    assert reactor.sslClients == []
    assert len(reactor.getDelayedCalls()) == 1  # next check still scheduled
    checker.stopService()


def test_tcp_check_of_tls_upstream_is_plain_tcp():
    checker, reactor, _, _ = make(upstreams=(B,))
    checker.startService()
    reactor.advance(0)
    assert reactor.sslClients == [] and reactor.tcpClients[0][:2] == ("backend.example", 8443)
    checker.stopService()


def test_constructor_validation():
    with pytest.raises(ValueError):
        HealthChecker((A,), HealthCheckConfig(), [], MemoryReactorClock())
    with pytest.raises(ValueError):
        HealthChecker((A,), HealthCheckConfig(type="http"), [HealthState()], MemoryReactorClock())
