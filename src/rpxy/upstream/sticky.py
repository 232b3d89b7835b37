"""Sticky-session cookies, byte-compatible with rpxy's ``rpxy_sticky_token``.

Sans-IO: no reactor, no clock. Time comes in as ``now`` / ``expiry`` (unix seconds),
randomness (the GCM nonce) as ``token_random``.

Cookie value::

    base64url-no-pad( 0x01 || nonce(12) || AES-256-GCM(expiry(8, big-endian) || server_id) )

with the associated data ``b"rpxy-sticky-v1\\0" + name + b"\\0" + domain + b"\\0" + path + b"\\0"``
so a token minted for one app/route is rejected by every other. ``server_id`` is
``base64url-no-pad(SHA-256(f"{uri}&index={i}"))``: stable across restarts and across
instances that share the secret and the upstream list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rpxy.message import Headers

__all__ = [
    "STICKY_COOKIE_NAME",
    "STICKY_LIFETIME",
    "STICKY_REISSUE_BEFORE",
    "StickyCodec",
    "StickyToken",
    "find_sticky_cookie",
    "iter_sticky_cookies",
    "server_id_for",
    "set_cookie_header",
    "strip_sticky_cookie",
]

STICKY_COOKIE_NAME = "rpxy_sticky_token"
_NAME_B = STICKY_COOKIE_NAME.encode("ascii")
#: Seconds a freshly issued cookie lives (rpxy hard-codes 300).
STICKY_LIFETIME = 300
#: A still-valid cookie with at most this many seconds left is re-issued (same upstream).
STICKY_REISSUE_BEFORE = 150

_VERSION = 0x01
_NONCE_LEN = 12
_TAG_LEN = 16
_EXPIRY_LEN = 8
_MIN_RAW = 1 + _NONCE_LEN + _EXPIRY_LEN + _TAG_LEN
# Generous cap: a real token is ~100 characters. Anything longer is not ours.
_MAX_VALUE_LEN = 1024
_AAD_PREFIX = b"rpxy-sticky-v1\0" + _NAME_B + b"\0"
_B64URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(value: str) -> bytes | None:
    """Strict unpadded base64url; None on anything else."""
    if len(value) % 4 == 1 or not _B64URL_CHARS.issuperset(value):
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def server_id_for(uri: str, index: int) -> str:
    """The sticky identity of upstream ``index`` (its position in the route) with ``uri``."""
    return _b64url(hashlib.sha256(f"{uri}&index={index}".encode()).digest())


def _aad(domain: str, path: str) -> bytes:
    return _AAD_PREFIX + domain.encode() + b"\0" + path.encode() + b"\0"


@attrs.frozen
class StickyToken:
    """A decrypted, unexpired cookie."""

    server_id: str
    expiry: int


class StickyCodec:
    """Mints and opens ``rpxy_sticky_token`` values with one 32-byte secret."""

    __slots__ = ("_aead", "_random")

    def __init__(self, secret: bytes, *, token_random: Callable[[int], bytes] = os.urandom) -> None:
        if len(secret) != 32:
            raise ValueError("sticky cookie secret must be 32 bytes (AES-256)")
        self._aead = AESGCM(secret)
        self._random = token_random

    def encode(self, server_id: str, expiry: int, *, domain: str, path: str) -> str:
        """A cookie value naming ``server_id``, valid until ``expiry`` (unix seconds)."""
        nonce = self._random(_NONCE_LEN)
        if len(nonce) != _NONCE_LEN:
            raise ValueError("token_random must return 12 bytes")
        plaintext = int(expiry).to_bytes(_EXPIRY_LEN, "big") + server_id.encode("ascii")
        sealed = self._aead.encrypt(nonce, plaintext, _aad(domain, path))
        return _b64url(bytes((_VERSION,)) + nonce + sealed)

    def open(self, value: str, *, domain: str, path: str, now: float) -> StickyToken | None:
        """The token in ``value`` if authentic for (domain, path) and not expired at ``now``.

        Expired means ``expiry <= now``. Never raises.
        """
        try:
            if not value or len(value) > _MAX_VALUE_LEN:
                return None
            raw = _b64url_decode(value)
            if raw is None or len(raw) < _MIN_RAW or raw[0] != _VERSION:
                return None
            nonce = raw[1 : 1 + _NONCE_LEN]
            plaintext = self._aead.decrypt(nonce, raw[1 + _NONCE_LEN :], _aad(domain, path))
            expiry = int.from_bytes(plaintext[:_EXPIRY_LEN], "big")
            if expiry <= now:
                return None
            return StickyToken(plaintext[_EXPIRY_LEN:].decode("ascii"), expiry)
        except (InvalidTag, ValueError, TypeError, UnicodeError):
            return None

    def decode(self, value: str, *, domain: str, path: str, now: float) -> str | None:
        """The server_id in ``value``, or None (malformed, forged, other app/route, expired)."""
        token = self.open(value, domain=domain, path=path, now=now)
        return None if token is None else token.server_id


def set_cookie_header(value: str, *, expiry: int, domain: str, path: str, secure: bool) -> bytes:
    """The ``Set-Cookie`` header *value* (without the name) carrying a sticky token."""
    cookie = (
        f"{STICKY_COOKIE_NAME}={value}; expires={formatdate(expiry, usegmt=True)}; "
        f"Max-Age={STICKY_LIFETIME}; path={path}; domain={domain}; HttpOnly; SameSite=Lax"
    )
    if secure:
        cookie += "; Secure"
    return cookie.encode("ascii")


def iter_sticky_cookies(cookie_values: Iterable[bytes]) -> Iterator[str]:
    """Every ``rpxy_sticky_token`` value in these ``Cookie`` header values, in order."""
    for header in cookie_values:
        if _NAME_B not in header:
            continue
        for pair in header.split(b";"):
            name, eq, value = pair.partition(b"=")
            if not eq or name.strip() != _NAME_B:
                continue
            value = value.strip()
            if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            try:
                yield value.decode("ascii")
            except UnicodeDecodeError:
                continue


def find_sticky_cookie(cookie_values: Iterable[bytes]) -> str | None:
    """The first ``rpxy_sticky_token`` value in these ``Cookie`` header values."""
    return next(iter_sticky_cookies(cookie_values), None)


def _has_sticky(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"cookie" and _NAME_B in value:
            return True
    return False


def strip_sticky_cookie(headers: Headers) -> Headers:
    """``headers`` without our cookie in any ``cookie`` header (empty headers dropped).

    Returns the *same list object* when there is nothing to strip (the common case);
    otherwise a new list, the input untouched. Other cookies keep their order; the
    pairs of an edited header are re-joined with ``"; "``.
    """
    if not _has_sticky(headers):
        return headers
    out: Headers = []
    for name, value in headers:
        if name == b"cookie" and _NAME_B in value:
            kept = [
                pair
                for pair in (p.strip() for p in value.split(b";"))
                if pair and pair.partition(b"=")[0].strip() != _NAME_B
            ]
            if not kept:
                continue
            value = b"; ".join(kept)
        out.append((name, value))
    return out
