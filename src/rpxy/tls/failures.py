"""Handshake failures: one structured record per refused or failed TLS handshake.

Categories (the ``category`` field), as in rpxy's logs:

``no_sni``       the ClientHello named no server (e.g. a client connecting by IP)
``unknown_sni``  the ClientHello named a server no app serves
``client_cert``  an mTLS app got no client certificate, or one that does not verify
``timeout``      the handshake did not finish within the handshake timeout
``handshake``    anything else TLS refused: old protocol version, no shared cipher
                 or group, malformed or non-TLS bytes, the client rejecting our
                 certificate (``reason`` says which)
``closed``       the peer closed the connection before finishing the handshake
                 without a TLS error (``bytes_received`` = 0 for a bare TCP probe)
"""

from __future__ import annotations

import attrs
from OpenSSL import SSL

__all__ = [
    "CATEGORIES",
    "HandshakeFailure",
    "categorize_error",
    "categorize_failure",
    "describe_error",
]

NO_SNI = "no_sni"
UNKNOWN_SNI = "unknown_sni"
CLIENT_CERT = "client_cert"
TIMEOUT = "timeout"
HANDSHAKE = "handshake"
CLOSED = "closed"
CATEGORIES = (NO_SNI, UNKNOWN_SNI, CLIENT_CERT, TIMEOUT, HANDSHAKE, CLOSED)


@attrs.frozen
class HandshakeFailure:
    """What the proxy reports for a failed handshake (pass to your logger)."""

    category: str
    reason: str
    peer: str  # "ip:port" ("[v6]:port" for IPv6)
    sni: str | None = None  # log-safe rendering of what the client sent
    app: str | None = None  # the app whose context was chosen, if any
    bytes_received: int = 0

    def __str__(self) -> str:
        sni = self.sni if self.sni is not None else "-"
        app = f" app={self.app}" if self.app else ""
        return f"TLS handshake failed: peer={self.peer} sni={sni}{app} category={self.category}: {self.reason}"


# Substrings of OpenSSL reason strings (lower-case), first match wins.
_CLIENT_CERT_REASONS = (
    "peer did not return a certificate",
    "certificate required",
    "certificate verify failed",
    "no certificate returned",
    "unsupported certificate purpose",
)
_CLOSED_REASONS = ("unexpected eof",)


def _reasons(error: BaseException) -> list[str]:
    out: list[str] = []
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        for item in args[0]:
            if isinstance(item, tuple) and item:
                out.append(str(item[-1]))
            else:
                out.append(str(item))
    elif args:
        out.extend(str(a) for a in args)
    return out


def describe_error(error: BaseException) -> str:
    """A short human-readable reason for an OpenSSL (or connection) error."""
    reasons = [r for r in _reasons(error) if r]
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    if isinstance(error, SSL.SysCallError):
        return "connection reset during the handshake"
    name = type(error).__name__
    text = str(error)
    return f"{name}: {text}" if text else name


def categorize_error(error: BaseException) -> str:
    """The category (see the module docs) for an exception that ended a handshake.

    ``OpenSSL.SSL.Error`` reasons are inspected; a connection closed or reset
    without TLS error is ``closed``; anything else is ``handshake``.
    """
    if isinstance(error, (SSL.ZeroReturnError,)):
        return CLOSED
    if isinstance(error, SSL.SysCallError):
        return CLOSED
    if isinstance(error, SSL.Error):
        text = " ".join(_reasons(error)).lower()
        if any(marker in text for marker in _CLIENT_CERT_REASONS):
            return CLIENT_CERT
        if any(marker in text for marker in _CLOSED_REASONS):
            return CLOSED
        return HANDSHAKE
    from twisted.internet import error as net_error

    if isinstance(error, (net_error.ConnectionDone, net_error.ConnectionLost, net_error.ConnectionAborted)):
        return CLOSED
    if isinstance(error, net_error.TimeoutError):
        return TIMEOUT
    return HANDSHAKE


def categorize_failure(reason) -> tuple[str, str]:
    """``(category, reason text)`` for a ``twisted.python.failure.Failure`` or an exception."""
    error = getattr(reason, "value", reason)
    if not isinstance(error, BaseException):
        return HANDSHAKE, str(error)
    return categorize_error(error), describe_error(error)


def format_peer(address) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
