"""Key exchange groups: X25519MLKEM768 first, then X25519, P-256, P-384.

pyOpenSSL has no groups API, but the OpenSSL 3.5+/4.x that ``cryptography`` bundles
is reachable through the cffi ``lib`` that pyOpenSSL itself uses, and that ``lib``
exports ``SSL_CTX_set1_curves_list`` / ``SSL_set1_curves_list``: in OpenSSL these
are the old names (macros over ``SSL_CTRL_SET_GROUPS_LIST``) of
``SSL_CTX_set1_groups_list`` and take the same group-list syntax, including
hybrid ML-KEM groups and the 3.5 tuple separator ``/``.

The list is :data:`GROUPS` = ``"X25519MLKEM768/X25519:P-256:P-384"``:

* ``X25519MLKEM768`` is its own first tuple, so it is *strictly* preferred: a
  client that supports it but sent only an X25519 key share is asked for an
  ML-KEM share (HelloRetryRequest) instead of silently getting classical crypto.
* ``X25519:P-256:P-384`` is one tuple in that order: among classical groups a
  key share the client already sent is used, without an extra round trip.
* Nothing else is accepted (no P-521, X448, FFDHE), as in Mozilla "intermediate".

TLS 1.2 has no ML-KEM; it negotiates X25519, P-256 or P-384 from the same list.
"""

from __future__ import annotations

from OpenSSL import SSL

__all__ = [
    "CLASSICAL_GROUPS",
    "GROUPS",
    "GroupsUnavailable",
    "PQ_GROUP",
    "negotiated_group",
    "set_connection_groups",
    "set_context_groups",
]

PQ_GROUP = "X25519MLKEM768"
# Preference order as documented above.
GROUPS = "X25519MLKEM768/X25519:P-256:P-384"
# Used only if the linked OpenSSL lacks ML-KEM (then a warning is logged by the caller).
CLASSICAL_GROUPS = "X25519:P-256:P-384"


class GroupsUnavailable(RuntimeError):
    """The OpenSSL bindings do not expose a way to set the group list."""


def _lib():
    try:
        from OpenSSL._util import lib
    except ImportError as exc:  # pragma: no cover - pyOpenSSL internals moved
        raise GroupsUnavailable(f"pyOpenSSL's OpenSSL bindings are not importable: {exc}") from None
    return lib


def _set(setter_name: str, handle, groups: str) -> None:
    lib = _lib()
    setter = getattr(lib, setter_name, None)
    if setter is None:
        raise GroupsUnavailable(f"the OpenSSL bindings lack {setter_name} (cryptography too old?)")
    if setter(handle, groups.encode("ascii")) != 1:
        # Clear OpenSSL's error queue so a later pyOpenSSL call does not report it.
        try:
            lib.ERR_clear_error()
        except AttributeError:  # pragma: no cover
            pass
        raise ValueError(f"OpenSSL rejected the group list {groups!r}")


def set_context_groups(context: SSL.Context, groups: str = GROUPS, *, fallback: str | None = CLASSICAL_GROUPS) -> str:
    """Set the supported groups of ``context``; return the list actually set.

    When OpenSSL rejects ``groups`` (an OpenSSL without ML-KEM) and ``fallback``
    is given, ``fallback`` is set instead and returned, so the caller can warn.
    Raises :class:`GroupsUnavailable` when the bindings have no setter at all.
    """
    handle = getattr(context, "_context", None)
    if handle is None:  # pragma: no cover - pyOpenSSL internals changed
        raise GroupsUnavailable("pyOpenSSL Context has no _context handle")
    try:
        _set("SSL_CTX_set1_curves_list", handle, groups)
        return groups
    except ValueError:
        if fallback is None:
            raise
        _set("SSL_CTX_set1_curves_list", handle, fallback)
        return fallback


def set_connection_groups(connection: SSL.Connection, groups: str) -> None:
    """Set the groups of one connection (tests use it to build restricted clients)."""
    handle = getattr(connection, "_ssl", None)
    if handle is None:  # pragma: no cover
        raise GroupsUnavailable("pyOpenSSL Connection has no _ssl handle")
    _set("SSL_set1_curves_list", handle, groups)


def negotiated_group(connection: SSL.Connection) -> str | None:
    """The key exchange group of an established connection (``"X25519MLKEM768"``...)."""
    try:
        return connection.get_group_name()
    except (AttributeError, NotImplementedError):  # pragma: no cover - old pyOpenSSL
        return None
