"""Integration fixtures: the real ``rpxy`` process and real origin processes on loopback.

Every port is a free random port on 127.0.0.1; every process started here is stopped
by the fixture that started it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
RPXY = Path(sys.executable).parent / "rpxy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


class Origin:
    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.origin", "--port", "0", "--name", name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"origin {name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.location = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Rpxy:
    """The real proxy process with a config written from text."""

    def __init__(self, tmp_path: Path, config: str, *, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.port = port or free_port()
        self.config_path = tmp_path / "config.toml"
        self.config_path.write_text(textwrap.dedent(config).replace("{port}", str(self.port)))
        self.log_dir = tmp_path / "logs"
        self.proc = subprocess.Popen(
            [str(RPXY), "--config", str(self.config_path), "--log-dir", str(self.log_dir), *(extra_args or [])],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception:
            if self.proc.poll() is None:
                self.proc.kill()
            stderr = self.proc.communicate(timeout=5)[1].decode(errors="replace")
            self.stop()
            raise RuntimeError(f"rpxy did not start: {stderr}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_lines(self) -> list[str]:
        path = self.log_dir / "access.log"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if path.exists() and path.read_text():
                break
            time.sleep(0.05)
        return path.read_text().splitlines() if path.exists() else []

    def system_log(self) -> str:
        path = self.log_dir / "rpxy.log"
        return path.read_text() if path.exists() else ""

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def origin_factory() -> Iterator:
    started: list[Origin] = []

    def start(name: str = "origin") -> Origin:
        origin = Origin(name)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()


@pytest.fixture
def origin(origin_factory) -> Origin:
    return origin_factory("a")


@pytest.fixture
def rpxy_factory(tmp_path: Path) -> Iterator:
    started: list[Rpxy] = []

    def start(config: str, **kwargs) -> Rpxy:
        directory = tmp_path / f"rpxy{len(started)}"
        directory.mkdir()
        proxy = Rpxy(directory, config, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run curl and return the completed process (stdout as bytes)."""
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args], capture_output=True, timeout=timeout + 5)


def curl_status(*args: str) -> int:
    result = curl("-o", "/dev/null", "-w", "%{http_code}", *args)
    return int(result.stdout or b"0")


def raw_request(port: int, data: bytes, *, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes and read the answer until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        except socket.timeout:
            pass
        return b"".join(chunks)
