"""httpoxy (CVE-2016-5385): never forward a ``Proxy`` request header.

CGI-style origins turn ``Proxy: x`` into the ``HTTP_PROXY`` environment variable,
which many HTTP client libraries then use as their outbound proxy. rpxy sends the
field with an empty value; dropping it is stricter and leaves no variable at all.
"""

from __future__ import annotations

from rpxy.message import Headers

__all__ = ["HTTPOXY", "drop_proxy_header"]

HTTPOXY = b"proxy"


def drop_proxy_header(headers: Headers) -> Headers:
    """``headers`` without any ``Proxy`` field."""
    return [item for item in headers if item[0] != HTTPOXY]
