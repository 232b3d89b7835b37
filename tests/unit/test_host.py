"""request_host: the routing host and the original host[:port]."""

from __future__ import annotations

import pytest

from rpxy.message import Headers, HttpError, RequestHead
from rpxy.policy.host import normalize_host, request_host


def head(
    host: list[bytes] | bytes | None = None, authority: bytes | None = None, version: bytes = b"1.1"
) -> RequestHead:
    headers: Headers = [(b"user-agent", b"t")]
    if isinstance(host, bytes):
        headers.insert(0, (b"host", host))
    elif host is not None:
        headers.extend((b"host", h) for h in host)
    return RequestHead(method=b"GET", path=b"/", version=version, headers=headers, authority=authority)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"example.com", "example.com"),
        (b"Example.COM", "example.com"),
        (b"example.com:8080", "example.com"),
        (b"EXAMPLE.com:443", "example.com"),
        (b"example.com.", "example.com"),
        (b"example.com.:8443", "example.com"),
        (b"localhost", "localhost"),
        (b"a-b.c_d.example", "a-b.c_d.example"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"192.0.2.1", "192.0.2.1"),
        (b"192.0.2.1:80", "192.0.2.1"),
        (b"[::1]", "::1"),
        (b"[::1]:80", "::1"),
        (b"[2001:DB8::1]:8443", "2001:db8::1"),
        (b"[2001:0db8:0000::0001]", "2001:db8::1"),
        (b"[0:0::1]:80", "::1"),
        (b"example.com:0", "example.com"),
        (b"example.com:65535", "example.com"),
        (b"example.com:00080", "example.com"),
    ],
)
def test_normalize_host(raw: bytes, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b":80",
        b"example.com:",  # empty port
        b"example.com:65536",
        b"example.com:123456",
        b"example.com:8o",
        b"example.com:-1",
        b"example.com:80:80",
        b"example.com/path",
        b"user@example.com",
        b"exa mple.com",
        b" example.com",
        b"example.com ",
        b"example.com\t",
        b"exa\x00mple.com",
        b"example.com\r\nx: y",
        b"%65xample.com",
        b"ex\xc3\xa4mple.com",
        b"[::1",
        b"::1",  # IPv6 needs brackets
        b"[::1]x",
        b"[::1]:",
        b"[::1]:99999",
        b"[not:an:ip]",
        b"[1:2:3:4:5:6:7:8:9]",
        b"[fe80::1%25eth0]",
        b"[]",
        b".",
        b"..",
        b".example.com",
        b"example..com",
        b"example.com..",
        b"a" * 254,
        b"*.example.com",
    ],
)
def test_normalize_host_rejects(raw: bytes) -> None:
    with pytest.raises(HttpError) as info:
        normalize_host(raw)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("host", "authority", "expected"),
    [
        (b"Example.com:8080", None, ("example.com", b"Example.com:8080")),
        (None, b"example.com", ("example.com", b"example.com")),
        (None, b"Example.com:8443", ("example.com", b"Example.com:8443")),
        # both present: same host; the authority is what the client targeted
        (b"example.com", b"example.com", ("example.com", b"example.com")),
        (b"EXAMPLE.com", b"example.com:443", ("example.com", b"example.com:443")),
        (b"example.com:8080", b"example.com", ("example.com", b"example.com")),
        (b"example.com.", b"example.com", ("example.com", b"example.com")),
        (b"[::1]:8080", None, ("::1", b"[::1]:8080")),
        (b"[::1]", b"[0::1]:80", ("::1", b"[0::1]:80")),
    ],
)
def test_request_host(host: bytes | None, authority: bytes | None, expected: tuple[str, bytes]) -> None:
    assert request_host(head(host, authority)) == expected


@pytest.mark.parametrize(
    ("host", "authority"),
    [
        (None, None),  # neither
        ([b"example.com", b"example.com"], None),  # two identical Host headers
        ([b"example.com", b"other.com"], None),
        ([b"example.com", b"example.com"], b"example.com"),
        (b"other.com", b"example.com"),  # differ
        (b"example.com", b"www.example.com"),
        (b"[::1]", b"[::2]"),
        (b"", None),  # empty Host
        (None, b""),  # empty authority
        (b"", b"example.com"),
        (b"example.com", b""),
        (b"bad host", None),
        (b"example.com:99999", None),
        (None, b"example.com:http"),
        (b"example.com", b"user:pw@example.com"),
    ],
)
def test_request_host_rejects(host: list[bytes] | bytes | None, authority: bytes | None) -> None:
    with pytest.raises(HttpError) as info:
        request_host(head(host, authority))
    assert info.value.status == 400
    assert info.value.reason


def test_http10_without_host_is_rejected() -> None:
    with pytest.raises(HttpError):
        request_host(head(None, None, version=b"1.0"))
