"""An HTTP/1.1 upstream on 127.0.0.1 that misbehaves on command, run in a thread of the test.

The request path picks the behaviour (see :data:`BEHAVIOURS`); every request it parsed is
recorded in :attr:`BadUpstream.requests` and every accepted connection counted, so tests
can tell whether the proxy forwarded something and whether it reused a connection.
Bodies are streamed through a hash, never stored, so ``/sink`` takes uploads of any size.

    with BadUpstream() as upstream:
        ... location = upstream.location ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time

import httptools

BEHAVIOURS = {
    "/ok": "200 with a Content-Length, keep-alive",
    "/sink": "reads the whole body, answers JSON {length, sha256}; ``?delay=S`` stops reading for S seconds first",
    "/garbage": "answers bytes that are not HTTP, then closes",
    "/http09": "answers an HTTP/0.9-style bare body, then closes",
    "/badstatus": "answers a malformed status line",
    "/clte": "answers with both Content-Length and Transfer-Encoding",
    "/dupcl": "answers with two different Content-Length values",
    "/never": "never answers (keeps the connection open)",
    "/early": "answers 403 as soon as the head arrived, before reading the body; keeps reading",
    "/truncate-cl": "announces 1 MB with Content-Length, sends 64 KiB, closes",
    "/truncate-chunked": "chunked, sends one 64 KiB chunk, closes without the last chunk",
    "/close-delimited": "HTTP/1.1 200 without framing, body ended by closing (legitimate)",
    "/101-mismatch": "101 with an Upgrade other than the one asked for",
    "/101-none": "101 without an Upgrade header",
    "/stale": "first request on a connection: 200 keep-alive; a later one: close without answering",
    "/ws": "a WebSocket echo (RFC 6455: text, binary, ping, close)",
    "/ok-then-close": "200 with a Content-Length and no Connection: close, then closes the connection",
}


class _Request:
    __slots__ = ("method", "path", "headers", "body_length", "sha", "complete", "upgrade")

    def __init__(self) -> None:
        self.method = ""
        self.path = ""
        self.headers: list[tuple[str, str]] = []
        self.body_length = 0
        self.sha = hashlib.sha256()
        self.complete = False
        self.upgrade = False


class _Collector:
    """httptools callbacks collecting requests, bodies hashed on the fly."""

    def __init__(self, upstream: BadUpstream) -> None:
        self.upstream = upstream
        self.current: _Request | None = None
        self.url = b""
        self.done: list[_Request] = []
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        request = self.current
        request.method = self.parser.get_method().decode()
        request.path = self.url.decode("latin-1")
        with self.upstream.lock:
            self.upstream.requests.append(request)
        if request.path.split("?")[0] in ("/never", "/early"):
            # Handled at the head: nothing (/never) or an answer before the body (/early).
            self.done.append(request)

    def on_body(self, body: bytes) -> None:
        self.current.body_length += len(body)
        self.current.sha.update(body)

    def on_message_complete(self) -> None:
        self.current.complete = True
        if self.current.path.split("?")[0] not in ("/never", "/early"):
            self.done.append(self.current)


class BadUpstream:
    """Accepts connections on a free loopback port until :meth:`stop`."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.location = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.requests: list[_Request] = []
        self.connections = 0
        #: connections that ended because the proxy closed them (EOF or reset while reading)
        self.closed_by_peer = 0
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="bad-upstream-accept", daemon=True)
        self._accept_thread.start()

    def __enter__(self) -> BadUpstream:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def paths(self) -> list[str]:
        with self.lock:
            return [request.path for request in self.requests]

    def wait_for_request(self, path: str, timeout: float = 5.0) -> _Request | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for request in self.requests:
                    if request.path == path:
                        return request
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        self._stopped.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self._accept_thread.join(5)
        for thread in self._threads:
            thread.join(5)

    # -- server -----------------------------------------------------------

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._sockets.add(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), name="bad-upstream-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        collector = _Collector(self)
        parser = httptools.HttpRequestParser(collector)
        collector.parser = parser
        served = 0
        delayed = False
        try:
            while not self._stopped.is_set():
                try:
                    data = sock.recv(262144)
                except OSError:
                    data = b""
                if not data:
                    if not self._stopped.is_set():
                        with self.lock:
                            self.closed_by_peer += 1
                    return
                rest = b""
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    rest = data[upgrade.args[0]:]
                    if collector.current is not None:
                        collector.current.upgrade = True
                        if collector.current not in collector.done:
                            collector.done.append(collector.current)
                except httptools.HttpParserError:
                    sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                current = collector.current
                if not delayed and current is not None and current.path.startswith("/sink?delay="):
                    delayed = True
                    time.sleep(float(current.path.split("=", 1)[1]))  # a slow reader: TCP backs up
                while collector.done:
                    request = collector.done.pop(0)
                    served += 1
                    if request.upgrade and request.path.split("?")[0] == "/ws":
                        self._websocket(sock, request, rest)
                        return
                    if not self._answer(sock, request, served):
                        return
        finally:
            with self.lock:
                self._sockets.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _websocket(self, sock: socket.socket, request: _Request, buffer: bytes) -> None:
        key = dict(request.headers).get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        while True:
            frame = _parse_frame(buffer)
            if frame is None:
                try:
                    data = sock.recv(262144)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                continue
            fin, opcode, payload, buffer = frame
            if opcode == 8:
                sock.sendall(_frame(8, payload))
                return
            if opcode == 9:
                sock.sendall(_frame(10, payload))
            elif opcode in (0, 1, 2):
                sock.sendall(_frame(opcode, payload, fin))

    def _answer(self, sock: socket.socket, request: _Request, served: int) -> bool:
        """Send the behaviour's answer; False when the connection must close."""
        path = request.path.split("?")[0]
        if path == "/ok":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        if path == "/sink":
            body = json.dumps({"length": request.body_length, "sha256": request.sha.hexdigest()}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return True
        if path == "/garbage":
            sock.sendall(b"THIS IS NOT HTTP\r\n\r\nnor is this\r\n")
            return False
        if path == "/http09":
            sock.sendall(b"<html>hello from 1991</html>\n")
            return False
        if path == "/badstatus":
            sock.sendall(b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok")
            return False
        if path == "/clte":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
            return False
        if path == "/dupcl":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!")
            return False
        if path == "/never":
            return True  # keep reading; nothing is ever sent
        if path == "/early":
            sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
            return True
        if path == "/truncate-cl":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 65536)
            return False
        if path == "/truncate-chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 65536 + b"\r\n")
            return False
        if path == "/close-delimited":
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"y" * 100000)
            return False
        if path == "/101-mismatch":
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: something-else\r\nConnection: Upgrade\r\n\r\n")
            time.sleep(0.5)
            return False
        if path == "/101-none":
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n")
            time.sleep(0.5)
            return False
        if path == "/stale":
            if served == 1:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
                return True
            return False  # as if the upstream's idle timer closed it just now
        if path == "/ok-then-close":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return False
        sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True


def _parse_frame(buffer: bytes):
    """(fin, opcode, unmasked payload, rest) of the first complete frame, or None."""
    if len(buffer) < 2:
        return None
    opcode = buffer[0] & 0x0F
    length = buffer[1] & 0x7F
    position = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length = int.from_bytes(buffer[2:4], "big")
        position = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length = int.from_bytes(buffer[2:10], "big")
        position = 10
    mask = b""
    if buffer[1] & 0x80:
        mask = buffer[position:position + 4]
        position += 4
    if len(buffer) < position + length:
        return None
    payload = buffer[position:position + length]
    if mask and length:
        key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
        payload = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
    return bool(buffer[0] & 0x80), opcode, payload, buffer[position + length:]


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server frame (fragments are echoed frame by frame, FIN kept)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = bytes([first, n])
    elif n < 65536:
        header = bytes([first, 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([first, 127]) + n.to_bytes(8, "big")
    return header + payload
