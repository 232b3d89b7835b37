"""The real proxy in memory, for fuzzing: front ends, pipeline and upstream client wired on
string transports, with upstream connections captured instead of dialled.

Everything between the client's bytes and the upstream's bytes is the production code
(H1Connection / H2Session, Pipeline, the header policy, UpstreamConnection); only the
sockets are replaced. The checks below are the properties a fuzzer hunts for: an
exception escaping a protocol callback, a request reaching the upstream that a strict
parser reads differently (smuggling), a response reaching the client that is not valid
HTTP/1.1.
"""

from __future__ import annotations

import io
import re
import tomllib
from collections.abc import Callable

import httptools
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from rpxy.config.load import parse_config
from rpxy.front.h1 import H1Connection, H1Factory
from rpxy.logs import AccessLog
from rpxy.pipeline import Pipeline
from rpxy.state import StateHolder, build_state
from rpxy.upstream.h1client import UpstreamConnection
from rpxy.upstream.pool import UpstreamPool

CONFIG = """
listen_port = 8080
[apps.app]
server_name = "localhost"
[[apps.app.reverse_proxy]]
upstream = [{ location = "127.0.0.1:9" }]
[[apps.app.reverse_proxy]]
path = "/api"
replace_path = "/v2"
upstream = [{ location = "127.0.0.1:10" }]
"""

#: What a captured upstream answers, unless a harness feeds its own bytes.
CANNED_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND "
    b"REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE "
    b"MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)


class Broken(AssertionError):
    """A property of the proxy does not hold for this input."""


class InMemoryProxy:
    """One proxy state with its pools patched to hand out upstream connections on string transports."""

    def __init__(self, config_text: str = CONFIG) -> None:
        self.clock = MemoryReactorClock()
        config = parse_config(tomllib.loads(config_text)).config
        state = build_state(config, self.clock)
        self.holder = StateHolder(state)
        self.access_log = AccessLog(io.StringIO(), self.clock)
        self.pipeline = Pipeline(self.holder, self.clock, self.access_log)
        self.factory = H1Factory(self.pipeline, self.holder, self.clock, tls=False)
        #: (connection, transport) of every upstream connection handed out, in order.
        self.upstreams: list[tuple[UpstreamConnection, StringTransport]] = []
        for pool in state.pools:
            if isinstance(pool, UpstreamPool):
                pool.acquire = self._acquirer(pool)  # type: ignore[method-assign]

    def _acquirer(self, pool: UpstreamPool) -> Callable[..., None]:
        def acquire(on_ready, on_error, *, fresh: bool = False, probe: bool = False) -> None:  # type: ignore[no-untyped-def]
            connection = UpstreamConnection(pool)
            transport = StringTransport(lenient=True)
            connection.makeConnection(transport)
            self.upstreams.append((connection, transport))
            on_ready(connection)

        return acquire

    def connect(self) -> tuple[H1Connection, StringTransport]:
        address = IPv4Address("TCP", "192.0.2.1", 40000)
        protocol = self.factory.buildProtocol(address)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=address, lenient=True)
        protocol.makeConnection(transport)
        return protocol, transport

    def answer_upstreams(self, response: bytes = CANNED_RESPONSE, *, rounds: int = 8) -> None:
        """Answer each captured upstream request once (pipelined requests then go on)."""
        answered: set[int] = set()
        for _ in range(rounds):
            pending = [(c, t) for c, t in self.upstreams if id(c) not in answered and t.value()]
            if not pending:
                return
            for connection, _transport in pending:
                answered.add(id(connection))
                if connection.transport is not None and connection.handler is not None:
                    connection.dataReceived(response)

    def finish(self, protocol: H1Connection) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))
        for connection, transport in self.upstreams:
            if transport.connected and not transport.disconnecting:
                connection.connectionLost(Failure(ConnectionDone()))
        self.upstreams.clear()
        self.clock.advance(3600)  # every deadline fires on what is left


class _Messages:
    """httptools callbacks counting messages, for the properties below."""

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self.started += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.completed += 1


def check_upstream_request(data: bytes) -> None:
    """What one upstream connection received is one HTTP/1.1 request (or a prefix of one).

    Two requests on a connection the proxy opened for one, or bytes a strict parser
    rejects, would mean the upstream reads something the proxy did not check: smuggling.
    """
    if not data:
        return
    method, space, rest = data.partition(b" ")
    if space and _TOKEN.fullmatch(method) and method not in _LLHTTP_METHODS:
        # Any token is a method (RFC 9110 section 9.1) but llhttp knows only registered
        # ones: check the framing with a method it knows.
        data = b"POST " + rest
    messages = _Messages()
    parser = httptools.HttpRequestParser(messages)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return  # a protocol switch: what follows is the tunnel's
    except httptools.HttpParserError as error:
        raise Broken(f"upstream got bytes a strict parser rejects ({error}): {data[:300]!r}") from error
    if messages.started > 1:
        raise Broken(f"upstream got {messages.started} requests on one exchange: {data[:300]!r}")
    for name, value in messages.headers:
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise Broken(f"CR/LF/NUL in a forwarded field {name!r}")


def check_client_output(data: bytes, *, max_responses: int | None = None) -> int:
    """The client got zero or more valid HTTP/1.1 responses (the last possibly cut short)."""
    if not data:
        return 0
    messages = _Messages()
    parser = httptools.HttpResponseParser(messages)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return messages.completed
    except httptools.HttpParserError as error:
        raise Broken(f"client got an invalid response ({error}): {data[:300]!r}") from error
    if max_responses is not None and messages.completed > max_responses:
        raise Broken(f"client got {messages.completed} responses, at most {max_responses} expected")
    return messages.completed
