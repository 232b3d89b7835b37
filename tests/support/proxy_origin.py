"""An origin that expects a PROXY protocol header on each connection (then optional TLS).

It answers every HTTP/1.1 request (keep-alive) with JSON: the PROXY header it read on that
connection (version, source, destination), the connection's number, and the request line.
A connection without a valid header is recorded as refused and closed.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading

from rpxy.proxy_protocol import ProxyHeaderError, parse_header


class ProxyOrigin:
    def __init__(self, *, tls_context: ssl.SSLContext | None = None) -> None:
        self.tls_context = tls_context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.location = f"localhost:{self.port}" if tls_context else f"127.0.0.1:{self.port}"
        self.connections = 0
        self.refused: list[str] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                continue
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(10)
        buffer = b""
        try:
            header = None
            while header is None:
                # Byte by byte: nothing past the header may be consumed before TLS starts.
                byte = sock.recv(1)
                if not byte:
                    return
                buffer += byte
                try:
                    parsed = parse_header(buffer)
                except ProxyHeaderError as error:
                    self.refused.append(str(error))
                    return
                if parsed is not None:
                    header = parsed[0]
            stream: socket.socket = sock
            if self.tls_context is not None:
                stream = self.tls_context.wrap_socket(sock, server_side=True)
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = stream.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                body = json.dumps(
                    {
                        "version": header.version,
                        "source": header.source,
                        "destination": header.destination,
                        "connection": number,
                        "request": head.split(b"\r\n", 1)[0].decode("latin-1"),
                    }
                ).encode()
                stream.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            return
        finally:
            sock.close()
