"""A tiny in-process origin that answers every request with one canned HTTP/1.1 response.

Used where the Twisted test origin cannot produce the response under test (hop-by-hop
response fields, an ``Alt-Svc``, a foreign ``Server``). It records each raw request head
it receives. It serves keep-alive connections (one request after another) on threads,
binds 127.0.0.1 on a free port and is stopped with :meth:`CannedOrigin.stop`.
"""

from __future__ import annotations

import socket
import socketserver
import threading


class CannedOrigin:
    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests: list[bytes] = []
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(10)
                buffer = b""
                try:
                    while True:
                        while b"\r\n\r\n" not in buffer:
                            chunk = sock.recv(65536)
                            if not chunk:
                                return
                            buffer += chunk
                        head, _, buffer = buffer.partition(b"\r\n\r\n")
                        origin.requests.append(head)
                        sock.sendall(origin.response)
                except OSError:
                    return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.location = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
