"""rpxy.metrics in memory: the recorder, its exposition, the metrics site, the config table,
and the access-log hook (the one place every finished request passes)."""

from __future__ import annotations

import io
import sys
import tomllib
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from rpxy.config.load import ConfigError, parse_config
from rpxy.config.model import MetricsConfig
from rpxy.logs import AccessLog
from rpxy.message import ConnectionInfo, RequestHead
from rpxy.metrics import LATENCY_BUCKETS, NULL_METRICS, Metrics, metrics_site, protocol_label


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def metrics(clock: Clock) -> Metrics:
    return Metrics(clock.seconds, process=False)


# -- requests --------------------------------------------------------------------------------


def test_requests_by_app_protocol_and_code(metrics: Metrics) -> None:
    for version in (b"1.1", b"1.0", b"1.1"):
        metrics.request("app1", version, 200, None)
    metrics.request("app1", b"2", 200, None)
    metrics.request("app1", b"3", 502, None)
    metrics.request("", b"1.1", 400, None)
    found = samples(metrics)
    assert value(found, "rpxy_requests_total", app="app1", protocol="h1", code="200") == 3  # 1.0 + 1.1
    assert value(found, "rpxy_requests_total", app="app1", protocol="h2", code="200") == 1
    assert value(found, "rpxy_requests_total", app="app1", protocol="h3", code="502") == 1
    assert value(found, "rpxy_requests_total", app="", protocol="h1", code="400") == 1


def test_latency_histogram_buckets_are_cumulative_and_bounds_inclusive(metrics: Metrics, clock: Clock) -> None:
    started = clock.seconds()
    clock.advance(0.005)  # exactly a bound: counted in le="0.005"
    metrics.request("a", b"2", 200, started)
    started = clock.seconds()
    clock.advance(0.3)
    metrics.request("a", b"2", 200, started)
    started = clock.seconds()
    clock.advance(120)  # beyond the last bound: only +Inf
    metrics.request("a", b"2", 504, started)
    metrics.request("a", b"2", 404, None)  # answered before routing finished: not timed
    found = samples(metrics)

    def bucket(le: str) -> float | None:
        return value(found, "rpxy_request_duration_seconds_bucket", app="a", protocol="h2", le=le)

    assert bucket("0.0025") == 0
    assert bucket("0.005") == 1
    assert bucket("0.25") == 1
    assert bucket("0.5") == 2
    assert bucket("60.0") == 2
    assert bucket("+Inf") == 3
    assert value(found, "rpxy_request_duration_seconds_count", app="a", protocol="h2") == 3
    assert value(found, "rpxy_request_duration_seconds_sum", app="a", protocol="h2") == pytest.approx(120.305)
    assert len([key for key in found if key[0] == "rpxy_request_duration_seconds_bucket"]) == len(LATENCY_BUCKETS) + 1


def test_a_clock_going_backwards_counts_zero_not_negative(metrics: Metrics, clock: Clock) -> None:
    metrics.request("a", b"1.1", 200, clock.seconds() + 5)
    found = samples(metrics)
    assert value(found, "rpxy_request_duration_seconds_bucket", app="a", protocol="h1", le="0.001") == 1
    assert value(found, "rpxy_request_duration_seconds_sum", app="a", protocol="h1") == 0


def test_one_series_object_per_app_and_version_is_reused(metrics: Metrics) -> None:
    """The hot path allocates nothing per request once a label set was seen."""
    metrics.request("a", b"1.1", 200, None)
    series = dict(metrics._series)
    for _ in range(100):
        metrics.request("a", b"1.1", 200, None)
    assert metrics._series == series and series[("a", b"1.1")] is metrics._series[("a", b"1.1")]


@pytest.mark.parametrize("version, label", [(b"1.0", "h1"), (b"1.1", "h1"), (b"2", "h2"), (b"3", "h3"), (b"-", "h1")])
def test_protocol_label(version: bytes, label: str) -> None:
    assert protocol_label(version) == label


# -- the other recorders and the scrape-time sources -------------------------------------------


def test_tls_failures_start_at_zero_for_every_category(metrics: Metrics) -> None:
    metrics.tls_failure("unknown_sni")
    metrics.tls_failure("unknown_sni")
    metrics.tls_failure("client_cert")
    found = samples(metrics)
    assert value(found, "rpxy_tls_handshake_failures_total", category="unknown_sni") == 2
    assert value(found, "rpxy_tls_handshake_failures_total", category="client_cert") == 1
    assert value(found, "rpxy_tls_handshake_failures_total", category="timeout") == 0


@pytest.mark.parametrize(
    "plan, result",
    [
        (SimpleNamespace(hit=object(), fwd=""), "hit"),
        (SimpleNamespace(hit=None, fwd="uri-miss"), "miss"),
        (SimpleNamespace(hit=None, fwd="vary-miss"), "miss"),
        (SimpleNamespace(hit=None, fwd=""), "miss"),  # only-if-cached with nothing stored (504)
        (SimpleNamespace(hit=None, fwd="stale"), "stale"),
        (SimpleNamespace(hit=None, fwd="request"), "bypass"),
    ],
)
def test_cache_lookups_by_result(metrics: Metrics, plan, result: str) -> None:
    metrics.cache_lookup(plan)
    found = samples(metrics)
    for name in ("hit", "miss", "stale", "bypass"):
        assert value(found, "rpxy_cache_lookups_total", result=name) == (1 if name == result else 0)


def test_scrape_time_sources(metrics: Metrics) -> None:
    metrics.connections = lambda: {"http": 3, "https": 1}
    metrics.upstream_health = lambda: [("http://a:1", True), ("http://a:1", False), ("http://b:2", True)]
    metrics.handshakes = lambda: 7
    metrics.reloads = lambda: (2, 1)
    metrics.draining = lambda: True
    metrics.acme = lambda: [("acme.test", "valid", 1_900_000_000.0), ("new.test", "ordering", None)]
    metrics.reload_succeeded(1_800_000_000.0)
    found = samples(metrics)
    assert value(found, "rpxy_client_connections", listener="http") == 3
    assert value(found, "rpxy_client_connections", listener="https") == 1
    # Checked by two routes, unhealthy for one of them: unhealthy.
    assert value(found, "rpxy_upstream_healthy", upstream="http://a:1") == 0
    assert value(found, "rpxy_upstream_healthy", upstream="http://b:2") == 1
    assert value(found, "rpxy_tls_handshakes_total") == 7
    assert value(found, "rpxy_config_reloads_total", result="success") == 2
    assert value(found, "rpxy_config_reloads_total", result="failure") == 1
    assert value(found, "rpxy_config_last_reload_success_timestamp_seconds") == 1_800_000_000.0
    assert value(found, "rpxy_draining") == 1
    assert value(found, "rpxy_acme_certificate_state", domain="acme.test", state="valid") == 1
    assert value(found, "rpxy_acme_certificate_expiry_timestamp_seconds", domain="acme.test") == 1_900_000_000.0
    assert value(found, "rpxy_acme_certificate_expiry_timestamp_seconds", domain="new.test") is None


def test_without_sources_only_the_own_counters_are_exposed(metrics: Metrics) -> None:
    names = {name for name, _ in samples(metrics)}
    assert "rpxy_client_connections" not in names and "rpxy_upstream_healthy" not in names
    assert "rpxy_info" in names and "rpxy_tls_handshake_failures_total" in names


def test_own_registry_not_the_global_one(metrics: Metrics) -> None:
    from prometheus_client import REGISTRY

    metrics.request("only-here", b"1.1", 200, None)
    assert metrics.registry is not REGISTRY
    assert REGISTRY.get_sample_value("rpxy_requests_total", {"app": "only-here", "protocol": "h1", "code": "200"}) is None


def test_null_metrics_do_nothing() -> None:
    assert NULL_METRICS.enabled is False
    NULL_METRICS.request("a", b"1.1", 200, 0.0)
    NULL_METRICS.tls_failure("timeout")
    NULL_METRICS.cache_lookup(SimpleNamespace(hit=None, fwd="stale"))
    NULL_METRICS.reload_succeeded()


# -- the access log hook ------------------------------------------------------------------------


def test_access_log_counts_every_line_only_when_metrics_are_on(metrics: Metrics, clock: Clock) -> None:
    conn = ConnectionInfo("192.0.2.1", 40000, 8080)
    head = RequestHead(b"GET", b"/x", b"2", [])
    log = AccessLog(io.StringIO())
    assert log.metrics is None
    log.record(conn, head, "a.test", 200, upstream="", app="a", started=clock.seconds())  # off: no error
    log.metrics = metrics
    started = clock.seconds()
    clock.advance(0.02)
    log.record(conn, head, "a.test", 200, upstream="http://u", app="a", started=started)
    log.record(conn, head, "", 400, upstream="")
    found = samples(metrics)
    assert value(found, "rpxy_requests_total", app="a", protocol="h2", code="200") == 1
    assert value(found, "rpxy_requests_total", app="", protocol="h2", code="400") == 1
    assert value(found, "rpxy_request_duration_seconds_bucket", app="a", protocol="h2", le="0.025") == 1
    assert len(log.stream.getvalue().splitlines()) == 3


def test_metrics_are_not_imported_by_a_proxy_without_them() -> None:
    """prometheus_client and twisted.web load only when [experimental.metrics] is set."""
    import subprocess

    code = (
        "import sys, rpxy.service, rpxy.pipeline, rpxy.logs, rpxy.metrics;"
        "print('prometheus_client' in sys.modules, 'twisted.web.server' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# -- the metrics site ----------------------------------------------------------------------------


def get(metrics: Metrics, clock: Clock, path: bytes, *, method: bytes = b"GET") -> bytes:
    site = metrics_site(metrics, "/metrics", reactor=clock)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return transport.value()


def test_site_serves_the_exposition_on_its_path(metrics: Metrics, clock: Clock) -> None:
    metrics.request("a", b"1.1", 200, None)
    answer = get(metrics, clock, b"/metrics?anything")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: text/plain; version=" in head.lower()
    assert b'rpxy_requests_total{app="a",code="200",protocol="h1"} 1.0' in body


@pytest.mark.parametrize("path", [b"/", b"/metrics/", b"/other", b"/metricsx"])
def test_site_answers_404_elsewhere(metrics: Metrics, clock: Clock, path: bytes) -> None:
    assert get(metrics, clock, path).startswith(b"HTTP/1.1 404")


def test_site_head(metrics: Metrics, clock: Clock) -> None:
    answer = get(metrics, clock, b"/metrics", method=b"HEAD")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")


# -- config ----------------------------------------------------------------------------------------

BASE = 'listen_port = 8080\n[apps.a]\nserver_name = "a.test"\nreverse_proxy = [{ upstream = [{ location = "127.0.0.1:9" }] }]\n'


def load(extra: str):
    return parse_config(tomllib.loads(BASE + extra)).config


def test_metrics_are_off_by_default_and_default_settings() -> None:
    assert load("").experimental.metrics is None
    assert load("[experimental.metrics]\n").experimental.metrics == MetricsConfig("127.0.0.1", 9100, "/metrics")
    config = load('[experimental.metrics]\nlisten_address = "[::1]"\nlisten_port = 9901\npath = "/m"\n')
    assert config.experimental.metrics == MetricsConfig("::1", 9901, "/m")


@pytest.mark.parametrize(
    "table, error",
    [
        ('listen_address = "localhost"', 'experimental.metrics.listen_address: "localhost" is not an IPv4 address'),
        ("listen_address = 1", "experimental.metrics.listen_address: must be a string"),
        ("listen_port = 0", "experimental.metrics.listen_port: must be an integer between 1 and 65535"),
        ("listen_port = 8080", "experimental.metrics.listen_port: must differ from listen_port (8080)"),
        ('path = "metrics"', "experimental.metrics.path: must be an absolute path"),
        ('path = "/m?x=1"', "experimental.metrics.path: must be an absolute path"),
    ],
)
def test_metrics_config_errors_name_the_key(table: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(f"[experimental.metrics]\n{table}\n")
    assert any(line.startswith(error) for line in caught.value.errors), caught.value.errors


def test_unknown_metrics_key_is_warned() -> None:
    loaded = parse_config(tomllib.loads(BASE + "[experimental.metrics]\nport = 1\n"))
    assert "unknown key experimental.metrics.port (ignored)" in loaded.warnings


def test_graceful_shutdown_timeout() -> None:
    assert load("").graceful_shutdown_timeout == 30.0
    assert parse_config(tomllib.loads("graceful_shutdown_timeout = 0\n" + BASE)).config.graceful_shutdown_timeout == 0
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads("graceful_shutdown_timeout = -1\n" + BASE))
    assert "graceful_shutdown_timeout: must be a number >= 0" in caught.value.errors


def test_changing_the_metrics_table_needs_a_restart() -> None:
    from rpxy.reload import RESTART_NEEDED, diff_configs

    old = load("")
    new = load("[experimental.metrics]\n")
    diff = diff_configs(old, new)
    assert "experimental.metrics" in diff.restart_needed and "experimental.metrics" in RESTART_NEEDED
    live = diff_configs(old, parse_config(tomllib.loads("graceful_shutdown_timeout = 5\n" + BASE)).config)
    assert live.settings_changed == ("graceful_shutdown_timeout",) and live.restart_needed == ()


def test_config_example_documents_the_metrics_keys() -> None:
    import re
    from pathlib import Path

    from rpxy.config import load as load_module

    text = (Path(__file__).resolve().parents[2] / "config-example.toml").read_text()
    assert "# [experimental.metrics]" in text and "# graceful_shutdown_timeout = 30" in text
    documented = set(re.findall(r"^[#\s]*([a-z0-9_]+)\s*=", text.split("[experimental.metrics]", 1)[1], re.MULTILINE))
    assert set(load_module._METRICS_KEYS) <= documented


def test_a_broken_source_costs_only_its_own_family(metrics: Metrics) -> None:
    def broken():
        raise RuntimeError("boom")

    metrics.upstream_health = broken
    metrics.connections = lambda: {"http": 2}
    metrics.request("a", b"1.1", 200, None)
    found = samples(metrics)
    assert value(found, "rpxy_client_connections", listener="http") == 2
    assert value(found, "rpxy_requests_total", app="a", protocol="h1", code="200") == 1
    assert not [key for key in found if key[0] == "rpxy_upstream_healthy"]


def test_acme_states_from_the_acme_service() -> None:
    """rpxy.service.acme_states reads the ACME service's domains by duck typing."""
    from datetime import datetime, timezone

    from twisted.application.service import MultiService, Service

    from rpxy.service import acme_states

    leaf = SimpleNamespace(not_valid_after_utc=datetime(2031, 1, 1, tzinfo=timezone.utc))
    entry = SimpleNamespace(leaf=leaf)
    acme = Service()
    acme.setName("rpxy-acme")
    acme.domains = {
        "b.test": SimpleNamespace(entry=entry, in_flight=False, failures=0),
        "a.test": SimpleNamespace(entry=None, in_flight=True, failures=0),
        "c.test": SimpleNamespace(entry=None, in_flight=False, failures=2),
        "d.test": SimpleNamespace(entry=entry, in_flight=True, failures=0),
        "e.test": SimpleNamespace(entry=None, in_flight=False, failures=0),
    }
    top = MultiService()
    assert list(acme_states(top)) == []  # no ACME service: nothing
    acme.setServiceParent(top)
    expiry = leaf.not_valid_after_utc.timestamp()
    assert list(acme_states(top)) == [
        ("a.test", "ordering", None),
        ("b.test", "valid", expiry),
        ("c.test", "failed", None),
        ("d.test", "renewing", expiry),
        ("e.test", "pending", None),
    ]
    metrics = Metrics(Clock().seconds, process=False)
    metrics.acme = lambda: acme_states(top)
    found = samples(metrics)
    assert value(found, "rpxy_acme_certificate_state", domain="b.test", state="valid") == 1
    assert value(found, "rpxy_acme_certificate_expiry_timestamp_seconds", domain="d.test") == expiry
