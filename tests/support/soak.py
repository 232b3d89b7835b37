"""A soak run: mixed HTTP/1.1 and HTTP/2 traffic through the real proxy, with live reloads and
upstream restarts, checked for errors, memory growth and leaked file descriptors.

``python -m tests.support.soak --seconds 600`` is ``make soak``; tests/integration/test_soak.py
runs a short one. The load is bounded (a few client threads pacing their requests); faults
are injected on a schedule and their windows recorded, so that a failed request is only
excused when it overlaps a fault.

What counts as a failure:
- any connection error or non-2xx answer from the proxy outside a fault window (a restart of
  origin B plus 3 s; a reload never excuses anything);
- RSS growth over ``--rss-limit-mb`` between the end of the warm-up and the end;
- more open file descriptors after the load stopped and idle connections expired than before it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import RPXY, free_port, wait_for_port  # noqa: E402
from tests.support.h2client import H2Client  # noqa: E402
from tests.support.tlsgen import Authority  # noqa: E402


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)

    def success(self) -> None:
        with self.lock:
            self.ok += 1

    def failure(self, when: float, what: str) -> None:
        with self.lock:
            self.failures.append((when, what))


class OriginProcess:
    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.origin", "--port", str(self.port), "--name", self.name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"origin {self.name} did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def _config(port: int, tls_port: int, cert: Path, key: Path, a: int, b: int, generation: int) -> str:
    return f"""# generation {generation}
listen_port = {port}
listen_port_tls = {tls_port}
listen_address_v4 = "127.0.0.1"
[apps.soak]
server_name = "localhost"
tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}", https_redirection = false }}
[[apps.soak.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:{a}" }}, {{ location = "127.0.0.1:{b}" }}]
load_balance = "round_robin"
health_check = {{ type = "tcp", interval = 1, timeout = 0.5, unhealthy_threshold = 1, healthy_threshold = 1 }}
upstream_options = [{'"forwarded_header"' if generation % 2 else ""}]
"""


def _read_response(reader) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    status = int(status_line.split()[1])
    length = None
    chunked = False
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if chunked:
        body = b""
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                reader.readline()
                break
            body += reader.read(size)
            reader.readline()
        return status, body
    return status, reader.read(length or 0)


def h1_worker(port: int, stop: threading.Event, tally: Tally, pace: float, n: int) -> None:
    body = os.urandom(2048)
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                reader = sock.makefile("rb")
                for i in range(50):  # a keep-alive connection for 50 requests, then a new one
                    if stop.is_set():
                        return
                    if i % 3 == 0:
                        request = (
                            b"POST /echo?w%d HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (n, len(body))
                            + body
                        )
                    else:
                        request = b"GET /bytes/%d?cl=1 HTTP/1.1\r\nHost: localhost\r\n\r\n" % (1000 + 997 * i)
                    started = time.monotonic()
                    sock.sendall(request)
                    status, answer = _read_response(reader)
                    if status != 200:
                        tally.failure(started, f"h1 status {status}")
                    elif i % 3 == 0 and json.loads(answer)["body_length"] != len(body):
                        tally.failure(started, "h1 body length mismatch")
                    else:
                        tally.success()
                    time.sleep(pace)
        except (OSError, ValueError, KeyError, ConnectionError) as error:
            tally.failure(time.monotonic(), f"h1 {type(error).__name__}: {error}")
            time.sleep(0.2)


def h2_worker(tls_port: int, ca: Path, stop: threading.Event, tally: Tally, pace: float) -> None:
    while not stop.is_set():
        try:
            with H2Client(tls_port, ca_file=ca, timeout=15) as client:
                for _ in range(40):
                    if stop.is_set():
                        return
                    started = time.monotonic()
                    streams = [client.request(f"/bytes/{5000 + k}?cl=1") for k in range(5)]
                    for stream_id in streams:
                        if not client.wait_response(stream_id, timeout=15):
                            tally.failure(started, "h2 no answer")
                        elif client.status(stream_id) != 200:
                            tally.failure(started, f"h2 status {client.status(stream_id)}")
                        else:
                            tally.success()
                    time.sleep(pace)
        except (OSError, AssertionError, ValueError) as error:
            tally.failure(time.monotonic(), f"h2 {type(error).__name__}: {error}")
            time.sleep(0.2)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class SoakResult:
    requests_ok: int
    failures: list[tuple[float, str]]
    excused: int
    reloads: int
    restarts: int
    rss_warm_kib: int
    rss_end_kib: int
    fds_before: int
    fds_after: int
    log_tracebacks: int

    @property
    def unexcused(self) -> list[tuple[float, str]]:
        return self.failures

    def summary(self) -> str:
        return (
            f"{self.requests_ok} requests ok, {self.excused} failures during injected faults, "
            f"{len(self.failures)} other failures; {self.reloads} reloads, {self.restarts} upstream restarts; "
            f"RSS {self.rss_warm_kib / 1024:.1f} -> {self.rss_end_kib / 1024:.1f} MiB after warm-up; "
            f"fds {self.fds_before} before -> {self.fds_after} after; tracebacks in the log: {self.log_tracebacks}"
        )


def soak(seconds: float, directory: Path, *, idle_wait: float = 45.0) -> SoakResult:
    authority = Authority("soak CA")
    cert, key = authority.issue("localhost").write(directory, "localhost")
    ca = authority.write_cert(directory / "ca.pem")
    origin_a, origin_b = OriginProcess("a"), OriginProcess("b")
    port, tls_port = free_port(), free_port()
    config_path = directory / "config.toml"
    generation = 0
    config_path.write_text(_config(port, tls_port, cert, key, origin_a.port, origin_b.port, generation))
    log_dir = directory / "logs"
    proxy = subprocess.Popen(
        [str(RPXY), "--config", str(config_path), "--log-dir", str(log_dir), "--config-poll-interval", "0.5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    tally = Tally()
    threads: list[threading.Thread] = []
    windows: list[tuple[float, float]] = []
    reloads = restarts = 0
    try:
        wait_for_port(port, proc=proxy)
        wait_for_port(tls_port, proc=proxy)
        fds_before = open_fds(proxy.pid)
        for n in range(3):
            threads.append(threading.Thread(target=h1_worker, args=(port, stop, tally, 0.01, n), daemon=True))
        for _ in range(2):
            threads.append(threading.Thread(target=h2_worker, args=(tls_port, ca, stop, tally, 0.02), daemon=True))
        for thread in threads:
            thread.start()
        started = time.monotonic()
        warm_until = started + min(30.0, seconds * 0.2)
        rss_warm = None
        next_reload = started + 7
        next_restart = started + 11
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if rss_warm is None and now >= warm_until:
                rss_warm = rss_kib(proxy.pid)
            if now >= next_reload:
                generation += 1
                config_path.write_text(_config(port, tls_port, cert, key, origin_a.port, origin_b.port, generation))
                reloads += 1
                next_reload = now + 7
            if now >= next_restart:
                window_start = time.monotonic()
                origin_b.stop()
                time.sleep(2)
                origin_b.start()
                # Requests already sent to B when it is killed fail too: they are the fault.
                windows.append((window_start - 2.0, time.monotonic() + 3))
                restarts += 1
                next_restart = time.monotonic() + 11
            time.sleep(0.1)
        rss_end = rss_kib(proxy.pid)
        stop.set()
        for thread in threads:
            thread.join(30)
        # Keep-alive clients and pooled upstream connections expire (idle 15 s, swept every
        # 7.5 s): the count must come back to where it was before the load.
        deadline = time.monotonic() + idle_wait
        fds_after = open_fds(proxy.pid)
        while fds_after > fds_before and time.monotonic() < deadline:
            time.sleep(1)
            fds_after = open_fds(proxy.pid)
    finally:
        stop.set()
        proxy.terminate()
        try:
            proxy.wait(15)
        except subprocess.TimeoutExpired:
            proxy.kill()
        origin_a.stop()
        origin_b.stop()
    excused = [f for f in tally.failures if any(start <= f[0] <= end for start, end in windows)]
    others = [f for f in tally.failures if f not in excused]
    log = (log_dir / "rpxy.log").read_text() if (log_dir / "rpxy.log").exists() else ""
    if others:
        # What the proxy said about failed upstream exchanges, for the report.
        for line in log.splitlines():
            if "failed" in line or "ERROR" in line or "WARN" in line:
                print("  proxy log:", line[:300])
    return SoakResult(
        requests_ok=tally.ok,
        failures=others,
        excused=len(excused),
        reloads=reloads,
        restarts=restarts,
        rss_warm_kib=rss_warm or rss_end,
        rss_end_kib=rss_end,
        fds_before=fds_before,
        fds_after=fds_after,
        log_tracebacks=log.count("Traceback (most recent call last)"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rss-limit-mb", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rpxy-soak-") as tmp:
        result = soak(args.seconds, Path(tmp))
    print(result.summary())
    for when, what in result.failures[:20]:
        print(f"  failure at {when:.1f}: {what}")
    growth_mb = (result.rss_end_kib - result.rss_warm_kib) / 1024
    ok = (
        not result.failures
        and growth_mb < args.rss_limit_mb
        and result.fds_after <= result.fds_before
        and result.log_tracebacks == 0
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
