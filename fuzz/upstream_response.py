"""Upstream bytes -> HTTP/1.1 upstream client -> pipeline -> the client's response.

Properties: nothing escapes or is logged as a failure; the client gets at most one
response to its one request, and it is valid HTTP/1.1 (a cut-short one only when the
connection is then closed): a malformed upstream answer never becomes two answers or
a body the client would frame differently.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["rpxy"]):
    from fuzz.harness import InMemoryProxy, check_client_output

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from fuzz.runner import raise_logged_failures, run

PROXY = InMemoryProxy()
REQUEST = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_one_input(data: bytes) -> None:
    cut = data[0] if data else 0
    answer = data[1:]
    protocol, transport = PROXY.connect()
    protocol.dataReceived(REQUEST)
    connection, _upstream = PROXY.upstreams[-1]
    split = (cut * len(answer)) // 255
    for piece in (answer[:split], answer[split:]):
        if piece and connection.handler is not None and connection.transport is not None:
            connection.dataReceived(piece)
    # The upstream closes: an answer still open must end in a 502 or a cut-off client, never hang.
    if connection.transport is not None and not connection.transport.disconnected:
        connection.connectionLost(Failure(ConnectionDone()))
    completed = check_client_output(transport.value(), max_responses=1)
    if completed == 0 and not (transport.disconnecting or transport.disconnected):
        raise AssertionError(f"no complete response and the client left waiting: {transport.value()[:200]!r}")
    PROXY.finish(protocol)
    raise_logged_failures()


if __name__ == "__main__":
    run(test_one_input)
