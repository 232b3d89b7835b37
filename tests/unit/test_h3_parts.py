"""The sans-IO pieces of HTTP/3: Retry tokens, the connection timer, Alt-Svc, certificate choice."""

from __future__ import annotations

import tomllib

import pytest
from twisted.internet.task import Clock

from rpxy.config.load import parse_config
from rpxy.policy.headers.alt_svc import alt_svc_for
from rpxy.policy.headers.response import prepare_response_headers
from rpxy.quic.timer import ConnectionTimer
from rpxy.quic.tls import CertificateChooser, UnusableSni
from rpxy.quic.tokens import InvalidToken, RetryTokens
from rpxy.tls.contexts import app_tls_from_material
from rpxy.tls.keys import certified_key_from_pem
from rpxy.tls.sni import SniContextMap
from tests.support.tlsgen import Authority

ADDR = ("192.0.2.1", 4000)

# -- Retry tokens -----------------------------------------------------------------------------------


def test_token_round_trip():
    tokens = RetryTokens(key=b"k" * 32)
    token = tokens.issue(ADDR, b"odcid-12", b"rscid-34", now=1000.0)
    assert tokens.check(ADDR, token, now=1005.0) == (b"odcid-12", b"rscid-34")


@pytest.mark.parametrize(
    ("addr", "now", "mutate"),
    [
        (("192.0.2.2", 4000), 1001.0, None),  # another address
        (("192.0.2.1", 4001), 1001.0, None),  # another port
        (ADDR, 1100.0, None),  # expired
        (ADDR, 900.0, None),  # from the future
        (ADDR, 1001.0, lambda t: t[:-1] + bytes((t[-1] ^ 1,))),  # forged MAC
        (ADDR, 1001.0, lambda t: t[:10]),  # truncated
        (ADDR, 1001.0, lambda t: b""),
        (ADDR, 1001.0, lambda t: t + b"x" * 100),
    ],
)
def test_bad_tokens_are_refused(addr, now, mutate):
    tokens = RetryTokens(key=b"k" * 32)
    token = tokens.issue(ADDR, b"odcid-12", b"rscid-34", now=1000.0)
    if mutate is not None:
        token = mutate(token)
    with pytest.raises(InvalidToken):
        tokens.check(addr, token, now=now)


def test_tokens_of_another_process_are_refused():
    token = RetryTokens().issue(ADDR, b"a", b"b", now=1.0)
    with pytest.raises(InvalidToken):
        RetryTokens().check(ADDR, token, now=1.0)


def test_ipv6_addresses_and_empty_cids():
    tokens = RetryTokens()
    addr = ("2001:db8::1", 443)
    assert tokens.check(addr, tokens.issue(addr, b"", b"12345678", now=5.0), now=5.0) == (b"", b"12345678")


# -- the connection timer -------------------------------------------------------------------------------


def test_timer_fires_at_the_earliest_deadline_and_follows_later_ones_lazily():
    clock = Clock()
    fired = []
    timer = ConnectionTimer(clock, lambda: fired.append(clock.seconds()))
    timer.set(10.0)
    timer.set(2.0)  # earlier: the one delayed call moves
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2.0)
    assert fired == [2.0]
    timer.set(5.0)
    timer.set(8.0)  # later: no new call, picked up when the first one fires
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3.0)
    assert fired == [2.0]
    clock.advance(3.0)
    assert fired == [2.0, 8.0]


def test_timer_none_and_cancel():
    clock = Clock()
    fired = []
    timer = ConnectionTimer(clock, lambda: fired.append(1))
    timer.set(1.0)
    timer.set(None)
    clock.advance(5)
    assert fired == []
    timer.set(7.0)
    timer.cancel()
    assert clock.getDelayedCalls() == []


# -- Alt-Svc ---------------------------------------------------------------------------------------------

BASE = """
listen_port = 8080
listen_port_tls = 8443
{extra}
[apps.plain]
server_name = "plain.test"
[[apps.plain.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:1" }}]
[apps.secure]
server_name = "secure.test"
tls = {{ tls_cert_path = "{d}/c.pem", tls_cert_key_path = "{d}/k.pem" }}
[[apps.secure.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:1" }}]
[apps.mutual]
server_name = "mutual.test"
tls = {{ tls_cert_path = "{d}/c.pem", tls_cert_key_path = "{d}/k.pem", client_ca_cert_path = "{d}/ca.pem" }}
[[apps.mutual.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:1" }}]
{h3}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A config factory; the files only need to exist (they are read when the state is built)."""
    directory = tmp_path_factory.mktemp("altsvc")
    for name in ("c.pem", "k.pem", "ca.pem"):
        (directory / name).write_text("")

    def make(extra: str = "", h3: str = "[experimental.h3]\nalt_svc_max_age = 60\n"):
        return parse_config(tomllib.loads(BASE.format(extra=extra, h3=h3, d=directory))).config

    return make


def test_alt_svc_value_follows_the_reference(config):
    cfg = config()
    secure = cfg.app_by_name("secure")
    assert alt_svc_for(cfg, secure, tls=True) == b'h3=":8443"; ma=60'
    cfg = config(extra="public_https_port = 443")
    assert alt_svc_for(cfg, cfg.app_by_name("secure"), tls=True) == b'h3=":443"; ma=60'


def test_no_alt_svc_without_h3_tls_request_or_tls_app(config):
    cfg = config()
    assert alt_svc_for(cfg, cfg.app_by_name("secure"), tls=False) is None  # cleartext request
    assert alt_svc_for(cfg, cfg.app_by_name("plain"), tls=True) is None  # app without TLS
    # Beyond rpxy: mTLS apps are served over HTTP/3 (with client certificates), so advertised.
    assert alt_svc_for(cfg, cfg.app_by_name("mutual"), tls=True) == b'h3=":8443"; ma=60'
    cfg = config(h3="")
    assert alt_svc_for(cfg, cfg.app_by_name("secure"), tls=True) is None  # HTTP/3 off


def test_upstream_alt_svc_is_always_replaced():
    upstream = [(b"alt-svc", b'h3=":9999"'), (b"content-type", b"text/plain")]
    assert prepare_response_headers(upstream, alt_svc=None, upgrade=False) == [
        (b"content-type", b"text/plain"),
        (b"server", b"rpxy"),
    ]
    assert (b"alt-svc", b'h3=":8443"; ma=60') in prepare_response_headers(upstream, alt_svc=b'h3=":8443"; ma=60', upgrade=False)


# -- certificate choice by SNI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contexts():
    ca = Authority("chooser CA")
    entries = []
    for app, name, cas in (("a", "a.test", ()), ("w", "*.wild.test", ()), ("m", "m.test", (ca.cert,))):
        leaf = ca.issue(name)
        entries.append(app_tls_from_material(app, name, certified_key_from_pem(leaf.cert_pem(), leaf.key_pem()), client_cas=cas))
    return SniContextMap(entries)


def test_chooser_picks_by_sni_and_caches(contexts):
    chooser = CertificateChooser(lambda: contexts)
    name, material, verifier = chooser.choose("A.Test.")
    assert (name, verifier) == ("a.test", None)  # no client certificates for this app
    assert chooser.choose("a.test")[1] is material  # converted once per entry
    assert chooser.choose("x.wild.test")[0] == "x.wild.test"


def test_chooser_gives_mtls_apps_their_client_verifier(contexts):
    chooser = CertificateChooser(lambda: contexts)
    _name, _material, verifier = chooser.choose("m.test")
    assert verifier is not None
    assert verifier.authorities == contexts.lookup_normalized("m.test").client_cas
    assert chooser.choose("m.test")[2] is verifier  # built once per TLS entry (a reload makes a new one)


@pytest.mark.parametrize(
    ("sni", "category"),
    [(None, "no_sni"), ("", "no_sni"), ("nobody.test", "unknown_sni")],
)
def test_chooser_refusals(contexts, sni, category):
    with pytest.raises(UnusableSni) as info:
        CertificateChooser(lambda: contexts).choose(sni)
    assert info.value.category == category


def test_chooser_without_tls():
    chooser = CertificateChooser(lambda: None)
    assert chooser.any_material() is None
    with pytest.raises(UnusableSni):
        chooser.choose("a.test")


# -- the HTTP/3 UDP port: batched system calls ---------------------------------------------------


def test_quic_udp_port_reads_and_sends_in_batches():
    import socket
    import time

    from twisted.internet.protocol import DatagramProtocol
    from twisted.internet.testing import MemoryReactorClock

    from rpxy.front.h3 import QuicUDPPort

    class Recorder(DatagramProtocol):
        def __init__(self) -> None:
            self.received: list[tuple[bytes, tuple]] = []

        def datagramReceived(self, data, addr):  # type: ignore[no-untyped-def]
            self.received.append((data, addr))

    recorder = Recorder()
    port = QuicUDPPort(0, recorder, "127.0.0.1", 65535, MemoryReactorClock())
    port.startListening()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        assert port.batch is not None  # qh3's quinn-udp state on Linux
        target = port.getHost().port
        for i in range(50):
            peer.sendto(b"d%02d" % i + b"x" * i, ("127.0.0.1", target))
        time.sleep(0.05)
        port.doRead()  # up to 32 datagrams per recvmmsg: at least two calls, all in order
        assert [data for data, _addr in recorder.received] == [b"d%02d" % i + b"x" * i for i in range(50)]
        assert {addr for _data, addr in recorder.received} == {peer.getsockname()}
        port.doRead()  # nothing left: returns quietly
        # One peer, several datagrams of QUIC's size and a short last one: one GSO send.
        datagrams = [b"a" * 1200, b"b" * 1200, b"c" * 300]
        assert port.send_batch(datagrams, peer.getsockname()) == 3
        peer.settimeout(2)
        assert [peer.recv(2000) for _ in datagrams] == datagrams
    finally:
        peer.close()
        port.stopListening()
