"""A small HTTP/3 load generator (qh3 on asyncio): ``-c`` connections x ``-m`` streams for ``-d`` seconds.

Debian's h2load has no HTTP/3, so bench/h3bench.py runs several of these processes side by
side. Each keeps ``m`` GETs in flight per connection, counts completed 2xx responses after
a warmup, and prints one JSON line: ``{"requests", "errors", "seconds", "bytes"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

from qh3.asyncio.client import connect
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.h3.connection import H3Connection
from qh3.h3.events import DataReceived, HeadersReceived
from qh3.h3.events import StreamReset as H3StreamReset
from qh3.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiters: dict[int, asyncio.Future] = {}
        self.status: dict[int, int] = {}
        self.sizes: dict[int, int] = {}

    def quic_event_received(self, event) -> None:  # type: ignore[no-untyped-def]
        for ev in self.h3.handle_event(event):
            sid = getattr(ev, "stream_id", None)
            waiter = self.waiters.get(sid)
            if waiter is None:
                continue
            done = False
            if isinstance(ev, HeadersReceived):
                for name, value in ev.headers:
                    if name == b":status":
                        self.status[sid] = int(value)
                done = ev.stream_ended
            elif isinstance(ev, DataReceived):
                self.sizes[sid] = self.sizes.get(sid, 0) + len(ev.data)
                done = ev.stream_ended
            elif isinstance(ev, H3StreamReset):
                self.status[sid] = 0
                done = True
            if done and not waiter.done():
                waiter.set_result((self.status.pop(sid, 0), self.sizes.pop(sid, 0)))

    async def get(self, authority: bytes, path: bytes) -> tuple[int, int]:
        sid = self._quic.get_next_available_stream_id()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[sid] = waiter
        self.h3.send_headers(
            sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority), (b":path", path)], end_stream=True
        )
        self.transmit()
        try:
            return await waiter
        finally:
            del self.waiters[sid]


async def worker(client: Client, authority: bytes, path: bytes, stop: list, counts: dict) -> None:
    while not stop[0]:
        try:
            status, size = await asyncio.wait_for(client.get(authority, path), 10)
        except Exception:
            counts["errors"] += 1
            continue
        if counts["measuring"]:
            if 200 <= status < 300:
                counts["requests"] += 1
                counts["bytes"] += size
            else:
                counts["errors"] += 1


async def run(args: argparse.Namespace) -> dict:
    counts = {"requests": 0, "errors": 0, "bytes": 0, "measuring": False}
    stop = [False]
    contexts = []
    tasks = []
    for _ in range(args.connections):
        configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=args.host)
        configuration.verify_mode = ssl.CERT_NONE
        cm = connect(args.address, args.port, configuration=configuration, create_protocol=Client)
        client = await asyncio.wait_for(cm.__aenter__(), 10)
        contexts.append(cm)
        for _ in range(args.streams):
            tasks.append(asyncio.create_task(worker(client, args.host.encode(), args.path.encode(), stop, counts)))
    await asyncio.sleep(args.warmup)
    counts["measuring"] = True
    started = time.monotonic()
    await asyncio.sleep(args.duration)
    counts["measuring"] = False
    elapsed = time.monotonic() - started
    stop[0] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for cm in contexts:
        try:
            await asyncio.wait_for(cm.__aexit__(None, None, None), 2)
        except Exception:
            pass
    return {"requests": counts["requests"], "errors": counts["errors"], "bytes": counts["bytes"], "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="localhost", help="SNI and :authority")
    p.add_argument("--path", default="/")
    p.add_argument("-c", "--connections", type=int, default=2)
    p.add_argument("-m", "--streams", type=int, default=10)
    p.add_argument("-d", "--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=1)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
