"""Active health checks of a route's upstreams.

:class:`HealthState` is sans-IO: it counts consecutive outcomes and flips a
``healthy`` flag at the configured thresholds. Load balancers read ``.healthy``;
only the :class:`HealthChecker` (or a passive observer in the pipeline) writes it.

:class:`HealthChecker` is the one Twisted-driven part. It receives the reactor
(``IReactorTime`` + ``IReactorTCP`` + ``IReactorSSL``) as a parameter and never
imports the global one, so tests run it on ``MemoryReactorClock``.

Checks:

* ``tcp``: the TCP connect succeeds within ``timeout`` (plain TCP, also for
  ``tls = true`` upstreams: a TCP check is a TCP check).
* ``http``: ``GET <path> HTTP/1.1`` (over TLS for ``tls = true`` upstreams) and the
  first final status line's code equals ``expected_status`` within ``timeout``.

Per upstream the next check is scheduled only once the previous one finished, at
``start + interval`` (never overlapping: ``timeout < interval`` is validated by the
config loader; if it were not, the next check simply starts right away).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.interfaces import IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rpxy.config.model import HealthCheckConfig, UpstreamConfig

__all__ = ["HealthChecker", "HealthState", "make_states"]

#: Delay of the first check after ``startService`` (seconds).
FIRST_CHECK_DELAY = 0.0
#: Bytes we are willing to buffer while looking for the status line / end of a 1xx head.
_MAX_HEAD = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?:[ \t][^\r\n]*)?\r?$")


class HealthState:
    """Health of one upstream: starts healthy, flips after N consecutive opposite outcomes."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "healthy",
        "healthy_threshold",
        "unhealthy_threshold",
    )

    def __init__(self, *, unhealthy_threshold: int = 3, healthy_threshold: int = 2) -> None:
        if unhealthy_threshold < 1 or healthy_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        self.healthy = True
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.consecutive_failures = 0
        self.consecutive_successes = 0

    @classmethod
    def from_config(cls, config: HealthCheckConfig) -> HealthState:
        return cls(
            unhealthy_threshold=config.unhealthy_threshold,
            healthy_threshold=config.healthy_threshold,
        )

    def record(self, success: bool) -> bool:
        """Count one check outcome; True iff ``healthy`` changed."""
        if success:
            self.consecutive_failures = 0
            self.consecutive_successes += 1
            if not self.healthy and self.consecutive_successes >= self.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.consecutive_successes = 0
            self.consecutive_failures += 1
            if self.healthy and self.consecutive_failures >= self.unhealthy_threshold:
                self.healthy = False
                return True
        return False

    def __repr__(self) -> str:
        return (
            f"HealthState(healthy={self.healthy}, failures={self.consecutive_failures}, "
            f"successes={self.consecutive_successes})"
        )


def make_states(config: HealthCheckConfig | None, count: int) -> list[HealthState]:
    """``count`` fresh states with ``config``'s thresholds (defaults when None)."""
    if config is None:
        return [HealthState() for _ in range(count)]
    return [HealthState.from_config(config) for _ in range(count)]


def _pem_blocks(data: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    blocks = []
    pos = 0
    while (start := data.find(begin, pos)) != -1:
        stop = data.find(end, start)
        if stop == -1:
            break
        pos = stop + len(end)
        blocks.append(data[start:pos] + b"\n")
    return blocks


def tls_options_for(upstream: UpstreamConfig) -> Any:
    """``optionsForClientTLS`` for ``upstream``: system trust store, or its ``ca_cert_path``."""
    if upstream.ca_cert_path is None:
        return ssl.optionsForClientTLS(upstream.host)
    with open(upstream.ca_cert_path, "rb") as f:
        blocks = _pem_blocks(f.read())
    if not blocks:
        raise ValueError(f"no PEM certificate in {upstream.ca_cert_path}")
    certs = [ssl.Certificate.loadPEM(block) for block in blocks]
    trust = ssl.trustRootFromCertificates(certs)
    return ssl.optionsForClientTLS(upstream.host, trustRoot=trust)


class _Attempt:
    """One in-flight check of one upstream; finishes exactly once."""

    __slots__ = ("checker", "connector", "done", "index", "started", "timer", "transport")

    def __init__(self, checker: HealthChecker, index: int, started: float) -> None:
        self.checker = checker
        self.index = index
        self.started = started
        self.done = False
        self.timer: IDelayedCall | None = None
        self.connector: IConnector | None = None
        self.transport: Any = None

    def finish(self, success: bool, reason: str) -> None:
        if self.done:
            return
        self._close()
        self.checker._attemptFinished(self, success, reason)

    def cancel(self) -> None:
        """Abandon without recording an outcome (service stopping)."""
        if not self.done:
            self._close()

    def _close(self) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.transport is not None:
            self.transport.abortConnection()
            self.transport = None
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:  # already connected (or gone): drop it whatever its state
                self.connector.disconnect()
        self.connector = None

    def timedOut(self) -> None:
        self.timer = None
        self.finish(False, f"timed out after {self.checker.config.timeout}s")


class _TcpProbe(Protocol):
    def __init__(self, attempt: _Attempt, preamble: bytes = b"") -> None:
        self.attempt = attempt
        self.preamble = preamble

    def connectionMade(self) -> None:
        # Connected: that is the whole check. finish() aborts the transport.
        self.attempt.transport = self.transport
        if self.preamble:
            self.transport.write(self.preamble)
        self.attempt.finish(True, "connected")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.attempt.finish(False, "connection lost")


class _HttpProbe(Protocol):
    """Sends one GET and judges the first final status line."""

    def __init__(self, attempt: _Attempt, request: bytes, expected_status: int) -> None:
        self.attempt = attempt
        self.request = request
        self.expected = expected_status
        self.buffer = b""

    def connectionMade(self) -> None:
        self.attempt.transport = self.transport
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.attempt.done:
            return
        self.buffer += data
        while not self.attempt.done:
            eol = self.buffer.find(b"\n")
            if eol == -1:
                if len(self.buffer) > _MAX_HEAD:
                    self.attempt.finish(False, "no status line")
                return
            match = _STATUS_LINE.fullmatch(self.buffer[:eol])
            if match is None:
                self.attempt.finish(False, f"malformed status line {self.buffer[:eol][:80]!r}")
                return
            status = int(match.group(1))
            if 100 <= status < 200 and status != 101 and status != self.expected:
                # Interim response (100 Continue, 103 Early Hints): skip its head.
                end = self.buffer.find(b"\r\n\r\n")
                if end == -1:
                    if len(self.buffer) > _MAX_HEAD:
                        self.attempt.finish(False, "interim response head too long")
                    return
                self.buffer = self.buffer[end + 4 :]
                continue
            if status == self.expected:
                self.attempt.finish(True, f"status {status}")
            else:
                self.attempt.finish(False, f"status {status}, expected {self.expected}")
            return

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.attempt.done:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.attempt.finish(False, f"connection lost before a status line ({why})")


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(self, attempt: _Attempt, make_protocol: Any) -> None:
        self.attempt = attempt
        self.make_protocol = make_protocol

    def startedConnecting(self, connector: IConnector) -> None:
        self.attempt.connector = connector

    def buildProtocol(self, addr: Any) -> Protocol:
        proto = self.make_protocol(self.attempt)
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.attempt.finish(False, f"connect failed: {reason.getErrorMessage()}")

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        pass


class HealthChecker(Service):
    """Checks every upstream of one route periodically and updates their states."""

    log = Logger()

    def __init__(
        self,
        upstreams: Sequence[UpstreamConfig],
        config: HealthCheckConfig,
        states: Sequence[HealthState],
        reactor: Any,
        *,
        log: Logger | None = None,
        preamble: bytes = b"",
    ) -> None:
        if len(upstreams) != len(states):
            raise ValueError("one HealthState per upstream")
        if config.type == "http" and not config.path:
            raise ValueError("http health check needs a path")
        self.upstreams = tuple(upstreams)
        self.config = config
        self.states = tuple(states)
        self.reactor = reactor
        if log is not None:
            self.log = log
        self._calls: dict[int, IDelayedCall] = {}
        self._attempts: dict[int, _Attempt] = {}
        self._tls_options: dict[int, Any] = {}
        #: Sent first on cleartext checks of upstreams that require a PROXY header
        #: (send_proxy_protocol_v1/v2): "PROXY UNKNOWN" / a v2 LOCAL header, as for any
        #: connection of the proxy's own.
        self.preamble = preamble
        self._requests: list[bytes] = [
            (
                f"GET {config.path} HTTP/1.1\r\nHost: {u.location}\r\n"
                "Connection: close\r\nUser-Agent: rpxy-health-check\r\nAccept: */*\r\n\r\n"
            ).encode("ascii")
            if config.type == "http"
            else b""
            for u in self.upstreams
        ]

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for index in range(len(self.upstreams)):
            self._schedule(index, FIRST_CHECK_DELAY)

    def stopService(self) -> Any:
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        attempts = list(self._attempts.values())
        self._attempts.clear()
        for attempt in attempts:
            attempt.cancel()
        return super().stopService()

    # -- scheduling ------------------------------------------------------------

    def _schedule(self, index: int, delay: float) -> None:
        self._calls[index] = self.reactor.callLater(delay, self._check, index)

    def _check(self, index: int) -> None:
        self._calls.pop(index, None)
        if not self.running or index in self._attempts:
            return
        attempt = _Attempt(self, index, self.reactor.seconds())
        self._attempts[index] = attempt
        attempt.timer = self.reactor.callLater(self.config.timeout, attempt.timedOut)
        upstream = self.upstreams[index]
        try:
            if self.config.type == "http":
                request = self._requests[index]
                if not upstream.tls:
                    request = self.preamble + request
                expected = self.config.expected_status
                factory = _ProbeFactory(attempt, lambda a: _HttpProbe(a, request, expected))
                if upstream.tls:
                    options = self._tls_options.get(index)
                    if options is None:
                        options = self._tls_options[index] = tls_options_for(upstream)
                    self.reactor.connectSSL(
                        upstream.host, upstream.port, factory, options, timeout=self.config.timeout
                    )
                    return
            else:
                preamble = self.preamble
                factory = _ProbeFactory(attempt, lambda a: _TcpProbe(a, preamble))
            self.reactor.connectTCP(
                upstream.host, upstream.port, factory, timeout=self.config.timeout
            )
        except Exception as exc:  # bad CA file, unresolvable literal, ...
            attempt.finish(False, f"cannot start check: {exc}")

    def _attemptFinished(self, attempt: _Attempt, success: bool, reason: str) -> None:
        if self._attempts.get(attempt.index) is not attempt:
            return  # cancelled by stopService
        del self._attempts[attempt.index]
        upstream = self.upstreams[attempt.index]
        state = self.states[attempt.index]
        if state.record(success):
            if state.healthy:
                self.log.info(
                    "upstream {location} is healthy again ({reason})",
                    location=upstream.location,
                    uri=upstream.uri,
                    reason=reason,
                )
            else:
                self.log.warn(
                    "upstream {location} is unhealthy after {failures} failed checks ({reason})",
                    location=upstream.location,
                    uri=upstream.uri,
                    failures=state.consecutive_failures,
                    reason=reason,
                )
        elif not success:
            self.log.debug(
                "health check of {location} failed: {reason}",
                location=upstream.location,
                reason=reason,
            )
        if self.running:
            elapsed = self.reactor.seconds() - attempt.started
            self._schedule(attempt.index, max(0.0, self.config.interval - elapsed))
