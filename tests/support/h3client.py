"""A small HTTP/3 client for tests: qh3's own QUIC + HTTP/3 code on asyncio.

``H3Client`` opens one QUIC connection (SNI, CA, optionally only some key exchange
groups) and sends requests on it, concurrently if asked. It records the key exchange
group the server answered with (read from the ServerHello) and how the connection
ended. Everything runs under ``asyncio.run`` with timeouts, so a test never hangs.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import attrs
from qh3 import tls as qtls
from qh3._hazmat import Buffer
from qh3.asyncio.client import connect
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.h3.connection import H3Connection
from qh3.h3.events import DataReceived, HeadersReceived
from qh3.h3.events import StreamReset as H3StreamReset
from qh3.quic import events as qevents
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

GROUP_NAMES = {int(qtls.Group.X25519ML768): "X25519MLKEM768", int(qtls.Group.X25519): "X25519", int(qtls.Group.SECP256R1): "secp256r1"}
X25519MLKEM768 = int(qtls.Group.X25519ML768)
X25519 = int(qtls.Group.X25519)


@attrs.define
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    reset: int | None = None  # the stream's reset code, if the server reset it

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _ClientQuic(QuicConnection):
    """Offers only ``groups`` (if given) and records the group of the ServerHello."""

    groups: Sequence[int] | None = None
    chosen_group: int | None = None

    def _create_tls(self, remote_source_cid):  # type: ignore[no-untyped-def]
        bridge = super()._create_tls(remote_source_cid)
        context = bridge.tls
        if self.groups is not None:
            context._supported_groups = list(self.groups)
        original = context._client_handle_hello

        def handle_hello(input_buf, output_buf):  # type: ignore[no-untyped-def]
            hello = qtls.pull_server_hello(Buffer(data=input_buf.raw_data))
            if hello.key_share is not None:
                self.chosen_group = int(hello.key_share[0])
            return original(input_buf, output_buf)

        context._client_handle_hello = handle_hello
        return bridge


class _Protocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiters: dict[int, asyncio.Future] = {}
        self.responses: dict[int, Response] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.terminated: asyncio.Future = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event) -> None:  # type: ignore[no-untyped-def]
        if isinstance(event, qevents.ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
            for waiter in self.waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError(f"connection closed: {event.reason_phrase!r} ({event.error_code})"))
        for h3_event in self.h3.handle_event(event):
            tunnel = self.tunnels.get(getattr(h3_event, "stream_id", -1))
            if tunnel is not None:
                tunnel.event(h3_event)
                continue
            response = self.responses.get(getattr(h3_event, "stream_id", -1))
            if response is None:
                continue
            sid = h3_event.stream_id
            ended = False
            if isinstance(h3_event, HeadersReceived):
                if response.status == 0:
                    headers = [item for item in h3_event.headers if not item[0].startswith(b":")]
                    status = dict(h3_event.headers).get(b":status", b"0")
                    if int(status) >= 200:
                        response.status = int(status)
                        response.headers = headers
                else:
                    response.trailers = list(h3_event.headers)
                ended = h3_event.stream_ended
            elif isinstance(h3_event, DataReceived):
                response.body += h3_event.data
                ended = h3_event.stream_ended
            elif isinstance(h3_event, H3StreamReset):
                response.reset = h3_event.error_code
                ended = True
            if ended and not self.waiters[sid].done():
                self.waiters[sid].set_result(response)

    async def request(
        self,
        method: str,
        path: str,
        authority: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | Sequence[bytes] | None = None,
        trailers: Sequence[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        sid = self._quic.get_next_available_stream_id()
        chunks = [body] if isinstance(body, bytes) else list(body or ())
        fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()), (b":path", path.encode())]
        fields.extend(headers)
        self.responses[sid] = Response()
        self.waiters[sid] = asyncio.get_running_loop().create_future()
        has_body = bool(chunks) or trailers is not None
        self.h3.send_headers(sid, fields, end_stream=not has_body)
        self.transmit()
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1 and trailers is None
            self.h3.send_data(sid, chunk, end_stream=last)
            self.transmit()
            await asyncio.sleep(0)
        if trailers is not None:
            self.h3.send_headers(sid, list(trailers), end_stream=True)
            self.transmit()
        return await self.waiters[sid]


class Tunnel:
    """An extended CONNECT stream (RFC 9220) whose DATA is read and written as it comes."""

    def __init__(self, protocol: _Protocol, sid: int) -> None:
        self.protocol = protocol
        self.sid = sid
        self.status: asyncio.Future = asyncio.get_running_loop().create_future()
        self.headers: list[tuple[bytes, bytes]] = []
        self.buffer = b""
        self.ended = False
        self.reset: int | None = None
        self._more = asyncio.Event()

    def event(self, h3_event) -> None:  # type: ignore[no-untyped-def]
        if isinstance(h3_event, HeadersReceived):
            if not self.status.done():
                self.headers = list(h3_event.headers)
                self.status.set_result(int(dict(h3_event.headers)[b":status"]))
            self.ended = self.ended or h3_event.stream_ended
        elif isinstance(h3_event, DataReceived):
            self.buffer += h3_event.data
            self.ended = self.ended or h3_event.stream_ended
        elif isinstance(h3_event, H3StreamReset):
            self.reset = h3_event.error_code
            self.ended = True
            if not self.status.done():
                self.status.set_result(0)
        self._more.set()

    def send(self, data: bytes, end: bool = False) -> None:
        self.protocol.h3.send_data(self.sid, data, end_stream=end)
        self.protocol.transmit()

    async def read(self, size: int, timeout: float = 10.0) -> bytes:
        """Exactly ``size`` bytes (fewer only if the stream ended)."""

        async def wait() -> None:
            while len(self.buffer) < size and not self.ended:
                self._more.clear()
                await self._more.wait()

        await asyncio.wait_for(wait(), timeout)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def wait_end(self, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not self.ended:
                self._more.clear()
                await self._more.wait()

        await asyncio.wait_for(wait(), timeout)


def websocket_frame(opcode: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A client (masked) WebSocket frame."""
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return header + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def client_configuration(
    server_name: str, ca_file: str | None, *, idle_timeout: float = 30.0, client_cert: tuple | None = None
) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=server_name, idle_timeout=idle_timeout)
    if client_cert is not None:
        configuration.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    if ca_file is None:
        configuration.verify_mode = ssl.CERT_NONE
    else:
        configuration.load_verify_locations(cafile=ca_file)
    return configuration


class H3Client:
    """``async with H3Client(port, "a.test", ca) as client: await client.get("/echo")``."""

    def __init__(
        self,
        port: int,
        server_name: str,
        ca_file: str | None,
        *,
        groups: Sequence[int] | None = None,
        idle_timeout: float = 30.0,
        host: str = "127.0.0.1",
        client_cert: tuple | None = None,
    ) -> None:
        self.client_cert = client_cert  # (certificate file, key file) for mTLS apps
        self.port = port
        self.server_name = server_name
        self.ca_file = ca_file
        self.groups = groups
        self.idle_timeout = idle_timeout
        self.host = host
        self._cm = None
        self.protocol: _Protocol | None = None

    async def __aenter__(self) -> H3Client:
        configuration = client_configuration(
            self.server_name, self.ca_file, idle_timeout=self.idle_timeout, client_cert=self.client_cert
        )
        groups = self.groups

        def make_protocol(connection, **kwargs):  # type: ignore[no-untyped-def]
            # qh3's connect() builds a plain QuicConnection: rebuild ours with the same settings.
            quic = _ClientQuic(configuration=connection.configuration)
            quic.groups = groups
            return _Protocol(quic, **kwargs)

        self._cm = connect(self.host, self.port, configuration=configuration, create_protocol=make_protocol)
        self.protocol = await asyncio.wait_for(self._cm.__aenter__(), 10)
        return self

    async def __aexit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        if self._cm is not None:
            try:
                await asyncio.wait_for(self._cm.__aexit__(*exc), 5)
            except (asyncio.TimeoutError, ConnectionError):
                pass

    @property
    def chosen_group(self) -> str | None:
        assert self.protocol is not None
        group = self.protocol._quic.chosen_group
        return None if group is None else GROUP_NAMES.get(group, hex(group))

    async def request(self, method: str, path: str, *, authority: str | None = None, timeout: float = 20.0, **kwargs) -> Response:  # type: ignore[no-untyped-def]
        assert self.protocol is not None
        return await asyncio.wait_for(
            self.protocol.request(method, path, authority or self.server_name, **kwargs), timeout
        )

    async def get(self, path: str, **kwargs) -> Response:  # type: ignore[no-untyped-def]
        return await self.request("GET", path, **kwargs)

    async def websocket(self, path: str, *, protocol: bytes = b"websocket", headers=(), timeout: float = 10.0) -> Tunnel:  # type: ignore[no-untyped-def]
        """An RFC 9220 extended CONNECT; returns once the response head arrived (see ``.status``)."""
        proto = self.protocol
        assert proto is not None
        sid = proto._quic.get_next_available_stream_id()
        tunnel = Tunnel(proto, sid)
        proto.tunnels[sid] = tunnel
        fields = [
            (b":method", b"CONNECT"), (b":protocol", protocol), (b":scheme", b"https"),
            (b":authority", self.server_name.encode()), (b":path", path.encode()),
            (b"sec-websocket-version", b"13"), *headers,
        ]  # fmt: skip
        proto.h3.send_headers(sid, fields, end_stream=False)
        proto.transmit()
        await asyncio.wait_for(asyncio.shield(tunnel.status), timeout)
        return tunnel

    @property
    def peer_settings(self) -> dict | None:
        assert self.protocol is not None
        return self.protocol.h3.received_settings

    async def wait_terminated(self, timeout: float) -> qevents.ConnectionTerminated:
        assert self.protocol is not None
        return await asyncio.wait_for(asyncio.shield(self.protocol.terminated), timeout)


def run(coro, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    """Run ``coro`` to completion in a fresh event loop, bounded by ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
