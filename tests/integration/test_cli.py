"""Entry points as a user runs them: ``rpxy``, ``twist rpxy``, ``twistd -n rpxy``, ``twistd -ny example.tac``.

Every process is started with a config on a free 127.0.0.1 port, serves one request
through to a real origin where that is the point, and is stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import rpxy
from tests.integration.conftest import RPXY, ROOT, Rpxy, curl, free_port, wait_for_port
from tests.support.http import echo_json

BIN = Path(sys.executable).parent
BAD_UPSTREAM = "apps.app1.reverse_proxy[0].upstream: must not be empty"


def write_config(directory: Path, body: str) -> Path:
    path = directory / "config.toml"
    path.write_text(textwrap.dedent(body))
    return path


def good_config(directory: Path, port: int, origin_location: str, extra_top: str = "", extra_tail: str = "") -> Path:
    return write_config(
        directory,
        f"""
        listen_port = {port}
        listen_address_v4 = "127.0.0.1"
        {extra_top}
        [apps.app1]
        server_name = "app1.test"
        reverse_proxy = [{{ upstream = [{{ location = "{origin_location}" }}] }}]
        {extra_tail}
        """,
    )


def bad_config(directory: Path, port: int) -> Path:
    return write_config(
        directory,
        f"""
        listen_port = {port}
        listen_address_v4 = "127.0.0.1"
        [apps.app1]
        server_name = "app1.test"
        [[apps.app1.reverse_proxy]]
        upstream = []
        """,
    )


def run(args: list, *, cwd: Path, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


class Server:
    """A long-running entry point process, stopped with SIGTERM."""

    def __init__(self, args: list, *, cwd: Path, port: int, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.port = port
        try:
            wait_for_port(port, proc=self.proc)
        except Exception:
            self.terminate()
            raise AssertionError(f"{args} did not start: {self.output()}") from None

    def output(self) -> str:
        out, err = self.proc.communicate(timeout=10)
        return out.decode(errors="replace") + err.decode(errors="replace")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("did not exit on SIGTERM") from None
        return self.proc.returncode

    def echo_origin(self) -> str:
        result = curl("-H", "Host: app1.test", f"http://127.0.0.1:{self.port}/echo")
        assert result.returncode == 0, result.stderr
        return echo_json(result.stdout)["origin"]


# -- rpxy ----------------------------------------------------------------------------------


def test_version(tmp_path):
    result = run([RPXY, "-V"], cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"rpxy {rpxy.__version__.public()}"
    assert run([RPXY, "--version"], cwd=tmp_path).stdout == result.stdout


def test_help_lists_the_rpxy_flags(tmp_path):
    result = run([RPXY, "-h"], cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("-c", "--config", "-l", "--log-dir", "-V", "--version", "-h"):
        assert flag in result.stdout.split() or f"{flag}," in result.stdout, flag


def test_config_is_required(tmp_path):
    result = run([RPXY], cwd=tmp_path)
    assert result.returncode != 0
    assert "--config" in result.stderr


def test_bad_config_exits_naming_the_key_and_never_listens(tmp_path):
    port = free_port()
    config = bad_config(tmp_path, port)
    proc = subprocess.Popen(
        [str(RPXY), "--config", str(config), "--log-dir", str(tmp_path / "logs")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Probe the port for as long as the process lives (bounded): it must never accept.
    accepted = False
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        accepted = accepted or not port_is_closed(port)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=10)
    assert not accepted
    assert proc.returncode not in (0, None)
    assert BAD_UPSTREAM in err
    assert "listening" not in out + err
    system_log = tmp_path / "logs" / "rpxy.log"
    assert not system_log.exists() or "listening" not in system_log.read_text()
    assert port_is_closed(port)


def test_bad_config_reports_every_problem(tmp_path):
    config = write_config(
        tmp_path,
        """
        listen_port = "eighty"
        [apps.app1]
        server_name = "app1.test"
        reverse_proxy = [{ upstream = [] }, { path = "/x", upstream = [{ location = "127.0.0.1:1" }], load_balance = "fastest" }]
        """,
    )
    result = run([RPXY, "--check", "--config", config], cwd=tmp_path)
    assert result.returncode == 1
    assert "listen_port:" in result.stderr
    assert BAD_UPSTREAM in result.stderr
    assert "apps.app1.reverse_proxy[1].load_balance:" in result.stderr


def test_check_valid_and_invalid(tmp_path):
    good = good_config(tmp_path, free_port(), "127.0.0.1:1")
    result = run([RPXY, "--check", "--config", good], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    result = run([RPXY, "--check", "-c", bad_config(bad_dir, free_port())], cwd=tmp_path)
    assert result.returncode == 1
    assert BAD_UPSTREAM in result.stderr
    missing = run([RPXY, "--check", "-c", tmp_path / "missing.toml"], cwd=tmp_path)
    assert missing.returncode == 1 and "missing.toml" in missing.stderr
    broken = write_config(bad_dir, "listen_port = [\n")
    result = run([RPXY, "--check", "-c", broken], cwd=tmp_path)
    assert result.returncode == 1 and "invalid TOML" in result.stderr


def test_unknown_keys_are_warned(tmp_path):
    config = good_config(
        tmp_path,
        free_port(),
        "127.0.0.1:1",
        extra_top="listen_prot = 8080",
        extra_tail='sever_name = "typo"\n[experimental]\nmystery = 1\n[experimental.h3]\nalt_svc_maxage = 1\n',
    )
    result = run([RPXY, "--check", "-c", config], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "unknown key listen_prot (ignored)" in result.stderr
    assert "unknown key apps.app1.sever_name (ignored)" in result.stderr
    assert "unknown key experimental.mystery (ignored)" in result.stderr
    assert "unknown key experimental.h3.alt_svc_maxage (ignored)" in result.stderr


def test_warnings_reach_the_system_log_of_a_running_proxy(tmp_path, origin):
    config = f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        listen_prot = 1
        [apps.app1]
        server_name = "app1.test"
        reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]
        [experimental]
        mystery = 1
    """
    proxy = Rpxy(tmp_path, config)
    try:
        log = proxy.system_log()
        assert "unknown key listen_prot (ignored)" in log
        assert "unknown key experimental.mystery (ignored)" in log
        assert f"listening on 127.0.0.1:{proxy.port}" in log
    finally:
        proxy.stop()


def test_port_in_use_fails_clearly(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = good_config(tmp_path, port, "127.0.0.1:1")
        result = run([RPXY, "-c", config, "-l", tmp_path / "logs"], cwd=tmp_path, timeout=20)
    assert result.returncode != 0
    assert "cannot listen" in result.stderr
    assert str(port) in result.stderr
    assert "in use" in result.stderr.lower()


def test_unusable_log_dir_fails_clearly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    port = free_port()
    config = good_config(tmp_path, port, "127.0.0.1:1")
    result = run([RPXY, "-c", config, "-l", blocker / "logs"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"rpxy: cannot use log directory {blocker / 'logs'}:")
    assert "Traceback" not in result.stderr
    assert port_is_closed(port)


def test_sigterm_exits_promptly_with_status_0(tmp_path, origin):
    port = free_port()
    # No grace period: requests in flight are cut at once (the graceful drain with a
    # deadline is tests/integration/test_shutdown.py).
    config = good_config(tmp_path, port, origin.location, extra_top="graceful_shutdown_timeout = 0")
    server = Server([RPXY, "-c", config, "-l", tmp_path / "logs"], cwd=tmp_path, port=port)
    assert server.echo_origin() == "a"
    # Open client connections must not hold the shutdown: an idle keep-alive one, one
    # waiting for a slow upstream answer and one still sending its request head.
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        clients[0].sendall(b"GET /echo HTTP/1.1\r\nHost: app1.test\r\n\r\n")
        assert clients[0].recv(12) == b"HTTP/1.1 200"
        clients[1].sendall(b"GET /slow/30 HTTP/1.1\r\nHost: app1.test\r\n\r\n")
        clients[2].sendall(b"GET /echo HTTP/1.1\r\nHost: app1")
        assert server.echo_origin() == "a"  # both requests above reached the proxy before this one
        assert server.terminate() == 0
    finally:
        for client in clients:
            client.close()
    assert port_is_closed(port)


# -- twist / twistd / .tac ---------------------------------------------------------------------


def twisted_exit_ok(code: int) -> bool:
    # twist/twistd re-raise the stopping signal after a clean shutdown (Twisted >= 22.8).
    return code in (0, -signal.SIGTERM)


def test_twist_plugin_serves(tmp_path, origin):
    port = free_port()
    config = good_config(tmp_path, port, origin.location)
    server = Server(
        [BIN / "twist", "rpxy", "--config", config, "--log-dir", tmp_path / "logs"], cwd=tmp_path, port=port
    )
    assert server.echo_origin() == "a"
    assert twisted_exit_ok(server.terminate())
    assert "app1.test <- 127.0.0.1:" in (tmp_path / "logs" / "access.log").read_text()


def test_twistd_plugin_serves(tmp_path, origin):
    port = free_port()
    config = good_config(tmp_path, port, origin.location)
    pidfile = tmp_path / "twistd.pid"
    server = Server(
        [BIN / "twistd", "-n", f"--pidfile={pidfile}", "rpxy", "-c", config], cwd=tmp_path, port=port
    )
    assert pidfile.read_text().strip() == str(server.proc.pid)
    assert server.echo_origin() == "a"
    assert twisted_exit_ok(server.terminate())
    assert not pidfile.exists()


def test_twistd_example_tac(tmp_path, origin):
    port = free_port()
    config = good_config(tmp_path, port, origin.location)
    env = dict(os.environ, RPXY_CONFIG=str(config), RPXY_LOG_DIR=str(tmp_path / "logs"))
    server = Server(
        [BIN / "twistd", f"--pidfile={tmp_path / 'tac.pid'}", "-ny", ROOT / "example.tac"],
        cwd=tmp_path,
        port=port,
        env=env,
    )
    assert server.echo_origin() == "a"
    assert twisted_exit_ok(server.terminate())
    assert "GET /echo HTTP/1.1 -- 200 OK" in (tmp_path / "logs" / "access.log").read_text()


@pytest.mark.parametrize("tool", ["twist", "twistd"])
def test_twisted_entry_points_reject_a_bad_config(tmp_path, tool):
    port = free_port()
    config = bad_config(tmp_path, port)
    args = [BIN / "twist"] if tool == "twist" else [BIN / "twistd", "-n", f"--pidfile={tmp_path / 'x.pid'}"]
    result = run([*args, "rpxy", "--config", config], cwd=tmp_path)
    assert result.returncode != 0
    assert BAD_UPSTREAM in result.stdout + result.stderr
    assert port_is_closed(port)
