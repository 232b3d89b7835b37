"""``rpxy --workers 2`` through the real proxy: both workers serve, a killed worker comes
back, sticky cookies cross workers, SIGHUP and config edits reach both, SIGTERM stops all.

Which worker served a request is read from the kernel, not from the proxy: the accepted
socket of the client's connection (``/proc/net/tcp``) is owned by exactly one worker
process (``/proc/<pid>/fd``). Linux only, like SO_REUSEPORT load spreading itself.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import Origin, Rpxy

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

DEADLINE = 60.0
STICKY_SECRET = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()


def config_for(upstreams: list[Origin], *, sticky: bool = False) -> str:
    ups = ", ".join(f'{{ location = "{origin.location}" }}' for origin in upstreams)
    balance = ', load_balance = "sticky"' if sticky else ""
    return f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        sticky_cookie_secret = "{STICKY_SECRET}"
        graceful_shutdown_timeout = 5
        [apps.a]
        server_name = "a.test"
        reverse_proxy = [{{ upstream = [{ups}]{balance} }}]
    """


def wait_until(check, *, timeout: float = DEADLINE, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(name))
    return found


def _socket_inode(server_port: int, client_port: int) -> str | None:
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return fields[9]
    return None


def owner(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """The process (among ``pids``) holding the accepted socket of this connection."""
    inode = _socket_inode(server_port, client_port)
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def request(proxy: Rpxy, pids: set[int], *, want: int | None = None, headers: dict[str, str] | None = None,
            path: str = "/echo") -> tuple[int, http.client.HTTPResponse, bytes]:
    """One request on a new connection: ``(worker pid, response, body)``. With ``want``,
    connections are opened until the kernel hands one to that worker."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=15)
        try:
            conn.connect()
            client_port = conn.sock.getsockname()[1]
            pid = None
            deadline = time.monotonic() + 2
            while pid is None and time.monotonic() < deadline:  # the accept may lag the connect
                pid = owner(proxy.port, client_port, pids)
                if pid is None:
                    time.sleep(0.01)
            if want is not None and pid != want:
                continue
            conn.request("GET", path, headers={"Host": "a.test", **(headers or {})})
            response = conn.getresponse()
            return pid, response, response.read()
        finally:
            conn.close()
    raise AssertionError(f"no connection reached worker {want}")


def start(rpxy_factory, config: str) -> Rpxy:
    proxy = rpxy_factory(config, extra_args=["--workers", "2"])
    wait_until(lambda: "all 2 workers ready" in proxy.system_log(), what="both workers ready")
    return proxy


def when(value, condition):
    """``value`` if ``condition(value)`` holds, else None (for :func:`wait_until`)."""
    return value if condition(value) else None


def workers_of(proxy: Rpxy) -> set[int]:
    return wait_until(lambda: when(children(proxy.proc.pid), lambda pids: len(pids) == 2), what="2 workers")


def test_two_workers_both_serve(rpxy_factory, origin):
    proxy = start(rpxy_factory, config_for([origin]))
    pids = workers_of(proxy)
    served = []
    for _ in range(40):
        pid, response, _body = request(proxy, pids)
        assert response.status == 200
        assert response.getheader("x-origin") == "a"
        served.append(pid)
    assert set(served) == pids, served  # 40 connections: both workers took some
    log = proxy.system_log()
    assert "rpxy.service: [worker 0] listening on" in log and "rpxy.service: [worker 1] listening on" in log, log
    # One access log for both, one whole line per request.
    lines = wait_until(
        lambda: when([line for line in proxy.access_lines() if "/echo" in line], lambda lines: len(lines) >= 40),
        what="40 access lines",
    )
    assert len(lines) == 40
    assert all(line.count("GET /echo") == 1 for line in lines)


def test_killed_worker_is_restarted_and_serving_goes_on(rpxy_factory, origin):
    proxy = start(rpxy_factory, config_for([origin]))
    pids = workers_of(proxy)
    victim, survivor = sorted(pids)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in children(proxy.proc.pid), what="the killed worker reaped")
    # Meanwhile the other worker serves every new connection (one retry for a connection
    # that was in the dead worker's accept queue).
    for _ in range(10):
        for attempt in range(2):
            try:
                pid, response, _ = request(proxy, children(proxy.proc.pid) | {survivor})
                break
            except (ConnectionError, http.client.HTTPException):
                if attempt:
                    raise
        assert response.status == 200
    # It comes back as a new process that serves too.
    new = wait_until(
        lambda: when(children(proxy.proc.pid), lambda now: len(now) == 2), what="a new worker"
    )
    (new,) = new - {survivor}
    assert new not in pids
    wait_until(lambda: re.search(rf"worker \d \(pid {new}\) ready", proxy.system_log()), what="the new worker ready")
    pid, response, _ = request(proxy, {new, survivor}, want=new)
    assert (pid, response.status) == (new, 200)
    log = proxy.system_log()
    assert re.search(rf"worker \d \(pid {victim}\) exited \(killed by SIGKILL\)", log), log


def test_sticky_cookie_from_one_worker_is_honoured_by_the_other(rpxy_factory, origin_factory):
    origins = [origin_factory("a"), origin_factory("b")]
    proxy = start(rpxy_factory, config_for(origins, sticky=True))
    first, second = sorted(workers_of(proxy))
    _, response, _ = request(proxy, {first, second}, want=first)
    cookie = re.match(r"(rpxy_sticky_token=[A-Za-z0-9_-]+)", response.getheader("set-cookie") or "")
    assert cookie, response.getheaders()
    chosen = response.getheader("x-origin")
    # Round robin in the other worker would alternate a and b; the cookie pins every request.
    for _ in range(4):
        pid, response, _ = request(proxy, {first, second}, want=second, headers={"Cookie": cookie.group(1)})
        assert pid == second
        assert response.status == 200
        assert response.getheader("x-origin") == chosen


def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(rpxy_factory, origin):
    import threading

    proxy = start(rpxy_factory, config_for([origin]))
    pids = workers_of(proxy)
    # A request in flight on each worker when the signal arrives is answered (graceful drain).
    answers: list[int] = []

    def slow(pid: int) -> None:
        answers.append(request(proxy, pids, want=pid, path="/slow/1.5")[1].status)

    threads = [threading.Thread(target=slow, args=(pid,)) for pid in sorted(pids)]
    for thread in threads:
        thread.start()
    polls = []

    def reached_origin() -> bool:  # /count counts itself too
        with urllib.request.urlopen(f"http://{origin.location}/count", timeout=10) as response:
            polls.append(1)
            return int(response.read()) - len(polls) >= 2

    wait_until(reached_origin, what="both slow requests at the origin")
    proxy.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(DEADLINE)
    assert answers == [200, 200]
    assert proxy.proc.wait(DEADLINE) == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} still there"
    log = proxy.system_log()
    assert "SIGTERM: stopping 2 workers" in log
    assert log.count("stopped: exit status 0") == 2, log


def test_sighup_and_config_edits_reach_every_worker(rpxy_factory, origin_factory):
    a, b = origin_factory("a"), origin_factory("b")
    proxy = start(rpxy_factory, config_for([a]))
    pids = workers_of(proxy)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.system_log().count("config reloaded (SIGHUP)") == 2, what="both workers reloaded")
    # An edit of the file (written aside, renamed over it): each worker's watcher applies it.
    text = proxy.config_path.read_text().replace(a.location, b.location)
    aside = proxy.config_path.with_name("config.toml.new")
    aside.write_text(text)
    aside.rename(proxy.config_path)
    wait_until(lambda: proxy.system_log().count("config reloaded (file)") == 2, what="both workers reloaded the file")
    for pid in sorted(pids):
        served, response, _ = request(proxy, pids, want=pid)
        assert served == pid
        assert response.getheader("x-origin") == "b"
    assert children(proxy.proc.pid) == pids  # reloads restart nothing


def test_tls_http3_and_metrics_with_two_workers(rpxy_factory, origin, tmp_path):
    """Both workers bind the TLS port and the HTTP/3 UDP port (SO_REUSEPORT on UDP too: a
    second plain bind would fail the start); worker i serves metrics on listen_port + i."""
    import json
    import socket

    from tests.integration.conftest import curl, free_port
    from tests.support.h3client import H3Client, run
    from tests.support.tlssite import Pki, tls_app

    pki = Pki(tmp_path / "pki")
    site = pki.site("a", "a.test")
    tls_port = free_port()
    metrics_port = wait_until(lambda: _two_free_ports(socket), what="two consecutive free ports")
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        + tls_app(site, origin.location, https_redirection=False)
        + "[experimental.h3]\n"
        + f"[experimental.metrics]\nlisten_port = {metrics_port}\n"
    )
    proxy = start(rpxy_factory, config)
    log = proxy.system_log()
    assert log.count("(h3, udp)") == 2, log
    assert log.count(f"listening on 127.0.0.1:{tls_port} (https)") == 2, log

    result = curl("--cacert", str(pki.ca_file), "--resolve", f"a.test:{tls_port}:127.0.0.1",
                  f"https://a.test:{tls_port}/echo")
    assert result.returncode == 0 and json.loads(result.stdout)["origin"] == "a", result.stderr

    async def h3_requests() -> list[int]:
        statuses = []
        for _ in range(6):  # each a new QUIC connection from a new UDP port
            async with H3Client(tls_port, "a.test", str(pki.ca_file)) as client:
                statuses.append((await client.get("/echo")).status)
        return statuses

    assert run(h3_requests()) == [200] * 6

    for port in (metrics_port, metrics_port + 1):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert b"rpxy_" in response.read()


def _two_free_ports(socket) -> int | None:
    """A port P such that P and P + 1 are free now."""
    from tests.integration.conftest import free_port

    port = free_port()
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port + 1))
    except OSError:
        return None
    return port


def test_a_port_in_use_fails_the_start_with_status_1(tmp_path, origin):
    """A worker that cannot listen during the first start stops everything: exit status 1,
    the reason on stderr (as one process would), instead of restarting forever."""
    import socket
    import subprocess
    import textwrap

    from tests.integration.conftest import RPXY

    with socket.socket() as taken:  # a plain listener, without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(textwrap.dedent(config_for([origin])).replace("{port}", str(port)))
        result = subprocess.run(
            [str(RPXY), "--config", str(config), "--log-dir", str(tmp_path / "logs"), "--workers", "2"],
            capture_output=True, timeout=DEADLINE,
        )
    assert result.returncode == 1
    assert b"cannot listen" in result.stderr
    assert "failed to start (exit status 1); stopping" in (tmp_path / "logs" / "rpxy.log").read_text()
