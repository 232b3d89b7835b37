"""Writes the seed corpus (fuzz/corpus/<harness>/); run once, the files are committed."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "corpus"

H1_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /api/x?q=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    b"GET http://localhost/abs HTTP/1.1\r\nHost: other\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /%2e%2e/x HTTP/1.1\r\nHost: LOCALHOST:8080\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
]
UPSTREAM_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited body",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    b"HTTP/1.0 200 OK\r\n\r\nold",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nServer: origin\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
]


def _write(harness: str, seeds: list[bytes]) -> None:
    folder = ROOT / harness
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def main() -> None:
    # First byte: where the harness splits the rest into two reads (0 = one read).
    _write("h1_request", [bytes((split,)) + r for r in H1_REQUESTS for split in (0, 128)])
    _write("upstream_response", [bytes((split,)) + r for r in UPSTREAM_RESPONSES for split in (0, 100)])
    _write("paths", [bytes(range(n, n + 40)) for n in (0, 50, 100, 150)])
    _write("h2_request", [bytes(range(n, 256, step)) for n, step in ((0, 1), (7, 3), (1, 2), (200, 1))])
    config_example = (ROOT.parent.parent / "config-example.toml").read_bytes()
    _write(
        "config",
        [
            b"\x01" + config_example,
            b'\x01listen_port = 8080\n[apps.a]\nserver_name = "a"\nreverse_proxy = [{ upstream = [{ location = "127.0.0.1:1" }] }]\n',
            bytes(range(0, 200, 2)),
            bytes(range(1, 200, 3)),
        ],
    )


if __name__ == "__main__":
    main()
