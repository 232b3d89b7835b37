"""``Alt-Svc`` advertising HTTP/3 (RFC 7838), owned by the proxy, never by the origin.

An origin's Alt-Svc names the origin's own services, which clients of the proxy
cannot reach, so it is always stripped; the proxy's own value is added only when
HTTP/3 is on, the request came over TLS/QUIC and the app uses TLS without mTLS
(that decision belongs to the caller, which passes the pre-rendered value).
"""

from __future__ import annotations

__all__ = ["ALT_SVC", "alt_svc_value"]

ALT_SVC = b"alt-svc"


def alt_svc_value(port: int, max_age: int) -> bytes:
    """``h3=":<port>"; ma=<max_age>``, rendered once per configuration."""
    return b'h3=":%d"; ma=%d' % (port, max_age)
