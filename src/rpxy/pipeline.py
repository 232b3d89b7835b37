"""The one request pipeline shared by every front end.

A front end hands over a parsed :class:`~rpxy.message.RequestHead` and a
:class:`~rpxy.streams.ResponseSink`; :meth:`Pipeline.handle` applies rpxy's rules in
their documented order (Host → body size → app → HTTPS redirect → path → upstream)
and returns the :class:`~rpxy.streams.Exchange` the front end feeds with the request
body. Local answers (400, 404, 301, ...) have empty bodies as in rpxy; everything
else is streamed to and from an upstream with backpressure both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rpxy.cache.relay import CacheHitExchange, CachingSink
from rpxy.message import ConnectionInfo, Headers, HttpError, RequestHead
from rpxy.metrics import NULL_METRICS
from rpxy.policy.headers.alt_svc import alt_svc_for
from rpxy.policy.headers.request import prepare_request_headers
from rpxy.policy.headers.response import prepare_response_headers
from rpxy.policy.host import request_host
from rpxy.policy.paths import rewrite_path, split_path_query
from rpxy.policy.responses import https_redirect_location
from rpxy.upstream.h1client import UpstreamConnection
from rpxy.upstream.h2client import H2UpstreamStream, request_fields
from rpxy.upstream.sticky import strip_sticky_cookie

if TYPE_CHECKING:
    from rpxy.logs import AccessLog
    from rpxy.state import AppRuntime, RouteRuntime, RuntimeState, StateHolder
    from rpxy.streams import ResponseSink, TunnelEnd
    from rpxy.upstream.h2client import H2UpstreamPool
    from rpxy.upstream.pool import UpstreamPool

log = Logger()

_SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
_SERVER = (b"server", b"rpxy")


class Pipeline:
    """Routes requests of every front end with the state current when each request starts."""

    def __init__(self, holder: StateHolder, reactor: IReactorTime, access_log: AccessLog) -> None:
        self.holder = holder
        self.reactor = reactor
        self.access_log = access_log
        #: ACME HTTP-01 responder ``(host, path) -> body | None`` (rpxy.acme), when configured.
        self.acme_http01: Callable[[str, bytes], bytes | None] | None = None
        #: rpxy.metrics: the recorder for cache lookups (a no-op when metrics are off), and the
        #: clock a proxied request is stamped with when it starts (None when off: no clock read).
        self.metrics = NULL_METRICS
        self.clock: Callable[[], float] | None = None

    def handle(
        self,
        conn: ConnectionInfo,
        head: RequestHead,
        sink: ResponseSink,
        *,
        content_length: int | None,
        body_expected: bool,
    ) -> _LocalExchange | ProxyExchange | CacheHitExchange:
        state = self.holder.current
        try:
            host, original_host = request_host(head)
        except HttpError as error:
            log.debug("rejected request from {peer}: {reason}", peer=conn.peer_ip, reason=error.reason)
            return self._local(error.status, conn, head, sink, host="", close=True)
        if not conn.tls and self.acme_http01 is not None and head.path.startswith(b"/.well-known/acme-challenge/"):
            body = self.acme_http01(host, head.path)
            if body is not None:
                return self._acme_answer(conn, head, sink, host, body)
        if conn.tls and host != conn.sni and self._misdirected(state, host, conn.sni):
            return self._local(421, conn, head, sink, host=host)
        max_body = state.max_body
        if max_body and content_length is not None and content_length > max_body:
            return self._local(413, conn, head, sink, host=host, close=True)

        app = state.apps.lookup(host)
        fallback = False
        if app is None:
            if not conn.tls and state.default_app is not None:
                app = state.default_app
                fallback = True
            else:
                return self._local(503, conn, head, sink, host=host)

        if not conn.tls and app.https_redirection:
            # A wildcard app redirects to the name the client asked for, not to "*.example.com".
            redirect_host = host if app.server_name.startswith("*.") else app.server_name
            location = https_redirect_location(redirect_host, state.https_port_for_clients, head.path)
            return self._local(
                301, conn, head, sink, host=host, extra=[(b"location", location)], app=app.config.name
            )

        path, _query = split_path_query(head.path)
        asterisk = path == b"*"  # OPTIONS * is about the server: the default route answers it
        match = app.paths.lookup(b"/" if asterisk else path)
        if match is None:
            return self._local(404, conn, head, sink, host=host, app=app.config.name)
        prefix, route = match
        cache_plan = None
        if state.cache is not None:
            cache_plan = state.cache.plan(conn, head, host, app=app.config, sticky=route.sticky, body=body_expected)
            if cache_plan is not None:
                self.metrics.cache_lookup(cache_plan)
                if cache_plan.answers_locally:
                    record = self.access_log.record
                    name = app.config.name
                    return cache_plan.serve(
                        sink, lambda status: record(conn, head, host, status, upstream="cache", app=name)
                    )

        # Set by the front end: HTTP/1.1 Upgrade or HTTP/2 extended CONNECT (RFC 8441 ``:protocol``).
        upgrade = head.protocol
        if fallback and not route.set_upstream_host:
            upstream_host: bytes | None = app.server_name_bytes
        else:
            upstream_host = None
        prepared = prepare_request_headers(
            head.headers,
            conn=conn,
            original_host=original_host,
            original_uri=head.path,
            trusted=state.trusted,
            add_forwarded=route.forwarded_header,
            upstream_host=upstream_host,
            upgrade_insecure=route.upgrade_insecure,
            upgrade=upgrade,
        )
        headers = prepared.headers
        if route.sticky:
            choice = route.group.choose(
                cookie_values=[value for name, value in headers if name == b"cookie"],
                now=self.reactor.seconds(),
                secure=prepared.secure,
            )
            headers = strip_sticky_cookie(headers)
        else:
            choice = route.group.choose()
        if cache_plan is not None:
            sink, headers = cache_plan.forward(sink, headers)
        exchange = ProxyExchange(
            self,
            state,
            conn,
            head,
            sink,
            app=app,
            route=route,
            host=host,
            upstream_path=head.path if asterisk else rewrite_path(head.path, prefix, route.replace_path),
            headers=headers,
            index=choice.index,
            set_cookie=choice.set_cookie,
            upgrade=upgrade,
            content_length=content_length,
            body_expected=body_expected,
            max_body=max_body,
        )
        exchange.start()
        return exchange

    @staticmethod
    def _misdirected(state: RuntimeState, host: str, sni: str | None) -> bool:
        """Host differs from SNI: domain fronting, refused (421) unless ignore_sni_consistency.

        Even then, a request may never reach an mTLS app over a handshake made for another
        app (that handshake did not ask for a client certificate).
        """
        if not state.ignore_sni_consistency:
            return True
        app = state.apps.lookup(host)
        if app is None or app.config.tls is None or not app.config.tls.client_ca_cert_path:
            return False
        return app is not state.apps.lookup(sni or "")

    def _acme_answer(self, conn: ConnectionInfo, head: RequestHead, sink: ResponseSink, host: str, body: bytes):
        """An HTTP-01 key authorization (RFC 8555 section 8.3), before any redirect or route."""
        sink.send_head(200, [_SERVER, (b"content-type", b"application/octet-stream"),
                             (b"content-length", str(len(body)).encode())])
        if head.method != b"HEAD":
            sink.send_data(body)
        sink.send_end(None)
        self.access_log.record(conn, head, host, 200, upstream="acme")
        return _LOCAL_EXCHANGE

    def _local(
        self,
        status: int,
        conn: ConnectionInfo,
        head: RequestHead,
        sink: ResponseSink,
        *,
        host: str,
        close: bool = False,
        extra: Headers | None = None,
        app: str = "",
    ) -> _LocalExchange:
        send_local_response(sink, status, close=close, extra=extra)
        self.access_log.record(conn, head, host, status, upstream="", app=app)
        return _LOCAL_EXCHANGE


def send_local_response(sink: ResponseSink, status: int, *, close: bool = False, extra: Headers | None = None) -> None:
    """An rpxy-made response: empty body, ``Server: rpxy``."""
    headers: Headers = [_SERVER, (b"content-length", b"0")]
    if extra:
        headers.extend(extra)
    if close:
        headers.append((b"connection", b"close"))
    sink.send_head(status, headers)
    sink.send_end(None)


def requested_upgrade(headers: Headers) -> bytes | None:
    """The client's Upgrade value when it asks for a protocol switch we relay (never h2c)."""
    upgrade = None
    connection_upgrade = False
    for name, value in headers:
        if name == b"upgrade":
            upgrade = value
        elif name == b"connection" and b"upgrade" in value.lower():
            connection_upgrade = any(token.strip() == b"upgrade" for token in value.lower().split(b","))
    if upgrade is None or not connection_upgrade or upgrade.strip().lower() == b"h2c":
        return None
    return upgrade.strip()


class _LocalExchange:
    """A request answered locally: its body (if any) is discarded."""

    def request_data(self, data: bytes) -> None:
        pass

    def request_end(self, trailers: Headers | None = None) -> None:
        pass

    def client_gone(self) -> None:
        pass


_LOCAL_EXCHANGE = _LocalExchange()


def wants_http2(route: RouteRuntime, headers: Headers, upgrade: bytes | None) -> bool:
    """The upstream version: gRPC always HTTP/2, force options override, otherwise HTTP/1.1."""
    if route.h2_pools is None or upgrade is not None:
        return False  # force_http11_upstream, or a protocol switch (HTTP/1.1 only)
    if route.force_http2:
        return True
    for name, value in headers:
        if name == b"content-type":
            return value[:16].lower() == b"application/grpc"
    return False


class ProxyExchange:
    """One request relayed to one upstream over HTTP/1.1 or HTTP/2, streaming both ways."""

    def __init__(
        self,
        pipeline: Pipeline,
        state: RuntimeState,
        conn: ConnectionInfo,
        head: RequestHead,
        sink: ResponseSink,
        *,
        app: AppRuntime,
        route: RouteRuntime,
        host: str,
        upstream_path: bytes,
        headers: Headers,
        index: int,
        set_cookie: bytes | None,
        upgrade: bytes | None,
        content_length: int | None,
        body_expected: bool,
        max_body: int,
    ) -> None:
        self.pipeline = pipeline
        self.state = state
        self.conn = conn
        self.head = head
        self.sink = sink
        self.app = app
        self.route = route
        self.host = host
        self.upstream_path = upstream_path
        self.headers = headers
        self.index = index
        self.set_cookie = set_cookie
        self.upgrade = upgrade
        self.content_length = content_length
        self.body_expected = body_expected
        self.max_body = max_body if content_length is None else 0
        self.body_seen = 0
        self.upstream: UpstreamConnection | H2UpstreamStream | None = None
        self.http2 = wants_http2(route, headers, upgrade)
        self.pending: list[bytes] | None = [] if body_expected else None
        self.request_done = not body_expected
        self.request_trailers: Headers | None = None
        self.response_started = False
        self.finished = False
        self.status = 0
        self.tried_alternative = False
        self.retried_stale = False
        # Set while the upstream connection holds a response deadline for us.
        self.timer: bool | None = None
        self.client_tunnel: TunnelEnd | None = None
        self.paused_client = False
        self.producer_registered = False
        clock = pipeline.clock
        self.started = clock() if clock is not None else None  # for the latency metric

    # -- lifecycle ------------------------------------------------------------

    @property
    def pool(self) -> UpstreamPool | H2UpstreamPool:
        route = self.route
        pool = route.h2_pools[self.index] if self.http2 else route.pools[self.index]  # type: ignore[index]
        if route.proxy_protocol:
            # send_proxy_protocol_v*: connections that name this client serve only this client.
            return pool.for_client(self.conn)  # type: ignore[union-attr]
        return pool

    def start(self, *, fresh: bool = False) -> None:
        if self.body_expected and not self.paused_client:
            # Hold the client's body until the upstream connection exists.
            self.paused_client = True
            self.sink.request_producer.pauseProducing()
        if self.http2:
            self.pool.acquire(self._connected, self._connect_failed, fresh=fresh)
        else:
            retryable = not self.body_expected and self.head.method in _SAFE_METHODS
            self.pool.acquire(self._connected, self._connect_failed, fresh=fresh, probe=not retryable)

    def _connected(self, upstream: UpstreamConnection | H2UpstreamStream) -> None:
        if self.finished:
            # The client left while we connected: keep the connection for someone else.
            upstream.pool.release(upstream)
            return
        self.upstream = upstream
        has_body = self.body_expected
        if isinstance(upstream, H2UpstreamStream):
            upstream.send_request_fields(self, self._h2_fields(upstream), end_stream=not has_body)
        else:
            chunked = has_body and self.content_length is None
            upstream.send_request(
                self,
                self._encode_head(chunked),
                is_head=self.head.method == b"HEAD",
                chunked_body=chunked,
            )
        timeout = self.state.config.upstream_response_timeout
        if timeout > 0:
            self.timer = True
            upstream.set_response_deadline(self.pipeline.reactor.seconds() + timeout)
        pending = self.pending
        if pending:
            for chunk in pending:
                upstream.write_body(chunk)
        self.pending = None
        if self.request_done:
            upstream.end_body(self.request_trailers)
        else:
            upstream.transport.registerProducer(self.sink.request_producer, True)
            self.producer_registered = True
        if self.paused_client:
            self.paused_client = False
            self.sink.request_producer.resumeProducing()

    def _h2_fields(self, upstream: H2UpstreamStream) -> Headers:
        route = self.route
        return request_fields(
            self.head.method,
            b"https" if upstream.pool.upstream.tls else b"http",
            self.upstream_path,
            self.headers,
            route.upstream_hosts[self.index] if route.set_upstream_host else None,
        )

    def _encode_head(self, chunked: bool) -> bytes:
        route = self.route
        host_override = route.upstream_hosts[self.index] if route.set_upstream_host else None
        parts = [self.head.method, b" ", self.upstream_path, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            if host_override is not None and name == b"host":
                continue
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        if host_override is not None:
            parts.append(b"host: " + host_override + b"\r\n")
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _connect_failed(self, failure: Failure) -> None:
        if self.finished:
            return
        log.warn(
            "upstream {upstream} connect failed: {error}",
            upstream=self.route.upstream_uris[self.index],
            error=failure.getErrorMessage(),
        )
        if not self.tried_alternative:
            self.tried_alternative = True
            alternative = self.route.group.alternative(self.index)
            if alternative is not None:
                self.index = alternative.index
                self.start()
                return
        self._fail_before_response(502)

    def upstream_timeout(self) -> None:
        """The upstream's response head did not arrive within upstream_response_timeout."""
        self.timer = None
        if self.response_started or self.finished:
            return
        log.warn("upstream {upstream} did not answer in time", upstream=self.route.upstream_uris[self.index])
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        self._fail_before_response(504)

    def _fail_before_response(self, status: int) -> None:
        self._cancel_timer()
        self._drop_request_producer()
        if self.paused_client:
            self.paused_client = False
            self.sink.request_producer.resumeProducing()
        send_local_response(self.sink, status, close=not self.request_done)
        self._finish(status)

    def _finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        self.status = status
        self.pipeline.access_log.record(
            self.conn,
            self.head,
            self.host,
            status,
            upstream=self.route.upstream_uris[self.index] + self.upstream_path.split(b"?", 1)[0].decode("latin-1"),
            app=self.app.config.name,
            started=self.started,
        )

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer = None
            upstream = self.upstream
            if upstream is not None:
                upstream.set_response_deadline(None)

    def _drop_request_producer(self) -> None:
        upstream = self.upstream
        if self.producer_registered:
            self.producer_registered = False
            if upstream is not None and upstream.transport is not None:
                upstream.transport.unregisterProducer()

    # -- Exchange: events from the client ----------------------------------------

    def request_data(self, data: bytes) -> None:
        if self.finished and self.client_tunnel is None:
            return
        if self.max_body:
            self.body_seen += len(data)
            if self.body_seen > self.max_body:
                self._body_too_large()
                return
        upstream = self.upstream
        if upstream is not None:
            upstream.write_body(data)
        elif self.pending is not None:
            self.pending.append(data)

    def request_end(self, trailers: Headers | None = None) -> None:
        if self.request_done:
            return
        self.request_done = True
        upstream = self.upstream
        if upstream is None:
            self.request_trailers = trailers
            return
        if self.finished:
            return
        self._drop_request_producer()
        upstream.end_body(trailers)

    def client_gone(self) -> None:
        self._cancel_timer()
        self._drop_request_producer()
        if self.client_tunnel is not None:
            upstream, self.upstream = self.upstream, None
            if upstream is not None:
                upstream.close()
            return
        if self.finished:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        if isinstance(self.sink, CachingSink):
            self.sink.client_gone()  # a partial body is never stored
        self._finish(self.status or 499)

    def _body_too_large(self) -> None:
        log.info("request body over request_max_body_size from {peer}", peer=self.conn.peer_ip)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        if self.response_started:
            self.sink.abort()
            self._finish(self.status)
        else:
            self.request_done = True  # nothing more is read; the connection closes
            self._cancel_timer()
            send_local_response(self.sink, 413, close=True)
            self._finish(413)

    # -- ResponseHandler: events from the upstream -----------------------------

    def upstream_head(self, status: int, headers: Headers, keep_alive: bool) -> None:
        self._cancel_timer()
        if self.finished:
            return
        if status == 101:
            offered = None
            for name, value in headers:
                if name == b"upgrade":
                    offered = value.strip().lower()
            if self.upgrade is None or offered != self.upgrade.lower():
                log.warn("upstream switched protocols without a matching Upgrade")
                upstream, self.upstream = self.upstream, None
                if upstream is not None:
                    upstream.abort()
                self._fail_before_response(500)
                return
            self.response_started = True
            self.status = 101
            self.sink.send_head(101, prepare_response_headers(headers, alt_svc=None, upgrade=True))
            self._start_tunnel()
            return
        self.response_started = True
        self.status = status
        headers = prepare_response_headers(
            headers, alt_svc=alt_svc_for(self.state.config, self.app.config, tls=self.conn.tls), upgrade=False
        )
        if self.set_cookie is not None:
            headers.append((b"set-cookie", self.set_cookie))
        sink = self.sink
        sink.send_head(status, headers)
        upstream = self.upstream
        if upstream is not None:
            sink.register_producer(upstream)

    def upstream_data(self, data: bytes) -> None:
        if not self.finished:
            self.sink.send_data(data)

    def upstream_flush(self) -> None:
        if not self.finished:
            self.sink.flush()

    def upstream_end(self, trailers: Headers | None) -> None:
        if self.client_tunnel is not None:
            tunnel, self.client_tunnel = self.client_tunnel, None
            tunnel.close()
            return
        if self.finished:
            return
        sink = self.sink
        sink.unregister_producer()
        self._drop_request_producer()
        upstream = self.upstream
        if not self.request_done:
            # The upstream answered before reading the whole body: that connection is spent.
            self.upstream = None
            if upstream is not None:
                upstream.close()
        else:
            self.upstream = None
        sink.send_end(trailers)
        self._finish(self.status)

    def upstream_failed(self, reason: str, received_anything: bool) -> None:
        self._cancel_timer()
        self._drop_request_producer()
        upstream, self.upstream = self.upstream, None
        if self.finished:
            return
        if (
            not received_anything
            and upstream is not None
            and upstream.reused
            and not self.retried_stale
            and not self.body_expected
            and self.head.method in _SAFE_METHODS
        ):
            # A pooled connection the upstream had closed: retry once on a fresh one.
            self.retried_stale = True
            self.start(fresh=True)
            return
        log.warn(
            "upstream {upstream} failed: {reason}",
            upstream=self.route.upstream_uris[self.index],
            reason=reason,
        )
        if self.response_started:
            self.sink.unregister_producer()
            self.sink.abort()
            self._finish(self.status)
        else:
            self._fail_before_response(502)

    # -- WebSocket / Upgrade tunnel ----------------------------------------------

    def _start_tunnel(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        self.client_tunnel = self.sink.start_tunnel(_UpstreamTunnelEnd(upstream))
        self._finish(101)

    def upstream_tunnel_data(self, data: bytes) -> None:
        tunnel = self.client_tunnel
        if tunnel is not None:
            tunnel.write(data)


class _UpstreamTunnelEnd:
    """The upstream side of a relayed upgrade."""

    def __init__(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream

    def write(self, data: bytes) -> None:
        self.upstream.tunnel_write(data)

    def close(self) -> None:
        self.upstream.close()

    def pause(self) -> None:
        self.upstream.pauseProducing()

    def resume(self) -> None:
        self.upstream.resumeProducing()

    def register_producer(self, producer: IPushProducer) -> None:
        """While registered, ``producer`` (the client's side) is paused when the upstream is full."""
        transport = self.upstream.transport
        if transport is not None:
            transport.registerProducer(producer, True)
