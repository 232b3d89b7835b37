"""The ``set_upstream_host`` option: send the upstream's ``host[:port]`` as Host.

By default the client's Host is kept (``keep_original_host`` is the default and
wins). The value is rendered once per upstream when the runtime state is built,
so requests only copy a reference.
"""

from __future__ import annotations

from rpxy.message import Headers

__all__ = ["HOST", "set_host", "upstream_host_value"]

HOST = b"host"


def upstream_host_value(location: str) -> bytes:
    """The Host value for an upstream ``location`` (``host[:port]`` as configured)."""
    return location.encode("ascii")


def set_host(headers: Headers, value: bytes) -> Headers:
    """``headers`` with exactly one Host field, ``value``, at the first Host's place (or first)."""
    out: Headers = []
    placed = False
    for item in headers:
        if item[0] == HOST:
            if not placed:
                out.append((HOST, value))
                placed = True
        else:
            out.append(item)
    if not placed:
        out.insert(0, (HOST, value))
    return out
