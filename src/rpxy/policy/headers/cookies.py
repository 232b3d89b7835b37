"""Cookie fields folded into one line.

HTTP/2 and HTTP/3 clients split cookies into one field per pair (RFC 9113
8.2.3); an HTTP/1.1 origin expects a single ``Cookie`` line (RFC 6265 5.4), so
the fields are joined with ``"; "`` before going upstream, as rpxy does.
"""

from __future__ import annotations

from rpxy.message import Headers

__all__ = ["COOKIE", "merge_cookie_values", "merge_cookies"]

COOKIE = b"cookie"


def merge_cookie_values(values: list[bytes]) -> bytes:
    """The single ``Cookie`` value for the field values ``values``, in order."""
    return values[0] if len(values) == 1 else b"; ".join(values)


def merge_cookies(headers: Headers) -> Headers:
    """``headers`` with all Cookie fields merged into one at the first one's place."""
    values = [value for name, value in headers if name == COOKIE]
    if len(values) < 2:
        return headers
    merged: bytes | None = merge_cookie_values(values)
    out: Headers = []
    for item in headers:
        if item[0] == COOKIE:
            if merged is not None:
                out.append((COOKIE, merged))
                merged = None
        else:
            out.append(item)
    return out
