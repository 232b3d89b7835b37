"""A small blocking HTTP/2 client for tests against the real proxy process.

It drives ``h2``'s client-side connection over a plain socket (h2c prior knowledge) or
over TLS with ALPN ``h2`` (Python's ``ssl``), and can send raw frames
(``hyperframe``) that no well-behaved client would: the tests use it for the protocol
errors and floods. Every read is bounded by a timeout; nothing retries.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import Frame, GoAwayFrame

HOST = "127.0.0.1"


class H2Client:
    def __init__(
        self,
        port: int,
        *,
        ca_file: Path | None = None,
        server_name: str = "localhost",
        validate: bool = True,
        timeout: float = 5.0,
    ) -> None:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname=server_name)
            if sock.selected_alpn_protocol() != "h2":
                sock.close()
                raise AssertionError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2")
        self.sock = sock
        self.timeout = timeout
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
            )
        )
        self.h2.initiate_connection()
        self.events: list = []
        self.raw_after_close = b""
        self.eof = False
        self.flush()

    # -- sending --------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        authority: str | None = "localhost",
        end: bool = True,
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        block = [(b":method", method.encode()), (b":scheme", b"https"), (b":path", path.encode())]
        if authority is not None:
            block.append((b":authority", authority.encode()))
        block.extend(headers or [])
        self.h2.send_headers(stream_id, block, end_stream=end and not body)
        self.flush()
        if body:
            self.send_body(stream_id, body, end=end)
        return stream_id

    def send_body(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                self._read_once()
                continue
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            self.h2.send_data(stream_id, bytes(view[:size]))
            view = view[size:]
            self.flush()
        if end:
            self.h2.end_stream(stream_id)
            self.flush()

    # -- receiving ------------------------------------------------------------------------

    def _read_once(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLError, ConnectionError):
            data = b""
        if not data:
            self.eof = True
            return
        if self.h2.state_machine.state is ConnectionState.CLOSED:
            self.raw_after_close += data
            return
        events = self.h2.receive_data(data)
        for event in events:
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.events.extend(events)
        if self.h2.state_machine.state is not ConnectionState.CLOSED:
            self.flush()

    def read_until(self, done, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not done(self):
            if self.eof or time.monotonic() > deadline:
                return done(self)
            self._read_once()
        return True

    def wait_response(self, stream_id: int, timeout: float | None = None) -> bool:
        return self.read_until(
            lambda c: c.ended(stream_id) or stream_id in c.resets() or c.goaway() is not None, timeout
        )

    # -- what arrived ---------------------------------------------------------------------

    def of(self, kind, stream_id: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]

    def ended(self, stream_id: int) -> bool:
        return bool(self.of(StreamEnded, stream_id))

    def status(self, stream_id: int) -> int | None:
        heads = self.of(ResponseReceived, stream_id)
        return int(dict(heads[0].headers)[b":status"]) if heads else None

    def headers(self, stream_id: int) -> dict[bytes, bytes]:
        heads = self.of(ResponseReceived, stream_id)
        return dict(heads[0].headers) if heads else {}

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(DataReceived, stream_id))

    def trailers(self, stream_id: int) -> list[tuple[bytes, bytes]] | None:
        found = self.of(TrailersReceived, stream_id)
        return list(found[0].headers) if found else None

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.of(StreamReset)}

    def goaway(self) -> int | None:
        terminated = self.of(ConnectionTerminated)
        if terminated:
            return terminated[0].error_code
        data = self.raw_after_close
        while len(data) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            if len(data) < 9 + length:
                break
            frame.parse_body(memoryview(data[9 : 9 + length]))
            if isinstance(frame, GoAwayFrame):
                return frame.error_code
            data = data[9 + length :]
        return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
