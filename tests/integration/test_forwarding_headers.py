"""Headers the real proxy sends upstream (read back from the origin's /echo) and to the client.

Two proxy processes (module scope): one with no trusted forwarders, one trusting
127.0.0.1/32 and 10.0.0.0/8. A canned in-process origin produces the response headers
the Twisted origin cannot (hop-by-hop fields, Alt-Svc, a foreign Server).
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Origin, Rpxy, curl, raw_request
from tests.support.canned import CannedOrigin
from tests.support.http import echo_json, get_header, header_names, header_values, parse_curl_include, parse_response

CANNED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: canned/1.0\r\n"
    b'Alt-Svc: h3=":443"; ma=86400\r\n'
    b"Connection: keep-alive, X-Hop\r\n"
    b"X-Hop: secret\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Authenticate: Basic realm=x\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Trailer: X-Checksum\r\n"
    b"X-Kept: yes\r\n"
    b"Content-Length: 2\r\n"
    b"\r\n"
    b"ok"
)


@pytest.fixture(scope="module")
def origin():
    origin = Origin("a")
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def canned():
    canned = CannedOrigin(CANNED_RESPONSE)
    yield canned
    canned.stop()


def _apps(origin: Origin, canned: CannedOrigin) -> str:
    up = f'[{{ location = "{origin.location}" }}]'
    return f"""
        [apps.plain]
        server_name = "plain.test"
        reverse_proxy = [{{ upstream = {up} }}]
        [apps.fwd]
        server_name = "fwd.test"
        reverse_proxy = [{{ upstream = {up}, upstream_options = ["forwarded_header"] }}]
        [apps.sethost]
        server_name = "sethost.test"
        reverse_proxy = [{{ upstream = {up}, upstream_options = ["set_upstream_host"] }}]
        [apps.keephost]
        server_name = "keephost.test"
        reverse_proxy = [{{ upstream = {up}, upstream_options = ["keep_original_host", "set_upstream_host"] }}]
        [apps.uir]
        server_name = "uir.test"
        reverse_proxy = [{{ upstream = {up}, upstream_options = ["upgrade_insecure_requests"] }}]
        [apps.canned]
        server_name = "canned.test"
        reverse_proxy = [{{ upstream = [{{ location = "{canned.location}" }}] }}]
    """


@pytest.fixture(scope="module")
def proxy(origin, canned, tmp_path_factory):
    config = 'listen_port = {port}\nlisten_address_v4 = "127.0.0.1"\n' + _apps(origin, canned)
    proxy = Rpxy(tmp_path_factory.mktemp("headers"), config)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def trusting_proxy(origin, canned, tmp_path_factory):
    config = (
        'listen_port = {port}\nlisten_address_v4 = "127.0.0.1"\n'
        'trusted_forwarded_proxies = ["127.0.0.1/32", "10.0.0.0/8"]\n' + _apps(origin, canned)
    )
    proxy = Rpxy(tmp_path_factory.mktemp("headers-trusted"), config)
    yield proxy
    proxy.stop()


def echo(proxy: Rpxy, host: str, path: str = "/echo", headers: tuple[str, ...] = ()) -> dict:
    args = ["--path-as-is", "-H", f"Host: {host}"]
    for header in headers:
        args += ["-H", header]
    result = curl(*args, proxy.url + path)
    assert result.returncode == 0, result.stderr
    return echo_json(result.stdout)


def raw_echo(proxy: Rpxy, head: bytes) -> dict:
    status, _headers, body = parse_response(raw_request(proxy.port, head))
    assert status == 200, body
    return echo_json(body)


def one(data: dict, name: str) -> str:
    values = header_values(data, name)
    assert len(values) == 1, (name, data["headers"])
    return values[0]


# -- the fields the proxy always sets ------------------------------------------------


def test_forwarding_fields(proxy):
    data = echo(proxy, "Plain.Test:8080", "/echo/x?y=1&z")
    assert one(data, "x-forwarded-for") == "127.0.0.1"
    assert one(data, "x-real-ip") == "127.0.0.1"
    assert one(data, "x-forwarded-proto") == "http"
    assert one(data, "x-forwarded-port") == str(proxy.port)
    assert one(data, "x-forwarded-ssl") == "off"
    assert one(data, "x-forwarded-host") == "Plain.Test:8080"
    assert one(data, "x-original-uri") == "/echo/x?y=1&z"
    assert one(data, "host") == "Plain.Test:8080"
    # No Forwarded unless the client sent one or the route asks for it.
    assert "forwarded" not in header_names(data)


def test_spoofed_forwarding_from_untrusted_peer_is_discarded(proxy):
    data = echo(
        proxy,
        "plain.test",
        headers=(
            "X-Forwarded-For: 6.6.6.6",
            "Forwarded: for=6.6.6.6;proto=https;host=evil.test",
            "X-Real-IP: 6.6.6.6",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Port: 1",
            "X-Forwarded-SSL: on",
            "X-Forwarded-Host: evil.test",
            "X-Original-URI: /evil",
        ),
    )
    assert one(data, "x-forwarded-for") == "127.0.0.1"
    assert one(data, "x-real-ip") == "127.0.0.1"
    assert one(data, "x-forwarded-proto") == "http"
    assert one(data, "x-forwarded-port") == str(proxy.port)
    assert one(data, "x-forwarded-ssl") == "off"
    assert one(data, "x-forwarded-host") == "plain.test"
    assert one(data, "x-original-uri") == "/echo"
    # A Forwarded field that came in is regenerated from the (peer-only) chain.
    assert one(data, "forwarded") == "for=127.0.0.1;proto=http;host=plain.test"
    dump = repr(data["headers"])
    assert "6.6.6.6" not in dump and "evil" not in dump


def test_trusted_peer_keeps_chain_and_appends_itself(trusting_proxy):
    data = echo(trusting_proxy, "plain.test", headers=("X-Forwarded-For: 203.0.113.7",))
    assert one(data, "x-forwarded-for") == "203.0.113.7, 127.0.0.1"
    assert one(data, "x-real-ip") == "203.0.113.7"
    # Several values are one list; trusted hops (10/8) stay, hops left of the
    # right-most untrusted address are unverifiable and cut.
    data = echo(
        trusting_proxy,
        "plain.test",
        headers=("X-Forwarded-For: 198.51.100.1", "X-Forwarded-For: 203.0.113.7, 10.1.2.3"),
    )
    assert one(data, "x-forwarded-for") == "203.0.113.7, 10.1.2.3, 127.0.0.1"
    assert one(data, "x-real-ip") == "203.0.113.7"
    # Our own view of the connection is always what is sent.
    assert one(data, "x-forwarded-proto") == "http"


def test_trusted_peer_forwarded_chain(trusting_proxy):
    data = echo(
        trusting_proxy,
        "plain.test",
        headers=("X-Forwarded-For: 203.0.113.7", "Forwarded: for=203.0.113.7;proto=https;host=front.test"),
    )
    assert one(data, "forwarded") == "for=203.0.113.7;proto=https;host=front.test, for=127.0.0.1;proto=http;host=plain.test"
    assert one(data, "x-forwarded-for") == "203.0.113.7, 127.0.0.1"
    # Forwarded alone (IPv6 node) is parsed into X-Forwarded-For as well.
    data = echo(trusting_proxy, "plain.test", headers=('Forwarded: for="[2001:db8::1]:4711";proto=https',))
    assert one(data, "x-forwarded-for") == "2001:db8::1, 127.0.0.1"
    assert one(data, "x-real-ip") == "2001:db8::1"
    assert one(data, "forwarded") == 'for="[2001:db8::1]:4711";proto=https, for=127.0.0.1;proto=http;host=plain.test'


def test_forwarded_header_option(proxy, trusting_proxy):
    data = echo(proxy, "fwd.test")
    assert one(data, "forwarded") == "for=127.0.0.1;proto=http;host=fwd.test"
    data = echo(proxy, "fwd.test:8080")
    assert one(data, "forwarded") == 'for=127.0.0.1;proto=http;host="fwd.test:8080"'
    data = echo(trusting_proxy, "fwd.test", headers=("X-Forwarded-For: 203.0.113.7",))
    assert one(data, "forwarded") == "for=203.0.113.7, for=127.0.0.1;proto=http;host=fwd.test"


# -- hop-by-hop and friends -----------------------------------------------------------------


def test_hop_by_hop_and_connection_nominated_fields_removed(proxy):
    data = raw_echo(
        proxy,
        b"GET /echo HTTP/1.1\r\n"
        b"Host: plain.test\r\n"
        b"Connection: x-secret, X-Other, close\r\n"
        b"X-Secret: 1\r\n"
        b"x-other: 2\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: something\r\n"
        b"TE: gzip\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n",
    )
    names = header_names(data)
    for gone in (
        "x-secret",
        "x-other",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
        "upgrade",
        "te",
    ):
        assert gone not in names, (gone, data["headers"])
    assert one(data, "x-kept") == "yes"


def test_connection_cannot_remove_the_proxys_own_fields(proxy):
    data = raw_echo(
        proxy,
        b"GET /echo HTTP/1.1\r\nHost: plain.test\r\n"
        b"Connection: close, x-forwarded-for, X-Real-IP, x-forwarded-proto, forwarded\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    assert one(data, "x-forwarded-for") == "127.0.0.1"
    assert one(data, "x-real-ip") == "127.0.0.1"
    assert one(data, "x-forwarded-proto") == "http"


def test_httpoxy_proxy_header_not_forwarded(proxy):
    data = echo(proxy, "plain.test", headers=("Proxy: http://evil.test:3128",))
    # rpxy sends it emptied; we drop it. Either way its value never reaches the origin.
    assert all(value == "" for value in header_values(data, "proxy")), data["headers"]
    assert "evil" not in repr(data["headers"])


def test_cookie_headers_merged(proxy):
    data = raw_echo(
        proxy,
        b"GET /echo HTTP/1.1\r\nHost: plain.test\r\nCookie: a=1\r\nX-Mid: m\r\nCookie: b=2; c=3\r\nConnection: close\r\n\r\n",
    )
    assert header_values(data, "cookie") == ["a=1; b=2; c=3"]


@pytest.mark.parametrize(
    ("te", "expected"),
    [("trailers", ["trailers"]), ("gzip;q=0.5, Trailers", ["trailers"]), ("gzip", []), ("deflate, chunked", [])],
)
def test_te_trailers_kept_other_te_dropped(proxy, te, expected):
    data = echo(proxy, "plain.test", headers=(f"TE: {te}",))
    assert header_values(data, "te") == expected


# -- upstream_options -------------------------------------------------------------------------


def test_set_upstream_host(proxy, origin):
    data = echo(proxy, "sethost.test:8080")
    assert one(data, "host") == origin.location
    assert one(data, "x-forwarded-host") == "sethost.test:8080"


def test_keep_original_host_wins(proxy):
    data = echo(proxy, "KeepHost.test")
    assert one(data, "host") == "KeepHost.test"
    assert "keep_original_host wins over set_upstream_host" in proxy.system_log()


def test_upgrade_insecure_requests(proxy):
    assert one(echo(proxy, "uir.test"), "upgrade-insecure-requests") == "1"
    assert one(echo(proxy, "uir.test", headers=("Upgrade-Insecure-Requests: 1",)), "upgrade-insecure-requests") == "1"
    assert "upgrade-insecure-requests" not in header_names(echo(proxy, "plain.test"))


# -- response headers ------------------------------------------------------------------------


def test_server_header_replaced(proxy):
    result = curl("-i", "-H", "Host: plain.test", proxy.url + "/echo")
    status, headers, _body = parse_curl_include(result.stdout)
    assert status == 200
    assert get_header(headers, "server") == ["rpxy"]
    assert get_header(headers, "x-origin") == ["a"]


def test_response_hop_by_hop_and_alt_svc_removed(proxy, canned):
    raw = raw_request(proxy.port, b"GET /r HTTP/1.1\r\nHost: canned.test\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_response(raw)
    assert (status, body) == (200, b"ok")
    names = {name for name, _ in headers}
    for gone in ("alt-svc", "x-hop", "keep-alive", "proxy-authenticate", "proxy-connection", "trailer"):
        assert gone not in names, (gone, headers)
    assert get_header(headers, "server") == ["rpxy"]
    assert get_header(headers, "x-kept") == ["yes"]
    assert "keep-alive" not in ",".join(get_header(headers, "connection")).lower()
    # The canned origin saw exactly one proxied request with our fields.
    assert canned.requests and canned.requests[-1].startswith(b"GET /r HTTP/1.1\r\n")
