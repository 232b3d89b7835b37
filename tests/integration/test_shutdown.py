"""Graceful shutdown of the real rpxy process (SIGTERM), through every entry point.

On SIGTERM the listeners close, idle connections close at once, requests in flight
finish (HTTP/1.1 with ``Connection: close``, HTTP/2 after GOAWAY(NO_ERROR)), anything
left at ``graceful_shutdown_timeout`` is cut, and the process exits 0. The only timing
in these tests is generous upper bounds: "exits within 20 s" where the configured
deadline is 120 s proves that idle connections did not hold the shutdown.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from h2.events import PingAckReceived
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from tests.integration.conftest import Rpxy, free_port, wait_for_port
from tests.support.h2client import H2Client

BIN = Path(sys.executable).parent

CONFIG = """
listen_port = {{port}}
listen_address_v4 = "127.0.0.1"
graceful_shutdown_timeout = {timeout}
[apps.app1]
server_name = "app1.test"
reverse_proxy = [{{ upstream = [{{ location = "{origin}" }}] }}]
"""


def start(rpxy_factory, origin, timeout: float = 120) -> Rpxy:
    return rpxy_factory(CONFIG.format(timeout=timeout, origin=origin.location))


def exit_status(proc: subprocess.Popen, within: float = 20.0) -> int:
    """The exit status, waiting at most ``within`` seconds (a generous bound)."""
    try:
        return proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {within:g} s after SIGTERM") from None


def refused(port: int, within: float = 10.0) -> bool:
    """True once a new TCP connection to ``port`` is refused (polled, bounded)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def in_flight(port: int, path: str, pid: int, origin) -> socket.socket:
    """A client connection with ``GET path`` sent, once the proxy (process ``pid``) has
    surely taken it: it opened a connection to the origin to forward it."""
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: app1.test\r\n\r\n".encode())
    deadline = time.monotonic() + 30
    while not connections_to(pid, origin.port):
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.05)
    return client


def raw_frames(data: bytes) -> list[Frame]:
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_request_in_flight_finishes_new_connections_are_refused_exit_0(rpxy_factory, origin):
    proxy = start(rpxy_factory, origin)
    client = in_flight(proxy.port, "/slow/4", proxy.proc.pid, origin)
    proxy.proc.send_signal(signal.SIGTERM)
    # While it drains: the listener is closed, the process still runs.
    assert refused(proxy.port)
    assert proxy.proc.poll() is None
    answer = read_all(client)
    client.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"\r\nconnection: close" in head.lower()
    assert body  # the whole response, then the close
    assert exit_status(proxy.proc) == 0
    log = proxy.system_log()
    assert "graceful shutdown" in log and "connections drained" in log
    assert "GET /slow/4 HTTP/1.1 -- 200 OK" in (proxy.log_dir / "access.log").read_text()


def test_http2_stream_in_flight_finishes_after_goaway(rpxy_factory, origin):
    proxy = start(rpxy_factory, origin)
    client = H2Client(proxy.port, timeout=60)
    stream = client.request("/slow/3", authority="app1.test")
    # A PING answered after the request proves the proxy took the stream before the signal.
    client.h2.ping(b"in-order")
    client.flush()
    assert client.read_until(lambda c: c.of(PingAckReceived), timeout=30)
    proxy.proc.send_signal(signal.SIGTERM)
    assert client.read_until(lambda c: c.eof, timeout=60)
    client.close()
    assert client.goaway() == 0  # GOAWAY(NO_ERROR) first: h2 hands the rest over raw
    frames = raw_frames(client.raw_after_close)
    heads = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == stream]
    assert heads and dict(client.h2.decoder.decode(heads[0].data, raw=True))[b":status"] == b"200"
    assert any(isinstance(f, DataFrame) and f.stream_id == stream and "END_STREAM" in f.flags for f in frames)
    assert exit_status(proxy.proc) == 0


def test_http2_with_a_real_client(rpxy_factory, origin):
    """curl (nghttp2) finishes its request across our GOAWAY."""
    proxy = start(rpxy_factory, origin)
    slow = subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", "--http2-prior-knowledge", "-H", "Host: app1.test",
         "-o", "/dev/null", "-w", "%{http_code} %{http_version}", f"{proxy.url}/slow/3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_request(proxy, origin)
        proxy.proc.send_signal(signal.SIGTERM)
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()
    assert slow.returncode == 0, err
    assert out == b"200 2"
    assert exit_status(proxy.proc) == 0


def wait_for_request(proxy: Rpxy, origin, within: float = 30.0) -> None:
    """Until the proxy has a connection to the origin open: a fresh proxy has none and opens
    one only to forward a request, so the request reached the proxy and was taken."""
    deadline = time.monotonic() + within
    while not connections_to(proxy.proc.pid, origin.port):
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.05)


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to remote ``port`` (from /proc)."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if fields[3] == "01" and fields[9] in inodes and remote_port == port:
                count += 1
    return count


def test_idle_connections_are_closed_at_once(rpxy_factory, origin):
    proxy = start(rpxy_factory, origin, timeout=120)
    idle_h1 = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    idle_h1.sendall(b"GET /echo HTTP/1.1\r\nHost: app1.test\r\n\r\n")
    assert idle_h1.recv(12) == b"HTTP/1.1 200"
    idle_h2 = H2Client(proxy.port, timeout=30)
    stream = idle_h2.request("/echo", authority="app1.test")
    assert idle_h2.wait_response(stream) and idle_h2.status(stream) == 200
    proxy.proc.send_signal(signal.SIGTERM)
    # Far below the 120 s deadline: neither idle connection held the shutdown.
    assert exit_status(proxy.proc, within=20) == 0
    read_all(idle_h1)  # EOF (the rest of the first response, then the close)
    assert idle_h2.read_until(lambda c: c.eof or c.goaway() is not None, timeout=10)
    assert idle_h2.goaway() == 0  # GOAWAY(NO_ERROR)
    idle_h1.close()
    idle_h2.close()


def test_deadline_cuts_what_is_left_and_still_exits_0(rpxy_factory, origin):
    proxy = start(rpxy_factory, origin, timeout=1)
    client = in_flight(proxy.port, "/slow/60", proxy.proc.pid, origin)
    proxy.proc.send_signal(signal.SIGTERM)
    assert exit_status(proxy.proc, within=30) == 0
    assert not read_all(client).startswith(b"HTTP/1.1 200")
    client.close()
    assert "aborting 1 connection(s)" in proxy.system_log()


def test_a_second_sigterm_cuts_at_once(rpxy_factory, origin):
    proxy = start(rpxy_factory, origin, timeout=120)
    client = in_flight(proxy.port, "/slow/60", proxy.proc.pid, origin)
    proxy.proc.send_signal(signal.SIGTERM)
    assert refused(proxy.port)
    proxy.proc.send_signal(signal.SIGTERM)
    assert exit_status(proxy.proc, within=20) == 0
    client.close()
    assert "second stop signal" in proxy.system_log()


@pytest.mark.parametrize("tool", ["twist", "twistd"])
def test_twisted_entry_points_drain_and_exit_0(tmp_path, origin, tool):
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(CONFIG.format(timeout=120, origin=origin.location)).replace("{port}", str(port)))
    if tool == "twist":
        args = [BIN / "twist", "rpxy", "--config", config, "--log-dir", tmp_path / "logs"]
    else:
        args = [BIN / "twistd", "-n", f"--pidfile={tmp_path / 'twistd.pid'}", "rpxy", "-c", config]
    proc = subprocess.Popen([str(a) for a in args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        client = in_flight(port, "/slow/3", proc.pid, origin)
        proc.send_signal(signal.SIGTERM)
        answer = read_all(client)
        client.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert exit_status(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_rpxy_command_exits_0_on_sigint_too(rpxy_factory, origin):
    proxy = start(rpxy_factory, origin)
    proxy.proc.send_signal(signal.SIGINT)
    assert exit_status(proxy.proc) == 0
    log = proxy.system_log()
    assert "connections drained" in log
    assert "Traceback" not in log and "failed" not in log
