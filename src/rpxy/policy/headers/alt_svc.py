"""``Alt-Svc`` advertising HTTP/3 (RFC 7838), owned by the proxy, never by the origin.

An origin's Alt-Svc names the origin's own services, which clients of the proxy
cannot reach, so it is always stripped; the proxy's own value is added only when
HTTP/3 is on, the request came over TLS/QUIC and the app uses TLS without mTLS
(that decision belongs to the caller, which passes the pre-rendered value).
"""

from __future__ import annotations

import functools

from rpxy.config.model import AppConfig, Config

__all__ = ["ALT_SVC", "alt_svc_for", "alt_svc_value"]

ALT_SVC = b"alt-svc"


def alt_svc_value(port: int, max_age: int) -> bytes:
    """``h3=":<port>"; ma=<max_age>``, rendered once per configuration."""
    return b'h3=":%d"; ma=%d' % (port, max_age)


@functools.lru_cache(maxsize=64)
def _rendered(port: int, max_age: int) -> bytes:
    return alt_svc_value(port, max_age)


def alt_svc_for(config: Config, app: AppConfig, *, tls: bool) -> bytes | None:
    """The Alt-Svc value for a response of ``app``, or None (rpxy's rule, in one place).

    Only when HTTP/3 is on (``[experimental.h3]`` with a TLS port), the request came over
    TLS/QUIC, and the app has TLS. Unlike rpxy, apps with client certificates (mTLS) get it
    too: the QUIC port asks for client certificates as the TCP port does
    (:mod:`rpxy.quic.client_auth`); a browser that cannot present one over QUIC falls back
    to TCP as for any broken alternative. The port is the one clients see:
    ``public_https_port``, else ``listen_port_tls``.
    """
    if not tls:
        return None
    h3 = config.experimental.h3
    if h3 is None or config.listen_port_tls is None:
        return None
    app_tls = app.tls
    if app_tls is None:
        return None
    port = config.https_port_for_clients
    if port is None:
        return None
    return _rendered(port, h3.alt_svc_max_age)
