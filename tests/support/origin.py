"""A test origin server, run as its own process by the integration tests.

``python -m tests.support.origin --port N --name NAME`` serves:
- ``/echo...`` (any method): JSON with method, path, headers (list), body length, body sha256
- ``/bytes/<n>``: n bytes streamed with a producer (chunked unless ``?cl=1``)
- ``/status/<code>``: that status, empty body
- ``/slow/<seconds>``: answers after a delay
- ``/count``: how many requests this origin has served
- ``/health``: 200 or, once ``/sick`` was requested, 503
- ``/cookie``: sets a cookie, echoes Cookie
- ``/ws``: a WebSocket echo (hand-rolled RFC 6455 handshake on a raw protocol switch)
With ``--tls-cert``/``--tls-key`` it serves HTTPS instead.
Prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys

from twisted.internet import reactor
from twisted.web import resource, server

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Origin(resource.Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.count = 0
        self.sick = False

    def render(self, request):
        self.count += 1
        path = request.path.decode()
        request.setHeader(b"x-origin", self.name.encode())
        if path.startswith("/bytes/"):
            return self._bytes(request, int(path.split("/")[2]))
        if path.startswith("/status/"):
            request.setResponseCode(int(path.split("/")[2]))
            return b""
        if path.startswith("/slow/"):
            delay = float(path.split("/")[2])
            reactor.callLater(delay, self._finish_slow, request)
            return server.NOT_DONE_YET
        if path == "/count":
            return str(self.count).encode()
        if path == "/sick":
            self.sick = True
            return b"sick"
        if path == "/well":
            self.sick = False
            return b"well"
        if path == "/health":
            if self.sick:
                request.setResponseCode(503)
            return b"ok"
        if path == "/ws":
            return self._websocket(request)
        return self._echo(request)

    def _echo(self, request):
        body = request.content.read()
        data = {
            "origin": self.name,
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "client": request.getClientAddress().host,
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(data).encode()

    def _finish_slow(self, request):
        if not request.finished and not request._disconnected:
            request.write(b"slow")
            request.finish()

    def _bytes(self, request, total: int):
        if request.args.get(b"cl"):
            request.setHeader(b"content-length", str(total).encode())
        producer = _Repeat(request, total)
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return server.NOT_DONE_YET

    def _websocket(self, request):
        key = request.getHeader(b"sec-websocket-key")
        if key is None:
            request.setResponseCode(400)
            return b""
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        transport = request.channel.transport
        request.channel._websocket = True
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        # Hand the raw connection to a frame echo protocol.
        echo = _WebSocketEcho(transport)
        request.channel.dataReceived = echo.dataReceived
        request.channel.setTimeout(None)
        return server.NOT_DONE_YET


class _Repeat:
    def __init__(self, request, total: int) -> None:
        self.request = request
        self.left = total
        self.paused = False
        self.block = b"x" * 65536

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.left > 0:
            n = min(self.left, len(self.block))
            self.left -= n
            self.request.write(self.block[:n] if n != len(self.block) else self.block)
        if self.left == 0 and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()
            self.left = -1

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.left = -1


class _WebSocketEcho:
    """Echoes text/binary frames back unmasked; answers close with close."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            frame = self._parse()
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 8:
                self.transport.write(b"\x88" + bytes([len(payload)]) + payload)
                self.transport.loseConnection()
                return
            if opcode in (1, 2):
                self.transport.write(self._frame(opcode, payload))
            elif opcode == 9:
                self.transport.write(self._frame(10, payload))

    def _parse(self):
        b = self.buffer
        if len(b) < 2:
            return None
        opcode = b[0] & 0x0F
        masked = b[1] & 0x80
        length = b[1] & 0x7F
        pos = 2
        if length == 126:
            if len(b) < 4:
                return None
            length = int.from_bytes(b[2:4], "big")
            pos = 4
        elif length == 127:
            if len(b) < 10:
                return None
            length = int.from_bytes(b[2:10], "big")
            pos = 10
        mask = b""
        if masked:
            if len(b) < pos + 4:
                return None
            mask = b[pos:pos + 4]
            pos += 4
        if len(b) < pos + length:
            return None
        payload = b[pos:pos + length]
        self.buffer = b[pos + length:]
        if masked:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return opcode, payload

    @staticmethod
    def _frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            header = bytes([0x80 | opcode, n])
        elif n < 65536:
            header = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
        return header + payload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="origin")
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate")
    parser.add_argument("--tls-key", help="and this PEM key")
    args = parser.parse_args()
    site = server.Site(Origin(args.name))
    site.displayTracebacks = False
    if args.tls_cert:
        from twisted.internet import ssl

        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            options = ssl.PrivateCertificate.loadPEM(cert.read() + key.read()).options()
        port = reactor.listenSSL(args.port, site, options, interface="127.0.0.1")
    else:
        port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print(f"READY {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
