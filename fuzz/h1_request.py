"""Client bytes -> HTTP/1.1 front end -> pipeline -> upstream bytes.

Properties: nothing escapes a callback or is logged as a failure; every upstream
connection receives exactly one request a strict parser accepts (no smuggling); the
client receives valid HTTP/1.1 responses.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["rpxy"]):
    from fuzz.harness import InMemoryProxy, check_client_output, check_upstream_request

from fuzz.runner import raise_logged_failures, run

PROXY = InMemoryProxy()


def test_one_input(data: bytes) -> None:
    cut = data[0] if data else 0
    body = data[1:]
    protocol, transport = PROXY.connect()
    # Two reads split where the first byte says: framing must not depend on read boundaries.
    split = (cut * len(body)) // 255
    if body[:split]:
        protocol.dataReceived(body[:split])
    if body[split:]:
        protocol.dataReceived(body[split:])
    PROXY.answer_upstreams()
    for _connection, upstream in PROXY.upstreams:
        check_upstream_request(upstream.value())
    # A response to HEAD has no body (it would be parsed apart from the rest); an h2c preface
    # turns the connection into HTTP/2 (its own harness).
    if b"HEAD" not in body.upper() and protocol.h2 is None:
        check_client_output(transport.value())
    PROXY.finish(protocol)
    raise_logged_failures()


if __name__ == "__main__":
    run(test_one_input)
