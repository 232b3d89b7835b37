"""An epoll reactor that dispatches I/O events without a legacy log context per event.

Twisted's ``EPollReactor.doPoll`` wraps every read/write event in
``twisted.python.log.callWithLogger`` (four Python frames and a context-dict push per
event) only to give legacy ``log.msg`` calls a per-connection prefix, which rpxy never
uses. Dispatching directly is a measurable share of a proxied request's CPU time. The
``rpxy`` command installs this reactor; under ``twistd`` the operator's reactor choice stands.
"""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class DirectEPollReactor(EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("unhandled error dispatching an I/O event")

    doIteration = doPoll


def install() -> DirectEPollReactor:
    """Install the reactor (must run before anything imports ``twisted.internet.reactor``)."""
    from twisted.internet.main import installReactor

    reactor = DirectEPollReactor()
    installReactor(reactor)
    return reactor
