"""The Prometheus endpoint ([experimental.metrics]) of the real rpxy process.

One proxy (module scope) with a cleartext port (HTTP/1.1 and h2c), a TLS port (one app
``site``, ALPN h2) and a second app whose route health-checks two upstreams. The tests
drive requests through it with curl and read ``/metrics`` with urllib, parsed by
prometheus_client's own parser. Counters are compared before/after, never absolute,
so the tests do not depend on their order.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Origin, Rpxy, curl, free_port, wait_for_port
from tests.support.tlssite import Pki, tls_app

HEALTH = (
    '{ type = "tcp", interval = 0.5, timeout = 0.4, unhealthy_threshold = 1, healthy_threshold = 1 }'
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("metrics-pki"))
    pki.sites = {"site": pki.site("site", "site.test")}
    return pki


@pytest.fixture(scope="module")
def origins():
    started = {}
    try:
        for name in ("a", "b", "c"):
            started[name] = Origin(name)
        yield started
    finally:
        for origin in started.values():
            origin.stop()


@pytest.fixture(scope="module")
def proxy(pki, origins, tmp_path_factory):
    tls_port, metrics_port = free_port(), free_port()
    directory = tmp_path_factory.mktemp("metrics-proxy")
    config = f"""
listen_port = {{port}}
listen_port_tls = {tls_port}
listen_address_v4 = "127.0.0.1"

[experimental.metrics]
listen_port = {metrics_port}
[experimental.h3]

{tls_app(pki.sites["site"], origins["a"].location, https_redirection=False)}
[apps.checked]
server_name = "checked.test"
[[apps.checked.reverse_proxy]]
upstream = [{{ location = "{origins["b"].location}" }}, {{ location = "{origins["c"].location}" }}]
load_balance = "round_robin"
health_check = {HEALTH}
"""
    proxy = Rpxy(directory, config)
    proxy.tls_port = tls_port
    proxy.metrics_port = metrics_port
    for port in (tls_port, metrics_port):  # Rpxy waits for the cleartext port only
        wait_for_port(port, proc=proxy.proc)
    yield proxy
    proxy.stop()


def scrape(proxy: Rpxy, path: str = "/metrics") -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def https(proxy: Rpxy, pki: Pki, *args: str):
    return curl(
        "--cacert", str(pki.ca_file), "--resolve", f"site.test:{proxy.tls_port}:127.0.0.1",
        *args, f"https://site.test:{proxy.tls_port}/echo",
    )


def test_requests_are_counted_by_app_protocol_and_code_with_latency(proxy, pki):
    before = scrape(proxy)
    for _ in range(3):
        assert curl("-H", "Host: site.test", f"{proxy.url}/echo").returncode == 0
    assert curl("--http2-prior-knowledge", "-H", "Host: site.test", f"{proxy.url}/status/404").returncode == 0
    result = https(proxy, pki, "--http2", "-o", "/dev/null", "-w", "%{http_version}")
    assert result.stdout == b"2"
    result = https(proxy, pki, "--http1.1", "-o", "/dev/null", "-w", "%{http_version}")
    assert result.stdout == b"1.1"
    assert curl("-H", "Host: nobody.test", f"{proxy.url}/").returncode == 0  # 503, no app
    after = scrape(proxy)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("rpxy_requests_total", app="site", protocol="h1", code="200") == 4
    assert moved("rpxy_requests_total", app="site", protocol="h2", code="404") == 1
    assert moved("rpxy_requests_total", app="site", protocol="h2", code="200") == 1
    assert moved("rpxy_requests_total", app="", protocol="h1", code="503") == 1
    # Latency: every proxied request lands in +Inf, count and buckets agree, sum grows.
    assert moved("rpxy_request_duration_seconds_count", app="site", protocol="h1") == 4
    assert moved("rpxy_request_duration_seconds_bucket", app="site", protocol="h1", le="+Inf") == 4
    assert moved("rpxy_request_duration_seconds_bucket", app="site", protocol="h1", le="60.0") == 4
    assert moved("rpxy_request_duration_seconds_count", app="site", protocol="h2") == 2
    assert moved("rpxy_request_duration_seconds_sum", app="site", protocol="h1") > 0
    # TLS handshakes completed (curl over TLS twice) and connections gauge present.
    assert moved("rpxy_tls_handshakes_total") >= 2
    assert ("rpxy_client_connections", (("listener", "http"),)) in after
    assert ("rpxy_client_connections", (("listener", "https"),)) in after


def test_slow_request_lands_in_a_higher_latency_bucket(proxy):
    before = scrape(proxy)
    assert curl("-H", "Host: site.test", f"{proxy.url}/slow/0.3").returncode == 0
    after = scrape(proxy)
    fast = value(after, "rpxy_request_duration_seconds_bucket", app="site", protocol="h1", le="0.25") - value(
        before, "rpxy_request_duration_seconds_bucket", app="site", protocol="h1", le="0.25"
    )
    slow = value(after, "rpxy_request_duration_seconds_bucket", app="site", protocol="h1", le="60.0") - value(
        before, "rpxy_request_duration_seconds_bucket", app="site", protocol="h1", le="60.0"
    )
    assert (fast, slow) == (0, 1)


def test_active_connections_gauge_counts_open_clients(proxy):
    def gauge() -> float:
        return value(scrape(proxy), "rpxy_client_connections", listener="http")

    wait_for(lambda: gauge() == 0)  # the clients of earlier tests are gone (scrapes are not counted)
    clients = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
    try:
        for client in clients:
            client.sendall(b"GET /echo HTTP/1.1\r\nHost: site.test\r\n\r\n")
            assert client.recv(12) == b"HTTP/1.1 200"
        assert gauge() == 2
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: gauge() == 0)


def test_upstream_health_gauge_flips_when_an_upstream_dies(proxy, origins):
    b, c = origins["b"], origins["c"]
    wait_for(lambda: value(scrape(proxy), "rpxy_upstream_healthy", upstream=f"http://{c.location}") == 1)
    assert value(scrape(proxy), "rpxy_upstream_healthy", upstream=f"http://{b.location}") == 1
    c.stop()
    wait_for(lambda: value(scrape(proxy), "rpxy_upstream_healthy", upstream=f"http://{c.location}") == 0)
    assert value(scrape(proxy), "rpxy_upstream_healthy", upstream=f"http://{b.location}") == 1


def test_tls_handshake_failure_is_counted_by_category(proxy):
    before = value(scrape(proxy), "rpxy_tls_handshake_failures_total", category="unknown_sni")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="nobody.test")
    wait_for(lambda: value(scrape(proxy), "rpxy_tls_handshake_failures_total", category="unknown_sni") == before + 1)


def test_reload_is_counted_with_its_timestamp(proxy):
    before = scrape(proxy)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: value(scrape(proxy), "rpxy_config_reloads_total", result="success")
        == value(before, "rpxy_config_reloads_total", result="success") + 1
    )
    after = scrape(proxy)
    assert value(after, "rpxy_config_last_reload_success_timestamp_seconds") > value(
        before, "rpxy_config_last_reload_success_timestamp_seconds"
    )
    assert value(after, "rpxy_config_reloads_total", result="failure") == value(
        before, "rpxy_config_reloads_total", result="failure"
    )


def test_other_paths_are_404_and_the_proxy_port_does_not_serve_metrics(proxy):
    with pytest.raises(urllib.error.HTTPError) as error:
        scrape(proxy, "/other")
    assert error.value.code == 404
    result = curl("-H", "Host: site.test", f"{proxy.url}/metrics", "-o", "/dev/null", "-w", "%{http_code}")
    assert result.stdout == b"200"  # proxied to the origin like any path, not our endpoint
    assert value(scrape(proxy, "/metrics?x=1"), "rpxy_info", version=value_label(proxy)) == 1


def value_label(proxy: Rpxy) -> str:
    import rpxy

    return rpxy.__version__.public()


def test_metrics_off_opens_no_listener(tmp_path, origins):
    config = f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[apps.a]
server_name = "a.test"
reverse_proxy = [{{ upstream = [{{ location = "{origins["a"].location}" }}] }}]
"""
    proxy = Rpxy(tmp_path, config)
    try:
        assert curl("-H", "Host: a.test", f"{proxy.url}/echo").returncode == 0
        log = proxy.system_log()
        assert f"listening on 127.0.0.1:{proxy.port} (http)" in log
        assert "(metrics)" not in log  # the default port of [experimental.metrics] is never opened
    finally:
        proxy.stop()


def test_http3_requests_and_connections_are_counted(proxy, pki):
    from tests.support.h3client import H3Client, run

    before = scrape(proxy)

    async def go():
        async with H3Client(proxy.tls_port, "site.test", str(pki.ca_file)) as client:
            response = await client.get("/echo")
            return response.status, scrape(proxy)

    status, during = run(go())
    assert status == 200
    assert value(during, "rpxy_client_connections", listener="h3") == 1
    after = scrape(proxy)
    moved = value(after, "rpxy_requests_total", app="site", protocol="h3", code="200") - value(
        before, "rpxy_requests_total", app="site", protocol="h3", code="200"
    )
    assert moved == 1
    assert value(after, "rpxy_request_duration_seconds_count", app="site", protocol="h3") >= 1


def test_cache_hits_and_misses_are_counted(tmp_path):
    import subprocess
    import sys

    from tests.integration.conftest import ROOT

    origin = subprocess.Popen(
        [sys.executable, "-m", "tests.support.cache_origin", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    proxy = None
    try:
        line = origin.stdout.readline()
        assert line.startswith("READY"), line
        metrics_port = free_port()
        config = f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
[experimental.cache]
cache_dir = "{tmp_path / "cache"}"
[experimental.metrics]
listen_port = {metrics_port}
[apps.cached]
server_name = "cached.test"
reverse_proxy = [{{ upstream = [{{ location = "127.0.0.1:{line.split()[1]}" }}] }}]
"""
        proxy = Rpxy(tmp_path, config)
        proxy.metrics_port = metrics_port
        wait_for_port(metrics_port, proc=proxy.proc)
        url = f"{proxy.url}/page?cc=max-age%3D60"
        statuses = []
        for extra in ([], [], ["-H", "Cache-Control: no-cache"]):
            result = curl("-H", "Host: cached.test", *extra, "-o", "/dev/null", "-w", "%{http_code}", url)
            statuses.append(result.stdout)
        assert statuses == [b"200"] * 3
        found = scrape(proxy)
        assert value(found, "rpxy_cache_lookups_total", result="miss") == 1
        assert value(found, "rpxy_cache_lookups_total", result="hit") == 1
        assert value(found, "rpxy_cache_lookups_total", result="bypass") == 1
        assert value(found, "rpxy_requests_total", app="cached", protocol="h1", code="200") == 3
        # The hit is counted but not timed (it never waited for an upstream).
        assert value(found, "rpxy_request_duration_seconds_count", app="cached", protocol="h1") == 2
    finally:
        if proxy is not None:
            proxy.stop()
        origin.terminate()
        origin.wait(10)
