"""rpxy.cache.relay in memory: the tee streams while storing, hits respect backpressure.

A recording sink stands in for a front end and a ``Clock`` for the reactor, so every
test drives the exact calls a ProxyExchange makes on its sink.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.task import Clock

from rpxy.cache.relay import CachingSink, ResponseCache
from rpxy.config.model import AppConfig, CacheConfig, TlsConfig
from rpxy.message import ConnectionInfo, RequestHead

CONN = ConnectionInfo("127.0.0.1", 50000, 8080)
MTLS_APP = AppConfig("m", "a.test", (), TlsConfig("c.pem", "k.pem", client_ca_cert_path="ca.pem"))


class RecordingSink:
    """Records what the client would get; pauses its producer on demand."""

    def __init__(self, *, pause_every_chunk: bool = False) -> None:
        self.calls: list[tuple] = []
        self.producer = None
        self.pause_every_chunk = pause_every_chunk
        self.request_producer = None

    def send_head(self, status, headers):
        self.calls.append(("head", status, list(headers)))

    def send_data(self, data):
        self.calls.append(("data", data))
        if self.pause_every_chunk and self.producer is not None:
            self.producer.pauseProducing()

    def flush(self):
        self.calls.append(("flush",))

    def send_end(self, trailers=None):
        self.calls.append(("end", trailers))

    def abort(self):
        self.calls.append(("abort",))

    def register_producer(self, producer):
        self.producer = producer
        self.calls.append(("register",))

    def unregister_producer(self):
        self.producer = None
        self.calls.append(("unregister",))

    @property
    def body(self) -> bytes:
        return b"".join(call[1] for call in self.calls if call[0] == "data")

    @property
    def status(self) -> int:
        return next(call[1] for call in self.calls if call[0] == "head")

    def header(self, name: bytes) -> bytes | None:
        head = next(call for call in self.calls if call[0] == "head")
        return next((value for key, value in head[2] if key == name), None)

    @property
    def ended(self) -> bool:
        return any(call[0] == "end" for call in self.calls)


def make_cache(tmp_path: Path, *, memory: int = 100, size: int = 10_000) -> tuple[ResponseCache, Clock]:
    clock = Clock()
    clock.advance(1_800_000_000)
    config = CacheConfig(cache_dir=str(tmp_path / "c"), max_cache_entry=100, max_cache_each_size=size, max_cache_each_size_on_memory=memory)
    return ResponseCache(config, clock), clock


def get(path: bytes = b"/x", method: bytes = b"GET", headers=None) -> RequestHead:
    return RequestHead(method, path, b"1.1", [(b"host", b"a.test"), *(headers or [])])


def forward(cache: ResponseCache, head: RequestHead, sink: RecordingSink) -> tuple[CachingSink, list]:
    plan = cache.plan(CONN, head, "a.test")
    assert plan is not None and not plan.answers_locally
    tee, headers = plan.forward(sink, [(b"host", b"a.test")])
    assert isinstance(tee, CachingSink)
    return tee, headers


def serve(cache: ResponseCache, head: RequestHead, sink: RecordingSink) -> list[int]:
    plan = cache.plan(CONN, head, "a.test")
    assert plan is not None and plan.answers_locally
    done: list[int] = []
    plan.serve(sink, done.append)
    return done


CACHEABLE = [(b"cache-control", b"max-age=60"), (b"server", b"rpxy")]


def test_each_chunk_reaches_the_client_before_the_body_ends(tmp_path):
    cache, _clock = make_cache(tmp_path)
    sink = RecordingSink()
    tee, _ = forward(cache, get(), sink)
    tee.send_head(200, CACHEABLE)
    tee.register_producer(object())
    assert sink.calls[-1] == ("register",)  # backpressure is the front end's, unchanged
    tee.send_data(b"first")
    assert sink.calls[-1] == ("data", b"first")
    assert len(cache.store) == 0  # nothing stored before the whole body arrived
    tee.send_data(b"second")
    tee.unregister_producer()
    tee.send_end(None)
    assert sink.body == b"firstsecond" and sink.ended
    assert len(cache.store) == 1
    assert sink.header(b"cache-status") == b"rpxy; fwd=uri-miss; fwd-status=200"  # no length: "stored" unknown


def test_hit_serves_stored_body_with_age(tmp_path):
    cache, clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE + [(b"content-length", b"5")])
    tee.send_data(b"hello")
    tee.send_end(None)
    clock.advance(7)
    sink = RecordingSink()
    done = serve(cache, get(), sink)
    assert done == [200]
    assert sink.body == b"hello" and sink.ended
    assert sink.header(b"age") == b"7"
    assert sink.header(b"content-length") == b"5"
    assert sink.header(b"cache-status") == b"rpxy; hit; ttl=53"


def test_hit_from_a_file_pauses_with_the_client(tmp_path):
    cache, _clock = make_cache(tmp_path, memory=0, size=1_000_000)
    body = os.urandom(300_000)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    for start in range(0, len(body), 10_000):
        tee.send_data(body[start : start + 10_000])
    tee.send_end(None)
    sink = RecordingSink(pause_every_chunk=True)
    done = serve(cache, get(), sink)
    chunks = 1
    while not sink.ended:
        assert len([c for c in sink.calls if c[0] == "data"]) == chunks  # one chunk per resume
        sink.producer.resumeProducing()
        chunks += 1
    assert sink.body == body and done == [200]
    assert sink.producer is None  # unregistered before the end


def test_client_gone_mid_body_stores_nothing(tmp_path):
    cache, _clock = make_cache(tmp_path, memory=10)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    tee.send_data(b"x" * 50)  # spilled into a .part file
    assert os.listdir(cache.store.directory)
    tee.client_gone()
    assert os.listdir(cache.store.directory) == []
    assert len(cache.store) == 0


def test_upstream_failure_after_head_stores_nothing(tmp_path):
    cache, _clock = make_cache(tmp_path)
    sink = RecordingSink()
    tee, _ = forward(cache, get(), sink)
    tee.send_head(200, CACHEABLE)
    tee.send_data(b"partial")
    tee.abort()
    assert sink.calls[-1] == ("abort",)
    assert len(cache.store) == 0


def test_short_body_against_content_length_is_not_stored(tmp_path):
    cache, _clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE + [(b"content-length", b"10")])
    tee.send_data(b"short")
    tee.send_end(None)
    assert len(cache.store) == 0


def test_trailers_are_not_stored(tmp_path):
    cache, _clock = make_cache(tmp_path)
    sink = RecordingSink()
    tee, _ = forward(cache, get(), sink)
    tee.send_head(200, CACHEABLE)
    tee.send_data(b"body")
    tee.send_end([(b"grpc-status", b"0")])
    assert sink.calls[-1] == ("end", [(b"grpc-status", b"0")])
    assert len(cache.store) == 0


def test_revalidation_304_serves_the_stored_body_and_absorbs_the_upstream_end(tmp_path):
    cache, clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, [(b"cache-control", b"max-age=10"), (b"etag", b'"v1"'), (b"x-old", b"1")])
    tee.send_data(b"stored body")
    tee.send_end(None)
    clock.advance(20)
    sink = RecordingSink()
    tee, headers = forward(cache, get(), sink)
    assert (b"if-none-match", b'"v1"') in headers
    tee.send_head(304, [(b"cache-control", b"max-age=100"), (b"etag", b'"v1"'), (b"x-old", b"2")])
    tee.register_producer(object())  # the exchange's registration is not the client's concern now
    tee.unregister_producer()
    tee.send_end(None)
    assert sink.status == 200 and sink.body == b"stored body"
    assert [call[0] for call in sink.calls].count("end") == 1
    assert sink.header(b"x-old") == b"2"
    assert sink.header(b"cache-status") == b"rpxy; fwd=stale; fwd-status=304"
    # and the entry is fresh again for max-age=100
    clock.advance(50)
    hit = RecordingSink()
    serve(cache, get(), hit)
    assert hit.body == b"stored body" and hit.header(b"cache-status").startswith(b"rpxy; hit")


def test_revalidation_answered_with_a_new_response_replaces_the_entry(tmp_path):
    cache, clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, [(b"cache-control", b"max-age=10"), (b"etag", b'"v1"')])
    tee.send_data(b"old")
    tee.send_end(None)
    clock.advance(20)
    sink = RecordingSink()
    tee, _ = forward(cache, get(), sink)
    tee.send_head(200, [(b"cache-control", b"max-age=10"), (b"etag", b'"v2"')])
    tee.send_data(b"new")
    tee.send_end(None)
    assert sink.body == b"new"
    hit = RecordingSink()
    serve(cache, get(), hit)
    assert hit.body == b"new"


def test_error_during_revalidation_is_passed_on_and_entry_kept(tmp_path):
    cache, clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, [(b"cache-control", b"max-age=10"), (b"etag", b'"v1"')])
    tee.send_end(None)
    clock.advance(20)
    sink = RecordingSink()
    tee, _ = forward(cache, get(), sink)
    tee.send_head(502, [(b"content-length", b"0")])
    tee.send_end(None)
    assert sink.status == 502  # never a stale answer instead (must-revalidate always holds)
    assert len(cache.store) == 1


def test_head_hit_sends_no_body(tmp_path):
    cache, _clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    tee.send_data(b"12345")
    tee.send_end(None)
    sink = RecordingSink()
    serve(cache, get(method=b"HEAD"), sink)
    assert sink.body == b"" and sink.ended and sink.header(b"content-length") == b"5"


def test_head_response_is_not_stored(tmp_path):
    cache, _clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(method=b"HEAD"), RecordingSink())
    tee.send_head(200, CACHEABLE + [(b"content-length", b"5")])
    tee.send_end(None)
    assert len(cache.store) == 0


def test_bypassed_requests(tmp_path):
    cache, _clock = make_cache(tmp_path)
    assert cache.plan(CONN, get(headers=[(b"range", b"bytes=0-1")]), "a.test") is None
    assert cache.plan(CONN, get(method=b"POST"), "a.test") is None
    assert cache.plan(CONN, get(), "a.test", sticky=True) is None
    assert cache.plan(CONN, get(), "a.test", body=True) is None  # a "fat GET": its body is not in the key
    websocket = get()
    websocket.protocol = b"websocket"
    assert cache.plan(CONN, websocket, "a.test") is None


def test_scheme_and_host_are_in_the_key(tmp_path):
    cache, _clock = make_cache(tmp_path)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    tee.send_end(None)
    assert cache.plan(CONN, get(), "a.test").answers_locally
    assert not cache.plan(CONN, get(), "b.test").answers_locally
    tls = ConnectionInfo("127.0.0.1", 50000, 8443, tls=True, sni="a.test")
    assert not cache.plan(tls, get(), "a.test").answers_locally
    assert not cache.plan(CONN, get(b"/x?q"), "a.test").answers_locally


def test_file_that_shrank_after_verification_aborts_instead_of_ending_short(tmp_path):
    cache, _clock = make_cache(tmp_path, memory=0, size=1_000_000)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    tee.send_data(b"x" * 200_000)
    tee.send_end(None)
    (entry,) = cache.store.lru.values()
    sink = RecordingSink(pause_every_chunk=True)
    done = serve(cache, get(), sink)  # verified, first chunk sent, paused
    os.truncate(entry.path, 100_000)
    while sink.producer is not None:
        sink.producer.resumeProducing()
    assert sink.calls[-1] == ("abort",) and not sink.ended
    assert len(sink.body) == 100_000
    assert done == []


def test_mtls_app_responses_stored_only_when_explicitly_allowed(tmp_path):
    cache, _clock = make_cache(tmp_path)
    for path, cc, stored in ((b"/private-ish", b"max-age=60", 0), (b"/public", b"public, max-age=60", 1)):
        plan = cache.plan(CONN, get(path), "a.test", app=MTLS_APP)
        tee, _ = plan.forward(RecordingSink(), [])
        tee.send_head(200, [(b"cache-control", cc)])
        tee.send_end(None)
        assert len(cache.store) == stored


def test_reload_closes_the_old_cache_only_when_the_new_one_exists(tmp_path):
    from types import SimpleNamespace

    import pytest

    from rpxy.config.load import ConfigError
    from rpxy.config.model import Config, ExperimentalConfig
    from rpxy.state import build_cache

    old, _clock = make_cache(tmp_path)
    previous = SimpleNamespace(cache=old)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    bad = Config(apps=(), experimental=ExperimentalConfig(cache=CacheConfig(cache_dir=str(blocker))))
    with pytest.raises(ConfigError, match="experimental.cache.cache_dir"):
        build_cache(bad, Clock(), previous)
    assert not old.store.closed  # the running state keeps a working cache
    good = Config(apps=(), experimental=ExperimentalConfig(cache=CacheConfig(cache_dir=str(tmp_path / "new"))))
    new = build_cache(good, Clock(), previous)
    assert new is not None and old.store.closed
    assert build_cache(Config(apps=()), Clock(), SimpleNamespace(cache=new)) is None and new.store.closed


def test_large_file_corrupted_is_verified_while_streaming_and_never_completes(tmp_path):
    from rpxy.cache.store import VERIFY_FIRST

    cache, _clock = make_cache(tmp_path, memory=0, size=4 * VERIFY_FIRST)
    size = VERIFY_FIRST + 100_000
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    for start in range(0, size, 50_000):
        tee.send_data(b"y" * min(50_000, size - start))
    tee.send_end(None)
    (entry,) = cache.store.lru.values()
    # intact: served completely, verified as it streamed
    sink = RecordingSink()
    assert serve(cache, get(), sink) == [200]
    assert len(sink.body) == size and sink.ended
    # one flipped byte in the middle
    with open(entry.path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"Z")
    sink = RecordingSink()
    done = serve(cache, get(), sink)
    assert sink.calls[-1] == ("abort",) and not sink.ended and done == []
    assert len(sink.body) < size  # the last bytes were held back
    assert not os.path.exists(entry.path) and len(cache.store) == 0
    assert not cache.plan(CONN, get(), "a.test").answers_locally  # the next request is a miss


def test_large_file_with_wrong_size_is_a_miss_at_once(tmp_path):
    from rpxy.cache.store import VERIFY_FIRST

    cache, _clock = make_cache(tmp_path, memory=0, size=4 * VERIFY_FIRST)
    tee, _ = forward(cache, get(), RecordingSink())
    tee.send_head(200, CACHEABLE)
    tee.send_data(b"y" * (VERIFY_FIRST + 1))
    tee.send_end(None)
    (entry,) = cache.store.lru.values()
    os.truncate(entry.path, VERIFY_FIRST)
    assert not cache.plan(CONN, get(), "a.test").answers_locally
    assert not os.path.exists(entry.path)
