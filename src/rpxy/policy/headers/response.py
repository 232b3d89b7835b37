"""The response header rules composed into one pass: upstream headers -> client headers.

Hop-by-hop fields (and those the upstream's ``Connection`` names) are removed,
except that a 101 keeps ``connection`` and ``upgrade``, which the client needs to
see the switch. The origin's ``Server`` and ``Alt-Svc`` are replaced by the
proxy's (see :mod:`.server`, :mod:`.alt_svc`). ``Transfer-Encoding`` goes (it is
hop-by-hop: the transport re-frames the body), ``Content-Length`` stays.
"""

from __future__ import annotations

from rpxy.message import Headers

from .alt_svc import ALT_SVC
from .hop_by_hop import HOP_BY_HOP, nominated_fields
from .server import SERVER, SERVER_HEADER

__all__ = ["prepare_response_headers"]

_DROP = HOP_BY_HOP | {SERVER, ALT_SVC}
_UPGRADE_KEEP = frozenset((b"connection", b"upgrade"))
_DROP_UPGRADE = _DROP - _UPGRADE_KEEP


def prepare_response_headers(headers: Headers, *, alt_svc: bytes | None, upgrade: bool) -> Headers:
    """The fields to send the client for an upstream response with fields ``headers``.

    ``alt_svc``: the proxy's pre-rendered Alt-Svc value, or None to send none.
    ``upgrade``: the response is a 101 that switches protocols.
    """
    drop = _DROP_UPGRADE if upgrade else _DROP
    connection = [value for name, value in headers if name == b"connection"]
    if connection:
        # Never hop-by-hop names, so a 101's connection/upgrade stay kept.
        nominated = nominated_fields(connection)
        if nominated:
            drop = drop | nominated
    out = [item for item in headers if item[0] not in drop]
    out.append(SERVER_HEADER)
    if alt_svc is not None:
        out.append((ALT_SVC, alt_svc))
    return out
