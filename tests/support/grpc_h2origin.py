"""A tiny HTTP/2-only (h2c prior knowledge) origin on the ``h2`` library, in a thread.

Answers every request, once its body ended, with 200 and a JSON body: method, path,
authority, scheme, the request fields, the body length and the request trailers. A request
to ``/trailers`` gets response trailers ``x-done: yes``; ``/big?n=<bytes>`` gets that many
bytes, sent as the proxy's flow-control windows allow. With ``read_rate`` the origin
reads at most that many bytes per second (a slow upstream for request bodies). An HTTP/1.1 request is not
HTTP/2: the connection is closed. :attr:`connections` counts accepted connections.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset, TrailersReceived
from h2.exceptions import ProtocolError


class H2Origin:
    def __init__(self, read_rate: int | None = None) -> None:
        self.read_rate = read_rate
        self.listener = socket.socket()
        if read_rate:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stop = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        requests: dict[int, dict] = {}
        sending: dict[int, int] = {}
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if self.read_rate:
                    time.sleep(len(data) / self.read_rate)
                try:
                    events = conn.receive_data(data)
                except ProtocolError:
                    sock.sendall(conn.data_to_send())
                    return
                for event in events:
                    if isinstance(event, RequestReceived):
                        requests[event.stream_id] = {"headers": event.headers, "body": 0, "trailers": []}
                    elif isinstance(event, DataReceived):
                        requests[event.stream_id]["body"] += len(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, TrailersReceived):
                        requests[event.stream_id]["trailers"] = event.headers
                    elif isinstance(event, StreamEnded):
                        request = requests.pop(event.stream_id)
                        path = dict(request["headers"]).get(b":path", b"")
                        if path.startswith(b"/big?n="):
                            sending[event.stream_id] = int(path.split(b"=", 1)[1])
                            conn.send_headers(event.stream_id, [(b":status", b"200")])
                        else:
                            self._answer(conn, event.stream_id, request)
                    elif isinstance(event, StreamReset):
                        sending.pop(event.stream_id, None)
                for stream_id, remaining in list(sending.items()):
                    while remaining:
                        size = min(remaining, 16384, conn.local_flow_control_window(stream_id))
                        if size <= 0:
                            break
                        remaining -= size
                        conn.send_data(stream_id, b"b" * size, end_stream=not remaining)
                    if remaining:
                        sending[stream_id] = remaining
                    else:
                        del sending[stream_id]
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
        except OSError:
            return
        finally:
            sock.close()

    @staticmethod
    def _answer(conn: H2Connection, stream_id: int, request: dict) -> None:
        pseudo = {name.decode(): value.decode() for name, value in request["headers"] if name[:1] == b":"}
        body = json.dumps(
            {
                "method": pseudo.get(":method"),
                "path": pseudo.get(":path"),
                "authority": pseudo.get(":authority"),
                "scheme": pseudo.get(":scheme"),
                "headers": [[n.decode(), v.decode()] for n, v in request["headers"] if n[:1] != b":"],
                "body": request["body"],
                "trailers": [[n.decode(), v.decode()] for n, v in request["trailers"]],
            }
        ).encode()
        trailers = pseudo.get(":path") == "/trailers"
        conn.send_headers(
            stream_id,
            [(b":status", b"200"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        )
        conn.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(stream_id, [(b"x-done", b"yes")], end_stream=True)
