"""LazyDeadline: moving a deadline costs no timer operation; it fires once, at the latest time set."""

from __future__ import annotations

from twisted.internet.task import Clock

from rpxy.deadline import LazyDeadline


def make() -> tuple[LazyDeadline, Clock, list[float]]:
    clock = Clock()
    fired: list[float] = []
    return LazyDeadline(clock, lambda: fired.append(clock.seconds())), clock, fired


def test_fires_at_the_deadline() -> None:
    deadline, clock, fired = make()
    deadline.set_after(5)
    clock.advance(4.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [5.0]
    assert deadline.when is None and not clock.getDelayedCalls()


def test_moving_it_later_keeps_one_timer_and_fires_at_the_new_time() -> None:
    deadline, clock, fired = make()
    deadline.set_after(5)
    for _ in range(100):
        clock.advance(0.01)
        deadline.set_after(5)  # e.g. a keep-alive request per 10 ms
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.999)  # now 5.999: the first timer fired at 5 and re-armed for 6
    assert fired == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.002)
    assert len(fired) == 1


def test_clear_means_never_and_cancel_drops_the_timer() -> None:
    deadline, clock, fired = make()
    deadline.set_after(1)
    deadline.clear()
    clock.advance(2)
    assert fired == []
    deadline.set_after(1)
    deadline.cancel()
    assert not clock.getDelayedCalls()
    clock.advance(5)
    assert fired == []
