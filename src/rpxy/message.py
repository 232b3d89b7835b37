"""The request and connection types every front end produces and every policy reads.

Headers are a list of ``(name, value)`` byte pairs with **lower-case** names, in
arrival order, duplicates kept. Lower-case names let HTTP/1.1, HTTP/2 and HTTP/3
front ends share one representation (h2/h3 require lower case), and bytes avoid a
decode/encode round trip on the hot path.
"""

from __future__ import annotations

import attrs

Headers = list[tuple[bytes, bytes]]


@attrs.frozen
class ConnectionInfo:
    """Facts about the client connection a request arrived on."""

    peer_ip: str
    peer_port: int
    local_port: int
    tls: bool = False
    sni: str | None = None
    #: The local address the client reached ("" when unknown); the destination of a PROXY
    #: header sent upstream.
    local_ip: str = ""

    @property
    def scheme(self) -> bytes:
        return b"https" if self.tls else b"http"


@attrs.define(slots=True)
class RequestHead:
    """A request as the front end parsed it, before any policy touched it.

    ``path`` is always origin-form (``/p?q``) even when the client sent an
    absolute-form target, in which case ``authority`` holds the URI's host[:port].
    """

    method: bytes
    path: bytes
    version: bytes  # b"1.0", b"1.1", b"2", b"3"
    headers: Headers
    authority: bytes | None = None
    #: The protocol switch the client asks for, set by the front end: the HTTP/1.1
    #: ``Upgrade`` value or the HTTP/2 extended CONNECT ``:protocol`` (RFC 8441); relayed
    #: upstream as an HTTP/1.1 Upgrade. None for every other request (and never ``h2c``).
    protocol: bytes | None = None


class HttpError(Exception):
    """A request that must be answered with ``status`` (and an empty body) instead of proxied.

    ``reason`` is for the system log only; it never reaches the client.
    """

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def header_values(headers: Headers, name: bytes) -> list[bytes]:
    """All values of the (lower-case) header ``name``, in order."""
    return [value for key, value in headers if key == name]


def first_header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None
