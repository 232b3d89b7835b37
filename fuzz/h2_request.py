"""HTTP/2 requests (arbitrary header lists, h2c) -> HTTP/2 front end -> pipeline -> upstream HTTP/1.1.

Properties: nothing escapes or is logged as a failure; what an upstream receives is one
HTTP/1.1 request a strict parser accepts, whatever the client put in its header block
(CR/LF/NUL, uppercase names, connection-specific fields, a Content-Length that lies,
pseudo-headers out of place): the H2 -> H1 translation never smuggles.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["rpxy"]):
    from fuzz.harness import InMemoryProxy, check_upstream_request

from h2.config import H2Configuration
from h2.connection import H2Connection

from fuzz.runner import raise_logged_failures, run

PROXY = InMemoryProxy()
METHODS = [b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS", b"get", b"G T", b""]
NAMES = [
    b"host", b"content-length", b"te", b"connection", b"cookie", b"x-forwarded-for", b"transfer-encoding",
    b"upgrade", b"keep-alive", b"forwarded", b"expect", b"x-a", b"X-Upper", b":status", b":path", b"sec-websocket-key",
]
_CHARS = b"aZ09 /:;,=\r\n\x00\t-?#%"


def _bytes(fdp: atheris.FuzzedDataProvider, size: int) -> bytes:
    return bytes(_CHARS[byte % len(_CHARS)] for byte in fdp.ConsumeBytes(size))


def _headers(fdp: atheris.FuzzedDataProvider) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    if fdp.ConsumeIntInRange(0, 9):
        headers.append((b":method", fdp.PickValueInList(METHODS)))
    if fdp.ConsumeIntInRange(0, 9):
        headers.append((b":scheme", b"https" if fdp.ConsumeBool() else _bytes(fdp, 3)))
    if fdp.ConsumeIntInRange(0, 9):
        headers.append((b":path", b"/" + _bytes(fdp, fdp.ConsumeIntInRange(0, 12))))
    if fdp.ConsumeIntInRange(0, 4):
        headers.append((b":authority", b"localhost" if fdp.ConsumeIntInRange(0, 3) else _bytes(fdp, 6)))
    if not fdp.ConsumeIntInRange(0, 7):
        headers.append((b":protocol", b"websocket"))
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        name = fdp.PickValueInList(NAMES) if fdp.ConsumeIntInRange(0, 3) else _bytes(fdp, 4)
        headers.append((name, _bytes(fdp, fdp.ConsumeIntInRange(0, 10))))
    if headers and fdp.ConsumeBool():
        # pseudo-headers after regular ones, or repeated
        headers.append(headers[fdp.ConsumeIntInRange(0, len(headers) - 1)])
    return headers


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    client = H2Connection(
        H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    client.initiate_connection()
    protocol, _transport = PROXY.connect()
    protocol.dataReceived(client.data_to_send())
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        stream_id = client.get_next_available_stream_id()
        end = fdp.ConsumeBool()
        try:
            client.send_headers(stream_id, _headers(fdp), end_stream=end)
            if not end:
                client.send_data(stream_id, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)), end_stream=fdp.ConsumeBool())
        except Exception:  # the client library refusing its own input is not the proxy's business
            break
        protocol.dataReceived(client.data_to_send())
    PROXY.answer_upstreams()
    for _connection, upstream in PROXY.upstreams:
        check_upstream_request(upstream.value())
    PROXY.finish(protocol)
    raise_logged_failures()


if __name__ == "__main__":
    run(test_one_input)
