"""netio: finding the OS socket under (TLS-)wrapped transports, and upstream TCP keepalive."""

from __future__ import annotations

import socket

import pytest

from rpxy import netio


class PlainTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


class Wrapper:
    """Like TLSMemoryBIOProtocol: reading unknown attributes is forwarded to the transport below."""

    def __init__(self, below) -> None:
        self.transport = below

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


@pytest.fixture
def tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    yield client, server
    for sock in (client, server, listener):
        sock.close()


def test_socket_below_a_plain_transport(tcp_pair):
    client, _ = tcp_pair
    assert netio.socket_below(PlainTransport(client)) == (client, False)


def test_socket_below_sees_through_a_forwarding_wrapper(tcp_pair):
    client, _ = tcp_pair
    wrapped = Wrapper(PlainTransport(client))
    assert wrapped.socket is client  # the forwarding that would hide the wrapper
    assert netio.socket_below(wrapped) == (client, True)


def test_socket_below_of_a_transport_without_socket_is_none():
    assert netio.socket_below(object()) == (None, False)
    assert netio.socket_below(Wrapper(None)) == (None, True)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "tls"])
def test_enable_keepalive_sets_rpxy_idle_time(tcp_pair, wrap):
    client, _ = tcp_pair
    transport = PlainTransport(client)
    netio.enable_keepalive(Wrapper(transport) if wrap else transport)
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 20
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == netio.KEEPALIVE_INTERVAL
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == netio.KEEPALIVE_PROBES


def test_enable_keepalive_without_a_socket_does_nothing():
    netio.enable_keepalive(object())  # a test transport: no error
