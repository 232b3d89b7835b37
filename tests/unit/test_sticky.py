import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rpxy.upstream.sticky import (
    STICKY_COOKIE_NAME,
    STICKY_LIFETIME,
    StickyCodec,
    find_sticky_cookie,
    iter_sticky_cookies,
    server_id_for,
    set_cookie_header,
    strip_sticky_cookie,
)

SECRET = bytes(range(32))
NONCE = bytes(range(100, 112))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@pytest.fixture
def codec():
    return StickyCodec(SECRET, token_random=lambda n: NONCE[:n])


def test_constants():
    assert STICKY_COOKIE_NAME == "rpxy_sticky_token"
    assert STICKY_LIFETIME == 300


def test_server_id_known_value():
    expected = b64url(hashlib.sha256(b"http://127.0.0.1:8080&index=0").digest())
    assert server_id_for("http://127.0.0.1:8080", 0) == expected
    assert "=" not in expected and len(expected) == 43
    assert server_id_for("http://127.0.0.1:8080", 1) != expected
    assert server_id_for("https://127.0.0.1:8080", 0) != expected


def test_round_trip(codec):
    sid = server_id_for("http://a:1", 0)
    value = codec.encode(sid, 1_000_300, domain="example.com", path="/")
    assert "=" not in value and "+" not in value and "/" not in value
    assert codec.decode(value, domain="example.com", path="/", now=1_000_000) == sid
    token = codec.open(value, domain="example.com", path="/", now=1_000_000)
    assert token.server_id == sid and token.expiry == 1_000_300


def test_wire_format_independent_decrypt(codec):
    sid = server_id_for("http://a:1", 2)
    value = codec.encode(sid, 1234567890, domain="example.com", path="/api")
    raw = b64url_decode(value)
    assert raw[0] == 0x01
    assert raw[1:13] == NONCE
    aad = b"rpxy-sticky-v1\0rpxy_sticky_token\0example.com\0/api\0"
    plain = AESGCM(SECRET).decrypt(raw[1:13], raw[13:], aad)
    assert plain == (1234567890).to_bytes(8, "big") + sid.encode()


def test_independent_encrypt_is_accepted(codec):
    aad = b"rpxy-sticky-v1\0rpxy_sticky_token\0example.com\0/\0"
    nonce = b"\x07" * 12
    sealed = AESGCM(SECRET).encrypt(nonce, (500).to_bytes(8, "big") + b"abc", aad)
    value = b64url(b"\x01" + nonce + sealed)
    assert codec.decode(value, domain="example.com", path="/", now=499) == "abc"


def test_tamper_every_byte(codec):
    value = codec.encode("sid", 10_000, domain="d", path="/")
    raw = bytearray(b64url_decode(value))
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        assert codec.decode(b64url(bytes(bad)), domain="d", path="/", now=0) is None


def test_wrong_aad(codec):
    value = codec.encode("sid", 10_000, domain="example.com", path="/app")
    assert codec.decode(value, domain="example.com", path="/app", now=0) == "sid"
    assert codec.decode(value, domain="other.com", path="/app", now=0) is None
    assert codec.decode(value, domain="example.com", path="/", now=0) is None


def test_wrong_secret(codec):
    value = codec.encode("sid", 10_000, domain="d", path="/")
    assert StickyCodec(b"\xff" * 32).decode(value, domain="d", path="/", now=0) is None


def test_expiry(codec):
    value = codec.encode("sid", 1000, domain="d", path="/")
    assert codec.decode(value, domain="d", path="/", now=999.9) == "sid"
    assert codec.decode(value, domain="d", path="/", now=1000) is None
    assert codec.decode(value, domain="d", path="/", now=5000) is None


def test_wrong_version(codec):
    raw = bytearray(b64url_decode(codec.encode("sid", 10_000, domain="d", path="/")))
    raw[0] = 0x02
    assert codec.decode(b64url(bytes(raw)), domain="d", path="/", now=0) is None


@pytest.mark.parametrize(
    "value",
    ["", "x", "abc=", "!!!!", "a" * 5, "a" * 2000, "é", b64url(b"\x01" + b"\0" * 20), "AQ==", "AQ", " " * 40],
)
def test_malformed_never_raises(codec, value):
    assert codec.decode(value, domain="d", path="/", now=0) is None


def test_padded_value_rejected(codec):
    value = codec.encode("sid", 10_000, domain="d", path="/")
    padded = value + "=" * (-len(value) % 4)
    if padded != value:
        assert codec.decode(padded, domain="d", path="/", now=0) is None


def test_bad_secret_length():
    with pytest.raises(ValueError):
        StickyCodec(b"short")


def test_nonce_is_random_by_default():
    c = StickyCodec(SECRET)
    assert c.encode("s", 10, domain="d", path="/") != c.encode("s", 10, domain="d", path="/")


def test_set_cookie_header_exact():
    assert set_cookie_header("VAL", expiry=784111777, domain="example.com", path="/", secure=False) == (
        b"rpxy_sticky_token=VAL; expires=Sun, 06 Nov 1994 08:49:37 GMT; Max-Age=300; "
        b"path=/; domain=example.com; HttpOnly; SameSite=Lax"
    )
    assert set_cookie_header("VAL", expiry=300, domain="a.b", path="/api", secure=True) == (
        b"rpxy_sticky_token=VAL; expires=Thu, 01 Jan 1970 00:05:00 GMT; Max-Age=300; "
        b"path=/api; domain=a.b; HttpOnly; SameSite=Lax; Secure"
    )


def test_find_cookie():
    assert find_sticky_cookie([]) is None
    assert find_sticky_cookie([b"a=1; b=2"]) is None
    assert find_sticky_cookie([b"a=1;  rpxy_sticky_token=TOK ;b=2"]) == "TOK"
    assert find_sticky_cookie([b"a=1", b"rpxy_sticky_token=TOK2"]) == "TOK2"
    assert find_sticky_cookie([b"xrpxy_sticky_token=no; rpxy_sticky_token_x=no"]) is None
    assert find_sticky_cookie([b'rpxy_sticky_token="Q"']) == "Q"
    assert find_sticky_cookie([b"rpxy_sticky_token=A; rpxy_sticky_token=B"]) == "A"
    assert list(iter_sticky_cookies([b"rpxy_sticky_token=A", b"c=d;rpxy_sticky_token=B"])) == ["A", "B"]
    assert find_sticky_cookie([b"rpxy_sticky_token=\xff\xfe; rpxy_sticky_token=ok"]) == "ok"


def test_strip_cookie():
    headers = [
        (b"host", b"example.com"),
        (b"cookie", b"a=1; rpxy_sticky_token=TOK;  b=2"),
        (b"x-other", b"rpxy_sticky_token=keep"),
        (b"cookie", b"rpxy_sticky_token=TOK"),
        (b"cookie", b"c=3"),
        (b"cookie", b"xrpxy_sticky_token=keep;rpxy_sticky_token=gone"),
    ]
    original = list(headers)
    out = strip_sticky_cookie(headers)
    assert out == [
        (b"host", b"example.com"),
        (b"cookie", b"a=1; b=2"),
        (b"x-other", b"rpxy_sticky_token=keep"),
        (b"cookie", b"c=3"),
        (b"cookie", b"xrpxy_sticky_token=keep"),
    ]
    assert headers == original


def test_strip_nothing_returns_same_list():
    headers = [(b"cookie", b"a=1"), (b"x", b"rpxy_sticky_token=1")]
    assert strip_sticky_cookie(headers) is headers
