"""Upstream connections that tell the upstream who the client is (PROXY protocol, sent).

With ``upstream_options = ["send_proxy_protocol_v1"]`` (or ``_v2``) each upstream connection
starts with a PROXY header naming the client connection it serves. Such a connection can
then only ever carry that client's requests, so instead of one shared pool per upstream
there is one small pool per client connection (``(client ip, port, local ip, port)``), each
an ordinary :class:`UpstreamPool` / :class:`H2UpstreamPool` whose connects write the header
first. A keep-alive client thus keeps reusing its own upstream connection; pools of clients
that went quiet are closed by a sweep, and the number of clients tracked is bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

from rpxy.message import ConnectionInfo
from rpxy.proxy_protocol import encode_v1, encode_v2

__all__ = ["ClientBoundPools", "proxy_header_for"]

P = TypeVar("P")

#: Clients tracked at once per upstream; beyond it the least recently used is closed.
MAX_CLIENTS = 4096


def proxy_header_for(conn: ConnectionInfo, version: int) -> bytes:
    """The PROXY header describing ``conn`` (its client, and the local end it reached)."""
    source = (conn.peer_ip, conn.peer_port)
    local = conn.local_ip
    if not local or (":" in local) != (":" in conn.peer_ip):
        # Unknown, or another family than the client's (a PROXY-carried IPv6 client on an
        # IPv4 listener): the header needs one family, so the local address is left unspecified.
        local = "::" if ":" in conn.peer_ip else "0.0.0.0"
    destination = (local, conn.local_port)
    return encode_v1(source, destination) if version == 1 else encode_v2(source, destination)


class ClientBoundPools(Generic[P]):
    """One pool per client connection, made on demand by ``make_pool(preamble)``."""

    def __init__(
        self,
        make_pool: Callable[[bytes], P],
        version: int,
        reactor: IReactorTime,
        *,
        idle_timeout: float = 15.0,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.make_pool = make_pool
        self.version = version
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        #: client key -> (pool, last use); oldest first.
        self._pools: OrderedDict[tuple, tuple[P, float]] = OrderedDict()
        self._sweeper = None
        self._closed = False

    def for_client(self, conn: ConnectionInfo) -> P:
        """The pool whose connections announce ``conn``."""
        key = (conn.peer_ip, conn.peer_port, conn.local_ip, conn.local_port)
        now = self.reactor.seconds()
        entry = self._pools.pop(key, None)
        if entry is None:
            pool = self.make_pool(proxy_header_for(conn, self.version))
            if self._closed:
                pool.close()  # type: ignore[attr-defined]
            while len(self._pools) >= self.max_clients:
                _key, (oldest, _used) = self._pools.popitem(last=False)
                oldest.close()  # type: ignore[attr-defined]
        else:
            pool = entry[0]
        self._pools[key] = (pool, now)
        if self._sweeper is None and not self._closed:
            self._sweeper = self.reactor.callLater(self.idle_timeout, self._sweep)
        return pool

    def _sweep(self) -> None:
        """Close the pools of clients not seen for two idle timeouts (their connections have expired)."""
        self._sweeper = None
        deadline = self.reactor.seconds() - 2 * self.idle_timeout
        for key in [key for key, (_pool, used) in self._pools.items() if used < deadline]:
            pool, _used = self._pools.pop(key)
            pool.close()  # type: ignore[attr-defined]
        if self._pools and not self._closed:
            self._sweeper = self.reactor.callLater(self.idle_timeout, self._sweep)

    @property
    def client_count(self) -> int:
        return len(self._pools)

    def close(self) -> None:
        """Close every client's pool (idle connections now, busy ones after their exchange)."""
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        while self._pools:
            _key, (pool, _used) = self._pools.popitem()
            pool.close()  # type: ignore[attr-defined]
