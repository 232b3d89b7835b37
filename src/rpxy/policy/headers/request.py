"""The request header rules composed into one pass: client headers -> upstream headers.

Each rule lives in its own module (hop_by_hop, te, cookies, httpoxy, forwarding,
forwarded, upstream_host, upgrade_insecure); this module applies them all with a
single walk over the client's fields, one dict probe per field, because it runs
for every proxied request. Order of effects, as in rpxy:

1. every hop-by-hop field and every field named by ``Connection`` is removed first,
   so a client can never use ``Connection: x-forwarded-for`` to remove a field the
   proxy adds (ours are appended afterwards), while a nominated incoming copy is
   ignored as the nomination asks;
2. Cookie fields are merged, ``Proxy`` is dropped, incoming copies of every field the
   proxy sets are dropped (no duplicates upstream);
3. the forwarding chain is built (see :mod:`.forwarding`) and our fields appended.

The output keeps the client's fields in their order (Host stays where it was, or
comes first when added) followed by the proxy's.
"""

from __future__ import annotations

from typing import NamedTuple

from rpxy.message import ConnectionInfo, Headers
from rpxy.policy.trusted import TrustedProxies, canonical_ip

from .cookies import COOKIE
from .forwarded import FORWARDED, ForwardedElement, format_forwarded
from .forwarding import (
    FORWARDING_FIELDS,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    forwarding_fields,
    incoming_chain,
    trim_trusted,
)
from .hop_by_hop import HOP_BY_HOP, list_tokens, nominated_fields
from .httpoxy import HTTPOXY
from .te import TE_TRAILERS, te_has_trailers
from .upgrade_insecure import UPGRADE_INSECURE_HEADER, UPGRADE_INSECURE_REQUESTS
from .upstream_host import HOST

__all__ = ["ForwardedFor", "prepare_request_headers"]


class ForwardedFor(NamedTuple):
    """The upstream request's fields plus what the access log and cookies need.

    A named tuple, not a frozen attrs class: one is built per request, and a tuple is
    several times cheaper to construct.

    ``client_ip``: the address given to X-Real-IP; ``xff``: the X-Forwarded-For value
    sent; ``forwarded``: the Forwarded value sent, or None. ``secure``: the client
    reached us over HTTPS, directly or (per X-Forwarded-Proto) through a trusted
    proxy, which decides the sticky cookie's ``Secure`` attribute.
    """

    headers: Headers
    client_ip: str
    xff: bytes
    forwarded: bytes | None
    secure: bool = False


# What the single pass does with a field, by name; absent names are copied.
_DROP = 0
_HOST = 1
_COOKIE = 2
_TE = 3
_XFF = 4
_FORWARDED = 5
_XFP = 6
_UIR = 7

_KINDS: dict[bytes, int] = {name: _DROP for name in HOP_BY_HOP | FORWARDING_FIELDS}
_KINDS.update(
    {
        HTTPOXY: _DROP,
        HOST: _HOST,
        COOKIE: _COOKIE,
        b"te": _TE,
        X_FORWARDED_FOR: _XFF,
        FORWARDED: _FORWARDED,
        X_FORWARDED_PROTO: _XFP,
        UPGRADE_INSECURE_REQUESTS: _UIR,
    }
)
_CONNECTION_UPGRADE = (b"connection", b"upgrade")


def prepare_request_headers(
    headers: Headers,
    *,
    conn: ConnectionInfo,
    original_host: bytes,
    original_uri: bytes,
    trusted: TrustedProxies,
    add_forwarded: bool,
    upstream_host: bytes | None,
    upgrade_insecure: bool,
    upgrade: bytes | None,
) -> ForwardedFor:
    """The fields to send upstream for a request with client fields ``headers``.

    ``original_host``: the client's host[:port] (X-Forwarded-Host, Forwarded ``host=``,
    and Host when the request had no Host field, e.g. HTTP/2 with ``:authority``).
    ``original_uri``: the request-target before rewriting (X-Original-URI).
    ``add_forwarded``: the ``forwarded_header`` option; Forwarded is (re)generated when
    it is set or when the request carried a Forwarded field.
    ``upstream_host``: Host to send instead of the client's (``set_upstream_host``, or
    the ``default_app`` server name); None keeps the client's.
    ``upgrade_insecure``: add ``upgrade-insecure-requests: 1`` when missing.
    ``upgrade``: the client's Upgrade value for a protocol switch (WebSocket); re-adds
    ``connection: upgrade`` and ``upgrade`` after the strip, never for ``h2c``.
    """
    kinds = _KINDS
    connection = [value for name, value in headers if name == b"connection"]
    if connection:
        nominated = nominated_fields(connection)
        if nominated:
            kinds = dict(kinds)
            for name in nominated:
                kinds[name] = _DROP

    out: Headers = []
    append = out.append
    host_seen = uir_seen = te_trailers = False
    cookie_at = -1
    cookies: list[bytes] | None = None
    xff_values: list[bytes] = []
    forwarded_values: list[bytes] = []
    xfp: bytes | None = None
    for item in headers:
        kind = kinds.get(item[0])
        if kind is None:
            append(item)
        elif kind == _DROP:
            continue
        elif kind == _HOST:
            if not host_seen:
                host_seen = True
                append(item if upstream_host is None else (HOST, upstream_host))
        elif kind == _COOKIE:
            if cookies is None:
                cookie_at = len(out)
                cookies = [item[1]]
                append(item)
            else:
                cookies.append(item[1])
        elif kind == _XFF:
            xff_values.append(item[1])
        elif kind == _FORWARDED:
            forwarded_values.append(item[1])
        elif kind == _XFP:
            if xfp is None:
                xfp = item[1]
        elif kind == _TE:
            te_trailers = te_trailers or te_has_trailers(item[1])
        elif kind == _UIR:
            uir_seen = True
            append(item)

    if cookies is not None and len(cookies) > 1:
        out[cookie_at] = (COOKIE, b"; ".join(cookies))
    if not host_seen:
        out.insert(0, (HOST, original_host if upstream_host is None else upstream_host))

    # The forwarding chain.
    tls = conn.tls
    peer_ip = canonical_ip(conn.peer_ip)
    peer = ForwardedElement(peer_ip, None, b"https" if tls else b"http", original_host)
    peer_trusted = trusted.contains(peer_ip)
    chain: list[ForwardedElement] | None = None
    if peer_trusted and (xff_values or forwarded_values):
        chain = incoming_chain(xff_values, forwarded_values, xfp)
    if chain is None:
        chain = [peer]
        xff = peer_ip.encode("ascii")
    else:
        chain.append(peer)
        chain = trim_trusted(chain, trusted)
        xff = b", ".join([element.for_ip.encode("ascii") for element in chain])
    client_ip = chain[0].for_ip

    if te_trailers:
        append(TE_TRAILERS)
    out.extend(
        forwarding_fields(
            client_ip,
            xff,
            tls=tls,
            local_port=conn.local_port,
            original_uri=original_uri,
            original_host=original_host,
        )
    )
    forwarded: bytes | None = None
    if forwarded_values or add_forwarded:
        forwarded = format_forwarded(chain)
        append((FORWARDED, forwarded))
    if upgrade_insecure and not uir_seen:
        append(UPGRADE_INSECURE_HEADER)
    if upgrade and b"h2c" not in list_tokens(upgrade):
        append(_CONNECTION_UPGRADE)
        append((b"upgrade", upgrade))

    secure = tls or (peer_trusted and xfp is not None and xfp.strip(b" \t").lower() == b"https")
    return ForwardedFor(out, client_ip, xff, forwarded, secure)
