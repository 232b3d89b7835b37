"""Header rules: hop-by-hop, forwarding chain, Forwarded, cookies, httpoxy, responses."""

from __future__ import annotations

import pytest

from rpxy.message import ConnectionInfo, Headers, header_values
from rpxy.policy.headers.alt_svc import alt_svc_value
from rpxy.policy.headers.cookies import merge_cookies
from rpxy.policy.headers.forwarded import (
    ForwardedElement,
    format_forwarded,
    format_node,
    format_value,
    parse_forwarded,
    parse_node,
    parse_x_forwarded_for,
)
from rpxy.policy.headers.forwarding import trim_trusted
from rpxy.policy.headers.hop_by_hop import HOP_BY_HOP, connection_tokens, strip_hop_by_hop
from rpxy.policy.headers.httpoxy import drop_proxy_header
from rpxy.policy.headers.request import ForwardedFor, prepare_request_headers
from rpxy.policy.headers.response import prepare_response_headers
from rpxy.policy.headers.te import te_has_trailers
from rpxy.policy.headers.upstream_host import set_host, upstream_host_value
from rpxy.policy.trusted import TrustedProxies, canonical_ip

NO_TRUST = TrustedProxies([])
TRUST_10 = TrustedProxies(["10.0.0.0/8"])
OURS = (
    b"x-forwarded-for",
    b"x-real-ip",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-forwarded-ssl",
    b"x-original-uri",
    b"x-forwarded-host",
)


def prepare(
    headers: Headers,
    *,
    peer: str = "203.0.113.10",
    tls: bool = False,
    local_port: int = 8080,
    trusted: TrustedProxies = NO_TRUST,
    original_host: bytes = b"app.example",
    original_uri: bytes = b"/demo?q=1",
    add_forwarded: bool = False,
    upstream_host: bytes | None = None,
    upgrade_insecure: bool = False,
    upgrade: bytes | None = None,
) -> ForwardedFor:
    return prepare_request_headers(
        headers,
        conn=ConnectionInfo(peer_ip=peer, peer_port=4321, local_port=local_port, tls=tls),
        original_host=original_host,
        original_uri=original_uri,
        trusted=trusted,
        add_forwarded=add_forwarded,
        upstream_host=upstream_host,
        upgrade_insecure=upgrade_insecure,
        upgrade=upgrade,
    )


def only(headers: Headers, name: bytes) -> bytes:
    values = header_values(headers, name)
    assert len(values) == 1, (name, headers)
    return values[0]


def names(headers: Headers) -> list[bytes]:
    return [name for name, _ in headers]


# ------------------------------------------------------------------ trusted proxies


@pytest.mark.parametrize(
    ("cidrs", "ip", "expected"),
    [
        ([], "10.0.0.1", False),
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # IPv4-mapped from a dual-stack socket
        (["10.0.0.0/8"], "::1", False),
        (["192.0.2.7/32"], "192.0.2.7", True),
        (["192.0.2.7"], "192.0.2.7", True),
        (["192.0.2.7"], "192.0.2.8", False),
        (["192.0.2.1/24"], "192.0.2.200", True),  # host bits tolerated
        (["2001:db8::/32"], "2001:db8:1::5", True),
        (["2001:db8::/32"], "2001:DB8::5", True),
        (["2001:db8::/32"], "2001:db9::5", False),
        (["2001:db8::/32"], "10.0.0.1", False),
        (["::ffff:10.0.0.0/104"], "10.2.3.4", True),
        (["::1/128"], "::1", True),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["10.0.0.0/8"], "not-an-ip", False),
        (["10.0.0.0/8"], "", False),
        (["0.0.0.0/0", "::/0"], "198.51.100.1", True),
    ],
)
def test_trusted_contains(cidrs: list[str], ip: str, expected: bool) -> None:
    trusted = TrustedProxies(cidrs)
    assert trusted.contains(ip) is expected
    assert trusted.contains(ip) is expected  # cached answer is the same


def test_trusted_cache_is_bounded() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    for i in range(5000):
        trusted.contains(f"192.168.{i // 256}.{i % 256}")
    assert len(trusted._cache) <= 1024
    assert trusted.contains("10.9.9.9")


def test_trusted_bool_and_bad_cidr() -> None:
    assert not NO_TRUST
    assert TRUST_10
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("garbage:x", "garbage:x"),
    ],
)
def test_canonical_ip(text: str, expected: str) -> None:
    assert canonical_ip(text) == expected


# ------------------------------------------------------------------ hop-by-hop rule


def test_strip_hop_by_hop_removes_all_and_nominated() -> None:
    headers = [(name, b"x") for name in sorted(HOP_BY_HOP)] + [
        (b"connection", b"X-Custom, , Keep-Alive"),
        (b"x-custom", b"1"),
        (b"host", b"h"),
        (b"content-length", b"1"),
        (b"x-keep", b"1"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"h"), (b"content-length", b"1"), (b"x-keep", b"1")]


def test_connection_cannot_nominate_host_or_content_length() -> None:
    assert connection_tokens([b"Host, Content-Length, x-a", b"X-B"]) == {b"x-a", b"x-b"}
    headers = [(b"connection", b"host, content-length"), (b"host", b"h"), (b"content-length", b"3")]
    assert strip_hop_by_hop(headers) == [(b"host", b"h"), (b"content-length", b"3")]


def test_strip_hop_by_hop_keep() -> None:
    headers = [(b"connection", b"upgrade"), (b"upgrade", b"websocket"), (b"keep-alive", b"5")]
    keep = frozenset((b"connection", b"upgrade"))
    assert strip_hop_by_hop(headers, keep=keep) == [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"trailers", True),
        (b"Trailers", True),
        (b"TRAILERS", True),
        (b"gzip, trailers", True),
        (b"gzip,\ttrailers", True),
        (b"trailers, deflate;q=0.5", True),
        (b"gzip", False),
        (b"", False),
        (b"trailers-extra", False),
        (b"xtrailers", False),
    ],
)
def test_te_has_trailers(value: bytes, expected: bool) -> None:
    assert te_has_trailers(value) is expected


def test_merge_cookies_standalone() -> None:
    assert merge_cookies([(b"cookie", b"a=1")]) == [(b"cookie", b"a=1")]
    assert merge_cookies(
        [(b"x", b"1"), (b"cookie", b"a=1"), (b"y", b"2"), (b"cookie", b"b=2"), (b"cookie", b"c=3")]
    ) == [
        (b"x", b"1"),
        (b"cookie", b"a=1; b=2; c=3"),
        (b"y", b"2"),
    ]


def test_drop_proxy_header_and_set_host() -> None:
    assert drop_proxy_header([(b"proxy", b"http://evil"), (b"x", b"1")]) == [(b"x", b"1")]
    assert set_host([(b"a", b"1"), (b"host", b"x"), (b"host", b"y")], b"up:8080") == [
        (b"a", b"1"),
        (b"host", b"up:8080"),
    ]
    assert set_host([(b"a", b"1")], b"up") == [(b"host", b"up"), (b"a", b"1")]
    assert upstream_host_value("backend.internal:8080") == b"backend.internal:8080"


def test_alt_svc_value() -> None:
    assert alt_svc_value(443, 3600) == b'h3=":443"; ma=3600'
    assert alt_svc_value(8443, 60) == b'h3=":8443"; ma=60'


# ------------------------------------------------------------------ Forwarded parse/format


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"192.0.2.1", ("192.0.2.1", None)),
        (b"192.0.2.1:4711", ("192.0.2.1", b"4711")),
        (b"192.0.2.1:_obf", ("192.0.2.1", b"_obf")),
        (b"[2001:db8::1]", ("2001:db8::1", None)),
        (b"[2001:db8::1]:443", ("2001:db8::1", b"443")),
        (b"2001:db8::4711", ("2001:db8::4711", None)),  # unbracketed: no port split
        (b"2001:db8::1:443", ("2001:db8::1:443", None)),
        (b"[::ffff:10.1.2.3]", ("10.1.2.3", None)),
        (b"unknown", None),
        (b"unknown:80", None),
        (b"_hidden", None),
        (b"192.0.2.1:99999", None),
        (b"192.0.2.1:", None),
        (b"[2001:db8::1", None),
        (b"[2001:db8::1]x", None),
        (b"[2001:db8::1]:", None),
        (b"300.1.1.1", None),
        (b"", None),
        (b"\xff", None),
    ],
)
def test_parse_node(value: bytes, expected: tuple[str, bytes | None] | None) -> None:
    assert parse_node(value) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            [b"for=192.0.2.60;proto=http;by=203.0.113.43"],
            [ForwardedElement("192.0.2.60", None, b"http", None, b"203.0.113.43")],
        ),
        ([b'for="[2001:db8:cafe::17]:4711"'], [ForwardedElement("2001:db8:cafe::17", b"4711")]),
        ([b'For="[2001:db8::1]"'], [ForwardedElement("2001:db8::1")]),
        ([b"for=192.0.2.43, for=198.51.100.17"], [ForwardedElement("192.0.2.43"), ForwardedElement("198.51.100.17")]),
        (
            [b"for=192.0.2.43", b"for=198.51.100.17"],
            [ForwardedElement("192.0.2.43"), ForwardedElement("198.51.100.17")],
        ),
        (
            [b'for=192.0.2.43;host="a.example:8443" ; proto=HTTPS'],
            [ForwardedElement("192.0.2.43", None, b"HTTPS", b"a.example:8443")],
        ),
        (
            [b'for=1.2.3.4;host="a,b;c"'],
            [ForwardedElement("1.2.3.4", None, None, b"a,b;c")],
        ),  # separators inside quotes
        ([b'for=1.2.3.4;host="a\\"b"'], [ForwardedElement("1.2.3.4", None, None, b'a"b')]),  # quoted-pair
        ([b"for=1.2.3.4;secret=x"], [ForwardedElement("1.2.3.4")]),  # unknown params dropped
        ([b"for=1.2.3.4,,"], [ForwardedElement("1.2.3.4")]),
        ([b"for=unknown"], None),
        ([b"for=_hidden, for=1.2.3.4"], None),
        ([b"proto=https"], None),  # no for=
        ([b"for=1.2.3.4;for=5.6.7.8"], None),  # duplicate parameter
        ([b"for=1.2.3.4;proto=http;proto=https"], None),
        ([b'for="1.2.3.4'], None),  # unterminated quote
        ([b"for=1.2.3.4;garbage"], None),  # pair without '='
        ([b"=1.2.3.4"], None),
        ([b'for=1.2.3.4;host=a"b'], None),
        ([b"for=not-an-ip"], None),
        ([b""], None),
        ([b" , "], None),
    ],
)
def test_parse_forwarded(values: list[bytes], expected: list[ForwardedElement] | None) -> None:
    assert parse_forwarded(values) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"198.51.100.10"], ["198.51.100.10"]),
        ([b"198.51.100.10, 10.9.0.4"], ["198.51.100.10", "10.9.0.4"]),
        ([b"198.51.100.10", b"10.9.0.4"], ["198.51.100.10", "10.9.0.4"]),
        ([b"198.51.100.10, , 203.0.113.20"], ["198.51.100.10", "203.0.113.20"]),
        ([b"2001:db8::1,10.0.0.1"], ["2001:db8::1", "10.0.0.1"]),
        ([b"[2001:db8::1]:443, 192.0.2.1:80"], ["2001:db8::1", "192.0.2.1"]),
        ([b"::ffff:1.2.3.4"], ["1.2.3.4"]),
        ([b""], []),
        ([b"unknown"], None),
        ([b"1.2.3.4, evil"], None),
        ([b"1.2.3.4 5.6.7.8"], None),
    ],
)
def test_parse_x_forwarded_for(values: list[bytes], expected: list[str] | None) -> None:
    assert parse_x_forwarded_for(values) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"https", b"https"),
        (b"example.com", b"example.com"),
        (b"example.com:8443", b'"example.com:8443"'),
        (b"[2001:db8::1]", b'"[2001:db8::1]"'),
        (b'a"b\\c', b'"a\\"b\\\\c"'),
        (b"", b'""'),
        (b"a b", b'"a b"'),
    ],
)
def test_format_value(value: bytes, expected: bytes) -> None:
    assert format_value(value) == expected


def test_format_node_and_forwarded() -> None:
    assert format_node("192.0.2.1") == b"192.0.2.1"
    assert format_node("192.0.2.1", b"80") == b'"192.0.2.1:80"'
    assert format_node("2001:db8::1") == b'"[2001:db8::1]"'
    assert format_node("2001:db8::1", b"443") == b'"[2001:db8::1]:443"'
    chain = [
        ForwardedElement("2001:db8::1", None, b"https", b"app.example"),
        ForwardedElement("10.1.2.3", None, b"http", b"app.example:8443", b"_proxy"),
    ]
    text = format_forwarded(chain)
    assert text == (
        b'for="[2001:db8::1]";proto=https;host=app.example, for=10.1.2.3;proto=http;host="app.example:8443";by=_proxy'
    )
    assert parse_forwarded([text]) == chain  # round trip


def test_trim_trusted() -> None:
    chain = [ForwardedElement(ip) for ip in ("1.1.1.1", "2.2.2.2", "10.0.0.1", "10.0.0.2")]
    assert [e.for_ip for e in trim_trusted(chain, TRUST_10)] == ["2.2.2.2", "10.0.0.1", "10.0.0.2"]
    all_trusted = [ForwardedElement(ip) for ip in ("10.0.0.9", "10.0.0.1")]
    assert trim_trusted(all_trusted, TRUST_10) == all_trusted
    one_untrusted = [ForwardedElement("1.1.1.1"), ForwardedElement("10.0.0.1")]
    assert trim_trusted(one_untrusted, TRUST_10) == one_untrusted


# ------------------------------------------------------------------ request: forwarding chain


def test_untrusted_peer_discards_spoofed_forwarding_headers() -> None:
    result = prepare(
        [
            (b"host", b"app.example"),
            (b"x-forwarded-for", b"1.2.3.4"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-port", b"443"),
            (b"x-forwarded-host", b"spoofed.example"),
            (b"x-forwarded-ssl", b"on"),
            (b"x-real-ip", b"1.2.3.4"),
            (b"x-original-uri", b"/admin"),
            (b"forwarded", b"for=1.2.3.4;proto=https;host=app.example"),
        ]
    )
    h = result.headers
    assert only(h, b"x-forwarded-for") == b"203.0.113.10"
    assert only(h, b"x-real-ip") == b"203.0.113.10"
    assert only(h, b"x-forwarded-proto") == b"http"
    assert only(h, b"x-forwarded-port") == b"8080"
    assert only(h, b"x-forwarded-ssl") == b"off"
    assert only(h, b"x-forwarded-host") == b"app.example"
    assert only(h, b"x-original-uri") == b"/demo?q=1"
    # present on input -> regenerated from our own chain
    assert only(h, b"forwarded") == b"for=203.0.113.10;proto=http;host=app.example"
    assert result.client_ip == "203.0.113.10"
    assert result.xff == b"203.0.113.10"
    assert result.forwarded == b"for=203.0.113.10;proto=http;host=app.example"
    assert result.secure is False


def test_untrusted_peer_spoofed_xff_not_prefixed() -> None:
    # Even with trusted proxies configured, an untrusted peer's claims are dropped.
    result = prepare([(b"x-forwarded-for", b"10.0.0.5, 1.2.3.4")], peer="198.51.100.7", trusted=TRUST_10)
    assert only(result.headers, b"x-forwarded-for") == b"198.51.100.7"
    assert result.client_ip == "198.51.100.7"


def test_no_forwarded_unless_present_or_option() -> None:
    assert header_values(prepare([]).headers, b"forwarded") == []
    result = prepare([], add_forwarded=True, tls=True, original_host=b"app.example:8443")
    assert only(result.headers, b"forwarded") == b'for=203.0.113.10;proto=https;host="app.example:8443"'


def test_trusted_keeps_trusted_suffix() -> None:
    result = prepare(
        [(b"x-forwarded-for", b"198.51.100.10, 10.9.0.4")], peer="10.1.2.3", tls=True, local_port=8443, trusted=TRUST_10
    )
    h = result.headers
    assert only(h, b"x-forwarded-for") == b"198.51.100.10, 10.9.0.4, 10.1.2.3"
    assert only(h, b"x-real-ip") == b"198.51.100.10"
    assert only(h, b"x-forwarded-proto") == b"https"
    assert only(h, b"x-forwarded-ssl") == b"on"
    assert only(h, b"x-forwarded-port") == b"8443"
    assert result.secure is True


def test_trusted_trims_multiple_hops_left_of_boundary() -> None:
    result = prepare(
        [(b"x-forwarded-for", b"6.6.6.6, 198.51.100.10, 203.0.113.20, 10.0.0.7, 10.0.0.8")],
        peer="10.1.2.3",
        trusted=TRUST_10,
    )
    assert result.xff == b"203.0.113.20, 10.0.0.7, 10.0.0.8, 10.1.2.3"
    assert only(result.headers, b"x-forwarded-for") == result.xff
    assert result.client_ip == "203.0.113.20"
    assert only(result.headers, b"x-real-ip") == b"203.0.113.20"


def test_trusted_all_hops_trusted_keeps_everything() -> None:
    result = prepare([(b"x-forwarded-for", b"10.0.0.1, 10.0.0.2")], peer="10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"10.0.0.1, 10.0.0.2, 10.1.2.3"
    assert result.client_ip == "10.0.0.1"


def test_trusted_multiple_xff_lines() -> None:
    result = prepare(
        [(b"x-forwarded-for", b"198.51.100.10"), (b"x-forwarded-for", b"10.9.0.4")], peer="10.1.2.3", trusted=TRUST_10
    )
    assert result.xff == b"198.51.100.10, 10.9.0.4, 10.1.2.3"


def test_trusted_peer_without_forwarding_headers() -> None:
    result = prepare([], peer="10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"10.1.2.3"
    assert result.client_ip == "10.1.2.3"


def test_trusted_garbage_xff_falls_back_to_peer() -> None:
    result = prepare([(b"x-forwarded-for", b"1.2.3.4, unknown")], peer="10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"10.1.2.3"
    assert result.client_ip == "10.1.2.3"


def test_trusted_uses_forwarded_when_xff_missing() -> None:
    result = prepare([(b"forwarded", b"for=198.51.100.10, for=10.9.0.4")], peer="10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"198.51.100.10, 10.9.0.4, 10.1.2.3"
    assert result.client_ip == "198.51.100.10"
    assert result.forwarded == b"for=198.51.100.10, for=10.9.0.4, for=10.1.2.3;proto=http;host=app.example"
    assert only(result.headers, b"forwarded") == result.forwarded


def test_trusted_forwarded_ipv6_quoting() -> None:
    result = prepare(
        [(b"forwarded", b'for="[2001:db8::1]";proto=https;host=app.example')], peer="10.1.2.3", trusted=TRUST_10
    )
    assert result.xff == b"2001:db8::1, 10.1.2.3"
    assert result.client_ip == "2001:db8::1"
    assert (
        result.forwarded
        == b'for="[2001:db8::1]";proto=https;host=app.example, for=10.1.2.3;proto=http;host=app.example'
    )


def test_trusted_forwarded_with_port_kept() -> None:
    result = prepare([(b"forwarded", b'for="192.0.2.43:4711", for=10.9.0.4')], peer="10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"192.0.2.43, 10.9.0.4, 10.1.2.3"
    assert result.forwarded == b'for="192.0.2.43:4711", for=10.9.0.4, for=10.1.2.3;proto=http;host=app.example'


def test_trusted_consistent_forwarded_preferred_over_xff() -> None:
    result = prepare(
        [(b"x-forwarded-for", b"198.51.100.10"), (b"forwarded", b"for=198.51.100.10;proto=https;host=front.example")],
        peer="10.1.2.3",
        trusted=TRUST_10,
    )
    # Forwarded's extra parameters survive: it was the chosen source.
    assert (
        result.forwarded
        == b"for=198.51.100.10;proto=https;host=front.example, for=10.1.2.3;proto=http;host=app.example"
    )


def test_trusted_inconsistent_forwarded_falls_back_to_xff() -> None:
    result = prepare(
        [(b"x-forwarded-for", b"198.51.100.10"), (b"forwarded", b"for=203.0.113.20;proto=https;host=app.example")],
        peer="10.1.2.3",
        trusted=TRUST_10,
    )
    assert result.xff == b"198.51.100.10, 10.1.2.3"
    assert result.client_ip == "198.51.100.10"
    assert result.forwarded == b"for=198.51.100.10, for=10.1.2.3;proto=http;host=app.example"


def test_trusted_forwarded_proto_disagreeing_with_xfp_falls_back() -> None:
    result = prepare(
        [
            (b"x-forwarded-for", b"198.51.100.10"),
            (b"x-forwarded-proto", b"http"),
            (b"forwarded", b"for=198.51.100.10;proto=https"),
        ],
        peer="10.1.2.3",
        trusted=TRUST_10,
    )
    assert result.forwarded == b"for=198.51.100.10, for=10.1.2.3;proto=http;host=app.example"


@pytest.mark.parametrize(
    "forwarded",
    [b"for=unknown", b'for="1.2.3.4', b"for=1.2.3.4;for=5.6.7.8", b"proto=https", b"for=_hidden"],
)
def test_trusted_malformed_forwarded_falls_back_to_xff(forwarded: bytes) -> None:
    result = prepare(
        [(b"forwarded", forwarded), (b"x-forwarded-for", b"198.51.100.10")], peer="10.1.2.3", trusted=TRUST_10
    )
    assert result.xff == b"198.51.100.10, 10.1.2.3"
    assert result.client_ip == "198.51.100.10"
    # still regenerated, since the request had one
    assert result.forwarded == b"for=198.51.100.10, for=10.1.2.3;proto=http;host=app.example"


def test_trusted_malformed_forwarded_without_xff_is_peer_only() -> None:
    result = prepare([(b"forwarded", b"for=unknown, for=10.9.0.4")], peer="10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"10.1.2.3"
    assert result.forwarded == b"for=10.1.2.3;proto=http;host=app.example"


def test_trusted_proxy_said_https_makes_secure() -> None:
    result = prepare(
        [(b"x-forwarded-for", b"198.51.100.10"), (b"x-forwarded-proto", b"HTTPS")], peer="10.1.2.3", trusted=TRUST_10
    )
    assert result.secure is True
    # but X-Forwarded-Proto upstream describes our listener, as in rpxy
    assert only(result.headers, b"x-forwarded-proto") == b"http"
    untrusted = prepare([(b"x-forwarded-proto", b"https")], peer="198.51.100.1", trusted=TRUST_10)
    assert untrusted.secure is False


def test_ipv6_peer() -> None:
    result = prepare([], peer="2001:db8::1", add_forwarded=True)
    assert result.xff == b"2001:db8::1"
    assert only(result.headers, b"x-real-ip") == b"2001:db8::1"
    assert result.forwarded == b'for="[2001:db8::1]";proto=http;host=app.example'


def test_ipv4_mapped_peer_is_unwrapped_and_matches_v4_cidr() -> None:
    result = prepare([(b"x-forwarded-for", b"198.51.100.10")], peer="::ffff:10.1.2.3", trusted=TRUST_10)
    assert result.xff == b"198.51.100.10, 10.1.2.3"
    plain = prepare([], peer="::ffff:192.0.2.9")
    assert plain.xff == b"192.0.2.9"


# ------------------------------------------------------------------ request: hop-by-hop and the rest


def test_connection_nominating_our_headers_does_not_remove_them() -> None:
    result = prepare(
        [
            (b"host", b"app.example"),
            (b"connection", b"x-forwarded-for, X-Real-IP, forwarded, x-forwarded-host, upgrade-insecure-requests"),
            (b"x-forwarded-for", b"1.2.3.4"),
        ],
        add_forwarded=True,
        upgrade_insecure=True,
    )
    h = result.headers
    assert only(h, b"x-forwarded-for") == b"203.0.113.10"
    assert only(h, b"x-real-ip") == b"203.0.113.10"
    assert only(h, b"x-forwarded-host") == b"app.example"
    assert only(h, b"forwarded") == b"for=203.0.113.10;proto=http;host=app.example"
    assert only(h, b"upgrade-insecure-requests") == b"1"
    assert b"connection" not in names(h)


def test_connection_nominated_xff_from_trusted_peer_is_ignored() -> None:
    result = prepare(
        [(b"connection", b"x-forwarded-for"), (b"x-forwarded-for", b"198.51.100.10")], peer="10.1.2.3", trusted=TRUST_10
    )
    assert result.xff == b"10.1.2.3"


def test_hop_by_hop_removed_from_request() -> None:
    result = prepare(
        [
            (b"host", b"app.example"),
            (b"connection", b"keep-alive, X-Secret, close"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-connection", b"keep-alive"),
            (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
            (b"proxy-authenticate", b"Basic"),
            (b"transfer-encoding", b"chunked"),
            (b"trailer", b"x-checksum"),
            (b"upgrade", b"websocket"),
            (b"te", b"gzip"),
            (b"x-secret", b"s"),
            (b"accept", b"*/*"),
        ]
    )
    client_part = [item for item in result.headers if item[0] not in OURS]
    assert client_part == [(b"host", b"app.example"), (b"accept", b"*/*")]


def test_connection_cannot_remove_host_or_content_length() -> None:
    result = prepare([(b"host", b"app.example"), (b"connection", b"host, content-length"), (b"content-length", b"5")])
    assert only(result.headers, b"host") == b"app.example"
    assert only(result.headers, b"content-length") == b"5"


@pytest.mark.parametrize(
    ("te", "kept"),
    [
        ([b"trailers"], True),
        ([b"Trailers"], True),
        ([b"gzip, trailers"], True),
        ([b"gzip", b"trailers"], True),
        ([b"gzip"], False),
        ([], False),
    ],
)
def test_te_trailers_re_added(te: list[bytes], kept: bool) -> None:
    result = prepare([(b"connection", b"te")] + [(b"te", v) for v in te])
    assert header_values(result.headers, b"te") == ([b"trailers"] if kept else [])


def test_cookies_merged_in_place() -> None:
    result = prepare(
        [(b"host", b"h"), (b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2"), (b"cookie", b"c=3")]
    )
    assert result.headers[:3] == [(b"host", b"h"), (b"cookie", b"a=1; b=2; c=3"), (b"accept", b"*/*")]
    single = prepare([(b"host", b"h"), (b"cookie", b"a=1; b=2")])
    assert only(single.headers, b"cookie") == b"a=1; b=2"


def test_httpoxy_proxy_header_dropped() -> None:
    result = prepare([(b"host", b"h"), (b"proxy", b"http://evil.example:3128")])
    assert b"proxy" not in names(result.headers)


def test_host_handling() -> None:
    kept = prepare([(b"accept", b"*/*"), (b"host", b"App.Example:8080")])
    assert kept.headers[:2] == [(b"accept", b"*/*"), (b"host", b"App.Example:8080")]
    replaced = prepare([(b"accept", b"*/*"), (b"host", b"app.example")], upstream_host=b"backend.internal:8080")
    assert replaced.headers[:2] == [(b"accept", b"*/*"), (b"host", b"backend.internal:8080")]
    assert only(replaced.headers, b"x-forwarded-host") == b"app.example"
    # HTTP/2 without Host: added from the authority, first
    h2 = prepare([(b"accept", b"*/*")], original_host=b"app.example:8443")
    assert h2.headers[0] == (b"host", b"app.example:8443")
    assert only(h2.headers, b"host") == b"app.example:8443"
    h2_set = prepare([(b"accept", b"*/*")], upstream_host=b"backend")
    assert only(h2_set.headers, b"host") == b"backend"


def test_upgrade_insecure_requests() -> None:
    assert only(prepare([], upgrade_insecure=True).headers, b"upgrade-insecure-requests") == b"1"
    kept = prepare([(b"upgrade-insecure-requests", b"0")], upgrade_insecure=True)
    assert only(kept.headers, b"upgrade-insecure-requests") == b"0"
    assert header_values(prepare([]).headers, b"upgrade-insecure-requests") == []
    passthrough = prepare([(b"upgrade-insecure-requests", b"1")])
    assert only(passthrough.headers, b"upgrade-insecure-requests") == b"1"


def test_websocket_upgrade_re_added_after_strip() -> None:
    result = prepare(
        [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-key", b"k")],
        upgrade=b"websocket",
    )
    h = result.headers
    assert only(h, b"connection") == b"upgrade"
    assert only(h, b"upgrade") == b"websocket"
    assert only(h, b"sec-websocket-key") == b"k"


@pytest.mark.parametrize("value", [b"h2c", b"H2C", b"websocket, h2c", b""])
def test_h2c_upgrade_never_forwarded(value: bytes) -> None:
    result = prepare(
        [(b"connection", b"upgrade, http2-settings"), (b"upgrade", b"h2c"), (b"http2-settings", b"AAA")], upgrade=value
    )
    h = result.headers
    assert b"upgrade" not in names(h)
    assert b"connection" not in names(h)
    assert b"http2-settings" not in names(h)


def test_output_order_client_first_then_ours() -> None:
    result = prepare(
        [(b"host", b"app.example"), (b"accept", b"*/*"), (b"te", b"trailers"), (b"user-agent", b"ua")],
        add_forwarded=True,
        upgrade_insecure=True,
    )
    assert names(result.headers) == [
        b"host",
        b"accept",
        b"user-agent",
        b"te",
        *OURS,
        b"forwarded",
        b"upgrade-insecure-requests",
    ]


def test_input_not_mutated() -> None:
    headers = [(b"host", b"h"), (b"cookie", b"a"), (b"cookie", b"b"), (b"connection", b"x"), (b"x", b"1")]
    copy = list(headers)
    prepare(headers)
    assert headers == copy


# ------------------------------------------------------------------ response


def test_response_strips_hop_by_hop_and_sets_server() -> None:
    upstream = [
        (b"content-type", b"text/plain"),
        (b"server", b"nginx/1.25"),
        (b"connection", b"keep-alive, X-Internal"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"trailer", b"x-sum"),
        (b"upgrade", b"h2c"),
        (b"proxy-authenticate", b"Basic"),
        (b"x-internal", b"secret"),
        (b"content-length", b"12"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    out = prepare_response_headers(upstream, alt_svc=None, upgrade=False)
    assert out == [
        (b"content-type", b"text/plain"),
        (b"content-length", b"12"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"server", b"rpxy"),
    ]


def test_response_server_inserted_when_missing() -> None:
    assert prepare_response_headers([], alt_svc=None, upgrade=False) == [(b"server", b"rpxy")]
    out = prepare_response_headers([(b"server", b"a"), (b"server", b"b")], alt_svc=None, upgrade=False)
    assert out == [(b"server", b"rpxy")]


def test_response_alt_svc_replaced_or_stripped() -> None:
    upstream = [(b"alt-svc", b'h3=":9999"; ma=60'), (b"alt-svc", b'h2=":443"'), (b"x", b"1")]
    ours = b'h3=":443"; ma=3600'
    assert prepare_response_headers(upstream, alt_svc=ours, upgrade=False) == [
        (b"x", b"1"),
        (b"server", b"rpxy"),
        (b"alt-svc", ours),
    ]
    assert prepare_response_headers(upstream, alt_svc=None, upgrade=False) == [(b"x", b"1"), (b"server", b"rpxy")]


def test_response_101_keeps_connection_and_upgrade() -> None:
    upstream = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"abc"),
        (b"keep-alive", b"5"),
        (b"transfer-encoding", b"chunked"),
    ]
    out = prepare_response_headers(upstream, alt_svc=None, upgrade=True)
    assert out == [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"abc"),
        (b"server", b"rpxy"),
    ]
    # a non-101 strips them
    assert prepare_response_headers(upstream, alt_svc=None, upgrade=False) == [
        (b"sec-websocket-accept", b"abc"),
        (b"server", b"rpxy"),
    ]


def test_response_101_still_strips_other_nominated() -> None:
    upstream = [(b"connection", b"upgrade, x-hop"), (b"upgrade", b"websocket"), (b"x-hop", b"1")]
    out = prepare_response_headers(upstream, alt_svc=None, upgrade=True)
    assert out == [(b"connection", b"upgrade, x-hop"), (b"upgrade", b"websocket"), (b"server", b"rpxy")]


def test_response_connection_cannot_remove_content_length() -> None:
    out = prepare_response_headers(
        [(b"connection", b"content-length"), (b"content-length", b"3")], alt_svc=None, upgrade=False
    )
    assert out == [(b"content-length", b"3"), (b"server", b"rpxy")]
