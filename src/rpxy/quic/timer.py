"""The one timer of a QUIC connection, following the stack's ``get_timer()``.

QUIC deadlines move both ways (an ACK delay of 25 ms arrives while a 10 s idle timer
is armed), so :class:`~rpxy.deadline.LazyDeadline` (later only) is not enough. One
delayed call per connection: a later deadline is picked up lazily when the call fires
early; an earlier one moves the call (``reset``).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["ConnectionTimer"]


class ConnectionTimer:
    __slots__ = ("reactor", "on_expire", "when", "call", "armed_for")

    def __init__(self, reactor: IReactorTime, on_expire: Callable[[], None]) -> None:
        self.reactor = reactor
        self.on_expire = on_expire
        self.when: float | None = None
        self.call: IDelayedCall | None = None
        self.armed_for: float | None = None

    def set(self, when: float | None) -> None:
        """Fire at ``when`` (reactor seconds), or never with None."""
        self.when = when
        if when is None:
            return
        call = self.call
        delay = max(0.0, when - self.reactor.seconds())
        if call is None:
            self.call = self.reactor.callLater(delay, self._fire)
            self.armed_for = when
        elif self.armed_for is not None and when < self.armed_for:
            call.reset(delay)
            self.armed_for = when

    def cancel(self) -> None:
        self.when = None
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self.call = None
        self.armed_for = None
        when = self.when
        if when is None:
            return
        now = self.reactor.seconds()
        if now < when:
            self.call = self.reactor.callLater(when - now, self._fire)
            self.armed_for = when
            return
        self.when = None
        self.on_expire()
