"""TLS clients for tests against the real proxy process on 127.0.0.1.

Two independent TLS stacks are used on purpose:

* Python's ``ssl`` (the system OpenSSL, no ML-KEM): :func:`stdlib_context`,
  :class:`TlsConnection` (a :class:`~tests.support.rawhttp.RawConnection` over TLS, so
  exact HTTP/1.1 bytes can be sent and responses read one by one);
* pyOpenSSL (the OpenSSL bundled with ``cryptography``, which has X25519MLKEM768):
  :func:`pyopenssl_handshake`, returning what the client negotiated, for groups, versions
  and cipher suites the system OpenSSL cannot offer.

Every call is bounded by a socket timeout; nothing here retries.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509

from tests.support.rawhttp import RawConnection, Response, request

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------
# Python ssl (system OpenSSL)
# ---------------------------------------------------------------------------


def stdlib_context(
    ca_file: Path | None,
    *,
    client_cert: tuple[Path, Path] | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A verifying client context (``ca_file`` = the trusted CA) or, with None, a non-verifying one."""
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    return ctx


class TlsConnection(RawConnection):
    """One TLS connection to ``127.0.0.1:port`` with ``sni`` (None = no SNI at all).

    The handshake runs in the constructor (``ssl.SSLError`` when refused). Then it is a
    ``RawConnection``: ``send(bytes)``, ``read_response()``, ``wait_closed()``...
    """

    def __init__(self, port: int, sni: str | None, ctx: ssl.SSLContext, *, timeout: float = 10.0) -> None:
        self.buffer = b""
        self.eof = False
        raw = socket.create_connection((HOST, port), timeout=timeout)
        #: The client's own port: the proxy's log names it as the peer.
        self.local_port = raw.getsockname()[1]
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=sni)
        except BaseException:
            raw.close()
            raise

    @property
    def peer_certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True))

    def get(self, path: str, *, host: str, headers: list[tuple[str, str]] | None = None) -> Response:
        self.send(request("GET", path, host=host, headers=headers))
        return self.read_response()


def https_get(
    port: int,
    sni: str,
    ctx: ssl.SSLContext,
    path: str = "/echo",
    *,
    host: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    """One request on a fresh TLS connection; ``host`` defaults to the SNI."""
    with TlsConnection(port, sni, ctx) as conn:
        return conn.get(path, host=host or sni, headers=headers)


def served_certificate(port: int, sni: str | None, ctx: ssl.SSLContext) -> x509.Certificate:
    with TlsConnection(port, sni, ctx) as conn:
        return conn.peer_certificate


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


# ---------------------------------------------------------------------------
# pyOpenSSL (cryptography's OpenSSL: ML-KEM, and versions/suites chosen exactly)
# ---------------------------------------------------------------------------


@attrs.frozen
class Negotiated:
    """What a pyOpenSSL client saw: ``error`` is None when the handshake completed."""

    local_port: int
    error: Exception | None = None
    version: str | None = None
    cipher: str | None = None
    group: str | None = None
    certificate: x509.Certificate | None = None
    resumed: bool = False
    session: object = None  # SSL.Session, to offer on another connection
    answer: bytes = b""  # the response to ``send`` (if any)

    @property
    def ok(self) -> bool:
        return self.error is None


def pyopenssl_context(
    *,
    ca: x509.Certificate | None = None,
    groups: str | None = None,
    min_version: int | None = None,
    max_version: int | None = None,
    ciphers: str | None = None,
    client_cert: tuple[x509.Certificate, object] | None = None,
) -> SSL.Context:
    """A pyOpenSSL client context; ``ca`` makes it verify the server's chain."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if min_version is not None:
        ctx.set_min_proto_version(min_version)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    if groups is not None:
        from rpxy.tls.groups import set_context_groups

        set_context_groups(ctx, groups, fallback=None)  # raises if OpenSSL does not know a group
    if ca is not None:
        ctx.get_cert_store().add_cert(X509.from_cryptography(ca))
        ctx.set_verify(SSL.VERIFY_PEER)
    if client_cert is not None:
        ctx.use_certificate(client_cert[0])
        ctx.use_privatekey(client_cert[1])
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


def retry(operation: Callable, sock: socket.socket, deadline: float):
    """Run a pyOpenSSL call on a socket in timeout (non-blocking) mode until ``deadline``."""
    while True:
        try:
            return operation()
        except SSL.WantReadError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS operation timed out") from None
            select.select([sock], [], [], min(remaining, 0.5))


def _read_answer(conn: SSL.Connection, sock: socket.socket, deadline: float) -> bytes:
    """Read an HTTP/1.1 response with Content-Length (enough for rpxy's own and the echo's)."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if match and len(body) >= int(match.group(1)):
                return data
        try:
            chunk = retry(lambda: conn.recv(65536), sock, deadline)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return data
        if not chunk:
            return data
        data += chunk


def pyopenssl_handshake(
    port: int,
    sni: str | None,
    ctx: SSL.Context,
    *,
    session=None,
    send: bytes | None = None,
    timeout: float = 10.0,
) -> Negotiated:
    """Connect, handshake (and optionally send ``send`` and read one response), close."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        local_port = sock.getsockname()[1]
        conn = SSL.Connection(ctx, sock)
        if sni is not None:
            conn.set_tlsext_host_name(sni.encode("ascii"))
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        try:
            retry(conn.do_handshake, sock, deadline)
            answer = b""
            if send is not None:
                conn.sendall(send)
                answer = _read_answer(conn, sock, deadline)
            else:
                # TLS 1.3: a server refusing the client's certificate says so after the
                # client's Finished; give that alert (or the session tickets) a chance.
                sock.settimeout(0.2)
                try:
                    conn.recv(1)
                except (SSL.WantReadError, socket.timeout, TimeoutError):
                    pass
                finally:
                    sock.settimeout(timeout)
        except (SSL.Error, OSError, TimeoutError) as exc:
            return Negotiated(local_port=local_port, error=exc)
        from OpenSSL._util import lib

        negotiated = Negotiated(
            local_port=local_port,
            version=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name(),
            group=conn.get_group_name(),
            certificate=conn.get_peer_certificate(as_cryptography=True),
            resumed=bool(lib.SSL_session_reused(conn._ssl)),
            session=conn.get_session(),
            answer=answer,
        )
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        return negotiated


# ---------------------------------------------------------------------------
# The proxy's system log
# ---------------------------------------------------------------------------


def wait_for_log(read: Callable[[], str], pattern: str, *, timeout: float = 10.0) -> re.Match:
    """Poll ``read()`` (e.g. ``proxy.system_log``) until ``pattern`` (a regex) matches a line."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        match = regex.search(text)
        if match is not None:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matches {pattern!r}; log tail:\n{text[-3000:]}")
        time.sleep(0.05)


def handshake_failure_pattern(*, local_port: int, sni: str | None, category: str) -> str:
    """The regex of rpxy's line for one failed handshake (peer = the client's own address)."""
    sni_part = re.escape(sni) if sni is not None else "-"
    return rf"TLS handshake failed: peer=127\.0\.0\.1:{local_port} sni={sni_part}( app=\S+)? category={category}: .+$"
