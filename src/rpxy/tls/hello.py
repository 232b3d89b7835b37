"""Reading the SNI from a TLS ClientHello before OpenSSL sees it ("SSL pre-read").

The proxy picks an app's ``SSL_CTX`` *before* creating the OpenSSL connection so
that the connection's session cache and ticket keys are the app's own (see
:mod:`rpxy.tls.contexts`). The parser is sans-IO: feed it everything received so
far; it answers "need more bytes", a :class:`ClientHello`, or raises
:class:`ClientHelloError`. It is as strict as OpenSSL where the two could
disagree about the server name (one ``host_name`` entry, no duplicate
extensions, no NUL, at most 255 bytes), and OpenSSL re-checks the name anyway.
"""

from __future__ import annotations

import attrs

from rpxy.tls.names import normalize_server_name

__all__ = ["MAX_CLIENT_HELLO", "ClientHello", "ClientHelloError", "parse_client_hello"]

# A ClientHello with a post-quantum key share is ~1.8 KiB; OpenSSL accepts up to ~128 KiB.
MAX_CLIENT_HELLO = 64 * 1024
_MAX_RECORD = 16384 + 256
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HTTP_METHODS = (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ")


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello. ``not_tls``: not TLS at all."""

    def __init__(self, message: str, *, not_tls: bool = False) -> None:
        super().__init__(message)
        self.not_tls = not_tls


@attrs.frozen
class ClientHello:
    raw_sni: bytes | None  # exactly as sent
    sni: str | None  # normalised (lower-case, no trailing dot); None if absent or non-ASCII
    legacy_version: int  # 0x0303 for TLS 1.2 and 1.3 clients
    length: int  # bytes of records consumed
    alpn: tuple[bytes, ...] = ()  # offered ALPN protocols (e.g. to route ``acme-tls/1`` later)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ClientHelloError("truncated ClientHello")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int) -> bytes:
        n = int.from_bytes(self.take(length_bytes), "big")
        return self.take(n)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the first handshake message of a connection; None until enough bytes arrived."""
    if not data:
        return None
    if data[0] != _HANDSHAKE:
        if data[:4] in _HTTP_METHODS or data[:3] == b"GET":
            raise ClientHelloError("plain HTTP request on the TLS port", not_tls=True)
        if data[0] & 0x80:
            raise ClientHelloError("SSLv2-format ClientHello (no SNI, TLS 1.2+ required)", not_tls=False)
        raise ClientHelloError("not a TLS handshake record", not_tls=True)
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None
        if data[pos] != _HANDSHAKE:
            raise ClientHelloError("ClientHello interleaved with a non-handshake record")
        if data[pos + 1] != 3:
            raise ClientHelloError("not a TLS record version", not_tls=pos == 0)
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            raise ClientHelloError(f"invalid TLS record length {length}")
        if len(data) - pos - 5 < length:
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise ClientHelloError("first handshake message is not a ClientHello")
            body_length = int.from_bytes(handshake[1:4], "big")
            if body_length > MAX_CLIENT_HELLO:
                raise ClientHelloError(f"ClientHello of {body_length} bytes is too large")
            if len(handshake) >= 4 + body_length:
                if len(handshake) > 4 + body_length:
                    # Coalesced handshake messages after a ClientHello are never valid.
                    raise ClientHelloError("unexpected data after the ClientHello")
                return _parse_body(bytes(handshake[4:]), pos)
        if pos > 2 * MAX_CLIENT_HELLO:
            raise ClientHelloError("ClientHello is too large")


def _parse_body(body: bytes, consumed: int) -> ClientHello:
    r = _Reader(body)
    legacy_version = r.u16()
    if legacy_version >> 8 != 3:
        raise ClientHelloError(f"unknown ClientHello version 0x{legacy_version:04x}")
    r.take(32)  # random
    session_id = r.vector(1)
    if len(session_id) > 32:
        raise ClientHelloError("session id longer than 32 bytes")
    suites = r.vector(2)
    if not suites or len(suites) % 2:
        raise ClientHelloError("invalid cipher suite list")
    if not r.vector(1):
        raise ClientHelloError("empty compression method list")
    raw_sni = None
    alpn: tuple[bytes, ...] = ()
    if r.remaining:
        extensions = _Reader(r.vector(2))
        if r.remaining:
            raise ClientHelloError("trailing bytes after the extensions")
        seen: set[int] = set()
        while extensions.remaining:
            ext_type = extensions.u16()
            ext_data = extensions.vector(2)
            if ext_type in seen:
                raise ClientHelloError(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                raw_sni = _parse_server_name(ext_data)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(ext_data)
    return ClientHello(
        raw_sni=raw_sni,
        sni=normalize_server_name(raw_sni),
        legacy_version=legacy_version,
        length=consumed,
        alpn=alpn,
    )


def _parse_alpn(data: bytes) -> tuple[bytes, ...]:
    # Informational only: a malformed list is left for OpenSSL to refuse.
    try:
        r = _Reader(data)
        names = _Reader(r.vector(2))
        out = []
        while names.remaining:
            out.append(names.vector(1))
        return tuple(out)
    except ClientHelloError:
        return ()


def _parse_server_name(data: bytes) -> bytes:
    # Like OpenSSL: exactly one entry, of type host_name, filling the whole list.
    r = _Reader(data)
    names = _Reader(r.vector(2))
    if r.remaining or not names.remaining:
        raise ClientHelloError("malformed server_name extension")
    if names.u8() != 0:
        raise ClientHelloError("server_name entry is not a host_name")
    host = names.vector(2)
    if names.remaining:
        raise ClientHelloError("more than one server_name entry")
    if not host or len(host) > 255 or b"\x00" in host:
        raise ClientHelloError("invalid host_name in server_name")
    return host
