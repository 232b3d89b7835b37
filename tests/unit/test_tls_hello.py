"""The ClientHello pre-reader: SNI extraction, fragmentation, malformed input."""

from __future__ import annotations

import os
import struct

import pytest
from OpenSSL import SSL

from rpxy.tls.hello import ClientHelloError, parse_client_hello


from tests.support.tlsgen import client_context  # noqa: E402


def real_client_hello(sni: bytes | None, **client_options) -> bytes:
    client = SSL.Connection(client_context(**client_options), None)
    client.set_connect_state()
    if sni is not None:
        client.set_tlsext_host_name(sni)
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    return client.bio_read(1 << 16)


def _u16(n: int) -> bytes:
    return struct.pack("!H", n)


def extension(ext_type: int, data: bytes) -> bytes:
    return _u16(ext_type) + _u16(len(data)) + data


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + _u16(len(n)) + n for n in names)
    return extension(0, _u16(len(entries)) + entries)


def synthetic_hello(extensions: bytes | None, *, record_size: int = 16384) -> bytes:
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + _u16(2) + b"\x13\x01" + b"\x01\x00"
    if extensions is not None:
        body += _u16(len(extensions)) + extensions
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    records = b""
    for i in range(0, len(handshake), record_size):
        chunk = handshake[i : i + record_size]
        records += b"\x16\x03\x01" + _u16(len(chunk)) + chunk
    return records


def test_real_client_hello_with_post_quantum_share():
    data = real_client_hello(b"Example.COM.")
    assert len(data) > 1200  # carries an X25519MLKEM768 key share
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.raw_sni == b"Example.COM."
    assert hello.sni == "example.com"
    assert hello.length == len(data)


def test_real_client_hello_without_sni():
    hello = parse_client_hello(real_client_hello(None))
    assert hello is not None and hello.raw_sni is None and hello.sni is None


def test_needs_more_bytes_until_complete():
    data = real_client_hello(b"a.test")
    for cut in (0, 1, 4, 5, 100, len(data) - 1):
        assert parse_client_hello(data[:cut]) is None
    assert parse_client_hello(data).sni == "a.test"


def test_handshake_fragmented_over_many_records():
    data = synthetic_hello(sni_extension(b"frag.test"), record_size=7)
    assert data.count(b"\x16\x03\x01") > 5
    assert parse_client_hello(data).sni == "frag.test"
    assert parse_client_hello(data[:-1]) is None


def test_plain_http_is_not_tls():
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert info.value.not_tls
    assert "plain HTTP" in str(info.value)


def test_random_bytes_are_not_tls():
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(b"\x00\x01\x02")
    assert info.value.not_tls


@pytest.mark.parametrize(
    ("extensions", "message"),
    [
        (sni_extension(b"a.test") + sni_extension(b"b.test"), "duplicate extension"),
        (sni_extension(b"a.test", b"b.test"), "more than one server_name"),
        (sni_extension(b"a.test", name_type=1), "not a host_name"),
        (sni_extension(b"a\x00.test"), "invalid host_name"),
        (sni_extension(b"x" * 256), "invalid host_name"),
        (extension(0, b"\x00\x00"), "malformed server_name"),
        (extension(0, b""), "truncated"),
        (extension(0, b"\x00\x05\x00\x00\x01"), "truncated"),
    ],
)
def test_malformed_server_name(extensions, message):
    with pytest.raises(ClientHelloError, match=message) as info:
        parse_client_hello(synthetic_hello(extensions))
    assert not info.value.not_tls


def test_not_a_client_hello():
    data = synthetic_hello(sni_extension(b"a.test"))
    data = data[:5] + b"\x02" + data[6:]  # ServerHello type
    with pytest.raises(ClientHelloError, match="not a ClientHello"):
        parse_client_hello(data)


def test_oversized_record_length():
    with pytest.raises(ClientHelloError, match="record length"):
        parse_client_hello(b"\x16\x03\x01\xff\xff" + b"\x00" * 10)


def test_hello_without_extensions_has_no_sni():
    hello = parse_client_hello(synthetic_hello(None))
    assert hello is not None and hello.sni is None


def test_non_ascii_sni_is_kept_raw_but_not_normalised():
    hello = parse_client_hello(synthetic_hello(sni_extension("bücher.test".encode())))
    assert hello.raw_sni == "bücher.test".encode()
    assert hello.sni is None


def test_offered_alpn_is_reported():
    hello = parse_client_hello(real_client_hello(b"a.test", alpn=[b"h2", b"acme-tls/1"]))
    assert hello.alpn == (b"h2", b"acme-tls/1")
    assert parse_client_hello(real_client_hello(b"a.test")).alpn == ()
