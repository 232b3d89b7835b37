"""The response cache through the real proxy, against an origin that counts what reaches it.

One proxy (module scope) with two virtual hosts in front of one counting origin
(tests/support/cache_origin.py); every test uses its own URLs, so entries never collide.
Memory entries are up to 1000 bytes, file entries up to 100000 bytes. Tests needing other
limits start their own proxy.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, RPXY, Rpxy, curl, free_port

MEMORY_LIMIT = 1000
FILE_LIMIT = 100_000


class CacheOrigin:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cache_origin", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"cache origin did not start: {line!r}")
        self.port = int(line.split()[1])
        self.location = f"127.0.0.1:{self.port}"

    def stats(self, uri: str) -> dict:
        with urllib.request.urlopen(f"http://{self.location}/__stats", timeout=10) as answer:
            return json.load(answer).get(uri, {"full": 0, "not_modified": 0, "conditional": 0, "methods": []})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def cache_config(origin: CacheOrigin, cache_dir: Path, *, entries: int = 1000, memory: int = MEMORY_LIMIT, size: int = FILE_LIMIT) -> str:
    return f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"

        [apps.a]
        server_name = "a.test"
        reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]

        [apps.b]
        server_name = "b.test"
        reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]

        [experimental.cache]
        cache_dir = "{cache_dir}"
        max_cache_entry = {entries}
        max_cache_each_size = {size}
        max_cache_each_size_on_memory = {memory}
    """


@pytest.fixture(scope="module")
def origin():
    started = CacheOrigin()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache") / "entries"


@pytest.fixture(scope="module")
def proxy(origin, cache_dir, tmp_path_factory):
    started = Rpxy(tmp_path_factory.mktemp("rpxy"), cache_config(origin, cache_dir))
    yield started
    started.stop()


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name]
        return ", ".join(values) if values else None

    @property
    def cache_status(self) -> str:
        return self.header("cache-status") or ""


def fetch(proxy: Rpxy, path: str, *, host: str = "a.test", method: str = "GET", headers: dict | None = None) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        connection.request(method, path, headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        body = response.read()
        return Answer(response.status, response.getheaders(), body)
    finally:
        connection.close()


# -- hit, miss, Age, Cache-Status ------------------------------------------------------


def test_miss_then_hit_with_age_and_cache_status(proxy, origin):
    url = "/hit?cc=max-age=60"
    first = fetch(proxy, url)
    assert first.status == 200
    assert first.cache_status == "rpxy; fwd=uri-miss; fwd-status=200; stored"
    second = fetch(proxy, url)
    assert second.status == 200
    assert second.body == first.body == b"/hit #1"
    assert second.cache_status.startswith("rpxy; hit; ttl=")
    assert second.header("age") is not None and int(second.header("age")) >= 0
    assert second.header("server") == "rpxy"
    assert origin.stats(url)["full"] == 1
    lines = proxy.access_lines()
    assert any("/hit?cc=max-age=60" in line and line.endswith('"cache"') for line in lines), lines


def test_hit_over_http2(proxy, origin):
    url = "/h2hit?cc=max-age=60"
    first = fetch(proxy, url)
    result = curl("--http2-prior-knowledge", "-i", "-H", "Host: a.test", proxy.url + url)
    assert result.returncode == 0, result.stderr
    assert b"cache-status: rpxy; hit" in result.stdout
    assert result.stdout.endswith(first.body)
    assert origin.stats(url)["full"] == 1


@pytest.mark.parametrize(
    ("name", "query", "headers"),
    [
        ("no-store", "cc=no-store", {}),
        ("private", "cc=private,max-age=60", {}),
        ("set-cookie", "cc=max-age=60&setcookie=1", {}),
        ("authorization", "cc=max-age=60", {"Authorization": "Bearer x"}),
        ("request-no-store", "cc=max-age=60", {"Cache-Control": "no-store"}),
        ("no-freshness-no-validator", "x=1", {}),
        ("status-500", "cc=max-age=60&status=500", {}),
        ("vary-star", "cc=max-age=60&vary=*", {}),
        ("malformed", "cc=max-age=60,%22unterminated", {}),
    ],
)
def test_not_stored(proxy, origin, name, query, headers):
    url = f"/notstored-{name}?{query}"
    first = fetch(proxy, url, headers=headers)
    second = fetch(proxy, url, headers=headers)
    assert "hit" not in second.cache_status
    assert "stored" not in first.cache_status
    assert origin.stats(url)["full"] == 2
    if name == "set-cookie":
        assert first.header("set-cookie") != second.header("set-cookie")


def test_authorization_with_public_is_stored(proxy, origin):
    url = "/auth-public?cc=public,max-age=60"
    fetch(proxy, url, headers={"Authorization": "Bearer x"})
    second = fetch(proxy, url, headers={"Authorization": "Bearer x"})
    assert "hit" in second.cache_status
    assert origin.stats(url)["full"] == 1


def test_request_no_cache_goes_to_the_origin(proxy, origin):
    url = "/reqnocache?cc=max-age=60"
    fetch(proxy, url)
    second = fetch(proxy, url, headers={"Cache-Control": "no-cache"})
    assert second.cache_status.startswith("rpxy; fwd=request")
    assert origin.stats(url)["full"] == 2
    assert "hit" in fetch(proxy, url).cache_status


def test_only_if_cached_miss_is_504(proxy, origin):
    url = "/onlyifcached?cc=max-age=60"
    answer = fetch(proxy, url, headers={"Cache-Control": "only-if-cached"})
    assert answer.status == 504
    assert origin.stats(url)["full"] == 0


# -- revalidation ------------------------------------------------------------------------


def test_stale_entry_revalidated_with_etag(proxy, origin):
    url = "/reval-etag?cc=max-age=0&etag=v1"
    first = fetch(proxy, url)
    assert "stored" in first.cache_status
    second = fetch(proxy, url)
    assert second.status == 200
    assert second.body == first.body
    assert second.cache_status == "rpxy; fwd=stale; fwd-status=304"
    assert second.header("etag") == '"v1"'
    stats = origin.stats(url)
    assert stats["full"] == 1 and stats["not_modified"] == 1


def test_no_cache_response_revalidated_with_last_modified(proxy, origin):
    url = "/reval-lm?cc=no-cache&lm=3600"
    first = fetch(proxy, url)
    for _ in range(2):
        again = fetch(proxy, url)
        assert again.body == first.body
        assert again.cache_status == "rpxy; fwd=stale; fwd-status=304"
    stats = origin.stats(url)
    assert stats["full"] == 1 and stats["not_modified"] == 2


def test_head_revalidation_sends_no_body(proxy, origin):
    url = "/reval-head?cc=max-age=0&etag=h1"
    fetch(proxy, url)
    head = fetch(proxy, url, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.header("content-length") == str(len(b"/reval-head #1"))
    assert fetch(proxy, url).body == b"/reval-head #1"


def test_client_conditional_answered_from_a_fresh_entry(proxy, origin):
    url = "/client-inm?cc=max-age=60&etag=c1"
    fetch(proxy, url)
    answer = fetch(proxy, url, headers={"If-None-Match": '"c1"'})
    assert answer.status == 304
    assert answer.body == b""
    assert answer.header("etag") == '"c1"'
    assert origin.stats(url)["full"] == 1 and origin.stats(url)["conditional"] == 0


def test_heuristic_freshness_from_last_modified(proxy, origin):
    url = "/heuristic?lm=36000"  # 10 % of 10 h: fresh for about an hour
    fetch(proxy, url)
    assert "hit" in fetch(proxy, url).cache_status
    assert origin.stats(url)["full"] == 1


# -- keys: Vary, virtual hosts, unkeyed headers --------------------------------------------


def test_vary_selects_by_request_header(proxy, origin):
    url = "/vary?cc=max-age=60&vary=Accept-Language&echo=accept-language"
    en = fetch(proxy, url, headers={"Accept-Language": "en"})
    fr = fetch(proxy, url, headers={"Accept-Language": "fr"})
    assert en.body.endswith(b"accept-language=en") and fr.body.endswith(b"accept-language=fr")
    assert fr.cache_status.startswith("rpxy; fwd=vary-miss")
    en_again = fetch(proxy, url, headers={"Accept-Language": "en"})
    fr_again = fetch(proxy, url, headers={"Accept-Language": "fr"})
    none = fetch(proxy, url)
    assert (en_again.body, fr_again.body) == (en.body, fr.body)
    assert "hit" in en_again.cache_status and "hit" in fr_again.cache_status
    assert none.body.endswith(b"accept-language=-") and "hit" not in none.cache_status
    assert origin.stats(url)["full"] == 3


def test_virtual_hosts_never_share_entries(proxy, origin):
    url = "/vhost?cc=max-age=60&echo=host"
    a = fetch(proxy, url, host="a.test")
    b = fetch(proxy, url, host="b.test")
    assert a.body.endswith(b"host=a.test") and b.body.endswith(b"host=b.test")
    assert "hit" not in b.cache_status
    assert fetch(proxy, url, host="b.test").body == b.body
    assert origin.stats(url)["full"] == 2


def test_unkeyed_x_forwarded_host_does_not_poison(proxy, origin):
    url = "/poison?cc=max-age=60&echo=x-forwarded-host"
    attack = fetch(proxy, url, headers={"X-Forwarded-Host": "evil.example"})
    assert b"evil" not in attack.body  # the proxy sets X-Forwarded-Host itself
    victim = fetch(proxy, url)
    assert b"evil" not in victim.body
    assert victim.body.endswith(b"x-forwarded-host=a.test")


def test_private_dynamic_page_under_a_static_looking_path_is_not_stored(proxy, origin):
    # Web cache deception: /account/x.css answered by the dynamic account page.
    url = "/account/x.css?cc=private&setcookie=1"
    victim = fetch(proxy, url, headers={"Cookie": "session=victim"})
    attacker = fetch(proxy, url)
    assert "hit" not in attacker.cache_status
    assert attacker.header("set-cookie") != victim.header("set-cookie")
    assert origin.stats(url)["full"] == 2


def test_head_does_not_store_a_body(proxy, origin):
    url = "/head-first?cc=max-age=60"
    head = fetch(proxy, url, method="HEAD")
    assert head.body == b"" and "stored" not in head.cache_status
    get = fetch(proxy, url)
    assert get.body == b"/head-first #2"  # HEAD did not leave an empty entry behind
    assert "hit" not in get.cache_status
    head_hit = fetch(proxy, url, method="HEAD")
    assert "hit" in head_hit.cache_status and head_hit.body == b""
    assert head_hit.header("content-length") == str(len(get.body))
    assert origin.stats(url)["methods"] == ["HEAD", "GET"]


def test_unsafe_method_invalidates(proxy, origin):
    url = "/invalidate?cc=max-age=60"
    fetch(proxy, url)
    assert "hit" in fetch(proxy, url).cache_status
    fetch(proxy, url, method="POST")
    after = fetch(proxy, url)
    assert "hit" not in after.cache_status
    assert origin.stats(url)["full"] == 3


# -- memory, files, limits ---------------------------------------------------------------


def _cache_files(cache_dir: Path, suffix: str = ".cache") -> set[Path]:
    return {path for path in cache_dir.iterdir() if path.name.endswith(suffix)} if cache_dir.exists() else set()


def _logged(proxy: Rpxy, text: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while text not in proxy.system_log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return text in proxy.system_log()


def _new_cache_files(cache_dir: Path, before: set[Path], count: int = 1) -> set[Path]:
    """The entry is committed when the upstream's end is seen, which may come just after the
    client has read the last byte: wait (bounded) for the file."""
    deadline = time.monotonic() + 10
    while len(_cache_files(cache_dir) - before) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return _cache_files(cache_dir) - before


def test_small_entry_stays_in_memory(proxy, origin, cache_dir):
    before = _cache_files(cache_dir)
    url = f"/memory?cc=max-age=60&size={MEMORY_LIMIT}&chunked=1"
    first = fetch(proxy, url)
    assert len(first.body) == MEMORY_LIMIT
    assert _cache_files(cache_dir) == before
    assert fetch(proxy, url).body == first.body
    assert origin.stats(url)["full"] == 1


def test_file_backed_entry(proxy, origin, cache_dir):
    before = _cache_files(cache_dir)
    url = "/file?cc=max-age=60&size=50000"
    first = fetch(proxy, url)
    assert len(first.body) == 50000
    new = _new_cache_files(cache_dir, before)
    assert len(new) == 1
    assert new.pop().read_bytes() == first.body
    second = fetch(proxy, url)
    assert second.body == first.body and "hit" in second.cache_status
    assert origin.stats(url)["full"] == 1


def test_corrupted_file_is_a_miss_deleted_and_logged(proxy, origin, cache_dir):
    before = _cache_files(cache_dir)
    url = "/corrupt?cc=max-age=60&size=20000"
    first = fetch(proxy, url)
    (path,) = _new_cache_files(cache_dir, before)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    second = fetch(proxy, url)
    assert len(second.body) == 20000 and second.body != bytes(data)
    assert second.body.startswith(b"2:")  # served by the origin again
    assert "hit" not in second.cache_status
    assert not path.exists()
    assert origin.stats(url)["full"] == 2
    assert _logged(proxy, "corrupted")
    assert fetch(proxy, url).body == second.body  # and the fresh copy is stored again
    assert first.body != second.body


@pytest.mark.parametrize("chunked", [False, True])
def test_response_over_the_limit_streams_through_uncached(proxy, origin, cache_dir, chunked):
    url = f"/toolarge-{int(chunked)}?cc=max-age=60&size={FILE_LIMIT + 50000}" + ("&chunked=1" if chunked else "")
    first = fetch(proxy, url)
    assert len(first.body) == FILE_LIMIT + 50000
    second = fetch(proxy, url)
    assert len(second.body) == FILE_LIMIT + 50000 and "hit" not in second.cache_status
    assert origin.stats(url)["full"] == 2
    assert not _cache_files(cache_dir, ".part")


def test_lru_over_max_cache_entry(origin, rpxy_factory, tmp_path):
    proxy = rpxy_factory(cache_config(origin, tmp_path / "lru", entries=2))
    urls = [f"/lru{i}?cc=max-age=60" for i in range(3)]
    for url in urls:
        fetch(proxy, url)
    assert "hit" in fetch(proxy, urls[2]).cache_status
    assert "hit" in fetch(proxy, urls[1]).cache_status
    assert "hit" not in fetch(proxy, urls[0]).cache_status  # evicted: least recently used
    assert origin.stats(urls[0])["full"] == 2


def test_memory_zero_means_always_file(origin, rpxy_factory, tmp_path):
    directory = tmp_path / "files"
    proxy = rpxy_factory(cache_config(origin, directory, memory=0))
    url = "/always-file?cc=max-age=60"
    first = fetch(proxy, url)
    (path,) = _new_cache_files(directory, set())
    assert path.read_bytes() == first.body
    assert "hit" in fetch(proxy, url).cache_status


def test_cache_dir_emptied_on_start_but_foreign_files_kept(origin, rpxy_factory, tmp_path):
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "0123456789abcdef-7.cache").write_bytes(b"old entry")
    (directory / "0123456789abcdef-8.part").write_bytes(b"old partial")
    (directory / "notes.txt").write_text("not ours")
    rpxy_factory(cache_config(origin, directory))
    assert sorted(path.name for path in directory.iterdir()) == ["notes.txt"]


def test_file_hit_over_http2_larger_than_the_stream_window(proxy, origin):
    url = "/h2file?cc=max-age=60&size=90000"  # more than HTTP/2's initial 65535-byte window
    first = fetch(proxy, url)
    result = curl("--http2-prior-knowledge", "-sS", "-D", "-", "-o", "-", "-H", "Host: a.test", proxy.url + url)
    assert result.returncode == 0, result.stderr
    assert b"cache-status: rpxy; hit" in result.stdout
    assert result.stdout.endswith(first.body)
    assert origin.stats(url)["full"] == 1


def test_stale_file_entry_revalidated_over_http2(proxy, origin):
    url = "/h2reval?cc=max-age=0&etag=f1&size=70000"
    first = fetch(proxy, url)
    result = curl("--http2-prior-knowledge", "-sS", "-D", "-", "-o", "-", "-H", "Host: a.test", proxy.url + url)
    assert result.returncode == 0, result.stderr
    assert b"cache-status: rpxy; fwd=stale; fwd-status=304" in result.stdout
    assert result.stdout.endswith(first.body)
    assert origin.stats(url)["not_modified"] == 1


def test_reload_empties_the_cache(origin, rpxy_factory, tmp_path):
    directory = tmp_path / "reload"
    proxy = rpxy_factory(cache_config(origin, directory))
    small, large = "/reload-small?cc=max-age=60", "/reload-large?cc=max-age=60&size=5000"
    for url in (small, large):
        fetch(proxy, url)
        _new_cache_files(directory, set()) if url == large else None
        assert "hit" in fetch(proxy, url).cache_status
    assert len(_cache_files(directory)) == 1
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "config reloaded" not in proxy.system_log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "config reloaded" in proxy.system_log()
    assert not _cache_files(directory)
    for url in (small, large):
        assert "hit" not in fetch(proxy, url).cache_status
        assert origin.stats(url)["full"] == 2
        assert "hit" in fetch(proxy, url).cache_status  # and the new state's cache works


def test_fat_get_does_not_poison(proxy, origin):
    # A GET with a body: the body is not part of the key, so its response is never stored.
    url = "/fatget?cc=max-age=60&echo=content-length"
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        connection.request("GET", url, body=b"poison=1", headers={"Host": "a.test"})
        fat = connection.getresponse()
        fat_body = fat.read()
    finally:
        connection.close()
    assert fat_body.endswith(b"content-length=8")
    victim = fetch(proxy, url)
    assert victim.body.endswith(b"content-length=-")
    assert origin.stats(url)["full"] == 2


def test_upstream_age_counts_toward_freshness(proxy, origin):
    # An upstream cache already held it for 50 of its 60 seconds.
    url = "/aged?cc=max-age=60&age=50"
    fetch(proxy, url)
    hit = fetch(proxy, url)
    assert "hit" in hit.cache_status
    assert int(hit.header("age")) >= 50
    ttl = int(hit.cache_status.rsplit("ttl=", 1)[1])
    assert ttl <= 10
    # Already older than its max-age and no validator: never reusable, so not stored at all.
    old = "/too-old?cc=max-age=60&age=100"
    assert "stored" not in fetch(proxy, old).cache_status
    assert "hit" not in fetch(proxy, old).cache_status
    assert origin.stats(old)["full"] == 2


@pytest.mark.parametrize(("expires", "hit"), [("%2B3600", True), ("0", False), ("garbage", False)])
def test_expires(proxy, origin, expires, hit):
    url = f"/expires-{hit}-{expires[:3]}?expires={expires}"
    fetch(proxy, url)
    assert ("hit" in fetch(proxy, url).cache_status) is hit
    assert origin.stats(url)["full"] == (1 if hit else 2)


def test_upstream_cache_status_is_kept_and_ours_appended(proxy, origin):
    url = "/upstream-cs?cc=max-age=60&upstream_cs=1"
    first = fetch(proxy, url)
    assert first.cache_status == "origin-cache; hit, rpxy; fwd=uri-miss; fwd-status=200; stored"
    assert fetch(proxy, url).cache_status.startswith("rpxy; hit")  # only ours on a hit


def test_unusable_cache_dir_is_a_config_error(origin, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    config = tmp_path / "config.toml"
    config.write_text(cache_config(origin, not_a_directory).replace("{port}", str(free_port())))
    result = subprocess.run([str(RPXY), "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "experimental.cache.cache_dir" in result.stderr + result.stdout


def test_large_corrupted_file_never_reaches_a_client_complete(origin, rpxy_factory, tmp_path):
    directory = tmp_path / "large"
    proxy = rpxy_factory(cache_config(origin, directory, size=3_000_000))
    size = 1_500_000  # above VERIFY_FIRST (1 MiB): verified while it streams
    url = f"/large-corrupt?cc=max-age=60&size={size}"
    first = fetch(proxy, url)
    (path,) = _new_cache_files(directory, set())
    assert "hit" in fetch(proxy, url).cache_status
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"#")
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        connection.request("GET", url, headers={"Host": "a.test"})
        response = connection.getresponse()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
    finally:
        connection.close()
    again = fetch(proxy, url)
    assert len(again.body) == size and "hit" not in again.cache_status and again.body != first.body
    assert _logged(proxy, "SHA-256 mismatch, seen while serving")


def test_head_hit_over_http2(proxy, origin):
    url = "/h2head?cc=max-age=60&size=3000"
    get = fetch(proxy, url)
    result = curl("--http2-prior-knowledge", "-sS", "-I", "-H", "Host: a.test", proxy.url + url)
    assert result.returncode == 0, result.stderr
    head = result.stdout.lower()
    assert b"cache-status: rpxy; hit" in head
    assert b"content-length: %d" % len(get.body) in head
    assert origin.stats(url)["methods"] == ["GET"]
