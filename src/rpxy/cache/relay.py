"""The cache in the request pipeline: lookups, hits, and the tee that stores while relaying.

:meth:`ResponseCache.plan` runs in :meth:`rpxy.pipeline.Pipeline.handle` once the route is
known. It answers a hit itself (:meth:`CachePlan.serve`), or wraps the response sink of the
exchange going upstream (:meth:`CachePlan.forward`) in a :class:`CachingSink`. That sink
relays every call to the front end's sink unchanged (the client gets each chunk as soon as
the upstream sends it, with the upstream still paused by the client's backpressure) and
feeds a copy to an :class:`~rpxy.cache.store.EntryWriter`; the entry exists only once the
whole body arrived. When the plan revalidates a stale entry, a 304 from the upstream is
turned into the stored response with freshened headers.

Every front end (HTTP/1.1, HTTP/2, HTTP/3) gets this for free: it only sees a sink.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from rpxy.config.model import AppConfig, CacheConfig
from rpxy.message import ConnectionInfo, Headers, RequestHead

from . import policy
from .store import CHUNK, BodySource, CacheStore, CorruptBody, Entry, EntryWriter, _unlink

if TYPE_CHECKING:
    from rpxy.streams import ResponseSink, TunnelEnd

__all__ = ["ResponseCache", "CachePlan", "CachingSink", "CacheHitExchange"]

log = Logger()

CACHE_STATUS = b"cache-status"
_NAME = b"rpxy"
#: Fields never stored: recomputed on every answer from the cache.
_NOT_STORED = frozenset((b"age", CACHE_STATUS, b"content-length"))
#: Requests this cache stays out of entirely (partial or precondition semantics it does not implement).
_BYPASS_FIELDS = frozenset((b"range", b"if-range", b"if-match", b"if-unmodified-since"))
_CONDITIONAL_FIELDS = frozenset((b"if-none-match", b"if-modified-since"))
#: Request fields the cache looks at: everything else skips the directive parsing.
_REQUEST_FIELDS = _BYPASS_FIELDS | _CONDITIONAL_FIELDS | frozenset((b"cache-control", b"pragma"))


class ResponseCache:
    """The cache of one runtime state (emptied with it on reload: :meth:`clear`)."""

    def __init__(self, config: CacheConfig, reactor: IReactorTime) -> None:
        self.store = CacheStore(config)
        self.reactor = reactor
        self.store.start()

    def clear(self) -> None:
        """Drop every entry (and file); the cache stays usable."""
        self.store.clear()

    def close(self) -> None:
        """Empty the cache of a replaced (or stopped) state; late responses are not stored."""
        self.store.close()

    def plan(
        self,
        conn: ConnectionInfo,
        head: RequestHead,
        host: str,
        *,
        app: AppConfig | None = None,
        sticky: bool = False,
        body: bool = False,
    ) -> CachePlan | None:
        """What the cache does for this request; None when it stays out of the way.

        ``host`` is the client-facing host the request was routed by: with the scheme,
        path and query it forms the key, so two virtual hosts never share an entry.
        ``body``: the request has a body. A GET with a body ("fat GET") is left alone:
        the body is not in the key, so a response shaped by it must never be stored.
        ``app``: when it requires client certificates (mTLS), its responses are stored only
        as those to a request with ``Authorization``.
        """
        method = head.method
        primary = b"%s://%s%s" % (conn.scheme, host.encode("ascii", "replace"), head.path)
        if method not in policy.CACHEABLE_METHODS:
            if policy.invalidates(method):
                self.store.invalidate(primary)
            return None
        if head.protocol is not None or sticky or body:
            # A protocol switch is not a response; a sticky route adds a per-client cookie;
            # a fat GET's body is not in the key.
            return None
        request_headers = head.headers
        # One pass over the request's fields: most requests carry none of these, and then
        # the directive parsing below is skipped.
        directives = conditional = False
        for name, _ in request_headers:
            if name in _REQUEST_FIELDS:
                if name in _BYPASS_FIELDS:
                    return None
                if name in _CONDITIONAL_FIELDS:
                    conditional = True
                else:
                    directives = True
        client_certificate = app is not None and app.tls is not None and bool(app.tls.client_ca_cert_path)
        now = self.reactor.seconds()
        entry, miss = self.store.lookup(primary, request_headers)
        if entry is None:
            if directives and policy.only_if_cached(request_headers):
                return CachePlan(self, head, primary, now, fwd="", local_status=504)
            return CachePlan(self, head, primary, now, fwd=miss, client_certificate=client_certificate)
        age = entry.age(now)
        if directives:
            reusable, reason = policy.request_allows_reuse(request_headers, age, entry.lifetime)
        else:
            reusable, reason = age < entry.lifetime, "stale"
        if reusable:
            source = self.store.open_body(entry)
            if source is None:
                return CachePlan(self, head, primary, now, fwd="uri-miss", client_certificate=client_certificate)
            return CachePlan(self, head, primary, now, fwd="", hit=entry, body=source, conditional=conditional)
        if directives and policy.only_if_cached(request_headers):
            return CachePlan(self, head, primary, now, fwd="", local_status=504)
        if entry.has_validator() and not conditional:
            source = self.store.open_body(entry)
            if source is not None:
                return CachePlan(
                    self, head, primary, now, fwd=reason, revalidate=entry, body=source, client_certificate=client_certificate
                )
            reason = "uri-miss"
        return CachePlan(self, head, primary, now, fwd=reason, client_certificate=client_certificate)


class CachePlan:
    """The cache's decision for one request: serve it (``hit``) or forward it (``fwd``)."""

    __slots__ = (
        "cache",
        "head",
        "primary",
        "request_time",
        "fwd",
        "hit",
        "revalidate",
        "body",
        "local_status",
        "client_certificate",
        "conditional",
    )

    def __init__(
        self,
        cache: ResponseCache,
        head: RequestHead,
        primary: bytes,
        request_time: float,
        *,
        fwd: str,
        hit: Entry | None = None,
        revalidate: Entry | None = None,
        body: BodySource | None = None,
        local_status: int = 0,
        client_certificate: bool = False,
        conditional: bool = False,
    ) -> None:
        self.cache = cache
        self.head = head
        self.primary = primary
        self.request_time = request_time
        self.fwd = fwd
        self.hit = hit
        self.revalidate = revalidate
        self.body = body
        self.local_status = local_status
        self.client_certificate = client_certificate
        #: the client sent If-None-Match / If-Modified-Since (answered on a hit)
        self.conditional = conditional

    @property
    def answers_locally(self) -> bool:
        return self.hit is not None or self.local_status != 0

    def serve(self, sink: ResponseSink, on_done: Callable[[int], None]) -> CacheHitExchange:
        """Answer from the cache (a hit, a 304 to the client's own validators, or a 504 for
        ``only-if-cached``); ``on_done(status)`` runs when the response is complete."""
        exchange = CacheHitExchange(on_done)
        if self.local_status:
            sink.send_head(self.local_status, [(b"server", _NAME), (b"content-length", b"0"), _status_field("fwd=miss")])
            sink.send_end(None)
            exchange.done(self.local_status)
            return exchange
        entry, body = self.hit, self.body
        assert entry is not None and body is not None
        now = self.cache.reactor.seconds()
        age = entry.age(now)
        ttl = int(entry.lifetime - age)
        status_field = _status_field(f"hit; ttl={ttl}")
        if self.conditional and policy.client_not_modified(self.head.headers, entry.headers):
            body.close()
            headers = [item for item in entry.headers if item[0] in policy.NOT_MODIFIED_FIELDS]
            headers.append((b"age", b"%d" % int(age)))
            headers.append(status_field)
            sink.send_head(304, headers)
            sink.send_end(None)
            exchange.done(304)
            return exchange
        headers = _client_headers(entry, age, status_field)
        sink.send_head(entry.status, headers)
        if self.head.method == b"HEAD" or entry.size == 0:
            body.close()
            sink.send_end(None)
            exchange.done(entry.status)
            return exchange
        if entry.body is not None and entry.size <= CHUNK:
            # One chunk, like one upstream read: no producer needed (the common small hit).
            sink.send_data(entry.body)
            sink.send_end(None)
            exchange.done(entry.status)
            return exchange
        exchange.server = _BodyServer(sink, body, entry.size, lambda: exchange.done(entry.status))
        exchange.server.start()
        return exchange

    def forward(self, sink: ResponseSink, headers: Headers) -> tuple[CachingSink, Headers]:
        """The sink and upstream request fields for a request going upstream."""
        if self.revalidate is not None:
            headers = headers + policy.conditional_headers(self.revalidate.headers)
        return CachingSink(sink, self), headers


def _status_field(params: str) -> tuple[bytes, bytes]:
    return CACHE_STATUS, b"rpxy; " + params.encode("ascii")


def _client_headers(entry: Entry, age: float, status_field: tuple[bytes, bytes]) -> Headers:
    headers = list(entry.headers)
    headers.append((b"content-length", b"%d" % entry.size))
    headers.append((b"age", b"%d" % int(age)))
    headers.append(status_field)
    return headers


class CacheHitExchange:
    """A request answered from the cache: its body (if any) is ignored."""

    __slots__ = ("on_done", "server", "finished")

    def __init__(self, on_done: Callable[[int], None]) -> None:
        self.on_done = on_done
        self.server: _BodyServer | None = None
        self.finished = False

    def done(self, status: int) -> None:
        if not self.finished:
            self.finished = True
            self.on_done(status)

    def request_data(self, data: bytes) -> None:
        pass

    def request_end(self, trailers: Headers | None = None) -> None:
        pass

    def client_gone(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stopProducing()
        self.done(499)


@implementer(IPushProducer)
class _BodyServer:
    """Streams a stored body to a sink in chunks, paused while the client cannot keep up.

    Exactly ``size`` bytes (the Content-Length already sent): a file that shrank under us
    aborts the response rather than ending it short.
    """

    __slots__ = ("sink", "source", "remaining", "on_done", "paused", "pumping", "stopped")

    def __init__(self, sink: ResponseSink, source: BodySource, size: int, on_done: Callable[[], None]) -> None:
        self.sink = sink
        self.source = source
        self.remaining = size
        self.on_done = on_done
        self.paused = False
        self.pumping = False
        self.stopped = False

    def start(self) -> None:
        self.sink.register_producer(self)
        self._pump()

    def _pump(self) -> None:
        if self.pumping or self.stopped:
            return
        self.pumping = True
        sink = self.sink
        try:
            while not self.paused and not self.stopped:
                if self.remaining <= 0:
                    self.stopped = True
                    self.source.close()
                    sink.unregister_producer()
                    sink.send_end(None)
                    self.on_done()
                    return
                try:
                    chunk = self.source.read(min(CHUNK, self.remaining))
                except CorruptBody:
                    chunk = None  # logged, entry dropped: the client never gets it complete
                except OSError:
                    chunk = b""
                if not chunk:
                    if chunk is not None:
                        log.warn("cache body ended {n} bytes early: response aborted", n=self.remaining)
                    self.stopped = True
                    self.source.close()
                    sink.unregister_producer()
                    sink.abort()
                    return
                self.remaining -= len(chunk)
                sink.send_data(chunk)
            if not self.stopped:
                sink.flush()
        finally:
            self.pumping = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.source.close()


class CachingSink:
    """Relays a response to the client's sink and stores a copy when it is storable.

    For a revalidation, a 304 becomes the stored response (freshened) served from the
    cache, and the upstream's (empty) 304 body and end are absorbed.
    """

    def __init__(self, sink: ResponseSink, plan: CachePlan) -> None:
        self.sink = sink
        self.plan = plan
        self.writer: EntryWriter | None = None
        #: (status, fields to store, response time, initial age, declared Content-Length)
        self.entry_head: tuple[int, Headers, float, float, int | None] | None = None
        #: serving a revalidated entry: the upstream's own end waits for the stored body
        self.server: _BodyServer | None = None
        self.serving_stored = False

    @property
    def request_producer(self) -> IPushProducer:
        return self.sink.request_producer

    def send_head(self, status: int, headers: Headers) -> None:
        plan = self.plan
        cache = plan.cache
        now = cache.reactor.seconds()
        entry = plan.revalidate
        if entry is not None and status == 304:
            self._serve_revalidated(entry, headers, now)
            return
        if plan.body is not None:
            plan.body.close()
            plan.body = None
        head = plan.head
        ok, _why = policy.storable(
            head.method, status, head.headers, headers, now, client_certificate=plan.client_certificate
        )
        names = policy.vary_names(headers) if ok else None
        stored = False
        if ok and names is not None:
            content_length = _content_length(headers)
            writer = cache.store.writer(content_length)
            if writer is not None:
                self.writer = writer
                stored_headers = [item for item in headers if item[0] not in _NOT_STORED]
                age = policy.initial_age(headers, plan.request_time, now)  # Age is not stored
                self.entry_head = (status, stored_headers, now, age, content_length)
                stored = content_length is not None
        elif entry is not None and status < 500:
            cache.store.remove(entry)  # replaced by a response we may not keep
        params = f"fwd={plan.fwd or 'miss'}; fwd-status={status}"
        if stored:
            params += "; stored"
        headers = headers + [_status_field(params)]
        self.sink.send_head(status, headers)

    def _serve_revalidated(self, entry: Entry, new_headers: Headers, now: float) -> None:
        store = self.plan.cache.store
        plan = self.plan
        fresh = [item for item in new_headers if item[0] not in _NOT_STORED]
        merged = policy.merge_not_modified(entry.headers, fresh)
        entry.headers = merged
        entry.request_time = plan.request_time
        entry.response_time = now
        entry.initial_age = policy.initial_age(new_headers, plan.request_time, now)
        entry.lifetime = policy.freshness_lifetime(entry.status, merged, now)
        if store.lru.get((entry.primary, entry.vary_values)) is entry:
            store.lru.move_to_end((entry.primary, entry.vary_values))
        self.serving_stored = True
        body, plan.body = plan.body, None
        assert body is not None
        sink = self.sink
        sink.send_head(entry.status, _client_headers(entry, entry.age(now), _status_field(f"fwd={plan.fwd}; fwd-status=304")))
        if plan.head.method == b"HEAD" or entry.size == 0:
            body.close()
            sink.send_end(None)
            return
        self.server = _BodyServer(sink, body, entry.size, self._stored_body_done)
        self.server.start()

    def _stored_body_done(self) -> None:
        self.server = None

    def send_data(self, data: bytes) -> None:
        if self.serving_stored:
            return
        self.sink.send_data(data)
        writer = self.writer
        if writer is not None and not writer.write(data):
            self.writer = None

    def flush(self) -> None:
        if not self.serving_stored:
            self.sink.flush()

    def send_end(self, trailers: Headers | None = None) -> None:
        if self.serving_stored:
            return  # the stored body's server (or _serve_revalidated) ends the response
        writer, self.writer = self.writer, None
        if writer is not None:
            if trailers:
                writer.discard()  # trailers are not stored: such a response is not kept
            else:
                self._commit(writer)
        self.sink.send_end(trailers)

    def _commit(self, writer: EntryWriter) -> None:
        finished = writer.finish()
        entry_head = self.entry_head
        if finished is None or entry_head is None:
            return
        body, path, size, digest = finished
        status, headers, response_time, age, declared = entry_head
        if declared is not None and declared != size:
            if path is not None:
                _unlink(path)
            return
        plan = self.plan
        request_headers = plan.head.headers
        names = policy.vary_names(headers) or ()
        entry = Entry(
            primary=plan.primary,
            vary_names=names,
            vary_values=policy.vary_key(names, request_headers),
            status=status,
            headers=headers,
            request_time=plan.request_time,
            response_time=response_time,
            initial_age=age,
            lifetime=policy.freshness_lifetime(status, headers, response_time),
            size=size,
            sha256=digest,
            body=body,
            path=path,
        )
        plan.cache.store.insert(entry)

    def abort(self) -> None:
        self._drop()
        self.sink.abort()

    def _drop(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.discard()
        server, self.server = self.server, None
        if server is not None:
            server.stopProducing()
        body, self.plan.body = self.plan.body, None
        if body is not None:
            body.close()

    def register_producer(self, producer: IPushProducer) -> None:
        if not self.serving_stored:
            self.sink.register_producer(producer)

    def unregister_producer(self) -> None:
        if not self.serving_stored:
            self.sink.unregister_producer()

    def start_tunnel(self, upstream: TunnelEnd) -> TunnelEnd:
        self._drop()
        return self.sink.start_tunnel(upstream)

    def client_gone(self) -> None:
        """The client left: a partial body is never stored."""
        self._drop()


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None
