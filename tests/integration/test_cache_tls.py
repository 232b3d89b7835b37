"""The cache behind the TLS port: HTTP/1.1, HTTP/2 and HTTP/3 share https entries.

The cache sits in the one pipeline, so an entry stored from a request over one front end
answers the others for the same ``https://host/path``; a cleartext request never gets it
(the scheme is part of the key).
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Rpxy, curl, free_port, wait_for_port
from tests.integration.test_cache import CacheOrigin
from tests.support.h3client import H3Client, run
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsclient import wait_for_log
from tests.support.tlssite import Pki, tls_app


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("cache-pki"))
    pki.sites = {"a": pki.site("site_a", "a.test")}
    return pki


@pytest.fixture(scope="module")
def origin():
    started = CacheOrigin()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def proxy(pki, origin, tmp_path_factory):
    tls_port = free_port()
    directory = tmp_path_factory.mktemp("cache-tls")
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        + tls_app(pki.sites["a"], origin.location, https_redirection=False)
        + "[experimental.h3]\n"
        + f'[experimental.cache]\ncache_dir = "{directory / "entries"}"\nmax_cache_each_size = 200000\n'
        + "max_cache_each_size_on_memory = 1000\n"
    )
    started = Rpxy(tmp_path_factory.mktemp("cache-tls-proxy"), config)
    started.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=started.proc)
        wait_for_log(started.system_log, r"\(h3, udp\)")
        yield started
    finally:
        started.stop()
    assert_no_tracebacks(started.system_log())


def https(proxy, pki, path: str, *extra: str) -> tuple[bytes, bytes]:
    """(head, body) of one request with curl over TLS (``extra``: e.g. ``--http2``)."""
    result = curl(
        "-sS",
        "--cacert",
        str(pki.ca_file),
        "--resolve",
        f"a.test:{proxy.tls_port}:127.0.0.1",
        "-D",
        "-",
        *extra,
        f"https://a.test:{proxy.tls_port}{path}",
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    return head.lower(), body


def h3_get(proxy, pki, path: str):
    async def go():
        async with H3Client(proxy.tls_port, "a.test", str(pki.ca_file)) as client:
            return await client.get(path)

    return run(go())


@pytest.mark.parametrize("size", [100, 90000], ids=["memory", "file"])
def test_entry_stored_over_h1_served_over_h2_and_h3(proxy, pki, origin, size):
    url = f"/tls-shared-{size}?cc=max-age=60&size={size}"
    head, body = https(proxy, pki, url, "--http1.1")
    assert b"cache-status: rpxy; fwd=uri-miss; fwd-status=200; stored" in head
    assert len(body) == size
    h2_head, h2_body = https(proxy, pki, url, "--http2")
    assert h2_head.startswith(b"http/2 200") and b"cache-status: rpxy; hit" in h2_head
    assert h2_body == body
    response = h3_get(proxy, pki, url)
    assert response.status == 200
    assert (response.header(b"cache-status") or b"").startswith(b"rpxy; hit")
    assert response.body == body  # 90000 bytes: more than the initial stream window
    assert origin.stats(url)["full"] == 1


def test_revalidation_over_h3(proxy, pki, origin):
    url = "/tls-reval?cc=max-age=0&etag=t1&size=5000"
    first = h3_get(proxy, pki, url)
    assert first.status == 200 and len(first.body) == 5000
    again = h3_get(proxy, pki, url)
    assert again.header(b"cache-status") == b"rpxy; fwd=stale; fwd-status=304"
    assert again.body == first.body
    assert origin.stats(url)["not_modified"] == 1


def test_cleartext_and_tls_never_share(proxy, pki, origin):
    url = "/tls-scheme?cc=max-age=60"
    _head, tls_body = https(proxy, pki, url)
    result = curl("-sS", "-D", "-", "-H", "Host: a.test", f"http://127.0.0.1:{proxy.port}{url}")
    head = result.stdout.partition(b"\r\n\r\n")[0].lower()
    assert b"cache-status: rpxy; fwd=uri-miss" in head
    assert origin.stats(url)["full"] == 2
    assert tls_body == b"/tls-scheme #1"
