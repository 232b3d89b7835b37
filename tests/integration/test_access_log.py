"""The access log (and the system log) of the real proxy, line by line.

Format (rpxy-reference.md, "CLI and logs")::

    <RFC3339 UTC µs>Z {host} <- {ip:port} -- {METHOD} {path?query} HTTP/1.1 -- {status} {reason}
      -- {target} "{UA}", "{XFF}"[ "{Forwarded}"] "{upstream URI}"
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest

from tests.integration.conftest import RPXY, Origin, Rpxy, curl, free_port, raw_request, wait_for_port

LINE_RE = re.compile(
    r"(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6})Z"
    r" (?P<host>\S*) <- (?P<ip>\d{1,3}(?:\.\d{1,3}){3}):(?P<port>\d+)"
    r" -- (?P<method>[A-Z]+) (?P<pq>\S+) (?P<version>HTTP/1\.[01])"
    r" -- (?P<status>\d{3}) (?P<reason>[A-Za-z][A-Za-z' -]*)"
    r" -- (?P<target>\S+)"
    r' "(?P<ua>[^"]*)", "(?P<xff>[^"]*)"(?: "(?P<forwarded>[^"]*)")? "(?P<upstream>[^"]*)"'
)


@pytest.fixture(scope="module")
def origin():
    origin = Origin("a")
    yield origin
    origin.stop()


def config_for(origin: Origin, top: str = "") -> str:
    return f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        {top}
        [apps.app1]
        server_name = "app1.test"
        [[apps.app1.reverse_proxy]]
        upstream = [{{ location = "{origin.location}" }}]
        [[apps.app1.reverse_proxy]]
        path = "/path/another"
        replace_path = "/path"
        upstream = [{{ location = "{origin.location}" }}]
        [apps.only]
        server_name = "only.test"
        reverse_proxy = [{{ path = "/only", upstream = [{{ location = "{origin.location}" }}] }}]
        [apps.dead]
        server_name = "dead.test"
        reverse_proxy = [{{ upstream = [{{ location = "127.0.0.1:{free_port()}" }}] }}]
    """


@pytest.fixture(scope="module")
def proxy(origin, tmp_path_factory):
    proxy = Rpxy(tmp_path_factory.mktemp("access"), config_for(origin))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def redacting_proxy(origin, tmp_path_factory):
    proxy = Rpxy(tmp_path_factory.mktemp("access-redact"), config_for(origin, "redact_query_in_access_log = true"))
    yield proxy
    proxy.stop()


def lines_with(proxy: Rpxy, marker: str, count: int = 1, timeout: float = 5.0) -> list[str]:
    """The access lines containing ``marker``, waiting (bounded) until ``count`` are written."""
    path = proxy.log_dir / "access.log"
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in path.read_text().splitlines() if marker in line] if path.exists() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def parse(line: str) -> dict:
    match = LINE_RE.fullmatch(line)
    assert match is not None, f"access line does not match the rpxy format: {line!r}"
    return match.groupdict()


def request(proxy: Rpxy, host: str, path: str, *extra: str) -> tuple[int, int]:
    """(status, client port) of one curl request."""
    result = curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code} %{local_port}", "-H", f"Host: {host}", *extra, proxy.url + path)
    status, port = result.stdout.decode().split()
    return int(status), int(port)


def test_proxied_request_line(proxy, origin):
    before = datetime.now(timezone.utc).timestamp()
    status, client_port = request(
        proxy, "App1.Test:8080", "/echo/x?marker=proxied&b=2", "-A", "Agent/1.0 (test)", "-H", "X-Forwarded-For: 10.0.0.1"
    )
    after = datetime.now(timezone.utc).timestamp()
    assert status == 200
    [line] = lines_with(proxy, "marker=proxied")
    fields = parse(line)
    logged_at = datetime.strptime(fields["ts"], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
    assert before - 1 <= logged_at <= after + 1
    assert fields == {
        "ts": fields["ts"],
        "host": "app1.test",
        "ip": "127.0.0.1",
        "port": str(client_port),
        "method": "GET",
        "pq": "/echo/x?marker=proxied&b=2",
        "version": "HTTP/1.1",
        "status": "200",
        "reason": "OK",
        "target": "http://app1.test/echo/x",
        "ua": "Agent/1.0 (test)",
        "xff": "10.0.0.1",
        "forwarded": None,
        "upstream": f"http://{origin.location}/echo/x",
    }


def test_client_values_cannot_forge_log_fields(proxy, origin):
    # A User-Agent with quotes would otherwise end its field and forge the ones after it.
    status, _ = request(
        proxy, "app1.test", "/echo?marker=forge", "-A", 'evil", "1.2.3.4" "http://x/\\ \u00e9',
        "-H", 'X-Forwarded-For: 10.0.0.9", "forged',
    )
    assert status == 200
    fields = parse(lines_with(proxy, "marker=forge")[0])
    assert fields["ua"] == "evil\\x22, \\x221.2.3.4\\x22 \\x22http://x/\\x5C \\xC3\\xA9"
    assert fields["xff"] == "10.0.0.9\\x22, \\x22forged"
    assert fields["upstream"] == f"http://{origin.location}/echo"


def test_forwarded_field_and_rewritten_upstream(proxy, origin):
    status, _ = request(
        proxy, "app1.test", "/path/another/xx?query=ng&marker=fwd", "-X", "POST", "-d", "", "-A", "",
        "-H", "Forwarded: for=192.0.2.60;proto=http",
    )
    assert status == 200
    fields = parse(lines_with(proxy, "marker=fwd")[0])
    assert fields["method"] == "POST"
    assert fields["ua"] == ""
    assert fields["xff"] == ""
    assert fields["forwarded"] == "for=192.0.2.60;proto=http"
    assert fields["upstream"] == f"http://{origin.location}/path/xx"


def test_one_line_per_request_on_a_keep_alive_connection(proxy):
    urls = [f"{proxy.url}/echo?marker=keepalive&n={i}" for i in range(5)]
    result = curl("-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                  "-H", "Host: app1.test", *urls)
    assert result.returncode == 0, result.stderr
    lines = lines_with(proxy, "marker=keepalive", count=5)
    assert [parse(line)["pq"] for line in lines] == [f"/echo?marker=keepalive&n={i}" for i in range(5)]
    assert len({parse(line)["port"] for line in lines}) == 1  # one connection, one client port


@pytest.mark.parametrize(
    ("host", "path", "status", "reason"),
    [
        ("unknown.test", "/echo?marker=503", 503, "Service Unavailable"),
        ("only.test", "/other?marker=404", 404, "Not Found"),
        ("dead.test", "/echo?marker=502", 502, "Bad Gateway"),
    ],
)
def test_local_responses_are_logged(proxy, host, path, status, reason):
    assert request(proxy, host, path)[0] == status
    marker = path.split("?")[1]
    fields = parse(lines_with(proxy, marker)[0])
    assert (fields["status"], fields["reason"]) == (str(status), reason)
    assert fields["host"] == host
    assert fields["pq"] == path
    if status == 502:
        assert fields["upstream"].startswith("http://127.0.0.1:") and fields["upstream"].endswith("/echo")
    else:
        assert fields["upstream"] == ""


def test_bad_request_and_http10_are_logged(proxy):
    raw = raw_request(proxy.port, b"GET /echo?marker=400 HTTP/1.1\r\nUser-Agent: nohost\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    raw = raw_request(proxy.port, b"HEAD /echo?marker=http10 HTTP/1.0\r\nHost: app1.test\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ") or raw.startswith(b"HTTP/1.0 200 ")
    fields = parse(lines_with(proxy, "marker=400")[0])
    assert (fields["status"], fields["reason"], fields["host"]) == ("400", "Bad Request", "")
    assert fields["ua"] == "nohost"
    assert fields["target"] == "/echo"  # no host: the bare path, as rpxy writes it
    fields = parse(lines_with(proxy, "marker=http10")[0])
    assert (fields["method"], fields["version"], fields["status"]) == ("HEAD", "HTTP/1.0", "200")


def test_redacted_query(redacting_proxy, origin):
    assert request(redacting_proxy, "app1.test", "/echo?a=secret1&b=secret2")[0] == 200
    assert request(redacting_proxy, "app1.test", "/path/another/x?token=secret3&flagsecret4")[0] == 200
    lines = lines_with(redacting_proxy, "<redacted>", count=2)
    assert [parse(line)["pq"] for line in lines] == [
        "/echo?a=<redacted>&b=<redacted>",
        "/path/another/x?token=<redacted>&<redacted>",
    ]
    assert parse(lines[1])["upstream"] == f"http://{origin.location}/path/x"
    assert "secret" not in (redacting_proxy.log_dir / "access.log").read_text()


def test_system_log(proxy):
    log = proxy.system_log()
    assert re.search(
        rf"^\d{{4}}-\d{{2}}-\d{{2}}T\d{{2}}:\d{{2}}:\d{{2}}\.\d{{6}}Z INFO +rpxy\.service: listening on 127\.0\.0\.1:{proxy.port} \(http\)$",
        log,
        re.M,
    ), log
    # Access lines never go to the system log, and vice versa.
    assert " <- " not in log
    assert "listening" not in (proxy.log_dir / "access.log").read_text()


def test_without_log_dir_everything_goes_to_stdout(origin, tmp_path):
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'listen_port = {port}\nlisten_address_v4 = "127.0.0.1"\nunknown_thing = 1\n'
        f'[apps.app1]\nserver_name = "app1.test"\nreverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]\n'
    )
    proc = subprocess.Popen([str(RPXY), "-c", str(config)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        result = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: app1.test", f"http://127.0.0.1:{port}/echo?marker=stdout")
        assert result.stdout == b"200"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0
    text = out.decode()
    assert f"listening on 127.0.0.1:{port} (http)" in text
    assert "unknown key unknown_thing (ignored)" in text
    [line] = [line for line in text.splitlines() if "marker=stdout" in line]
    assert parse(line)["status"] == "200"
    assert list(tmp_path.iterdir()) == [config]  # no log files anywhere
