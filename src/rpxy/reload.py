"""Live reload of the config file: watch, validate, swap one state, keep every listener.

Three parts, bottom up:

:func:`diff_configs`
    pure: what changed between two validated configs (apps added / removed / changed,
    top-level settings, and the keys that cannot change without a restart).
:class:`ConfigWatcher`
    a service noticing changes to the file: ``twisted.internet.inotify`` on the file's
    *directory* (editors that save by writing a new file and renaming it over the old
    one replace the inode, which a watch on the file itself would lose), plus a
    ``stat`` poll (mtime, size, inode) that is the only mechanism where inotify is
    missing and a safety net where it is not (a ConfigMap's symlink swap, a network
    file system). Bursts of events (an editor's write + rename + chmod) are debounced
    into one reload.
:class:`Reloader`
    reads and validates the file, builds a new :class:`~rpxy.state.RuntimeState`
    taking over the upstream pools and health checkers whose key did not change,
    lets the service close and open only the listeners whose address changed, swaps
    the state, drains what the new state left behind and calls the ``on_reload``
    hooks. An invalid file is logged (every problem naming its key) and the previous
    config keeps serving; a deleted file keeps the last config.

Requests capture ``holder.current`` when they start, so a request (and its upstream
exchange) in flight finishes on the state it started with; keep-alive connections
take the new state with their next request. SIGHUP (installed by the entry points
only, through :func:`install_sighup`) forces a reload even when the file's content
did not change, which also re-reads every certificate.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import filepath

from rpxy.config.load import ConfigError, LoadedConfig, load_config_bytes
from rpxy.config.model import Config
from rpxy.state import Retired, RuntimeState, StateHolder, build_state, retired

__all__ = [
    "CONFIG_POLL_INTERVAL",
    "ConfigDiff",
    "ConfigWatcher",
    "ReloadEvent",
    "ReloadTarget",
    "Reloader",
    "diff_configs",
    "install_sighup",
]

log = Logger(namespace="rpxy.reload")

#: Seconds between ``stat`` checks of the config file (the only check without inotify).
CONFIG_POLL_INTERVAL = 2.0
#: Quiet time after the last change event before reloading (an editor's save is a burst).
DEBOUNCE = 0.2
#: A burst never delays a reload by more than this.
MAX_DEBOUNCE = 2.0
# A stat taken less than this long after the file's mtime may miss a later write in
# the same timestamp tick: such a file is re-read (and its content hash compared) at
# the next poll.
_RACY_SECONDS = 2.0

#: Top-level settings a running process cannot apply to what already exists, with why.
#: (Listener addresses and ports *are* applied; see :meth:`ReloadTarget.close_listeners`.)
RESTART_NEEDED: dict[str, str] = {
    "tcp_listen_backlog": "listeners already open keep their backlog; new ones get the new value",
    "workers": "the number of worker processes is set when rpxy starts",
    "experimental.acme": "ACME is configured at start",
    "experimental.metrics": "the metrics listener is opened at start",
}


# -- what changed ----------------------------------------------------------------------------


@attrs.frozen
class ConfigDiff:
    """What changed between two configs, by name (for the log line and the hooks)."""

    apps_added: tuple[str, ...] = ()
    apps_removed: tuple[str, ...] = ()
    apps_changed: tuple[str, ...] = ()
    #: Top-level keys (``experimental.*`` spelled out) whose value changed.
    settings_changed: tuple[str, ...] = ()
    #: Changed keys that only a restart applies fully (see :data:`RESTART_NEEDED`).
    restart_needed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.apps_added or self.apps_removed or self.apps_changed or self.settings_changed)


def _settings(config: Config) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in attrs.fields(Config):
        if field.name == "apps":
            continue
        value = getattr(config, field.name)
        if field.name == "experimental":
            for sub in attrs.fields(type(value)):
                values[f"experimental.{sub.name}"] = getattr(value, sub.name)
        else:
            values[field.name] = value
    return values


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two validated configs. Apps are matched by their table name (``[apps.<name>]``)."""
    old_apps = {app.name: app for app in old.apps}
    new_apps = {app.name: app for app in new.apps}
    old_settings, new_settings = _settings(old), _settings(new)
    changed = tuple(key for key in new_settings if old_settings.get(key) != new_settings[key])
    restart = [key for key in changed if key in RESTART_NEEDED]
    return ConfigDiff(
        apps_added=tuple(name for name in new_apps if name not in old_apps),
        apps_removed=tuple(name for name in old_apps if name not in new_apps),
        apps_changed=tuple(name for name in new_apps if name in old_apps and old_apps[name] != new_apps[name]),
        settings_changed=changed,
        restart_needed=tuple(restart),
    )


# -- watching the file -----------------------------------------------------------------------------


_Sig = tuple[int, int, int, int] | str


def file_signature(path: str, wall_now: float | None = None) -> tuple[_Sig, bool]:
    """``((mtime_ns, size, inode, device), racy)``, or ``("missing", False)``.

    ``racy``: the mtime is so recent that a second write in the same clock tick would
    leave the signature unchanged, so the content must be checked again later.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", False
    except OSError as error:
        return f"error:{error.errno}", False
    now = time.time() if wall_now is None else wall_now
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev), now - st.st_mtime < _RACY_SECONDS


class ConfigWatcher(Service):
    """Calls ``on_change()`` (debounced) when the file at ``path`` may have changed.

    False alarms are fine: the :class:`Reloader` compares content hashes. ``reactor``
    provides time (``Clock`` in tests); ``use_inotify=False`` forces polling only.
    """

    name = "rpxy-config-watcher"

    def __init__(
        self,
        path: str,
        reactor: Any,
        on_change: Callable[[], object],
        *,
        poll_interval: float = CONFIG_POLL_INTERVAL,
        debounce: float = DEBOUNCE,
        use_inotify: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.path = os.path.abspath(path)
        self.reactor = reactor
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.use_inotify = use_inotify
        self._wall = wall_clock
        self._sig: _Sig | None = None
        self._racy = False
        self._loop: LoopingCall | None = None
        self._notifier: Any = None
        self._pending: IDelayedCall | None = None
        self._burst_started = 0.0
        #: "inotify+poll" or "poll", once started (for the log and the tests).
        self.mode = "stopped"

    def startService(self) -> None:
        super().startService()
        self._sig, self._racy = file_signature(self.path, self._wall())
        self.mode = "poll"
        if self.use_inotify:
            self._notifier = self._start_inotify()
            if self._notifier is not None:
                self.mode = "inotify+poll"
        loop = LoopingCall(self.poll)
        loop.clock = self.reactor
        self._loop = loop
        loop.start(self.poll_interval, now=False).addErrback(lambda f: log.failure("config watcher stopped", failure=f))
        log.info("watching {path} for changes ({mode})", path=self.path, mode=self.mode)

    def _start_inotify(self) -> Any:
        try:
            from twisted.internet import inotify

            notifier = inotify.INotify(reactor=self.reactor)
            notifier.startReading()
            mask = (
                inotify.IN_CLOSE_WRITE
                | inotify.IN_MODIFY
                | inotify.IN_ATTRIB
                | inotify.IN_CREATE
                | inotify.IN_DELETE
                | inotify.IN_MOVED_FROM
                | inotify.IN_MOVED_TO
                | inotify.IN_DELETE_SELF
                | inotify.IN_MOVE_SELF
            )
            notifier.watch(filepath.FilePath(os.path.dirname(self.path)), mask=mask, callbacks=[self._notified])
            return notifier
        except Exception as error:  # no inotify on this platform or reactor, or no watch left
            log.info("config file notifications unavailable ({error}); polling only", error=error)
            return None

    def stopService(self) -> Any:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            try:
                notifier.loseConnection()
            except Exception:
                pass
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self.mode = "stopped"
        return super().stopService()

    def _notified(self, _ignored: object, path: filepath.FilePath, _mask: int) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        # Our file, or (for a symlinked config, e.g. a Kubernetes ConfigMap's ``..data``
        # swap) anything in its directory.
        if name == os.path.basename(self.path) or os.path.islink(self.path):
            self.changed()

    def poll(self) -> None:
        """One ``stat`` check (the LoopingCall's body; tests call it directly)."""
        sig, racy = file_signature(self.path, self._wall())
        if sig != self._sig:
            self._sig, self._racy = sig, racy
            self.changed()
        elif self._racy:
            # Same signature, but a write in the same clock tick would not show in it:
            # have the content compared again, without holding back a pending reload.
            self._racy = racy
            self.changed(extend=False)

    def changed(self, *, extend: bool = True) -> None:
        """Something happened to the file: reload once the burst is over.

        ``extend``: this event is part of a burst (an editor's write, rename, chmod), so a
        pending reload waits ``debounce`` more (at most ``MAX_DEBOUNCE`` in all).
        """
        now = self.reactor.seconds()
        pending = self._pending
        if pending is not None and pending.active():
            if extend and now - self._burst_started < MAX_DEBOUNCE:
                pending.reset(self.debounce)
            return
        self._burst_started = now
        self._pending = self.reactor.callLater(self.debounce, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._sig, self._racy = file_signature(self.path, self._wall())
        try:
            self.on_change()
        except Exception:
            log.failure("config reload raised")


# -- applying a change -----------------------------------------------------------------------------


@attrs.frozen
class ReloadEvent:
    """Handed to every ``on_reload`` hook after the new state was swapped in."""

    old: RuntimeState
    new: RuntimeState
    diff: ConfigDiff
    #: "file" (a change seen by the watcher), "SIGHUP", or what the caller passed.
    reason: str
    retired: Retired


class ReloadTarget(Protocol):
    """What the service does for a reload (implemented by :class:`rpxy.service.RpxyService`)."""

    holder: StateHolder

    def close_listeners(self, config: Config) -> defer.Deferred:
        """Stop the listeners ``config`` no longer wants; fires when their sockets are closed."""

    def open_listeners(self, config: Config) -> list[str]:
        """Start the listeners ``config`` wants and that are not open; returns what was opened."""

    def adopt(self, event: ReloadEvent) -> None:
        """Start the new state's new health checkers, stop the retired ones, sync watchers."""


Hook = Callable[[ReloadEvent], object]


def _describe(diff: ConfigDiff) -> str:
    parts = []
    for label, names in (
        ("apps added", diff.apps_added),
        ("apps removed", diff.apps_removed),
        ("apps changed", diff.apps_changed),
        ("settings changed", diff.settings_changed),
    ):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "; ".join(parts) if parts else "no effective change"


class Reloader:
    """Reads, validates and applies the config file; one reload at a time.

    ``on_reload``: hooks called after each successful swap with a :class:`ReloadEvent`
    (a response cache clears itself, the HTTP/3 service re-reads its settings...). A
    hook that raises is logged; the reload stands.
    """

    def __init__(
        self,
        path: str,
        target: ReloadTarget,
        reactor: Any,
        *,
        applied: bytes | None = None,
        build: Callable[..., RuntimeState] = build_state,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        # Absolute: a daemonising entry point may change the working directory later.
        self.path = os.path.abspath(path)
        self.target = target
        self.reactor = reactor
        self.build = build
        self.timer = timer
        self.on_reload: list[Hook] = []
        #: sha256 of the content now serving (None: unknown, the next look applies it).
        self.applied_digest = hashlib.sha256(applied).digest() if applied is not None else None
        #: sha256 of the last content that failed, so a poll does not log it again.
        self.failed_digest: bytes | None = None
        self.missing = False
        self._running: defer.Deferred | None = None
        self._again: tuple[bool, str] | None = None
        self._waiters: list[defer.Deferred] = []
        #: Counters for the tests and the docs' "how do I know": successful / failed reloads.
        self.reloads = 0
        self.failures = 0

    # -- entry points ----------------------------------------------------------------------------

    def file_changed(self) -> defer.Deferred:
        """The watcher saw something: reload if the content differs from what is served."""
        return self.reload(force=False, reason="file")

    def reload(self, *, force: bool = False, reason: str = "SIGHUP") -> defer.Deferred:
        """Reload now (``force``: even when the content is unchanged). Fires when done.

        Reloads never overlap: one requested while another runs is run after it (and
        several requested meanwhile become one); its Deferred fires when that one is done.
        """
        if self._running is not None:
            previous = self._again
            self._again = (force or (previous is not None and previous[0]), reason)
            waiter: defer.Deferred = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        running = self._running = defer.maybeDeferred(self._reload, force, reason)
        running.addErrback(lambda f: log.failure("config reload failed unexpectedly", failure=f))
        running.addBoth(self._done)
        return running

    def _done(self, result: object) -> None:
        self._running = None
        again, self._again = self._again, None
        waiters, self._waiters = self._waiters, []
        if again is not None:
            def release(_: object) -> None:
                for waiter in waiters:
                    waiter.callback(None)

            self.reload(force=again[0], reason=again[1]).addBoth(release)
        return None

    # -- one reload --------------------------------------------------------------------------------

    def _reload(self, force: bool, reason: str) -> defer.Deferred | None:
        started = self.timer()
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            if not self.missing:
                self.missing = True
                log.warn(
                    "config file {path} was removed; still serving the last config (it is reloaded when it reappears)",
                    path=self.path,
                )
            return None
        except OSError as error:
            self._fail(None, [f"{self.path}: cannot read: {error.strerror or error}"], reason)
            return None
        if self.missing:
            self.missing = False
            log.info("config file {path} is back", path=self.path)
        digest = hashlib.sha256(raw).digest()
        if not force and (digest == self.applied_digest or digest == self.failed_digest):
            return None
        try:
            loaded = load_config_bytes(raw, self.path)
        except ConfigError as error:
            self._fail(digest, error.errors, reason)
            return None
        holder = self.target.holder
        old = holder.current
        if loaded.config == old.config and not force:
            if self.applied_digest is not None:  # (else: the first look since the start)
                log.info("config file {path} changed; no effective change", path=self.path)
            self.applied_digest, self.failed_digest = digest, None
            return None
        try:
            new = self.build(loaded.config, self.reactor, previous=old)
        except ConfigError as error:
            self._fail(digest, error.errors, reason)
            return None
        except Exception as error:
            log.failure("config reload: building the new state failed")
            self._fail(digest, [f"{type(error).__name__}: {error}"], reason)
            return None
        diff = diff_configs(old.config, loaded.config)
        # Listeners that go away close first (a new listener may need their address),
        # before the swap (so no new connection lands on a listener of the old config).
        closing = defer.maybeDeferred(self.target.close_listeners, loaded.config)

        def swap(_: object) -> None:
            self._apply(old, new, loaded, diff, digest, reason, started)

        def closing_failed(failure: Any) -> None:
            log.failure("config reload: closing listeners failed", failure=failure)
            swap(None)

        closing.addCallbacks(swap, closing_failed)
        return closing

    def _apply(
        self,
        old: RuntimeState,
        new: RuntimeState,
        loaded: LoadedConfig,
        diff: ConfigDiff,
        digest: bytes,
        reason: str,
        started: float,
    ) -> None:
        target = self.target
        if target.holder.current is not old:  # pragma: no cover - reloads never overlap
            log.warn("config reload: state replaced meanwhile; reloading again")
            self._again = (True, reason)
            return
        target.holder.swap(new)
        self.applied_digest, self.failed_digest = digest, None
        opened = target.open_listeners(loaded.config)
        left = retired(old, new)
        for pool in left.pools:
            try:
                pool.close()  # idle connections now, busy ones when their exchange ends
            except Exception:
                log.failure("config reload: closing a retired upstream pool failed")
        event = ReloadEvent(old=old, new=new, diff=diff, reason=reason, retired=left)
        try:
            target.adopt(event)
        except Exception:
            log.failure("config reload: updating health checkers and watchers failed")
        for hook in list(self.on_reload):
            try:
                hook(event)
            except Exception:
                log.failure("config reload: hook {hook!r} failed", hook=hook)
        self.reloads += 1
        for warning in loaded.warnings:
            log.warn("config: {warning}", warning=warning)
        for key in diff.restart_needed:
            log.warn(
                "config: {key} changed; restart rpxy to apply it fully ({why})", key=key, why=RESTART_NEEDED[key]
            )
        elapsed_ms = (self.timer() - started) * 1000
        pools_new = len(new.pools) - left.kept_pools
        log.info(
            "config reloaded ({reason}) in {ms:.1f} ms: {what}; listeners opened: {opened}; "
            "upstream pools kept {kept}, new {new}, draining {draining}; health checkers kept {ckept}, stopped {cstopped}",
            reason=reason,
            ms=elapsed_ms,
            what=_describe(diff),
            opened=", ".join(opened) if opened else "none",
            kept=left.kept_pools,
            new=pools_new,
            draining=len(left.pools),
            ckept=left.kept_checkers,
            cstopped=len(left.checkers),
        )

    def _fail(self, digest: bytes | None, errors: Sequence[str], reason: str) -> None:
        self.failures += 1
        if digest is not None and digest == self.failed_digest:
            return
        self.failed_digest = digest
        log.error(
            "config reload ({reason}) failed; still serving the previous config: {errors}",
            reason=reason,
            errors="; ".join(errors),
        )


def install_sighup(reactor: Any, callback: Callable[[], object]) -> bool:
    """Make SIGHUP call ``callback`` on the reactor thread. Entry points only (rpxy, twistd).

    Returns False where there is no SIGHUP (Windows). The handler only schedules: the
    reload itself runs as an ordinary reactor call.
    """
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return False

    def handler(_signum: int, _frame: object) -> None:
        reactor.callFromThread(callback)

    signal.signal(sighup, handler)
    return True


def listener_keys(config: Config) -> dict[tuple[str, str, int], None]:
    """``(kind, interface, port)`` of every listener ``config`` wants, in start order."""
    interfaces: Iterable[str] = (*config.listen_address_v4, *config.listen_address_v6)
    keys: dict[tuple[str, str, int], None] = {}
    for interface in interfaces:
        if config.listen_port is not None:
            keys[("http", interface, config.listen_port)] = None
    for interface in interfaces:
        if config.listen_port_tls is not None:
            keys[("https", interface, config.listen_port_tls)] = None
    return keys
