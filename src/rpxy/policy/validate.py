"""Strict request-head checks that stop smuggling and header injection before routing.

The HTTP/1.1 parser already rejects malformed request lines and obs-fold; this
module checks what a parser lets through but a proxy must not forward: names
that are not tokens, values that could split a header line upstream, and
ambiguous message framing (RFC 9112 section 6.3), which is how request smuggling
between two HTTP/1.1 hops happens.
"""

from __future__ import annotations

import re

from rpxy.message import HttpError, RequestHead

__all__ = ["MAX_HEADER_COUNT", "check_request_head"]

MAX_HEADER_COUNT = 100

# RFC 9110 token characters; names arrive lower-case but upper case is harmless.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_NAMES_RE = re.compile(rb"[" + _TCHAR + rb"]+(?: [" + _TCHAR + rb"]+)*")
_OWS = b" \t"

# Connection-specific fields that RFC 9113 8.2.2 / RFC 9114 4.2 make malformed in
# HTTP/2 and HTTP/3 requests (``te`` is allowed only as ``trailers``).
_H2_FORBIDDEN = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))


def check_request_head(head: RequestHead, *, http1: bool) -> int | None:
    """Reject a request head that is unsafe to forward; return its Content-Length.

    Raises ``HttpError(431)`` for more than :data:`MAX_HEADER_COUNT` header lines and
    ``HttpError(400)`` for:

    * a header name that is not a token, or a value holding NUL, CR or LF, or
      starting/ending with whitespace;
    * a Content-Length that is repeated (even with equal values), is a list
      (``5, 5``), empty, or not all digits;
    * HTTP/1.x: Transfer-Encoding together with Content-Length; Transfer-Encoding
      on HTTP/1.0; more than one Transfer-Encoding line, or any value other than
      exactly ``chunked`` (case-insensitive). RFC 9112 allows 501 for an unknown
      coding; 400 is used for every framing error because the proxy will not parse
      the body either way and 400 makes the client not retry;
    * HTTP/2 and HTTP/3: any connection-specific field, or ``te`` other than
      ``trailers``.

    Returns the declared Content-Length, or None when there is none (chunked,
    or a body delimited by the HTTP/2-3 stream).
    """
    headers = head.headers
    count = len(headers)
    if count > MAX_HEADER_COUNT:
        raise HttpError(431, f"{count} header fields (limit {MAX_HEADER_COUNT})")
    if not count:
        return None

    names, values = zip(*headers)
    joined = b" ".join(names)
    # A name holding the separator would pass the regex as two names: count them.
    if joined.count(b" ") != count - 1 or _NAMES_RE.fullmatch(joined) is None:
        bad = next((n for n in names if _NAMES_RE.fullmatch(n) is None or b" " in n), b"")
        raise HttpError(400, f"invalid header name {bad[:100]!r}")

    joined = b"\n".join(values)
    if b"\r" in joined or b"\x00" in joined or joined.count(b"\n") != count - 1:
        raise HttpError(400, "CR, LF or NUL in a header value")
    if [value for value in values if value.strip(_OWS) != value]:
        raise HttpError(400, "header value with leading or trailing whitespace")

    content_length: int | None = None
    if b"content-length" in names:
        lengths = [value for name, value in headers if name == b"content-length"]
        if len(lengths) > 1:
            raise HttpError(400, "more than one Content-Length")
        raw = lengths[0]
        # bytes.isdigit() is ASCII-only: no sign, space, comma or underscore.
        if not raw.isdigit() or len(raw) > 19:
            raise HttpError(400, f"invalid Content-Length {raw[:40]!r}")
        content_length = int(raw)

    if http1:
        if b"transfer-encoding" in names:
            if head.version == b"1.0":
                raise HttpError(400, "Transfer-Encoding on HTTP/1.0")
            if content_length is not None:
                raise HttpError(400, "both Transfer-Encoding and Content-Length")
            codings = [value for name, value in headers if name == b"transfer-encoding"]
            if len(codings) > 1 or codings[0].lower() != b"chunked":
                raise HttpError(400, f"unsupported Transfer-Encoding {b', '.join(codings)[:80]!r}")
    else:
        if not _H2_FORBIDDEN.isdisjoint(names):
            bad = next(n for n in names if n in _H2_FORBIDDEN)
            raise HttpError(
                400, f"connection-specific header {bad!r} in HTTP/{head.version.decode('ascii', 'replace')}"
            )
        if b"te" in names:
            for name, value in headers:
                if name == b"te" and value.lower() != b"trailers":
                    raise HttpError(400, f"te: {value[:40]!r} in HTTP/{head.version.decode('ascii', 'replace')}")
    return content_length
