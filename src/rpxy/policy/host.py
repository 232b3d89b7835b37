"""Which host a request is for: the Host header or the request-target's authority.

The routing form of a host is:

* a DNS name or IPv4 literal: ASCII lower-case, port removed, one trailing dot
  removed (``Example.COM.:8080`` -> ``example.com``), which is the form app
  ``server_name`` values are stored in;
* an IPv6 literal: the address without brackets in Python's canonical compressed
  text (``[0:0::1]:80`` -> ``::1``). No app can have an IPv6 ``server_name``, so such
  requests only ever reach ``default_app``; canonical text just makes the Host /
  authority comparison exact.
"""

from __future__ import annotations

import ipaddress
import re

from rpxy.message import HttpError, RequestHead

__all__ = ["normalize_host", "request_host"]

# host = IP-literal / reg-name (restricted to the characters DNS names and IPv4
# literals use; '_' tolerated for internal names), then an optional port of 1-5
# digits. '%', '@', spaces, userinfo, zone ids, an empty port (``host:``) and
# unbracketed IPv6 are all rejected.
_HOST_RE = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.\-]+))(?::([0-9]{1,5}))?")
_MAX_NAME = 253


def normalize_host(raw: bytes) -> str:
    """The routing form of a ``host[:port]`` value; ``HttpError(400)`` if it is malformed."""
    match = _HOST_RE.fullmatch(raw)
    if match is None:
        raise HttpError(400, f"invalid host {raw[:300]!r}")
    name, port = match.group(2, 3)
    if port is not None and int(port) > 65535:
        raise HttpError(400, f"invalid port in host {raw[:300]!r}")
    if name is None:
        try:
            return str(ipaddress.IPv6Address(match.group(1).decode("ascii")))
        except ValueError:
            raise HttpError(400, f"invalid IPv6 host {raw[:300]!r}") from None
    if name[-1:] == b".":
        name = name[:-1]
    if not name or len(name) > _MAX_NAME or name[:1] == b"." or name[-1:] == b"." or b".." in name:
        raise HttpError(400, f"invalid host name {raw[:300]!r}")
    return name.lower().decode("ascii")


def request_host(head: RequestHead) -> tuple[str, bytes]:
    """``(routing host, host[:port] as the client sent it)`` for ``head``.

    The authority of an absolute-form target / HTTP/2-3 ``:authority`` wins over the
    Host header, as in rpxy; the second element (used for X-Forwarded-Host and the
    Forwarded ``host=``) is the raw value of whichever was chosen.

    ``HttpError(400)`` when: more than one Host header; neither a Host header nor
    an authority; either value empty or malformed (bad characters, bad port); or
    both present and naming different hosts. Like rpxy, the comparison is between
    the routing forms, so ``Host: example.com`` with ``:authority: example.com:443``
    (a port-only difference) is accepted.
    """
    hosts = [value for name, value in head.headers if name == b"host"]
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host header")
    authority = head.authority
    if authority is not None:
        host = normalize_host(authority)
        if hosts and normalize_host(hosts[0]) != host:
            raise HttpError(400, "Host header and request authority differ")
        return host, authority
    if hosts:
        return normalize_host(hosts[0]), hosts[0]
    raise HttpError(400, "no Host header and no authority")
