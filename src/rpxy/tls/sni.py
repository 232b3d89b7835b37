"""Server name -> app TLS context, for one TLS listener.

:class:`SniContextMap` holds one :class:`~rpxy.tls.contexts.AppTls` per app with
TLS. Lookups take the SNI as sent (bytes or str): case-insensitive, a trailing
dot ignored; an exact ``server_name`` wins over a ``*.example.com`` wildcard, which
matches exactly one extra label (``a.example.com``, never ``example.com`` or
``a.b.example.com``).

The map is replaced as a whole on a config reload; between reloads
:class:`~rpxy.tls.reload.CertificateWatcher` swaps single entries with
:meth:`SniContextMap.replace` when certificate files change. Handshakes read the
entry current when their ClientHello arrives.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator

from OpenSSL import SSL

from rpxy.tls import connections
from rpxy.tls.contexts import AppTls, TlsOptions, build_app_tls, harden, refusal_context
from rpxy.tls.failures import NO_SNI, UNKNOWN_SNI
from rpxy.tls.keys import TlsMaterialError
from rpxy.tls.names import normalize_server_name

__all__ = ["SniContextMap"]

_VERIFY_CLIENT = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE


class SniContextMap:
    """The TLS contexts of one listener, looked up by SNI."""

    def __init__(self, entries: Iterable[AppTls] = (), *, options: TlsOptions = TlsOptions()) -> None:
        self.options = options
        self._by_app: dict[str, AppTls] = {}
        self._exact: dict[str, AppTls] = {}
        self._wildcard: dict[str, AppTls] = {}  # key: the suffix after "*."
        self._dispatch: SSL.Context | None = None
        for entry in entries:
            self.add(entry)

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_apps(cls, apps: Iterable, options: TlsOptions = TlsOptions()) -> SniContextMap:
        """Build every app's context (apps without cert paths, e.g. ACME-only, are skipped).

        Raises :class:`~rpxy.tls.keys.TlsMaterialError` listing the problems of every
        app (``error.describe()`` gives one ``apps.<app>.tls.<key>: "<file>": ...`` line each).
        """
        built: list[AppTls] = []
        problems = []
        for app in apps:
            try:
                entry = build_app_tls(app, options)
            except TlsMaterialError as exc:
                problems.append(exc)
                continue
            if entry is not None:
                built.append(entry)
        if problems:
            raise TlsMaterialError([p for exc in problems for p in exc.problems])
        return cls(built, options=options)

    def add(self, entry: AppTls) -> None:
        if entry.app_name in self._by_app:
            raise ValueError(f"app {entry.app_name!r} already has a TLS context")
        table, key = self._slot(entry.server_name)
        if key in table:
            raise ValueError(f"duplicate TLS server name {entry.server_name!r}")
        table[key] = entry
        self._by_app[entry.app_name] = entry

    def replace(self, entry: AppTls) -> AppTls | None:
        """Swap the entry of ``entry.app_name`` (added if absent); returns the old one.

        New handshakes use the new context at once; established connections keep theirs.
        """
        old = self._by_app.get(entry.app_name)
        if old is not None:
            table, key = self._slot(old.server_name)
            if table.get(key) is old:
                del table[key]
            del self._by_app[entry.app_name]
        self.add(entry)
        return old

    def remove(self, app_name: str) -> AppTls | None:
        old = self._by_app.pop(app_name, None)
        if old is not None:
            table, key = self._slot(old.server_name)
            if table.get(key) is old:
                del table[key]
        return old

    def _slot(self, server_name: str) -> tuple[dict[str, AppTls], str]:
        name = server_name.lower()
        if name.startswith("*."):
            suffix = name[2:]
            if not suffix or "*" in suffix:
                raise ValueError(f"invalid wildcard server name {server_name!r}")
            return self._wildcard, suffix
        if "*" in name:
            raise ValueError(f"invalid server name {server_name!r}")
        return self._exact, name

    # -- lookup -------------------------------------------------------------------

    def lookup(self, sni: bytes | str | None) -> AppTls | None:
        """The entry for a server name as sent by a client, or None."""
        name = normalize_server_name(sni)
        if name is None:
            return None
        return self.lookup_normalized(name)

    def lookup_normalized(self, name: str) -> AppTls | None:
        entry = self._exact.get(name)
        if entry is not None or not self._wildcard:
            return entry
        first, dot, rest = name.partition(".")
        if not dot or not first:
            return None
        return self._wildcard.get(rest)

    def get(self, app_name: str) -> AppTls | None:
        return self._by_app.get(app_name)

    def __iter__(self) -> Iterator[AppTls]:
        return iter(list(self._by_app.values()))

    def __len__(self) -> int:
        return len(self._by_app)

    def __contains__(self, app_name: object) -> bool:
        return app_name in self._by_app

    # -- the SNI-callback ("dispatch") context ------------------------------------

    @property
    def dispatch_context(self) -> SSL.Context:
        """A certificate-less context whose servername callback switches to the app's context.

        Only for connections created before the SNI is known (plain
        ``TLSMemoryBIOFactory`` with :class:`~rpxy.tls.server.SniConnectionCreator`).
        OpenSSL keeps this context as the connection's session context, so session
        resumption would be shared by every app: it is therefore disabled here (no
        tickets, no cache). Unknown or missing SNI leaves the connection on this
        context, which has no certificate, so the handshake fails.
        """
        if self._dispatch is None:
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            harden(context, self.options)
            context.set_options(SSL.OP_NO_TICKET)
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            context.set_session_id(b"rpxy-tls-dispatch")
            ref = weakref.ref(self)

            def on_servername(connection: SSL.Connection) -> None:
                contexts = ref()
                if contexts is not None:
                    contexts._switch(connection)
                else:  # pragma: no cover - map gone while a handshake runs
                    connection.set_context(refusal_context())

            context.set_tlsext_servername_callback(on_servername)
            self._dispatch = context
        return self._dispatch

    def _switch(self, connection: SSL.Connection) -> None:
        state = connections.connection_state(connection)
        if state is None:
            state = connections.attach(connection, connections.ConnectionTls())
        raw = connection.get_servername()
        state.raw_sni = raw
        state.sni = normalize_server_name(raw)
        entry = self.lookup_normalized(state.sni) if state.sni is not None else None
        if entry is None:
            state.failure_category = NO_SNI if raw is None else UNKNOWN_SNI
            return  # stays on the certificate-less dispatch context: the handshake fails
        state.entry = entry
        connection.set_context(entry.context)
        if entry.client_auth:
            # SSL_set_SSL_CTX does not copy the verify mode; the trust store and the
            # client CA list do come from the new context.
            connection.set_verify(_VERIFY_CLIENT)
