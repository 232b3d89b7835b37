"""rpxy.workers: the pure parts (command, environment, backoff) and the supervisor loop
driving small stand-in worker processes (real processes, no rpxy inside: fast)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tomllib

import pytest

from rpxy import workers
from rpxy.cli import build_parser
from rpxy.config.load import ConfigError, parse_config
from rpxy.workers import Backoff, Supervisor, describe_exit, worker_command, worker_env, worker_index

BASE = """
listen_port = 8080
[apps.a]
server_name = "a.example"
reverse_proxy = [{ upstream = [{ location = "127.0.0.1:9000" }] }]
"""


# -- config and flag -------------------------------------------------------------------------


def test_workers_defaults_to_one() -> None:
    assert parse_config(tomllib.loads(BASE)).config.workers == 1


def test_workers_key() -> None:
    assert parse_config(tomllib.loads("workers = 4\n" + BASE)).config.workers == 4


@pytest.mark.parametrize("value", ["0", "-1", "1.5", '"2"', "true", "257"])
def test_workers_key_rejects(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(f"workers = {value}\n" + BASE))
    assert any(line.startswith("workers:") for line in info.value.errors)


def test_workers_flag() -> None:
    assert build_parser().parse_args(["-c", "x", "--workers", "3"]).workers == 3
    assert build_parser().parse_args(["-c", "x"]).workers is None


@pytest.mark.parametrize("value", ["0", "x", "1000"])
def test_workers_flag_rejects(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-c", "x", "--workers", value])
    assert "--workers" in capsys.readouterr().err


# -- pure parts ------------------------------------------------------------------------------


def test_worker_index_from_environment() -> None:
    assert worker_index({}) is None
    assert worker_index({"RPXY_WORKER": "0"}) == 0
    assert worker_index({"RPXY_WORKER": "3"}) == 3
    assert worker_index({"RPXY_WORKER": "x"}) is None
    assert worker_index({"RPXY_WORKER": "-1"}) is None


def test_worker_command_is_the_same_interpreter_and_arguments() -> None:
    argv = ["--config", "/etc/rpxy.toml", "--log-dir", "/var/log/rpxy", "--workers", "2"]
    assert worker_command(argv, python="/venv/bin/python") == ["/venv/bin/python", "-m", "rpxy.cli", *argv]


def test_worker_env_adds_markers_and_keeps_the_rest() -> None:
    base = {"PATH": "/bin", "HOME": "/root"}
    env = worker_env(base, 1, ready_fd=7, supervisor_pid=42)
    assert env == {"PATH": "/bin", "HOME": "/root", "RPXY_WORKER": "1", "RPXY_WORKER_READY_FD": "7",
                   "RPXY_SUPERVISOR_PID": "42"}
    assert base == {"PATH": "/bin", "HOME": "/root"}  # not modified


def test_backoff_doubles_while_the_worker_dies_quickly_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0, stable=10.0)
    assert [backoff.next_delay(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff.next_delay(60.0) == 0.5
    assert backoff.next_delay(0.1) == 1.0


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_report_ready_writes_once_and_closes(tmp_path) -> None:
    read_fd, write_fd = os.pipe()
    workers.report_ready({"RPXY_WORKER_READY_FD": str(write_fd)})
    assert os.read(read_fd, 64) == b"ready\n"
    assert os.read(read_fd, 64) == b""  # the write end was closed
    os.close(read_fd)
    workers.report_ready({})  # no pipe: nothing to do


# -- the supervisor with stand-in workers ----------------------------------------------------

# A stand-in worker: reports ready, then waits; exits 0 on SIGTERM/SIGHUP counts in a file.
STAND_IN = r"""
import os, signal, sys, time
fd = int(os.environ["RPXY_WORKER_READY_FD"])
mode = sys.argv[1]
if mode == "fail":
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(fd, b"ready\n"); os.close(fd)
    while True:
        time.sleep(0.05)
log = open(sys.argv[2], "a")
signal.signal(signal.SIGTERM, lambda *a: (log.write(f"TERM {os.getpid()}\n"), log.flush(), sys.exit(0)))
signal.signal(signal.SIGHUP, lambda *a: (log.write(f"HUP {os.getpid()}\n"), log.flush()))
os.write(fd, b"ready\n"); os.close(fd)
while True:
    time.sleep(0.05)
"""


def _spawner(mode: str, record: str):
    def spawn(index: int, ready_fd: int) -> subprocess.Popen[bytes]:
        env = worker_env(os.environ, index, ready_fd=ready_fd, supervisor_pid=os.getpid())
        return subprocess.Popen([sys.executable, "-c", STAND_IN, mode, record], env=env, pass_fds=(ready_fd,),
                                start_new_session=True)

    return spawn


def _signal_supervisor(supervisor: Supervisor, signum: int) -> None:
    """Signal this process, but only while the supervisor's handler is installed (never kill pytest)."""
    if signal.getsignal(signum) == supervisor._on_signal:
        os.kill(os.getpid(), signum)


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_supervisor_restarts_a_killed_worker_forwards_sighup_and_stops_on_sigterm(tmp_path) -> None:
    record = tmp_path / "record.txt"
    record.touch()
    supervisor = Supervisor(2, _spawner("serve", str(record)), stop_timeout=30.0)
    seen: dict[str, object] = {}

    def drive() -> None:
        try:
            _wait(lambda: supervisor.all_ready_logged)
            first = supervisor.pids()
            seen["first"] = first
            os.kill(first[0], signal.SIGKILL)
            _wait(lambda: len(supervisor.pids()) == 2 and first[0] not in supervisor.pids()
                  and all(slot.ready for slot in supervisor.slots))
            seen["second"] = supervisor.pids()
            _signal_supervisor(supervisor, signal.SIGHUP)
            _wait(lambda: record.read_text().count("HUP") == 2)
            _signal_supervisor(supervisor, signal.SIGTERM)
        except BaseException as error:  # surfaced by the assertions below
            seen["error"] = error
            for pid in supervisor.pids():
                os.kill(pid, signal.SIGKILL)
            _signal_supervisor(supervisor, signal.SIGTERM)

    thread = threading.Thread(target=drive)
    thread.start()
    status = supervisor.run()
    thread.join()
    assert "error" not in seen, seen.get("error")
    assert status == 0
    assert supervisor.pids() == []
    first, second = seen["first"], seen["second"]
    assert first[1] in second and first[0] not in second
    lines = record.read_text().splitlines()
    assert sorted(line.split()[1] for line in lines if line.startswith("TERM")) == sorted(map(str, second))
    assert signal.getsignal(signal.SIGTERM) is not supervisor._on_signal  # handlers restored


def test_supervisor_fails_when_a_worker_cannot_start(tmp_path) -> None:
    supervisor = Supervisor(2, _spawner("fail", str(tmp_path / "r")), stop_timeout=10.0)
    assert supervisor.run() == 1
    assert supervisor.pids() == []


# -- SO_REUSEPORT on the listeners --------------------------------------------------------------


def _reuseport(sock) -> int:
    import socket

    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        sock.close()


def test_tcp_and_udp_ports_set_so_reuseport_when_asked() -> None:
    from twisted.internet.protocol import DatagramProtocol, Factory
    from twisted.internet.testing import MemoryReactor

    from rpxy.front.h3 import QuicUDPPort
    from rpxy.service import _V6OnlyPort

    reactor = MemoryReactor()
    for reuse in (False, True):
        tcp_port = _V6OnlyPort(0, Factory(), 50, "127.0.0.1", reactor)
        udp_port = QuicUDPPort(0, DatagramProtocol(), "127.0.0.1", 65535, reactor)
        tcp_port.reuse_port = udp_port.reuse_port = reuse
        assert bool(_reuseport(tcp_port.createInternetSocket())) is reuse
        assert bool(_reuseport(udp_port.createInternetSocket())) is reuse


def test_make_service_opens_shared_listeners_only_in_a_worker(tmp_path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from rpxy.service import make_service

    config = tmp_path / "config.toml"
    config.write_text('listen_address_v4 = "127.0.0.1"\n' + BASE)
    alone = make_service(str(config), reactor=MemoryReactorClock(), log_dir=str(tmp_path / "a"), config_watch="none")
    worker = make_service(str(config), reactor=MemoryReactorClock(), log_dir=str(tmp_path / "w"), config_watch="none",
                          worker=1)
    assert [listener.reuse_port for listener in alone.listeners.values()] == [False]
    assert [listener.reuse_port for listener in worker.listeners.values()] == [True]
    assert worker.worker == 1 and alone.worker is None


def test_acme_with_several_workers_is_refused(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from rpxy.cli import main

    config = tmp_path / "config.toml"
    config.write_text(
        'listen_port = 8080\nlisten_port_tls = 8443\n[apps.a]\nserver_name = "a.example"\n'
        "tls = { acme = true }\n"
        'reverse_proxy = [{ upstream = [{ location = "127.0.0.1:9000" }] }]\n'
        f'[experimental.acme]\nemail = "ops@a.example"\nregistry_path = "{tmp_path / "acme"}"\n'
    )
    assert main(["--config", str(config), "--workers", "2"]) == 1
    assert "[experimental.acme]" in capsys.readouterr().err


def test_tagged_lines_mark_the_worker_after_the_namespace() -> None:
    import io

    stream = io.StringIO()
    tagged = workers.TaggedLines(stream, 1)
    tagged.write("2026-11-25T18:21:25.797031Z INFO  rpxy.service: listening on 127.0.0.1:80 (http)\n")
    tagged.write("no separator\n")
    tagged.flush()
    assert stream.getvalue() == (
        "2026-11-25T18:21:25.797031Z INFO  rpxy.service: [worker 1] listening on 127.0.0.1:80 (http)\n"
        "no separator\n"
    )


def test_make_service_warns_when_workers_cannot_apply(tmp_path) -> None:
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import LogLevel, globalLogPublisher

    from rpxy.service import make_service

    config = tmp_path / "config.toml"
    config.write_text('workers = 2\nlisten_address_v4 = "127.0.0.1"\n' + BASE)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        make_service(str(config), reactor=MemoryReactorClock(), log_dir=str(tmp_path / "a"), config_watch="none")
        make_service(str(config), reactor=MemoryReactorClock(), log_dir=str(tmp_path / "w"), config_watch="none",
                     worker=0)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if e.get("log_level") == LogLevel.warn and "workers" in e.get("log_format", "")]
    assert len(warnings) == 1  # the lone process, not the worker


def test_supervisor_kills_a_worker_that_ignores_sigterm_after_the_stop_timeout(tmp_path) -> None:
    supervisor = Supervisor(1, _spawner("stubborn", str(tmp_path / "r")), stop_timeout=1.0)

    def drive() -> None:
        try:
            _wait(lambda: supervisor.all_ready_logged)
        finally:
            _signal_supervisor(supervisor, signal.SIGTERM)

    thread = threading.Thread(target=drive)
    thread.start()
    assert supervisor.run() == 0
    thread.join()
    assert supervisor.pids() == []
