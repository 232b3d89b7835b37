"""An origin for the cache tests that counts what reaches it.

``python -m tests.support.cache_origin --port 0`` serves every path; the query string
shapes the response (so each test's URL says what it expects):

- ``cc=<Cache-Control>``, ``expires=<value>`` (``+N``: N seconds from now), ``age=<Age>``, ``upstream_cs=1`` (a Cache-Status of its own), ``vary=<fields>``, ``etag=<tag>`` (sent quoted),
  ``lm=<seconds ago>`` (Last-Modified), ``setcookie=1``, ``status=<code>``,
  ``size=<n>`` (a body of n bytes, streamed in 16 KiB writes), ``chunked=1`` (no Content-Length),
  ``echo=<field>`` (the body ends with that request field's value).
- A request whose If-None-Match matches ``etag`` gets a 304 (counted as ``not_modified``); without
  ``etag``, any If-Modified-Since gets a 304 when ``lm`` is set.

``GET /__stats`` (sent directly to the origin, not through the proxy) returns JSON:
``{"<uri>": {"full": n, "not_modified": m, "conditional": c, "methods": [...]}}``.
Prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from email.utils import formatdate

from twisted.internet import reactor
from twisted.web import resource, server


class CacheOrigin(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, dict] = {}

    def render(self, request):
        uri = request.uri.decode("latin-1")
        if request.path == b"/__stats":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return json.dumps(self.stats).encode()
        stats = self.stats.setdefault(uri, {"full": 0, "not_modified": 0, "conditional": 0, "methods": []})
        stats["methods"].append(request.method.decode())
        args = {key.decode(): values[0].decode() for key, values in request.args.items()}
        conditional = request.getHeader(b"if-none-match") or request.getHeader(b"if-modified-since")
        if conditional:
            stats["conditional"] += 1
        request.setHeader(b"date", formatdate(time.time(), usegmt=True).encode())
        if "cc" in args:
            request.setHeader(b"cache-control", args["cc"].encode())
        if "upstream_cs" in args:
            request.setHeader(b"cache-status", b"origin-cache; hit")
        if "age" in args:
            request.setHeader(b"age", args["age"].encode())
        if "expires" in args:
            expires = args["expires"]
            if expires.startswith("+"):
                expires = formatdate(time.time() + float(expires[1:]), usegmt=True)
            request.setHeader(b"expires", expires.encode())
        if "vary" in args:
            request.setHeader(b"vary", args["vary"].encode())
        if "lm" in args:
            request.setHeader(b"last-modified", formatdate(time.time() - float(args["lm"]), usegmt=True).encode())
        if "etag" in args:
            etag = b'"' + args["etag"].encode() + b'"'
            request.setHeader(b"etag", etag)
            if request.getHeader(b"if-none-match") == etag:
                stats["not_modified"] += 1
                request.setResponseCode(304)
                return b""
        elif "lm" in args and request.getHeader(b"if-modified-since"):
            stats["not_modified"] += 1
            request.setResponseCode(304)
            return b""
        if "setcookie" in args:
            request.setHeader(b"set-cookie", b"session=secret-%d; Path=/" % (stats["full"] + 1))
        stats["full"] += 1
        if "status" in args:
            request.setResponseCode(int(args["status"]))
        request.setHeader(b"content-type", b"text/plain")
        if "size" in args:
            size = int(args["size"])
            fill = b"%d:" % stats["full"]
            body = (fill * (size // len(fill) + 1))[:size]
            if "chunked" not in args:
                request.setHeader(b"content-length", b"%d" % size)
            for start in range(0, size, 16384):
                request.write(body[start : start + 16384])
            request.finish()
            return server.NOT_DONE_YET
        body = f"{request.path.decode('latin-1')} #{stats['full']}"
        if "echo" in args:
            value = request.getHeader(args["echo"].encode())
            body += f" {args['echo']}={value.decode('latin-1') if value else '-'}"
        data = body.encode()
        if "chunked" in args:
            request.write(data)
            request.finish()
            return server.NOT_DONE_YET
        return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    site = server.Site(CacheOrigin())
    site.displayTracebacks = False
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print(f"READY {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
