"""Stateless Retry tokens (RFC 9000 section 8.1.2): address validation before any state.

A token binds the client's address, the original destination connection ID and the
Retry's source connection ID to a time, under an HMAC key that lives only in this
process. Validation needs no lookup, so a flood of spoofed Initials costs one HMAC
each and creates no connection. Tokens expire after ``lifetime`` seconds; the time is
passed in (the reactor's clock), never read here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

__all__ = ["InvalidToken", "RetryTokens"]

_VERSION = 1
_MAC_SIZE = 16
_MAX_CID = 20


class InvalidToken(ValueError):
    """A token that is malformed, forged, expired or made for another address."""


def _address(addr: tuple) -> bytes:
    return ipaddress.ip_address(addr[0]).packed + struct.pack("!H", addr[1])


class RetryTokens:
    """Issues and checks Retry tokens; one key per process (a restart invalidates them)."""

    def __init__(self, *, key: bytes | None = None, lifetime: float = 10.0) -> None:
        self._key = key if key is not None else os.urandom(32)
        self.lifetime = lifetime

    def _mac(self, addr: tuple, body: bytes) -> bytes:
        return hmac.new(self._key, _address(addr) + body, hashlib.sha256).digest()[:_MAC_SIZE]

    def issue(self, addr: tuple, original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        """The token to put in a Retry sent to ``addr``."""
        if len(original_dcid) > _MAX_CID or len(retry_scid) > _MAX_CID:
            raise ValueError("connection IDs are at most 20 bytes")
        body = (
            struct.pack("!BQ", _VERSION, int(now))
            + bytes((len(original_dcid),))
            + original_dcid
            + bytes((len(retry_scid),))
            + retry_scid
        )
        return body + self._mac(addr, body)

    def check(self, addr: tuple, token: bytes, now: float) -> tuple[bytes, bytes]:
        """``(original_dcid, retry_scid)`` from a token the client echoed; :class:`InvalidToken` otherwise."""
        if len(token) < 9 + 2 + _MAC_SIZE or len(token) > 9 + 2 + 2 * _MAX_CID + _MAC_SIZE:
            raise InvalidToken("bad length")
        body, mac = token[:-_MAC_SIZE], token[-_MAC_SIZE:]
        if not hmac.compare_digest(mac, self._mac(addr, body)):
            raise InvalidToken("bad MAC (forged, or another address)")
        version, issued = struct.unpack_from("!BQ", body)
        if version != _VERSION:
            raise InvalidToken("unknown token version")
        if not (issued - 1 <= now <= issued + self.lifetime + 1):
            raise InvalidToken("expired")
        offset = 9
        odcid_len = body[offset]
        odcid = body[offset + 1 : offset + 1 + odcid_len]
        offset += 1 + odcid_len
        if offset >= len(body):
            raise InvalidToken("truncated")
        scid_len = body[offset]
        scid = body[offset + 1 : offset + 1 + scid_len]
        if len(odcid) != odcid_len or len(scid) != scid_len or offset + 1 + scid_len != len(body):
            raise InvalidToken("truncated")
        return odcid, scid
