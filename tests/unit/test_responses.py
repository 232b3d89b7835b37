"""Reason phrases and the https_redirection Location."""

from __future__ import annotations

import pytest

from rpxy.policy.responses import REASONS, https_redirect_location, reason


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (200, b"OK"),
        (101, b"Switching Protocols"),
        (301, b"Moved Permanently"),
        (400, b"Bad Request"),
        (404, b"Not Found"),
        (413, b"Payload Too Large"),
        (421, b"Misdirected Request"),
        (425, b"Too Early"),
        (431, b"Request Header Fields Too Large"),
        (500, b"Internal Server Error"),
        (502, b"Bad Gateway"),
        (503, b"Service Unavailable"),
        (504, b"Gateway Timeout"),
        (599, b"Unknown"),
        (299, b"Unknown"),
        (0, b"Unknown"),
    ],
)
def test_reason(status: int, phrase: bytes) -> None:
    assert reason(status) == phrase


def test_every_standard_code_has_a_phrase() -> None:
    import http

    for status in http.HTTPStatus:
        if status.value == 306:
            continue
        assert status.value in REASONS, status
    assert all(phrase and b"\r" not in phrase and b"\n" not in phrase for phrase in REASONS.values())


@pytest.mark.parametrize(
    ("name", "port", "target", "expected"),
    [
        ("example.com", 443, b"/", b"https://example.com/"),
        ("example.com", None, b"/a?b=c", b"https://example.com/a?b=c"),
        ("example.com", 8443, b"/a?b=c", b"https://example.com:8443/a?b=c"),
        ("example.com", 8443, b"/", b"https://example.com:8443/"),
        ("example.com", 80, b"/x", b"https://example.com:80/x"),
        ("192.0.2.1", 8443, b"/x", b"https://192.0.2.1:8443/x"),
        ("example.com", 443, b"", b"https://example.com/"),
    ],
)
def test_https_redirect_location(name: str, port: int | None, target: bytes, expected: bytes) -> None:
    assert https_redirect_location(name, port, target) == expected
