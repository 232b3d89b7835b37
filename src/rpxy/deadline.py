"""A deadline that moves by attribute write: the project's one timer pattern.

Connections keep deadlines (header read, idle keep-alive, upstream response) that move on
every request. Cancelling and re-creating a ``callLater`` each time is a heap operation
per request; instead one delayed call per deadline is armed, and when it fires early
(the deadline moved later meanwhile) it re-arms itself for the remaining time.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Slow readers (beyond rpxy): a client whose transport has taken none of our writes for
#: this long in a row (its buffers stayed full) is disconnected, on HTTP/1.1 and HTTP/2.
SEND_STALL_TIMEOUT = 20.0


class LazyDeadline:
    __slots__ = ("reactor", "on_expire", "when", "call")

    def __init__(self, reactor: IReactorTime, on_expire: Callable[[], None]) -> None:
        self.reactor = reactor
        self.on_expire = on_expire
        self.when: float | None = None
        self.call: IDelayedCall | None = None

    def set(self, when: float | None) -> None:
        """Expire at ``when`` (reactor seconds), or never with None."""
        self.when = when
        if when is not None and self.call is None:
            self.call = self.reactor.callLater(max(0.0, when - self.reactor.seconds()), self._fire)

    def set_after(self, seconds: float) -> None:
        self.set(self.reactor.seconds() + seconds)

    def clear(self) -> None:
        self.when = None

    def cancel(self) -> None:
        """Clear and drop the timer (the owner is going away)."""
        self.when = None
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self.call = None
        when = self.when
        if when is None:
            return
        now = self.reactor.seconds()
        if now < when:
            self.call = self.reactor.callLater(when - now, self._fire)
            return
        self.when = None
        self.on_expire()
