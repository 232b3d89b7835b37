"""An in-process HTTP/1.1 origin that reads request bodies slowly (a slow upstream).

Each request must carry Content-Length; the body is read at no more than ``rate``
bytes per second, thrown away, and answered with ``200`` and the number of body bytes
read. A proxy without upload backpressure has to buffer what the sink has not read yet.
Binds 127.0.0.1 on a free port; stopped with :meth:`SlowSink.stop`.
"""

from __future__ import annotations

import socket
import threading
import time


class SlowSink:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.received: list[int] = []
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.location = f"127.0.0.1:{self.port}"
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        # A small receive buffer, so that the kernel does not absorb the upload for us.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _, rest = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            got = len(rest)
            started = time.monotonic()
            while got < length:
                chunk = conn.recv(min(65536, length - got))
                if not chunk:
                    return
                got += len(chunk)
                ahead = got / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            self.received.append(got)
            body = str(got).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped = True
        self.server.close()
