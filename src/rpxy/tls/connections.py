"""What the TLS layer knows about one connection, for the application layer.

A record is attached to each server ``OpenSSL.SSL.Connection`` when it is created
(or when the SNI callback picks its app) and read back through the Twisted TLS
transport with :func:`tls_info` / :func:`connection_sni`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import attrs
from OpenSSL import SSL

from rpxy.tls.names import normalize_server_name

if TYPE_CHECKING:
    from rpxy.tls.contexts import AppTls

__all__ = ["ConnectionTls", "TlsInfo", "connection_sni", "connection_state", "tls_info"]


@attrs.define(eq=False, slots=True)
class ConnectionTls:
    """Mutable per-connection TLS facts, owned by this package."""

    sni: str | None = None  # normalised SNI this ClientHello asked for
    raw_sni: bytes | None = None
    entry: AppTls | None = None  # the app whose context serves the connection
    failure_category: str | None = None  # set when the SNI callback refused the handshake


_STATES: weakref.WeakKeyDictionary[SSL.Connection, ConnectionTls] = weakref.WeakKeyDictionary()


def attach(connection: SSL.Connection, state: ConnectionTls) -> ConnectionTls:
    _STATES[connection] = state
    return state


def connection_state(connection: SSL.Connection | None) -> ConnectionTls | None:
    if connection is None:
        return None
    return _STATES.get(connection)


def _handle(transport) -> SSL.Connection | None:
    if isinstance(transport, SSL.Connection):
        return transport
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except Exception:
        return None
    return handle if isinstance(handle, SSL.Connection) else None


@attrs.frozen
class TlsInfo:
    """TLS facts of an established connection (see :func:`tls_info`)."""

    sni: str | None
    app_name: str | None
    server_name: str | None  # the app's configured name (may be ``*.example.com``)
    client_auth: bool  # the app requires client certificates
    version: str | None  # "TLSv1.3"
    cipher: str | None
    group: str | None  # "X25519MLKEM768"
    alpn: bytes | None
    client_certificate: object = None  # cryptography x509.Certificate when mTLS
    resumed: bool = False


def connection_sni(transport) -> str | None:
    """The normalised SNI the client sent on this connection (cheap; usable before the handshake ends).

    ``transport`` is the Twisted TLS transport (``TLSMemoryBIOProtocol``) the
    application protocol was given, or the ``OpenSSL.SSL.Connection`` itself.
    Prefer this to ``Connection.get_servername()``: on a resumed TLS 1.2 session
    OpenSSL reports the name of the *original* handshake.
    """
    connection = _handle(transport)
    state = _STATES.get(connection) if connection is not None else None
    if state is not None:
        return state.sni
    if connection is None:
        return None
    return normalize_server_name(connection.get_servername())


def tls_info(transport) -> TlsInfo | None:
    """Everything about an established TLS connection, or None when ``transport`` is not TLS."""
    connection = _handle(transport)
    if connection is None:
        return None
    state = _STATES.get(connection)
    entry = state.entry if state is not None else None
    try:
        alpn = connection.get_alpn_proto_negotiated() or None
    except (NotImplementedError, SSL.Error):  # pragma: no cover
        alpn = None
    try:
        group = connection.get_group_name()
    except Exception:  # pragma: no cover - old pyOpenSSL
        group = None
    peer = None
    if entry is not None and entry.client_auth:
        peer = connection.get_peer_certificate(as_cryptography=True)
    try:
        resumed = bool(connection.session_reused())  # type: ignore[attr-defined]
    except AttributeError:
        from OpenSSL._util import lib

        resumed = bool(lib.SSL_session_reused(connection._ssl))
    return TlsInfo(
        sni=state.sni if state is not None else None,
        app_name=entry.app_name if entry is not None else None,
        server_name=entry.server_name if entry is not None else None,
        client_auth=bool(entry is not None and entry.client_auth),
        version=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name(),
        group=group,
        alpn=alpn,
        client_certificate=peer,
        resumed=resumed,
    )
