"""Certificate reload without restart: poll each app's cert, key and client CA files.

:class:`CertificateWatcher` is a Twisted service. Every ``interval`` seconds (60,
as rpxy) it ``stat``s each app's files; when the size, mtime or inode changed --
or the previous ``stat`` was too close to the file's mtime to be trusted (the
"racy timestamp" case of filesystems with coarse clocks) -- it reads the files,
hashes them and, if the content differs from what is served, builds a new
context and swaps it into the :class:`~rpxy.tls.sni.SniContextMap`. New
handshakes get the new certificate; established connections keep theirs. A
failed read or parse (a half-written file, a key that does not match yet...)
keeps the last good context and logs why, once per distinct problem; the next
change is tried again.

Files are read on the reactor thread: they are a few kilobytes each.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rpxy.tls.contexts import AppTls, TlsSource, build_from_source, read_source, source_digest
from rpxy.tls.keys import TlsMaterialError
from rpxy.tls.sni import SniContextMap

__all__ = ["CERTIFICATE_POLL_INTERVAL", "CertificateWatcher"]

log = Logger(namespace="rpxy.tls")

#: rpxy's certificate poll period, seconds.
CERTIFICATE_POLL_INTERVAL = 60.0
# A stat taken less than this long after the file's mtime may miss a later write
# within the same timestamp tick: such files are re-hashed at the next poll.
_RACY_SECONDS = 2.0

_FileSig = tuple[int, int, int, int] | str


@attrs.define
class _Seen:
    source: TlsSource
    sigs: tuple[_FileSig, ...]
    racy: bool


def _stat(path: str, wall_now: float) -> tuple[_FileSig, bool]:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"error:{exc.errno}", False
    racy = wall_now - st.st_mtime < _RACY_SECONDS
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev), racy


class CertificateWatcher(Service):
    """Reloads changed certificate files into a :class:`SniContextMap`.

    ``contexts``: the map, or a zero-argument callable returning the current one
    (so one watcher can follow config reloads). ``reactor``: an ``IReactorTime``
    (``twisted.internet.task.Clock`` in tests). ``on_change(old, new)`` is called
    after an app's context was replaced.
    """

    name = "rpxy-tls-certificate-watcher"

    def __init__(
        self,
        contexts: SniContextMap | Callable[[], SniContextMap],
        reactor: IReactorTime,
        *,
        interval: float = CERTIFICATE_POLL_INTERVAL,
        on_change: Callable[[AppTls, AppTls], object] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._contexts = (lambda: contexts) if isinstance(contexts, SniContextMap) else contexts
        self.reactor = reactor
        self.interval = interval
        self.on_change = on_change
        self._wall = wall_clock
        self._seen: dict[str, _Seen] = {}
        #: app name -> the problem that currently keeps the previous certificate served.
        self.errors: dict[str, str] = {}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = LoopingCall(self.poll)
        loop.clock = self.reactor
        self._loop = loop
        # The first poll compares content hashes with what is served, so a change
        # between building the contexts and starting the service is not missed.
        loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("certificate watcher stopped", failure=f)
        )

    def stopService(self):
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return super().stopService()

    # -- polling --------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Check every app once; returns the names of the apps whose context was replaced."""
        contexts = self._contexts()
        replaced: list[str] = []
        live = set()
        for entry in contexts:
            source = entry.source
            if source is None:
                continue  # built from memory (ACME...): nothing to watch
            live.add(entry.app_name)
            try:
                if self._check(contexts, entry, source):
                    replaced.append(entry.app_name)
            except Exception:
                log.failure("TLS: checking the certificate files of app {app} failed", app=entry.app_name)
        for gone in set(self._seen) - live:
            del self._seen[gone]
            self.errors.pop(gone, None)
        return replaced

    def _check(self, contexts: SniContextMap, entry: AppTls, source: TlsSource) -> bool:
        app = entry.app_name
        wall_now = self._wall()
        stats = [_stat(path, wall_now) for path in source.paths()]
        sigs = tuple(sig for sig, _ in stats)
        racy = any(r for _, r in stats)
        seen = self._seen.get(app)
        if seen is not None and seen.source == source and seen.sigs == sigs and not seen.racy:
            return False
        self._seen[app] = _Seen(source, sigs, racy)

        try:
            contents = read_source(source)
        except TlsMaterialError as exc:
            self._failed(app, TlsMaterialError(exc.problems, app=app))
            return False
        if source_digest(*contents) == entry.digest:
            if self.errors.pop(app, None) is not None:
                log.info("TLS: certificate files of app {app} are readable again (unchanged)", app=app)
            return False
        try:
            new = build_from_source(app, entry.server_name, source, contexts.options, contents=contents)
        except TlsMaterialError as exc:
            self._failed(app, exc)
            return False
        except Exception as exc:  # OpenSSL refusing something cryptography accepted
            self._failed(app, exc)
            return False
        old = contexts.replace(new)
        self.errors.pop(app, None)
        leaf = new.leaf
        log.info(
            "TLS: reloaded the certificate of app {app} ({subject}, valid until {not_after})",
            app=app,
            subject=leaf.subject.rfc4514_string(),
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        for warning in new.warnings:
            log.warn("TLS: app {app}: {warning}", app=app, warning=warning)
        if self.on_change is not None and old is not None:
            self.on_change(old, new)
        return True

    def _failed(self, app: str, error: Exception) -> None:
        text = str(error)
        if self.errors.get(app) != text:
            log.error(
                "TLS: keeping the previous certificate of app {app}: {error}",
                app=app,
                error=text,
            )
        self.errors[app] = text
