"""Slow and hostile clients through the real proxy, with the real tools: slowloris (PyPI)
and slowhttptest (Debian) in its slow-headers (-H), slow-body (-B) and slow-read (-X) modes.

Legitimate clients keep being served while slowloris holds twice max_clients sockets
(slow-header sockets are evicted to admit new clients), and every slow connection is
closed within its absolute deadline + 5 s (header 20 s; body 20 s + 1 s per 500 bytes;
a response not read for 20 s), with bounded memory.

``SLOW_CLIENT_SECONDS`` sets the slowloris run length (CI: 15 s; ``make soak``: 60 s).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Origin, Rpxy
from tests.support.rawhttp import assert_no_tracebacks

SLOWLORIS_SECONDS = float(os.environ.get("SLOW_CLIENT_SECONDS", "15"))
SLOWLORIS = Path(sys.executable).with_name("slowloris")


def proxy_config(origin: Origin, top: str = "") -> str:
    return f"""
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
default_app = "app"
{top}
[apps.app]
server_name = "localhost"
reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]
"""


@pytest.fixture(scope="module")
def origin():
    started = Origin("slow")
    yield started
    started.stop()


def probe(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 12:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@pytest.mark.skipif(not SLOWLORIS.exists(), reason="slowloris (PyPI, the test extra) is not installed")
def test_slowloris_with_twice_max_clients_sockets_does_not_lock_out_clients(origin, tmp_path):
    max_clients = 20
    proxy = Rpxy(tmp_path, proxy_config(origin, f"max_clients = {max_clients}"))
    attack = subprocess.Popen(
        [str(SLOWLORIS), "127.0.0.1", "-p", str(proxy.port), "-s", str(2 * max_clients), "--sleeptime", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)  # the attack holds every slot by now
        results = []
        end = time.monotonic() + SLOWLORIS_SECONDS
        while time.monotonic() < end:
            started = time.monotonic()
            results.append(probe(proxy.port))
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
        assert attack.poll() is None, "slowloris stopped early: the attack did not run"
    finally:
        attack.terminate()
        attack.wait(10)
        proxy.stop()
    ok = sum(results)
    print(f"slowloris ({2 * max_clients} sockets, {SLOWLORIS_SECONDS:.0f} s): {ok}/{len(results)} probes served")
    assert len(results) >= SLOWLORIS_SECONDS * 5
    assert ok / len(results) >= 0.99, f"{ok}/{len(results)} probes served"
    log = proxy.system_log()
    assert "closed to admit a new client (max_clients reached)" in log  # the attack did fill the slots
    assert_no_tracebacks(log)


def run_slowhttptest(mode: str, url: str, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["slowhttptest", mode, "-c", "10", "-r", "20", "-l", "32", "-u", url, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def established_to(port: int) -> int:
    """Client connections the proxy holds open on ``port`` (the server side of the sockets)."""
    listing = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in listing.splitlines() if line.strip())


@pytest.mark.skipif(shutil.which("slowhttptest") is None, reason="slowhttptest (Debian package) is not installed")
@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is required to count open connections")
def test_slowhttptest_slow_headers_body_and_read_are_closed_by_their_deadlines(origin, tmp_path):
    # The three attacks at once, 10 connections each. Deadlines: headers 20 s; body 20 s +
    # 1 s per 500 bytes (it sends 10 bytes every 5 s); a response not read for 20 s. Every
    # slow connection must be closed by deadline + 5 s: counted on the proxy's own sockets
    # (slowhttptest's slow-read statistics do not notice a reset).
    proxy = Rpxy(tmp_path, proxy_config(origin))
    url = f"http://127.0.0.1:{proxy.port}"
    rss_before = proxy.rss_kib()
    started = time.monotonic()
    runs = [
        run_slowhttptest("-H", f"{url}/echo", ["-i", "5", "-x", "10"]),
        run_slowhttptest("-B", f"{url}/echo", ["-i", "5", "-x", "10", "-s", "65536"]),
        run_slowhttptest("-X", f"{url}/bytes/5000000", ["-k", "2", "-n", "1", "-w", "1", "-y", "16", "-z", "5"]),
    ]
    try:
        time.sleep(10 - (time.monotonic() - started))
        held_at_10s = established_to(proxy.port)
        served_meanwhile = probe(proxy.port)
        time.sleep(max(0.0, 27 - (time.monotonic() - started)))
        left_at_27s = established_to(proxy.port)
        rss_peak = proxy.rss_kib()
    finally:
        for process in runs:
            if process.poll() is None:
                process.kill()
            process.wait(10)
        proxy.stop()
    assert held_at_10s >= 25, f"the attacks held only {held_at_10s} connections"
    assert served_meanwhile
    assert left_at_27s == 0, f"{left_at_27s} slow connections still open after 27 s"
    assert rss_peak - rss_before < 50 * 1024, f"RSS grew {rss_peak - rss_before} KiB"
    log = proxy.system_log()
    assert "request head from 127.0.0.1 not received in time" in log
    assert "request body from 127.0.0.1 too slow" in log
    assert "response to 127.0.0.1 not read for 20 s" in log
    assert_no_tracebacks(log)
