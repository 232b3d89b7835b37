"""An in-process grpcio server with generic (bytes) handlers: no protoc needed.

Service ``test.Echo``:

* ``Unary``: answers ``b"echo:" + request``; echoes the ``x-meta`` metadata back as initial
  metadata and ``x-trailer`` as trailing metadata.
* ``Fail``: aborts with ``INVALID_ARGUMENT``, details ``"bad thing: " + request`` and a
  trailing ``x-why`` field.
* ``ServerStream``: request ``b"<n>"`` → n messages ``b"item <i>"``.
* ``ClientStream``: joins every request message with ``b","``.
* ``Bidi``: answers each message with ``b"re:" + message`` as it arrives.
* ``Hang``: waits until the call is cancelled and records that in :attr:`cancelled`.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc


def _identity(data: bytes) -> bytes:
    return data


class EchoServer:
    def __init__(self, *, credentials: grpc.ServerCredentials | None = None) -> None:
        self.cancelled = threading.Event()
        self.hang_started = threading.Event()
        self.seen_metadata: list[tuple[str, str]] = []
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(
                self.unary, request_deserializer=_identity, response_serializer=_identity
            ),
            "Fail": grpc.unary_unary_rpc_method_handler(
                self.fail, request_deserializer=_identity, response_serializer=_identity
            ),
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                self.server_stream, request_deserializer=_identity, response_serializer=_identity
            ),
            "ClientStream": grpc.stream_unary_rpc_method_handler(
                self.client_stream, request_deserializer=_identity, response_serializer=_identity
            ),
            "Bidi": grpc.stream_stream_rpc_method_handler(
                self.bidi, request_deserializer=_identity, response_serializer=_identity
            ),
            "Hang": grpc.unary_unary_rpc_method_handler(
                self.hang, request_deserializer=_identity, response_serializer=_identity
            ),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        address = "127.0.0.1:0"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)

    # -- handlers --------------------------------------------------------------------------

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = list(context.invocation_metadata())
        self.seen_metadata = [(item.key, item.value) for item in metadata]
        values = dict(self.seen_metadata)
        if "x-meta" in values:
            context.send_initial_metadata((("x-meta-back", values["x-meta"]),))
        if "x-trailer" in values:
            context.set_trailing_metadata((("x-trailer-back", values["x-trailer"]),))
        return b"echo:" + request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-why", "because"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing: " + request.decode())
        return b""  # not reached

    def server_stream(self, request: bytes, context: grpc.ServicerContext):
        for index in range(int(request)):
            yield b"item %d" % index

    def client_stream(self, requests, context: grpc.ServicerContext) -> bytes:
        return b",".join(requests)

    def bidi(self, requests, context: grpc.ServicerContext):
        for message in requests:
            yield b"re:" + message

    def hang(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.add_callback(self.cancelled.set)
        self.hang_started.set()
        deadline = time.monotonic() + 20
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not context.is_active():
            self.cancelled.set()
        return b"too late"


def stub(channel: grpc.Channel, kind: str, method: str):
    """A callable for ``/test.Echo/<method>`` with bytes (de)serializers."""
    make = {
        "uu": channel.unary_unary,
        "us": channel.unary_stream,
        "su": channel.stream_unary,
        "ss": channel.stream_stream,
    }[kind]
    return make(f"/test.Echo/{method}", request_serializer=_identity, response_deserializer=_identity)
