#!/usr/bin/env python3
"""Tiny HTTP/1.1 "sink" origin for the upload benchmark (stdlib only).

Reads every request body (Content-Length or chunked), throws it away, and
answers ``200`` with the number of body bytes it received as the response body,
so the harness can check that the whole upload reached the origin. Answers
``100 Continue`` when the request carries ``Expect: 100-continue``. Keeps the
connection alive unless the client asks to close it.

With ``--rate BYTES_PER_S`` it reads each body no faster than that (a slow origin:
a proxy that does not apply backpressure then has to buffer the upload).

Usage: upload_sink.py --port PORT [--host 127.0.0.1] [--rate BYTES_PER_S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024


class BadRequest(Exception):
    pass


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("truncated head") from None
        return None  # clean EOF between requests
    except asyncio.LimitOverrunError:
        raise BadRequest("head too large") from None


RATE = 0.0  # bytes/s per connection; 0 = read as fast as possible


class Throttle:
    """Keeps the average read rate of one request body at or below RATE."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.done = 0

    async def account(self, n: int) -> None:
        self.done += n
        ahead = self.done / RATE - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def discard(reader: asyncio.StreamReader, n: int, throttle: Throttle | None = None) -> None:
    while n > 0:
        data = await reader.read(min(CHUNK, n))
        if not data:
            raise BadRequest("body truncated")
        n -= len(data)
        if throttle is not None:
            await throttle.account(len(data))


async def discard_chunked(reader: asyncio.StreamReader, throttle: Throttle | None) -> int:
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # trailers, up to the empty line
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return total
        await discard(reader, size, throttle)
        total += size
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("bad chunk terminator")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await read_head(reader)
            if head is None:
                break
            lines = head.decode("latin-1").split("\r\n")
            request_line = lines[0].split()
            if len(request_line) != 3:
                raise BadRequest("bad request line")
            version = request_line[2]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if not line:
                    continue
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            throttle = Throttle() if RATE > 0 else None
            if "chunked" in headers.get("transfer-encoding", "").lower():
                received = await discard_chunked(reader, throttle)
            else:
                received = int(headers.get("content-length", "0") or 0)
                await discard(reader, received, throttle)
            conn = headers.get("connection", "").lower()
            close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
            body = f"{received}\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Content-Type: text/plain\r\n"
                + f"Content-Length: {len(body)}\r\n".encode()
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n"
                + body
            )
            await writer.drain()
            if close:
                break
    except (BadRequest, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    except (ConnectionError, OSError):
        pass  # client went away
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0, help="read each body at most this many bytes/s (0 = unlimited)")
    args = parser.parse_args()
    global RATE
    RATE = args.rate
    server = await asyncio.start_server(handle, args.host, args.port, limit=MAX_HEAD, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
