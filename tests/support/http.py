"""Small helpers shared by the integration tests: parse curl/raw answers, read /echo JSON."""

from __future__ import annotations

import json
from typing import Any


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive) that the origin's /echo saw."""
    wanted = name.lower()
    return [value for key, value in echo["headers"] if key.lower() == wanted]


def header_names(echo: dict[str, Any]) -> set[str]:
    return {key.lower() for key, _value in echo["headers"]}


def parse_response(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """``(status, [(lower-case name, value)], body)`` of the first response in ``raw``."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {raw[:300]!r}")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    assert parts[0].startswith("HTTP/1."), lines[0]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), headers, body


def get_header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name.lower()]


def parse_curl_include(output: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Parse ``curl -i`` output (a single response, no interim ones)."""
    return parse_response(output)


def echo_json(body: bytes) -> dict[str, Any]:
    try:
        return json.loads(body)
    except ValueError:
        raise AssertionError(f"not an /echo answer: {body[:300]!r}") from None
