"""The ACME service: certificates for every app with ``tls = { acme = true }``.

:class:`AcmeService` is a Twisted service owned by the proxy's ``MultiService``. It

* serves what the registry already holds at once (valid stored certificates are used
  when the service starts, before any network traffic);
* orders a certificate when there is none, or when a third of its lifetime remains
  (``renew_before_days`` overrides), on its own single worker thread: the ``acme``
  library is synchronous and the reactor must never wait for the CA;
* answers the CA's challenge while an order runs: TLS-ALPN-01 through the TLS
  listener (:meth:`challenge`, consulted by :mod:`rpxy.tls.server` when a ClientHello
  offers ``acme-tls/1``), or HTTP-01 through the pipeline (:meth:`http01`);
* swaps the new certificate in for new handshakes (:meth:`lookup`, consulted by the
  TLS listener for names the static map does not serve) without a restart;
* on failure logs the CA's problem document, keeps serving the last good certificate,
  and retries with an exponential backoff (:func:`rpxy.acme.schedule.backoff_delay`);
* takes the registry's lock while ordering, so instances sharing ``registry_path``
  order one at a time; every poll it re-reads the registry, so the others pick up the
  certificate the lock holder stored.

Per-app state lives on the reactor thread only; the worker thread touches it through
``blockingCallFromThread`` (challenge install/uninstall) and its result Deferred.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool

from rpxy.acme import client as acme_client
from rpxy.config.model import Config
from rpxy.acme.challenge import ACME_TLS_ALPN, http01_token, tls_alpn01_certificate
from rpxy.acme.registry import Registry
from rpxy.acme.schedule import backoff_delay, renewal_time
from rpxy.tls.contexts import AppTls, TlsOptions, app_tls_from_material
from rpxy.tls.keys import CertifiedKey, TlsMaterialError, certified_key_from_pem

__all__ = ["AcmeService", "managed_apps"]

log = Logger(namespace="rpxy.acme")

#: Never order for the same name twice within this many seconds after a success, even
#: when the renewal window says "now" (a window longer than the CA's lifetime).
MIN_ORDER_GAP = 3600.0


def managed_apps(config: Config) -> list[tuple[str, str]]:
    """``(app name, server name)`` of every app with ``tls = { acme = true }``."""
    return [(app.name, app.server_name) for app in config.apps if app.tls is not None and app.tls.acme]


@attrs.define(eq=False)
class _Domain:
    app_name: str
    name: str
    entry: AppTls | None = None
    signature: tuple[int, int, int] | None = None  # registry files the entry came from
    next_check: float = 0.0  # wall-clock seconds
    failures: int = 0
    in_flight: bool = False
    last_error: str | None = None
    last_issued: float | None = None


@attrs.define(eq=False)
class _Challenge:
    kind: str
    token: str
    key_authz: str
    entry: AppTls | None = None  # TLS-ALPN-01 certificate context


class _DaemonThreadPool(ThreadPool):
    """Worker threads that never hold the process up: an order cut short by a shutdown
    leaves nothing half-written (files are renamed into place) and its lock dies with
    the process."""

    @staticmethod
    def threadFactory(*args, **kwargs) -> threading.Thread:  # type: ignore[override]
        return threading.Thread(*args, daemon=True, **kwargs)


class AcmeService(Service):
    """Orders, renews, stores and serves ACME certificates (see the module docs).

    ``config``: the whole :class:`~rpxy.config.model.Config` (``[experimental.acme]``
    must be set). ``reactor``: ``IReactorTime`` + ``IReactorThreads``. ``issue`` and
    ``run_in_thread`` exist for tests: an order function with the signature of
    :func:`rpxy.acme.client.order_certificate`, and a ``(f, *args) -> Deferred`` runner
    (default: the service's own one-thread pool).
    """

    name = "rpxy-acme"

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        tls_options: TlsOptions = TlsOptions(),
        issue: Callable[..., acme_client.OrderResult] = acme_client.order_certificate,
        run_in_thread: Callable[..., defer.Deferred] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        acme = config.experimental.acme
        if acme is None:
            raise ValueError("[experimental.acme] is not configured")
        self.reactor = reactor
        self.tls_options = tls_options
        self._issue = issue
        self._run_in_thread = run_in_thread
        self._wall = wall_clock
        self._pool: ThreadPool | None = None
        self._timer = None
        self.domains: dict[str, _Domain] = {}
        self.challenges: dict[str, dict[str, _Challenge]] = {}  # name -> token -> challenge
        self.update(config)

    # -- configuration -------------------------------------------------------------

    def update(self, config: Config) -> None:
        """Follow a (re)loaded config: new ACME apps are ordered, removed ones dropped."""
        acme = config.experimental.acme
        if acme is None:
            self.domains.clear()
            return
        self.acme_config = acme
        self.registry = Registry(acme.registry_path, acme.dir_url)
        self.poll_interval = max(1.0, float(config.certificate_poll_interval))
        days = getattr(acme, "renew_before_days", None)
        self.renew_before = datetime.timedelta(days=days) if days is not None else None
        self.challenge_type = getattr(acme, "challenge", "tls-alpn-01")
        wanted: dict[str, _Domain] = {}
        for app_name, name in managed_apps(config):
            if name.startswith("*."):
                log.error(
                    "ACME: app {app}: {name} is a wildcard; TLS-ALPN-01 and HTTP-01 cannot validate wildcards",
                    app=app_name, name=name,
                )
                continue
            old = self.domains.get(name)
            if old is not None and old.app_name == app_name:
                wanted[name] = old
            else:
                wanted[name] = _Domain(app_name=app_name, name=name)
        self.domains = wanted
        if self.running:
            self._schedule(0)

    # -- Service -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._run_in_thread is None:
            self._pool = _DaemonThreadPool(minthreads=0, maxthreads=1, name="rpxy-acme")
            self._pool.start()
        try:
            self.registry.ensure()
        except OSError as error:
            log.error("ACME: cannot use the registry {path}: {error}", path=self.registry.root, error=error)
        for domain in self.domains.values():
            self._refresh(domain)  # stored certificates are served before anything else happens
        self._schedule(0)

    def stopService(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pool, self._pool = self._pool, None
        if pool is not None:
            # ThreadPool.stop() joins its workers: never on the reactor thread, which must
            # not wait for an order's HTTP requests to the CA during a graceful shutdown.
            threading.Thread(target=pool.stop, name="rpxy-acme-stop", daemon=True).start()
        return super().stopService()

    # -- what the listeners ask ----------------------------------------------------

    def lookup(self, sni: str) -> AppTls | None:
        """The served certificate context of a managed name, or None."""
        domain = self.domains.get(sni)
        return domain.entry if domain is not None else None

    def missing(self, sni: str) -> str | None:
        """Why a managed name has no certificate yet (for the handshake failure line)."""
        domain = self.domains.get(sni)
        if domain is None or domain.entry is not None:
            return None
        text = f"app {domain.app_name} has no certificate yet (ACME order "
        text += "in progress" if domain.in_flight else "pending"
        if domain.last_error:
            text += f"; last error: {domain.last_error}"
        return text + ")"

    def challenge(self, sni: str) -> AppTls | None:
        """The TLS-ALPN-01 challenge context for ``sni`` while it is being validated.

        Only names this service manages and is currently ordering have one: an
        ``acme-tls/1`` handshake for any other name gets None (and is refused).
        """
        for challenge in self.challenges.get(sni, {}).values():
            if challenge.entry is not None:
                log.info("ACME: answering a TLS-ALPN-01 validation for {name}", name=sni)
                return challenge.entry
        return None

    def http01(self, host: str, path: bytes) -> bytes | None:
        """The key authorization for ``GET /.well-known/acme-challenge/<token>``, or None."""
        token = http01_token(path)
        if token is None:
            return None
        challenge = self.challenges.get(host, {}).get(token)
        if challenge is None or challenge.kind != "http-01":
            return None
        log.info("ACME: answering an HTTP-01 validation for {name}", name=host)
        return challenge.key_authz.encode("ascii")

    # -- scheduling ----------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._wall()
        for domain in list(self.domains.values()):
            try:
                self._refresh(domain)
                if not domain.in_flight and now >= domain.next_check:
                    self._start_order(domain)
            except Exception:
                log.failure("ACME: checking {name} failed", name=domain.name)
                domain.next_check = now + self.poll_interval
        waits = [d.next_check - now for d in self.domains.values() if not d.in_flight]
        self._schedule(max(0.0, min([self.poll_interval, *waits])))

    def _refresh(self, domain: _Domain) -> None:
        """Serve the registry's certificate for ``domain`` if it changed on disk."""
        signature = self.registry.signature(domain.name)
        if signature is None or signature == domain.signature:
            return
        files = self.registry.load(domain.name)
        if files is None:
            return
        try:
            pair = certified_key_from_pem(
                files.cert_pem,
                files.key_pem,
                cert_path=self.registry.cert_path(domain.name),
                key_path=self.registry.key_path(domain.name),
                server_name=domain.name,
            )
        except TlsMaterialError as error:
            # A half-renamed pair from another instance, or a damaged file: retried next poll.
            log.warn("ACME: ignoring the stored certificate of {name}: {error}", name=domain.name, error=error)
            return
        domain.signature = files.signature
        leaf = pair.leaf
        not_after = leaf.not_valid_after_utc
        if not_after.timestamp() <= self._wall():
            log.warn("ACME: the stored certificate of {name} expired on {when}", name=domain.name, when=not_after.isoformat())
            return
        if domain.entry is not None and domain.entry.leaf.not_valid_after_utc >= not_after:
            return  # what we serve is at least as fresh
        self._serve(domain, pair, source="registry")

    def _serve(self, domain: _Domain, pair: CertifiedKey, *, source: str) -> None:
        domain.entry = app_tls_from_material(domain.app_name, domain.name, pair, options=self.tls_options)
        leaf = pair.leaf
        due = renewal_time(leaf.not_valid_before_utc, leaf.not_valid_after_utc, renew_before=self.renew_before)
        next_check = due.timestamp()
        if domain.last_issued is not None:
            next_check = max(next_check, domain.last_issued + MIN_ORDER_GAP)
        if domain.failures == 0 or next_check > domain.next_check:
            domain.next_check = next_check
        log.info(
            "ACME: serving the certificate of {name} from the {source} (issuer {issuer}, valid until {until}, renewal from {due})",
            name=domain.name,
            source=source,
            issuer=leaf.issuer.rfc4514_string(),
            until=leaf.not_valid_after_utc.isoformat(),
            due=due.isoformat(),
        )

    # -- ordering ------------------------------------------------------------------

    def _run(self, f, *args) -> defer.Deferred:
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args)
        assert self._pool is not None
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def _on_reactor(self, f, *args):
        if self._run_in_thread is not None or threadable.isInIOThread():
            return f(*args)
        return blockingCallFromThread(self.reactor, f, *args)

    def _start_order(self, domain: _Domain) -> None:
        domain.in_flight = True
        log.info("ACME: ordering a certificate for {name} ({challenge}) from {url}",
                 name=domain.name, challenge=self.challenge_type, url=self.acme_config.dir_url)
        d = self._run(self._order_blocking, domain.name, self.challenge_type)
        d.addCallbacks(self._ordered, self._failed, callbackArgs=(domain,), errbackArgs=(domain,))
        d.addErrback(lambda f: log.failure("ACME: internal error after ordering {name}", failure=f, name=domain.name))

    def _order_blocking(self, name: str, challenge_type: str):
        """On the worker thread: take the lock, re-check the registry, order, store."""
        lock = self.registry.lock()
        if not lock.acquire():
            return ("locked", lock.holder())
        try:
            files = self.registry.load(name)
            if files is not None and self._still_good(files, name):
                return ("stored", None)  # another instance renewed while we waited
            acme = self.acme_config
            result = self._issue(
                self.registry,
                dir_url=acme.dir_url,
                email=acme.email,
                domain=name,
                challenge_type=challenge_type,
                install=lambda *a: self._on_reactor(self._install, *a),
                uninstall=lambda *a: self._on_reactor(self._uninstall, *a),
            )
            self.registry.store(name, result.cert_pem, result.key_pem)
            return ("issued", result)
        finally:
            lock.release()

    def _still_good(self, files, name: str) -> bool:
        try:
            pair = certified_key_from_pem(files.cert_pem, files.key_pem, server_name=name)
        except TlsMaterialError:
            return False
        leaf = pair.leaf
        due = renewal_time(leaf.not_valid_before_utc, leaf.not_valid_after_utc, renew_before=self.renew_before)
        domain = self.domains.get(name)
        if domain is not None and domain.signature == files.signature:
            return False  # that is the very certificate we decided to renew
        return due.timestamp() > self._wall()

    def _install(self, name: str, kind: str, token: str, key_authz: str) -> None:
        challenge = _Challenge(kind=kind, token=token, key_authz=key_authz)
        if kind == "tls-alpn-01":
            domain = self.domains.get(name)
            cert, key = tls_alpn01_certificate(name, key_authz)
            pair = CertifiedKey(chain=(cert,), private_key=key, cert_path="<acme challenge>", key_path="<memory>", digest=b"")
            challenge.entry = app_tls_from_material(
                domain.app_name if domain is not None else name,
                name,
                pair,
                options=TlsOptions(alpn=(ACME_TLS_ALPN,), groups=self.tls_options.groups),
            )
        self.challenges.setdefault(name, {})[token] = challenge

    def _uninstall(self, name: str, token: str) -> None:
        tokens = self.challenges.get(name)
        if tokens is not None:
            tokens.pop(token, None)
            if not tokens:
                del self.challenges[name]

    def _ordered(self, outcome, domain: _Domain) -> None:
        domain.in_flight = False
        kind, value = outcome
        now = self._wall()
        if kind == "locked":
            log.info("ACME: another instance ({holder}) is ordering; waiting for its certificate for {name}",
                     holder=value, name=domain.name)
            domain.next_check = now + self.poll_interval
        elif kind == "stored":
            self._refresh(domain)
        else:
            domain.failures = 0
            domain.last_error = None
            domain.last_issued = now
            try:
                pair = certified_key_from_pem(
                    value.cert_pem, value.key_pem,
                    cert_path=self.registry.cert_path(domain.name), key_path=self.registry.key_path(domain.name),
                    server_name=domain.name,
                )
            except TlsMaterialError as error:
                self._record_failure(domain, acme_client.OrderFailed(f"the CA's certificate is unusable: {error}"))
            else:
                domain.signature = self.registry.signature(domain.name)
                self._serve(domain, pair, source="CA")
        self._schedule(0)

    def _failed(self, failure, domain: _Domain) -> None:
        domain.in_flight = False
        self._record_failure(domain, acme_client.describe_error(failure.value))
        self._schedule(0)

    def _record_failure(self, domain: _Domain, error: acme_client.OrderFailed) -> None:
        domain.failures += 1
        delay = backoff_delay(domain.failures)
        domain.next_check = self._wall() + delay
        domain.last_error = str(error)
        log.error(
            "ACME: ordering a certificate for {name} failed: {error}; ACME error document: {document}; "
            "{keeping}; next attempt in {delay:.0f} s (failure {failures})",
            name=domain.name,
            error=str(error),
            document=error.document or "none",
            keeping="keeping the current certificate" if domain.entry is not None else "the name has no certificate yet",
            delay=delay,
            failures=domain.failures,
        )
