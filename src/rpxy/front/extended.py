"""Request rules shared by the multiplexed front ends (HTTP/2 and HTTP/3).

Both carry a request as a header block with pseudo-headers and both support WebSocket by
extended CONNECT (RFC 8441 over HTTP/2, RFC 9220 over HTTP/3); what the pipeline sees must
be the same whichever carried it, so the checks and rewrites live here once.
"""

from __future__ import annotations

import base64
import os

from rpxy.message import HttpError, RequestHead
from rpxy.policy.validate import check_request_head

__all__ = ["prepare_stream_request"]


def prepare_stream_request(
    head: RequestHead, method: bytes, protocol: bytes | None, *, body_expected: bool, end_flag: str
) -> tuple[int | None, bool, bool]:
    """Check a decoded stream request and adapt it for the pipeline.

    ``head`` is already a GET with ``protocol = b"websocket"`` for a WebSocket extended
    CONNECT. Returns ``(content_length, body_expected, expect_continue)``: a WebSocket
    gets a fresh ``Sec-WebSocket-Key`` (an HTTP/2 or HTTP/3 client sends none; the HTTP/1.1
    upstream needs one) and no body; ``Expect: 100-continue`` is answered by the front end,
    never forwarded. Raises :class:`HttpError` (405 plain CONNECT, 501 other ``:protocol``,
    400 malformed, 417 other expectations); ``end_flag`` names the protocol's end-of-stream
    signal in messages (``END_STREAM``, ``FIN``).
    """
    websocket = head.protocol == b"websocket"
    if method == b"CONNECT" and not websocket:
        if protocol is not None:
            raise HttpError(501, "unsupported extended CONNECT :protocol")
        raise HttpError(405, "CONNECT is not supported")
    if websocket and not body_expected:
        raise HttpError(400, f"WebSocket CONNECT with {end_flag}")
    content_length = check_request_head(head, http1=False)
    fields = head.headers
    if websocket:
        if content_length is not None:
            raise HttpError(400, "content-length on a WebSocket CONNECT")
        key = base64.b64encode(os.urandom(16))
        head.headers = fields = [item for item in fields if item[0] != b"sec-websocket-key"]
        fields.append((b"sec-websocket-key", key))
        body_expected = False
    expect_continue = False
    for name, value in fields:
        if name == b"expect":
            # As for HTTP/1.1: answered by the front end, never forwarded.
            if value.lower() != b"100-continue":
                raise HttpError(417, "unsupported expectation")
            expect_continue = body_expected and not websocket
            head.headers = [item for item in fields if item[0] != b"expect"]
            break
    return content_length, body_expected, expect_continue
