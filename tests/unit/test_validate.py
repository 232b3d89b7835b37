"""check_request_head: token names, injection-proof values, unambiguous framing."""

from __future__ import annotations

import pytest

from rpxy.message import Headers, HttpError, RequestHead
from rpxy.policy.validate import MAX_HEADER_COUNT, check_request_head


def head(headers: Headers, version: bytes = b"1.1") -> RequestHead:
    return RequestHead(method=b"POST", path=b"/", version=version, headers=[(b"host", b"example.com"), *headers])


@pytest.mark.parametrize(
    ("headers", "version", "expected"),
    [
        ([], b"1.1", None),
        ([(b"content-length", b"0")], b"1.1", 0),
        ([(b"content-length", b"42")], b"1.1", 42),
        ([(b"content-length", b"0042")], b"1.1", 42),
        ([(b"content-length", b"9999999999999999999")], b"1.1", 9999999999999999999),
        ([(b"transfer-encoding", b"chunked")], b"1.1", None),
        ([(b"transfer-encoding", b"Chunked")], b"1.1", None),
        ([(b"transfer-encoding", b"CHUNKED")], b"1.1", None),
        ([(b"content-length", b"5")], b"1.0", 5),
        ([(b"x-empty", b"")], b"1.1", None),
        ([(b"x-inner-space", b"a b\tc")], b"1.1", None),
        ([(b"x-obs-text", b"caf\xc3\xa9")], b"1.1", None),
        ([(b"!#$%&'*+-.^_`|~09az", b"v")], b"1.1", None),  # every tchar class
        ([(b"content-length", b"7"), (b"te", b"trailers")], b"2", 7),
        ([(b"te", b"Trailers")], b"3", None),
        ([(b"content-length", b"3")], b"3", 3),
    ],
)
def test_accepts(headers: Headers, version: bytes, expected: int | None) -> None:
    assert check_request_head(head(headers, version), http1=version.startswith(b"1")) == expected


BAD_HTTP1 = [
    # framing: request smuggling vectors (RFC 9112 6.1, 6.3)
    ("CL+TE", [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], b"1.1"),
    ("TE+CL", [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")], b"1.1"),
    ("two CL equal", [(b"content-length", b"5"), (b"content-length", b"5")], b"1.1"),
    ("two CL differ", [(b"content-length", b"5"), (b"content-length", b"6")], b"1.1"),
    ("CL list", [(b"content-length", b"5, 5")], b"1.1"),
    ("CL list no space", [(b"content-length", b"5,5")], b"1.1"),
    ("CL empty", [(b"content-length", b"")], b"1.1"),
    ("CL sign", [(b"content-length", b"+5")], b"1.1"),
    ("CL negative", [(b"content-length", b"-1")], b"1.1"),
    ("CL hex", [(b"content-length", b"0x10")], b"1.1"),
    ("CL underscore", [(b"content-length", b"1_0")], b"1.1"),
    ("CL space inside", [(b"content-length", b"1 0")], b"1.1"),
    ("CL unicode digit", [(b"content-length", "٣".encode())], b"1.1"),
    ("CL too long", [(b"content-length", b"1" * 20)], b"1.1"),
    ("TE gzip", [(b"transfer-encoding", b"gzip")], b"1.1"),
    ("TE gzip chunked", [(b"transfer-encoding", b"gzip, chunked")], b"1.1"),
    ("TE chunked chunked", [(b"transfer-encoding", b"chunked, chunked")], b"1.1"),
    ("TE two lines", [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], b"1.1"),
    ("TE identity", [(b"transfer-encoding", b"identity")], b"1.1"),
    ("TE xchunked", [(b"transfer-encoding", b"xchunked")], b"1.1"),
    ("TE chunked;x", [(b"transfer-encoding", b"chunked;ext=1")], b"1.1"),
    ("TE empty", [(b"transfer-encoding", b"")], b"1.1"),
    ("TE on 1.0", [(b"transfer-encoding", b"chunked")], b"1.0"),
    ("TE trailing space", [(b"transfer-encoding", b"chunked ")], b"1.1"),
    # names
    ("space in name", [(b"x bad", b"v")], b"1.1"),
    ("colon in name", [(b"x:bad", b"v")], b"1.1"),
    ("empty name", [(b"", b"v")], b"1.1"),
    ("slash in name", [(b"x/y", b"v")], b"1.1"),
    ("NUL in name", [(b"x\x00y", b"v")], b"1.1"),
    ("LF in name", [(b"x\ny", b"v")], b"1.1"),
    ("CR in name", [(b"x\ry", b"v")], b"1.1"),
    ("non-ascii name", [("naïve".encode(), b"v")], b"1.1"),
    ("quote in name", [(b'x"y', b"v")], b"1.1"),
    ("paren in name", [(b"x(y)", b"v")], b"1.1"),
    ("pseudo header", [(b":path", b"/")], b"1.1"),
    # values
    ("NUL in value", [(b"x-a", b"a\x00b")], b"1.1"),
    ("CR in value", [(b"x-a", b"a\rb")], b"1.1"),
    ("LF in value", [(b"x-a", b"a\nb")], b"1.1"),
    ("CRLF injection", [(b"x-a", b"a\r\nx-injected: 1")], b"1.1"),
    ("lone LF value", [(b"x-a", b"\n")], b"1.1"),
    ("leading space", [(b"x-a", b" a")], b"1.1"),
    ("trailing space", [(b"x-a", b"a ")], b"1.1"),
    ("leading tab", [(b"x-a", b"\ta")], b"1.1"),
    ("trailing tab", [(b"x-a", b"a\t")], b"1.1"),
    ("only space", [(b"x-a", b" ")], b"1.1"),
    ("ws in a middle field", [(b"x-a", b"a"), (b"x-b", b" b"), (b"x-c", b"c")], b"1.1"),
]


@pytest.mark.parametrize(("headers", "version"), [case[1:] for case in BAD_HTTP1], ids=[case[0] for case in BAD_HTTP1])
def test_rejects_http1(headers: Headers, version: bytes) -> None:
    with pytest.raises(HttpError) as info:
        check_request_head(head(headers, version), http1=True)
    assert info.value.status == 400
    assert info.value.reason


BAD_H2 = [
    ("connection", [(b"connection", b"keep-alive")]),
    ("keep-alive", [(b"keep-alive", b"5")]),
    ("proxy-connection", [(b"proxy-connection", b"keep-alive")]),
    ("transfer-encoding", [(b"transfer-encoding", b"chunked")]),
    ("upgrade", [(b"upgrade", b"websocket")]),
    ("te gzip", [(b"te", b"gzip")]),
    ("te list", [(b"te", b"trailers, gzip")]),
    ("two CL", [(b"content-length", b"1"), (b"content-length", b"1")]),
    ("bad CL", [(b"content-length", b"abc")]),
    ("CR in value", [(b"x-a", b"a\rb")]),
    ("uppercase-invalid name", [(b"x a", b"v")]),
    ("leading space", [(b"x-a", b" v")]),
]


@pytest.mark.parametrize("version", [b"2", b"3"])
@pytest.mark.parametrize("headers", [case[1] for case in BAD_H2], ids=[case[0] for case in BAD_H2])
def test_rejects_h2_h3(headers: Headers, version: bytes) -> None:
    with pytest.raises(HttpError) as info:
        check_request_head(head(headers, version), http1=False)
    assert info.value.status == 400


def test_header_count_limit() -> None:
    at_limit = [(b"x-h%d" % i, b"v") for i in range(MAX_HEADER_COUNT - 1)]  # + host
    assert check_request_head(head(at_limit), http1=True) is None
    with pytest.raises(HttpError) as info:
        check_request_head(head([*at_limit, (b"x-one-more", b"v")]), http1=True)
    assert info.value.status == 431


def test_no_headers_at_all() -> None:
    empty = RequestHead(method=b"GET", path=b"/", version=b"1.1", headers=[])
    assert check_request_head(empty, http1=True) is None
