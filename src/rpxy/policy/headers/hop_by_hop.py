"""Hop-by-hop fields (RFC 9110 section 7.6.1): meaningful for one connection only.

A proxy must drop them, and every field the ``Connection`` header names, before
forwarding in either direction; otherwise a client could, for example, make the
proxy forward (or hide) headers meant only for the proxy itself.
"""

from __future__ import annotations

from rpxy.message import Headers

__all__ = [
    "HOP_BY_HOP",
    "NEVER_CONNECTION_NOMINATED",
    "connection_tokens",
    "list_tokens",
    "nominated_fields",
    "strip_hop_by_hop",
]

HOP_BY_HOP: frozenset[bytes] = frozenset(
    (
        b"connection",
        b"te",
        b"trailer",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"transfer-encoding",
        b"upgrade",
    )
)

# Fields a ``Connection`` header may not make disappear: removing them would change
# message framing (``content-length``) or leave the upstream request without a
# target host (``host``). rpxy honours the nomination blindly; we do not.
NEVER_CONNECTION_NOMINATED: frozenset[bytes] = frozenset((b"host", b"content-length"))


def list_tokens(value: bytes) -> list[bytes]:
    """The lower-cased, OWS-trimmed, non-empty members of a comma-separated list value."""
    return [token for token in (part.strip(b" \t").lower() for part in value.split(b",")) if token]


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Field names nominated by the ``Connection`` header values ``values``.

    Names in :data:`NEVER_CONNECTION_NOMINATED` are left out.
    """
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(list_tokens(value))
    tokens -= NEVER_CONNECTION_NOMINATED
    return tokens


_NOMINATED_CACHE: dict[bytes, frozenset[bytes]] = {}
_NOMINATED_CACHE_LIMIT = 256


def nominated_fields(values: list[bytes]) -> frozenset[bytes]:
    """The extra fields to drop for the ``Connection`` values ``values``.

    Like :func:`connection_tokens` minus the names already in :data:`HOP_BY_HOP`,
    so the common ``keep-alive`` / ``close`` / ``Upgrade`` give an empty set. A
    single value's answer is cached: clients send the same few values over and over.
    """
    if len(values) == 1:
        value = values[0]
        cached = _NOMINATED_CACHE.get(value)
        if cached is None:
            cached = frozenset(connection_tokens(values) - HOP_BY_HOP)
            if len(_NOMINATED_CACHE) >= _NOMINATED_CACHE_LIMIT:
                _NOMINATED_CACHE.clear()
            _NOMINATED_CACHE[value] = cached
        return cached
    return frozenset(connection_tokens(values) - HOP_BY_HOP)


def strip_hop_by_hop(headers: Headers, *, keep: frozenset[bytes] = frozenset()) -> Headers:
    """``headers`` without hop-by-hop fields and Connection-nominated fields.

    Names in ``keep`` survive (a 101 response keeps ``connection`` and ``upgrade``).
    A standalone form of the rule; the request/response composers inline it into
    their single pass.
    """
    nominated = connection_tokens([value for name, value in headers if name == b"connection"])
    drop = (HOP_BY_HOP | nominated) - keep
    return [item for item in headers if item[0] not in drop]
