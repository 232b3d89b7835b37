"""rpxy-style logs: ``access.log`` lines and the system log (``rpxy.log``).

The access log is on the hot path, so lines are formatted with plain string
operations and gathered in memory: written once a second (or once 64 KiB are waiting,
and at shutdown) instead of on every request, whatever the stream's own buffering
(stdout is unbuffered under ``PYTHONUNBUFFERED``, common in containers: a write
system call per request otherwise). The system log goes through ``twisted.logger``
like everything else in Twisted.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import IO, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

from rpxy.message import ConnectionInfo, RequestHead
from rpxy.policy.responses import reason

_FLUSH_INTERVAL = 1.0
#: Access-log text gathered before it is written without waiting for the timer.
_MAX_PENDING = 64 * 1024


def format_timestamp(when: float) -> str:
    """RFC 3339 UTC with microseconds, as rpxy writes it."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_ESCAPED = frozenset(b'"\\') | frozenset(range(0x20)) | frozenset(range(0x7F, 0x100))


def log_field(value: bytes) -> str:
    """A client-sent value for a quoted access-log field, escaped as nginx does (``\\xHH``).

    Without it a User-Agent holding ``", "`` could forge the fields after it; quotes,
    backslashes and non-printable or non-ASCII bytes become ``\\x22``, ``\\x5C``, ...
    """
    if _ESCAPED.isdisjoint(value):
        return value.decode("ascii")
    return "".join(f"\\x{byte:02X}" if byte in _ESCAPED else chr(byte) for byte in value)


def redact_query(path: str) -> str:
    """``/p?a=1&flag&&b=`` → ``/p?a=<redacted>&<redacted>&&b=<redacted>``, as rpxy does.

    Keys are kept; every value is hidden, and so is a bare segment (``?secret-token``
    is a value, not a key). Empty segments and an empty query stay as they are.
    """
    base, _sep, query = path.partition("?")
    if not query:
        return path
    parts = []
    for item in query.split("&"):
        if item:
            name, eq, _value = item.partition("=")
            item = f"{name}=<redacted>" if eq else "<redacted>"
        parts.append(item)
    return base + "?" + "&".join(parts)


class AccessLog:
    """Writes one rpxy access line per finished request."""

    def __init__(self, stream: IO[str], reactor: IReactorTime | None = None, *, redact: bool = False) -> None:
        self.stream = stream
        self.reactor = reactor
        self.redact = redact
        self._flush_call = None
        self._pending: list[str] = []
        self._pending_size = 0
        self._second = -1
        self._second_text = ""
        #: rpxy.metrics.Metrics when [experimental.metrics] is on: every finished request
        #: passes here, so this is where it is counted. None (one test per request) when off.
        self.metrics = None

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return "%s.%06dZ" % (self._second_text, int((now - second) * 1_000_000))

    def record(
        self,
        conn: ConnectionInfo,
        head: RequestHead,
        host: str,
        status: int,
        *,
        upstream: str,
        app: str = "",
        started: float | None = None,
    ) -> None:
        """One access line; ``app`` (the app's table name, "" when none was chosen) and
        ``started`` (the pipeline clock when it took the request) are for the metrics."""
        user_agent = xff = ""
        forwarded = None
        for name, value in head.headers:
            if name == b"user-agent":
                user_agent = log_field(value)
            elif name == b"x-forwarded-for":
                xff = log_field(value) if not xff else xff + ", " + log_field(value)
            elif name == b"forwarded":
                forwarded = log_field(value)
        path = head.path.decode("latin-1")
        if self.redact:
            path = redact_query(path)
        scheme = "https" if conn.tls else "http"
        # Like rpxy: without a host (a 400 for a missing Host) the target is the bare path.
        target = f"{scheme}://{host}{path.partition('?')[0]}" if host else path.partition("?")[0]
        version = "HTTP/" + head.version.decode("ascii")
        line = (
            f"{self._timestamp()} {host} <- {conn.peer_ip}:{conn.peer_port} -- "
            f"{head.method.decode('latin-1')} {path} {version} -- {status} {reason(status).decode('latin-1')} -- "
            f'{target} "{user_agent}", "{xff}"'
        )
        if forwarded is not None:
            line += f' "{forwarded}"'
        line += f' "{upstream}"\n'
        metrics = self.metrics
        if metrics is not None:
            metrics.request(app, head.version, status, started)
        self._pending.append(line)
        self._pending_size += len(line)
        if self.reactor is None or self._pending_size >= _MAX_PENDING:
            self._write_pending()
        if self._flush_call is None and self.reactor is not None:
            self._flush_call = self.reactor.callLater(_FLUSH_INTERVAL, self.flush)

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        text = "".join(pending)
        pending.clear()
        self._pending_size = 0
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        self._flush_call = None
        self._write_pending()
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self.flush()


@implementer(ILogObserver)
class SystemLogObserver:
    """``<RFC3339> <LEVEL> <namespace>: <message>`` lines, like rpxy's system log."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: dict) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        level = event.get("log_level", LogLevel.info).name.upper()
        namespace = event.get("log_namespace", "-")
        line = f"{format_timestamp(event.get('log_time', time.time()))} {level:5} {namespace}: {text}\n"
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass


def open_access_log(log_dir: str | None) -> IO[str]:
    """``log_dir/access.log`` opened for appending (the directory is created), else stdout."""
    if log_dir is None:
        return sys.stdout
    os.makedirs(log_dir, exist_ok=True)
    return open(os.path.join(log_dir, "access.log"), "a", encoding="utf-8", buffering=1 << 16)


def open_system_log(log_dir: str | None) -> TextIO:
    """``log_dir/rpxy.log`` opened for appending (the directory is created), else stdout."""
    if log_dir is None:
        return sys.stdout
    os.makedirs(log_dir, exist_ok=True)
    return open(os.path.join(log_dir, "rpxy.log"), "a", encoding="utf-8")


def open_log_files(log_dir: str | None) -> tuple[IO[str], TextIO]:
    """(access stream, system stream): files appended in ``log_dir``, else stdout."""
    return open_access_log(log_dir), open_system_log(log_dir)


def start_system_logging(stream: TextIO, level: LogLevel = LogLevel.info) -> None:
    """Route every twisted.logger event at ``level`` or above to ``stream`` (rpxy CLI only)."""
    observer = FilteringLogObserver(SystemLogObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
