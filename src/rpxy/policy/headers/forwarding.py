"""Who the client is: the forwarding chain and the X-Forwarded-* / X-Real-IP fields.

The chain is built as rpxy builds it:

1. If the immediate peer is not a trusted proxy, whatever it says in
   X-Forwarded-For / Forwarded is a claim by the client itself and is discarded:
   the chain is just the peer.
2. If it is trusted, the incoming chain is taken from ``Forwarded`` when that parses
   and agrees with X-Forwarded-For (same addresses, same last ``proto`` as
   X-Forwarded-Proto) or when there is no X-Forwarded-For; otherwise from
   X-Forwarded-For. A trusted proxy that appends to X-Forwarded-For but passes
   ``Forwarded`` through untouched would otherwise let a client forge the latter.
   An X-Forwarded-For that does not parse makes the whole incoming chain
   untrustworthy (peer only).
3. The peer is appended, then the chain is cut at the trust boundary: walking
   from the right over trusted hops, the first untrusted hop is the client; hops
   left of it are unverifiable claims and are dropped, the trusted suffix after it
   is kept. If every hop is trusted the whole chain is kept.

The client address (X-Real-IP) is then the first element of the cut chain: the
right-most untrusted address, which is what the reference's "first in chain"
means once the chain has been cut.
"""

from __future__ import annotations

from rpxy.message import Headers
from rpxy.policy.trusted import TrustedProxies

from .forwarded import ForwardedElement, parse_forwarded, parse_x_forwarded_for

__all__ = [
    "FORWARDING_FIELDS",
    "X_FORWARDED_FOR",
    "X_FORWARDED_HOST",
    "X_FORWARDED_PORT",
    "X_FORWARDED_PROTO",
    "X_FORWARDED_SSL",
    "X_ORIGINAL_URI",
    "X_REAL_IP",
    "forwarding_fields",
    "incoming_chain",
    "trim_trusted",
]

X_FORWARDED_FOR = b"x-forwarded-for"
X_REAL_IP = b"x-real-ip"
X_FORWARDED_PROTO = b"x-forwarded-proto"
X_FORWARDED_PORT = b"x-forwarded-port"
X_FORWARDED_SSL = b"x-forwarded-ssl"
X_ORIGINAL_URI = b"x-original-uri"
X_FORWARDED_HOST = b"x-forwarded-host"

# Every field this rule writes (plus ``forwarded``): incoming copies are removed so
# the upstream never sees a client-supplied duplicate next to ours.
FORWARDING_FIELDS: frozenset[bytes] = frozenset(
    (
        X_FORWARDED_FOR,
        X_REAL_IP,
        X_FORWARDED_PROTO,
        X_FORWARDED_PORT,
        X_FORWARDED_SSL,
        X_ORIGINAL_URI,
        X_FORWARDED_HOST,
        b"forwarded",
    )
)

_TLS_FIELDS = ((X_FORWARDED_PROTO, b"https"), (X_FORWARDED_SSL, b"on"))
_PLAIN_FIELDS = ((X_FORWARDED_PROTO, b"http"), (X_FORWARDED_SSL, b"off"))


def _consistent(forwarded: list[ForwardedElement], xff: list[str], xfp: bytes | None) -> bool:
    if len(forwarded) != len(xff):
        return False
    for element, address in zip(forwarded, xff, strict=True):
        if element.for_ip != address:
            return False
    proto = forwarded[-1].proto
    if proto is not None and xfp is not None:
        return proto.lower() == xfp.strip(b" \t").lower()
    return True


def incoming_chain(
    xff_values: list[bytes], forwarded_values: list[bytes], x_forwarded_proto: bytes | None
) -> list[ForwardedElement] | None:
    """The chain a trusted peer claims (step 2 of the module docstring); None if unusable."""
    xff: list[str] | None = None
    if xff_values:
        xff = parse_x_forwarded_for(xff_values)
        if xff is None:
            return None
    if forwarded_values:
        forwarded = parse_forwarded(forwarded_values)
        if forwarded is not None and (not xff or _consistent(forwarded, xff, x_forwarded_proto)):
            return forwarded
    if xff:
        return [ForwardedElement(address) for address in xff]
    return None


def trim_trusted(chain: list[ForwardedElement], trusted: TrustedProxies) -> list[ForwardedElement]:
    """``chain`` cut at the trust boundary (step 3 of the module docstring)."""
    index = len(chain)
    while index and trusted.contains(chain[index - 1].for_ip):
        index -= 1
    if index <= 1:
        return chain
    return chain[index - 1 :]


def forwarding_fields(
    client_ip: str, xff: bytes, *, tls: bool, local_port: int, original_uri: bytes, original_host: bytes
) -> Headers:
    """The fields the proxy always sets: X-Forwarded-For/-Proto/-Port/-SSL/-Host, X-Real-IP, X-Original-URI.

    X-Forwarded-Proto / -SSL describe the connection the proxy received (like rpxy),
    X-Forwarded-Port is the local listener port, X-Forwarded-Host the host[:port] the
    client asked for and X-Original-URI its request-target before any rewrite.
    """
    proto, ssl = _TLS_FIELDS if tls else _PLAIN_FIELDS
    return [
        (X_FORWARDED_FOR, xff),
        (X_REAL_IP, client_ip.encode("ascii")),
        proto,
        (X_FORWARDED_PORT, b"%d" % local_port),
        ssl,
        (X_ORIGINAL_URI, original_uri),
        (X_FORWARDED_HOST, original_host),
    ]
