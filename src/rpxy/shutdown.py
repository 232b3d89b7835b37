"""Graceful shutdown: stop accepting, let requests in flight finish, then stop.

On SIGTERM (and SIGINT) the entry points stop the reactor; the reactor's "before
shutdown" trigger calls ``RpxyService.stopService``, whose Deferred the reactor waits
for. That method closes the proxy's listeners and hands the open client connections to
a :class:`Drainer`: an idle keep-alive connection closes at once, an HTTP/1.1 connection
with a request in flight answers it (``Connection: close``) and closes, an HTTP/2
connection gets GOAWAY(NO_ERROR) and closes after its last stream. Whatever is still
open at ``graceful_shutdown_timeout`` is aborted. Then the rest of the service stops.

Why a signal handler of our own (:func:`install_shutdown_signals`): Twisted's handler
records the signal, and ``twist``/``twistd`` re-raise it once the reactor stopped, so a
clean stop ends with exit status -15. A graceful stop is a success: ours stops the
reactor without recording the signal, so every entry point exits 0. A second signal
during the drain cuts the remaining connections at once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

#: Seconds between checks of whether the last connection closed (only while draining).
POLL_INTERVAL = 0.05
#: After aborting what was left, how long the aborted connections get to report their end.
ABORT_GRACE = 5.0


class Drainable(Protocol):
    """What a drained factory offers (``rpxy.front.h1.H1Factory``)."""

    connections: Any

    def drain(self) -> None: ...


class Drainer:
    """Drains the client connections of some factories, within a deadline.

    ``reactor``: ``IReactorTime``; ``factories``: called once when the drain starts.
    """

    def __init__(self, reactor: Any, factories: Callable[[], Iterable[Drainable]]) -> None:
        self.reactor = reactor
        self.factories = factories
        self.started: float | None = None
        self._drained: list[Drainable] = []
        self._waiting: defer.Deferred | None = None
        self._poll_call: Any = None
        self._deadline_call: Any = None
        self._give_up_at: float | None = None

    @property
    def active(self) -> bool:
        return self._waiting is not None

    def open_connections(self) -> int:
        return sum(len(factory.connections) for factory in self._drained)

    def drain(self, timeout: float) -> defer.Deferred:
        """Ask every connection to finish; fires (with None) once none is left, or after
        ``timeout`` seconds with the rest aborted."""
        if self._waiting is not None:
            return follow(self._waiting)
        self.started = self.reactor.seconds()
        self._drained = list(self.factories())
        for factory in self._drained:
            factory.drain()
        waiting = self._waiting = defer.Deferred()
        left = self.open_connections()
        if left:
            log.info(
                "shutting down: listeners closed; waiting up to {timeout:g} s for {count} connection(s) to finish",
                timeout=timeout,
                count=left,
            )
            self._deadline_call = self.reactor.callLater(timeout, self.force, "deadline passed")
        self._poll()  # (fires ``waiting`` at once when nothing is open)
        return follow(waiting)

    def force(self, why: str = "forced") -> None:
        """Abort every connection still open now (the deadline, or a second signal)."""
        self._cancel_deadline()
        left = [connection for factory in self._drained for connection in list(factory.connections)]
        if left:
            log.warn("shutting down: {why}; aborting {count} connection(s) still open", why=why, count=len(left))
        for connection in left:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abortConnection()
        if self._give_up_at is None:
            self._give_up_at = self.reactor.seconds() + ABORT_GRACE
        self._poll()

    def _poll(self) -> None:
        call, self._poll_call = self._poll_call, None
        if call is not None and call.active():
            call.cancel()
        waiting = self._waiting
        if waiting is None:
            return
        left = self.open_connections()
        if left:
            give_up = self._give_up_at
            if give_up is None or self.reactor.seconds() < give_up:
                self._poll_call = self.reactor.callLater(POLL_INTERVAL, self._poll)
                return
            log.warn("shutting down: {count} aborted connection(s) did not report their end; stopping anyway",
                     count=left)
        self._cancel_deadline()
        elapsed = self.reactor.seconds() - (self.started or 0.0)
        log.info("shutting down: connections drained in {elapsed:.1f} s", elapsed=elapsed)
        self._waiting = None
        waiting.callback(None)

    def _cancel_deadline(self) -> None:
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()


def follow(deferred: defer.Deferred | None) -> defer.Deferred:
    """A new Deferred firing (with None) when ``deferred`` fires (at once for None), leaving
    ``deferred``'s own result alone: several callers can wait for one shutdown."""
    if deferred is None:
        return defer.succeed(None)
    follower: defer.Deferred = defer.Deferred()

    def fire(result: object) -> object:
        follower.callback(None)
        return result

    deferred.addBoth(fire)
    return follower


#: ids of the reactors a stop signal has stopped (the second signal forces).
_stopping: set[int] = set()


def install_shutdown_signals(reactor: Any, force: Callable[[], object]) -> list[int]:
    """SIGTERM and SIGINT stop the reactor gracefully (exit status 0); a second one calls
    ``force`` (abort what is still in flight). Entry points only (``rpxy``, the twistd
    plugin): before the reactor runs (a signal while starting) and again with
    ``callWhenRunning`` (the reactor installs its own handlers as it starts).

    Installing it again (once the reactor replaced it with its own) keeps what the first
    one knew: the stop count is per reactor. Returns the signals handled.
    """

    def stop() -> None:
        if id(reactor) in _stopping:
            log.warn("second stop signal: not waiting for requests in flight")
            force()
            return
        _stopping.add(id(reactor))
        log.info("stop signal received: graceful shutdown")
        if getattr(reactor, "running", True):
            reactor.stop()

    def handler(_signum: int, _frame: object) -> None:
        reactor.callFromThread(stop)

    installed = []
    for name in ("SIGTERM", "SIGINT"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, handler)
            installed.append(number)
    return installed
