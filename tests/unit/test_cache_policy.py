"""RFC 9111 decisions of rpxy.cache.policy, as tables of cases (no I/O, no clock)."""

from __future__ import annotations

import pytest

from rpxy.cache import policy
from rpxy.cache.policy import format_http_date

NOW = 1_800_000_000.0
DATE = format_http_date(NOW).decode()


def h(**fields: str) -> list[tuple[bytes, bytes]]:
    """Headers from keyword arguments: cache_control="..." -> (b"cache-control", b"...")."""
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in fields.items()]


def ago(seconds: float) -> str:
    return format_http_date(NOW - seconds).decode()


def later(seconds: float) -> str:
    return format_http_date(NOW + seconds).decode()


# -- storable (RFC 9111 section 3) ---------------------------------------------------------

STORABLE = [
    # (case, method, status, request fields, response fields, stored?, reason)
    ("max-age", b"GET", 200, h(), h(cache_control="max-age=60"), True, ""),
    ("s-maxage", b"GET", 200, h(), h(cache_control="s-maxage=60"), True, ""),
    ("expires", b"GET", 200, h(), h(expires=later(60), date=DATE), True, ""),
    ("public without freshness", b"GET", 200, h(), h(cache_control="public", etag='"a"'), True, ""),
    ("HEAD never stored", b"HEAD", 200, h(), h(cache_control="max-age=60"), False, "method"),
    ("POST never stored", b"POST", 200, h(), h(cache_control="max-age=60"), False, "method"),
    ("206 not understood", b"GET", 206, h(), h(cache_control="max-age=60"), False, "status"),
    ("500 not stored", b"GET", 500, h(), h(cache_control="max-age=60"), False, "status"),
    ("304 not stored", b"GET", 304, h(), h(cache_control="max-age=60"), False, "status"),
    ("302 with explicit freshness", b"GET", 302, h(), h(cache_control="max-age=60"), True, ""),
    ("302 without explicit freshness", b"GET", 302, h(), h(last_modified=ago(3600)), False, "no explicit freshness"),
    ("404 heuristic", b"GET", 404, h(), h(last_modified=ago(3600), date=DATE), True, ""),
    ("no-store", b"GET", 200, h(), h(cache_control="no-store, max-age=60"), False, "no-store"),
    ("NO-STORE case-insensitive", b"GET", 200, h(), h(cache_control="NO-STORE"), False, "no-store"),
    ("request no-store", b"GET", 200, h(cache_control="no-store"), h(cache_control="max-age=60"), False, "request no-store"),
    ("private", b"GET", 200, h(), h(cache_control="private, max-age=60"), False, "private"),
    ("qualified private", b"GET", 200, h(), h(cache_control='private="set-cookie", max-age=60'), False, "private"),
    ("authorization", b"GET", 200, h(authorization="Bearer x"), h(cache_control="max-age=60"), False, "authorization"),
    ("authorization + public", b"GET", 200, h(authorization="x"), h(cache_control="public, max-age=60"), True, ""),
    ("authorization + s-maxage", b"GET", 200, h(authorization="x"), h(cache_control="s-maxage=60"), True, ""),
    ("authorization + must-revalidate", b"GET", 200, h(authorization="x"), h(cache_control="must-revalidate, max-age=60"), True, ""),
    ("set-cookie", b"GET", 200, h(), h(cache_control="max-age=60", set_cookie="a=b"), False, "set-cookie"),
    ("set-cookie + public", b"GET", 200, h(), h(cache_control="public, max-age=60", set_cookie="a=b"), True, ""),
    ("vary star", b"GET", 200, h(), h(cache_control="max-age=60", vary="accept, *"), False, "vary *"),
    ("malformed quote", b"GET", 200, h(), h(cache_control='max-age=60, "x'), False, "malformed cache-control"),
    ("non-ascii", b"GET", 200, h(), [(b"cache-control", "max-age=6\u00e9".encode("latin-1"))], False, "malformed cache-control"),
    ("no-cache with validator", b"GET", 200, h(), h(cache_control="no-cache", etag='"a"'), True, ""),
    ("no-cache without validator", b"GET", 200, h(), h(cache_control="no-cache"), False, "never reusable"),
    ("nothing at all", b"GET", 200, h(), h(), False, "never reusable"),
    ("max-age=0 with etag", b"GET", 200, h(), h(cache_control="max-age=0", etag='"a"'), True, ""),
    ("invalid max-age without validator", b"GET", 200, h(), h(cache_control="max-age=abc"), False, "never reusable"),
    ("Age beyond max-age", b"GET", 200, h(), h(cache_control="max-age=60", age="100"), False, "never reusable"),
    ("Age beyond max-age, with etag", b"GET", 200, h(), h(cache_control="max-age=60", age="100", etag='"a"'), True, ""),
    ("already expired by Date", b"GET", 200, h(), h(expires=ago(10), date=ago(100)), False, "never reusable"),
]


def test_client_certificate_counts_as_authorization():
    assert policy.storable(b"GET", 200, [], h(cache_control="max-age=60"), NOW, client_certificate=True) == (
        False,
        "authorization",
    )
    assert policy.storable(b"GET", 200, [], h(cache_control="public, max-age=60"), NOW, client_certificate=True) == (True, "")


@pytest.mark.parametrize(
    ("method", "status", "req", "response", "stored", "reason"),
    [case[1:] for case in STORABLE],
    ids=[case[0] for case in STORABLE],
)
def test_storable(method, status, req, response, stored, reason):
    assert policy.storable(method, status, req, response, NOW) == (stored, reason)


# -- freshness lifetime (section 4.2.1) and heuristics (4.2.2) -------------------------------

LIFETIME = [
    ("s-maxage wins over max-age", 200, h(cache_control="max-age=10, s-maxage=99"), 99),
    ("max-age wins over Expires", 200, h(cache_control="max-age=10", expires=later(500), date=DATE), 10),
    ("quoted max-age", 200, h(cache_control='max-age="30"'), 30),
    ("Expires - Date", 200, h(expires=later(500), date=DATE), 500),
    ("Expires without Date uses the response time", 200, h(expires=later(100)), 100),
    ("Expires in the past", 200, h(expires=ago(100), date=DATE), 0),
    ("invalid Expires = expired", 200, h(expires="0", date=DATE), 0),
    ("two Expires = stale", 200, [(b"expires", later(100).encode()), (b"expires", later(200).encode())], 0),
    ("repeated max-age = stale", 200, h(cache_control="max-age=10, max-age=20"), 0),
    ("invalid max-age = stale", 200, h(cache_control="max-age=-1"), 0),
    ("no-cache = always revalidate", 200, h(cache_control="no-cache, max-age=60"), 0),
    ("heuristic 10% of Last-Modified age", 200, h(last_modified=ago(1000), date=DATE), 100),
    ("heuristic capped at one day", 200, h(last_modified=ago(10 * 86400 * 10), date=DATE), 86400),
    ("no heuristic for 302", 302, h(last_modified=ago(1000), date=DATE), 0),
    ("public allows heuristic for 302", 302, h(cache_control="public", last_modified=ago(1000), date=DATE), 100),
    ("no Last-Modified, no heuristic", 200, h(date=DATE), 0),
    ("huge max-age capped", 200, h(cache_control="max-age=99999999999999"), 2**31),
]


@pytest.mark.parametrize(("status", "headers", "seconds"), [c[1:] for c in LIFETIME], ids=[c[0] for c in LIFETIME])
def test_freshness_lifetime(status, headers, seconds):
    assert policy.freshness_lifetime(status, headers, NOW) == pytest.approx(seconds)


# -- age (section 4.2.3) --------------------------------------------------------------------

AGE = [
    ("Age header plus delay", h(age="30", date=DATE), NOW - 2, NOW, 32),
    ("apparent age from Date", h(date=ago(50)), NOW - 1, NOW, 50),
    ("clock skew: Date in the future", h(date=later(50)), NOW - 1, NOW, 1),
    ("invalid Age ignored", h(age="abc", date=DATE), NOW, NOW, 0),
    ("no Date, no Age", h(), NOW, NOW, 0),
]


@pytest.mark.parametrize(("headers", "request_time", "response_time", "age"), [c[1:] for c in AGE], ids=[c[0] for c in AGE])
def test_initial_age(headers, request_time, response_time, age):
    assert policy.initial_age(headers, request_time, response_time) == pytest.approx(age)


# -- reuse (section 4 and 5.2.1) ---------------------------------------------------------------

REUSE = [
    ("fresh", h(), 10, 60, (True, "")),
    ("stale", h(), 61, 60, (False, "stale")),
    ("exactly expired", h(), 60, 60, (False, "stale")),
    ("request no-cache", h(cache_control="no-cache"), 0, 60, (False, "request")),
    ("request max-age=0", h(cache_control="max-age=0"), 0, 60, (False, "request")),
    ("request max-age older", h(cache_control="max-age=5"), 10, 60, (False, "stale")),
    ("request max-age younger", h(cache_control="max-age=50"), 10, 60, (True, "")),
    ("min-fresh", h(cache_control="min-fresh=55"), 10, 60, (False, "stale")),
    ("max-stale not honoured", h(cache_control="max-stale=100"), 61, 60, (False, "stale")),
    ("pragma no-cache (HTTP/1.0)", h(pragma="no-cache"), 0, 60, (False, "request")),
    ("pragma ignored with Cache-Control", h(pragma="no-cache", cache_control="max-age=100"), 0, 60, (True, "")),
]


@pytest.mark.parametrize(("req", "age", "lifetime", "expected"), [c[1:] for c in REUSE], ids=[c[0] for c in REUSE])
def test_request_allows_reuse(req, age, lifetime, expected):
    assert policy.request_allows_reuse(req, age, lifetime) == expected


# -- Vary (section 4.1) -------------------------------------------------------------------------


def test_vary_names_normalised_and_star():
    assert policy.vary_names(h(vary="Accept-Encoding, accept-language")) == (b"accept-encoding", b"accept-language")
    assert policy.vary_names([(b"vary", b"b"), (b"vary", b"a")]) == (b"a", b"b")
    assert policy.vary_names(h(vary="*")) is None
    assert policy.vary_names(h()) == ()


def test_vary_key_distinguishes_absent_and_normalises_whitespace():
    names = (b"accept-language",)
    assert policy.vary_key(names, h(accept_language="en")) == policy.vary_key(names, h(accept_language=" en "))
    assert policy.vary_key(names, h(accept_language="en  ,fr")) == policy.vary_key(names, h(accept_language="en ,fr"))
    assert policy.vary_key(names, h()) != policy.vary_key(names, h(accept_language=""))
    assert policy.vary_key(names, h(accept_language="en")) != policy.vary_key(names, h(accept_language="fr"))
    assert policy.vary_key((), h(accept_language="en")) == ()


# -- validation (section 4.3) ---------------------------------------------------------------------


def test_conditional_headers_from_validators():
    stored = h(etag='"v1"', last_modified=ago(10))
    assert policy.conditional_headers(stored) == [(b"if-none-match", b'"v1"'), (b"if-modified-since", ago(10).encode())]
    assert policy.conditional_headers(h(cache_control="max-age=1")) == []


def test_merge_304_replaces_fields_but_keeps_framing():
    stored = h(content_length="5", etag='"v1"', cache_control="max-age=1", x_kept="yes") + [(b"x-multi", b"1"), (b"x-multi", b"2")]
    new = h(content_length="0", etag='"v1"', cache_control="max-age=60") + [(b"x-multi", b"3")]
    merged = policy.merge_not_modified(stored, new)
    assert (b"content-length", b"5") in merged and (b"content-length", b"0") not in merged
    assert (b"cache-control", b"max-age=60") in merged and (b"cache-control", b"max-age=1") not in merged
    assert [v for k, v in merged if k == b"x-multi"] == [b"3"]
    assert (b"x-kept", b"yes") in merged


CLIENT_304 = [
    ("matching etag", h(if_none_match='"v1"'), True),
    ("weak comparison", h(if_none_match='W/"v1"'), True),
    ("one of a list", h(if_none_match='"x", "v1"'), True),
    ("star", h(if_none_match="*"), True),
    ("other etag", h(if_none_match='"v2"'), False),
    ("If-None-Match wins over If-Modified-Since", h(if_none_match='"v2"', if_modified_since=later(10)), False),
    ("not modified since", h(if_modified_since=ago(5)), True),
    ("modified since", h(if_modified_since=ago(100)), False),
    ("bad date", h(if_modified_since="yesterday"), False),
    ("unconditional", h(), False),
]


@pytest.mark.parametrize(("req", "expected"), [c[1:] for c in CLIENT_304], ids=[c[0] for c in CLIENT_304])
def test_client_not_modified(req, expected):
    stored = h(etag='"v1"', last_modified=ago(10))
    assert policy.client_not_modified(req, stored) is expected


# -- parsing robustness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"", b",,,", b"=", b"max-age", b"max-age=", b'max-age="', b"\xff\xfe", b"a=b=c", b"no-cache=\"a, b\", max-age=5", b"x" * 10000],
)
def test_parse_cache_control_never_raises(value):
    directives = policy.parse_cache_control([value])
    assert isinstance(directives.values, dict)
    # and every entry point copes
    policy.storable(b"GET", 200, [], [(b"cache-control", value)], NOW)
    policy.freshness_lifetime(200, [(b"cache-control", value)], NOW)
    policy.request_allows_reuse([(b"cache-control", value)], 0, 60)


def test_quoted_comma_is_one_directive():
    directives = policy.parse_cache_control([b'no-cache="set-cookie, x", max-age=5'])
    assert directives.values == {"no-cache": "set-cookie, x", "max-age": "5"}


def test_http_dates_in_all_three_formats():
    imf = policy.parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT")
    assert imf == 784111777
    assert policy.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == imf
    assert policy.parse_http_date(b"Sun Nov  6 08:49:37 1994") == imf
    assert policy.parse_http_date(b"garbage") is None
    assert policy.parse_http_date(b"\xff") is None


def test_unsafe_methods_invalidate():
    assert [m for m in (b"GET", b"HEAD", b"OPTIONS", b"POST", b"PUT", b"DELETE", b"PATCH") if policy.invalidates(m)] == [
        b"POST",
        b"PUT",
        b"DELETE",
        b"PATCH",
    ]


def test_random_header_values_never_raise():
    """Nothing an upstream or a client sends may raise: random bytes through every entry point."""
    import random

    rng = random.Random(9111)
    alphabet = b'max-age=s-maxage,no-cache"private public;=*\\ \t0123456789\xff\x00GMT, Sun Nov'
    names = [b"cache-control", b"expires", b"date", b"age", b"vary", b"etag", b"last-modified", b"pragma",
             b"if-none-match", b"if-modified-since", b"authorization", b"set-cookie"]  # fmt: skip
    for _ in range(3000):
        fields = [
            (rng.choice(names), bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))))
            for _ in range(rng.randrange(0, 6))
        ]
        status = rng.choice([200, 203, 204, 206, 301, 302, 304, 404, 500, 501])
        policy.storable(b"GET", status, fields, fields, NOW)
        lifetime = policy.freshness_lifetime(status, fields, NOW)
        age = policy.initial_age(fields, NOW - 1, NOW)
        assert lifetime >= 0 and age >= 0
        policy.request_allows_reuse(fields, age, lifetime)
        names_ = policy.vary_names(fields)
        if names_ is not None:
            policy.vary_key(names_, fields)
        policy.conditional_headers(fields)
        policy.merge_not_modified(fields, fields)
        policy.client_not_modified(fields, fields)
        policy.only_if_cached(fields)
