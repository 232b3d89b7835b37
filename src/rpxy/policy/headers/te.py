"""``TE: trailers`` survives the hop-by-hop strip.

TE is hop-by-hop, but its ``trailers`` member says the client accepts trailer
fields, which gRPC depends on end to end, so the proxy re-sends exactly
``te: trailers`` upstream when the client sent that member (as rpxy does).
"""

from __future__ import annotations

from .hop_by_hop import list_tokens

__all__ = ["TE_TRAILERS", "te_has_trailers"]

TE_TRAILERS: tuple[bytes, bytes] = (b"te", b"trailers")


def te_has_trailers(value: bytes) -> bool:
    """Whether the TE value lists ``trailers`` (case-insensitive, whole member)."""
    if value == b"trailers":
        return True
    return b"trailers" in list_tokens(value)
