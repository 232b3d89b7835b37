"""RFC 7239 ``Forwarded`` and the de-facto ``X-Forwarded-For``: parsing and formatting.

Parsing is all-or-nothing: an element without a usable ``for=`` IP address (the
RFC allows ``unknown`` and obfuscated ``_names``), a repeated parameter, a pair
without ``=`` or an unterminated quoted-string makes the whole field unusable
(None), because a chain with a hole in it cannot say who the client is. The
caller then falls back to X-Forwarded-For or to the peer address alone.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from rpxy.policy.trusted import parse_ip

__all__ = [
    "FORWARDED",
    "X_FORWARDED_FOR",
    "ForwardedElement",
    "format_forwarded",
    "format_node",
    "format_value",
    "parse_forwarded",
    "parse_node",
    "parse_x_forwarded_for",
]

FORWARDED = b"forwarded"
X_FORWARDED_FOR = b"x-forwarded-for"

_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_OBFPORT_RE = re.compile(rb"_[A-Za-z0-9._\-]+")
_QUOTED_PAIR_RE = re.compile(rb"\\(.)", re.DOTALL)


class ForwardedElement(NamedTuple):
    """One hop of a forwarding chain (one ``Forwarded`` element).

    ``for_ip`` is canonical address text (IPv6 without brackets, IPv4-mapped
    unwrapped); the other parameters are unquoted values, None when absent.
    """

    for_ip: str
    for_port: bytes | None = None
    proto: bytes | None = None
    host: bytes | None = None
    by: bytes | None = None


# ---------------------------------------------------------------- formatting


def format_value(value: bytes) -> bytes:
    """A parameter value as a token when it is one, else as a quoted-string.

    ``host=example.com:8443`` must be quoted (``:`` is not a token character), and
    ``"`` / ``\\`` inside a quoted-string are escaped.
    """
    if value and not value.translate(None, _TCHARS):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def format_node(ip: str, port: bytes | None = None) -> bytes:
    """A ``for=``/``by=`` node: ``192.0.2.1``, ``"192.0.2.1:80"``, ``"[2001:db8::1]"``."""
    text = ip.encode("ascii")
    if ":" in ip:
        text = b"[" + text + b"]"
        return b'"' + text + b'"' if port is None else b'"' + text + b":" + port + b'"'
    return text if port is None else b'"' + text + b":" + port + b'"'


def _format_element(element: ForwardedElement) -> bytes:
    parts = [b"for=" + format_node(element.for_ip, element.for_port)]
    if element.proto is not None:
        parts.append(b"proto=" + format_value(element.proto))
    if element.host is not None:
        parts.append(b"host=" + format_value(element.host))
    if element.by is not None:
        parts.append(b"by=" + format_value(element.by))
    return b";".join(parts)


def format_forwarded(chain: list[ForwardedElement]) -> bytes:
    """The ``Forwarded`` value for ``chain``: ``for=…;proto=…;host=…, for=…``."""
    return b", ".join([_format_element(element) for element in chain])


# ------------------------------------------------------------------- parsing


def _split_quoted(data: bytes, separator: int) -> list[bytes] | None:
    """``data`` split at ``separator`` outside quoted-strings; None if a quote is unclosed."""
    if b'"' not in data:
        return data.split(bytes((separator,)))
    parts: list[bytes] = []
    start = 0
    in_quotes = escaped = False
    for index, byte in enumerate(data):
        if escaped:
            escaped = False
        elif in_quotes:
            if byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_quotes = False
        elif byte == 0x22:
            in_quotes = True
        elif byte == separator:
            parts.append(data[start:index])
            start = index + 1
    if in_quotes:
        return None
    parts.append(data[start:])
    return parts


def _unquote(value: bytes) -> bytes | None:
    if value[:1] != b'"':
        return None if b'"' in value else value
    if len(value) < 2 or value[-1:] != b'"':
        return None
    inner = value[1:-1]
    if b"\\" in inner:
        inner = _QUOTED_PAIR_RE.sub(rb"\1", inner)
    return inner


def _valid_port(port: bytes) -> bool:
    if port.isdigit():
        return len(port) <= 5 and int(port) <= 65535
    return _OBFPORT_RE.fullmatch(port) is not None


def parse_node(value: bytes) -> tuple[str, bytes | None] | None:
    """``(canonical ip, port or None)`` of an unquoted node; None unless it is an IP.

    Accepts ``192.0.2.1``, ``192.0.2.1:80``, ``[2001:db8::1]``, ``[2001:db8::1]:80``
    and, leniently, unbracketed IPv6 without a port (``2001:db8::1``: with two or
    more colons nothing is taken as a port). ``unknown`` and ``_obfuscated`` -> None.
    """
    port: bytes | None = None
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0:
            return None
        rest = value[end + 1 :]
        value = value[1:end]
        if rest:
            if rest[:1] != b":":
                return None
            port = rest[1:]
    elif value.count(b":") == 1:
        value, _, port = value.partition(b":")
    if port is not None and not _valid_port(port):
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    addr = parse_ip(text)
    if addr is None:
        return None
    return str(addr), port


def parse_forwarded(values: list[bytes]) -> list[ForwardedElement] | None:
    """The chain in the ``Forwarded`` field values ``values`` (several lines join in order).

    None when any element is unusable (see the module docstring) or there is none.
    Parameters other than for/proto/host/by are dropped.
    """
    elements = _split_quoted(b",".join(values), 0x2C)
    if elements is None:
        return None
    chain: list[ForwardedElement] = []
    for element in elements:
        element = element.strip(b" \t")
        if not element:
            continue
        pairs = _split_quoted(element, 0x3B)
        if pairs is None:
            return None
        params: dict[bytes, bytes] = {}
        for pair in pairs:
            pair = pair.strip(b" \t")
            if not pair:
                continue
            key, eq, raw = pair.partition(b"=")
            key = key.strip(b" \t").lower()
            if not eq or not key or key in params:
                return None
            value = _unquote(raw.strip(b" \t"))
            if value is None:
                return None
            params[key] = value
        node = params.get(b"for")
        if node is None:
            return None
        parsed = parse_node(node)
        if parsed is None:
            return None
        chain.append(
            ForwardedElement(parsed[0], parsed[1], params.get(b"proto"), params.get(b"host"), params.get(b"by"))
        )
    return chain or None


def parse_x_forwarded_for(values: list[bytes]) -> list[str] | None:
    """Canonical addresses listed by the X-Forwarded-For values ``values``.

    Empty members are skipped; a member with a port (``192.0.2.1:80``,
    ``[2001:db8::1]:80``, sent by some load balancers) keeps only its address.
    None when any member is not an IP address (``unknown``, garbage); an empty
    list when the field lists nobody.
    """
    addresses: list[str] = []
    for value in values:
        for member in value.split(b","):
            member = member.strip(b" \t")
            if not member:
                continue
            parsed = parse_node(member)
            if parsed is None:
                return None
            addresses.append(parsed[0])
    return addresses
