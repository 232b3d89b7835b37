"""A raw-socket HTTP/1.1 client for wire-level tests: send exact bytes, read responses one by one.

Unlike ``curl`` it never fixes anything up, so tests can send malformed or pipelined
requests and check exactly what came back, in which order, and whether the server
closed the connection.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]


class ConnectionClosed(Exception):
    """The server closed the connection before a complete response."""


class RawConnection:
    """One TCP connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        if self.eof:
            raise ConnectionClosed(f"connection closed; unread {self.buffer[:200]!r}")
        try:
            chunk = self.sock.recv(262144)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise ConnectionClosed(f"connection closed; unread {self.buffer[:200]!r}")
        self.buffer += chunk

    def _read_until(self, marker: bytes) -> bytes:
        while True:
            position = self.buffer.find(marker)
            if position != -1:
                data = self.buffer[:position]
                self.buffer = self.buffer[position + len(marker):]
                return data
            self._fill()

    def _read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_head(self) -> Response:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        assert version.startswith("HTTP/1."), lines[0]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep, f"bad header line {line!r}"
            headers.append((name.strip().lower(), value.strip()))
        return Response(int(status), reason[0] if reason else "", version, headers)

    def read_response(self, *, head_request: bool = False, skip_interim: bool = True) -> Response:
        """Read one complete response; a body is framed as the headers say."""
        while True:
            response = self.read_head()
            if not (skip_interim and 100 <= response.status < 200 and response.status != 101):
                break
        if head_request or response.status in (101, 204, 304) or response.status < 200:
            return response
        if (response.header("transfer-encoding") or "").lower() == "chunked":
            parts = []
            while True:
                size_line = self._read_until(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                parts.append(self._read_exact(size))
                assert self._read_exact(2) == b"\r\n"
            while True:
                line = self._read_until(b"\r\n")
                if not line:
                    break
                name, _, value = line.decode("latin-1").partition(":")
                response.trailers.append((name.strip().lower(), value.strip()))
            response.body = b"".join(parts)
        elif response.header("content-length") is not None:
            response.body = self._read_exact(int(response.header("content-length")))
        else:
            response.body = self.read_until_close()
        return response

    def read_until_close(self) -> bytes:
        parts = [self.buffer]
        self.buffer = b""
        while not self.eof:
            try:
                chunk = self.sock.recv(262144)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
        return b"".join(parts)

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes (FIN or RST) within ``timeout`` with nothing more to read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eof:
                return True
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                return True
            self.buffer += chunk
        return self.eof


def request(method: str, path: str, *, host: str = "localhost", headers: list[tuple[str, str]] | None = None,
            body: bytes = b"", version: str = "1.1", close: bool = False) -> bytes:
    """Bytes of one request; a Content-Length is added when ``body`` is non-empty."""
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def proxy_config(*locations: str, top: str = "", route: str = "", server_name: str = "localhost") -> str:
    """A cleartext rpxy config (``{port}`` left for the fixture) with one app proxying ``/``
    to ``locations``; ``top`` adds top-level keys, ``route`` adds keys to the route table."""
    upstreams = ", ".join(f'{{ location = "{location}" }}' for location in locations)
    extra = f", {route}" if route else ""
    return (
        'listen_port = {port}\nlisten_address_v4 = "127.0.0.1"\n'
        + top
        + f'\n[apps.app]\nserver_name = "{server_name}"\n'
        + f"reverse_proxy = [{{ upstream = [{upstreams}]{extra} }}]\n"
    )


def assert_no_tracebacks(system_log: str) -> None:
    """Fail when the proxy logged an unhandled error (a bug even if the client saw nothing)."""
    bad = [line for line in system_log.splitlines() if "Traceback" in line or "CRITICAL" in line or "Unhandled" in line]
    assert not bad, system_log[-4000:]
