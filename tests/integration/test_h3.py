"""HTTP/3 through the real rpxy process, with qh3's own client (tests/support/h3client.py).

One proxy (module scope) serves two TLS apps on one port number (TCP for h1/h2, UDP
for h3) plus an mTLS app (served over QUIC with client certificates, beyond rpxy), each app with its own origin so that the
origin's name in ``/echo`` proves which app answered. A second proxy with a 1 s
``max_idle_timeout`` proves the idle close.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil

import pytest

from tests.integration.conftest import Origin, Rpxy, curl, free_port, wait_for_port
from tests.support.h3client import X25519, X25519MLKEM768, H3Client, run
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlsclient import wait_for_log
from tests.support.tlssite import Pki, tls_app


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("h3-pki"))
    pki.sites = {
        "a": pki.site("site_a", "a.test"),
        "b": pki.site("site_b", "b.test", kind="rsa", key_format="pkcs1"),
        "m": pki.site("secure", "mtls.test"),
    }
    return pki


@pytest.fixture(scope="module")
def origins():
    started = {}
    try:
        for name in ("a", "b", "m"):
            started[name] = Origin(name)
        yield started
    finally:
        for origin in started.values():
            origin.stop()


def h3_config(pki: Pki, origins, tls_port: int, extra: str = "") -> str:
    s, o = pki.sites, origins
    return (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        + tls_app(s["a"], o["a"].location)
        + tls_app(s["b"], o["b"].location)
        + tls_app(s["m"], o["m"].location, client_ca=pki.client_ca_file)
        + "[experimental.h3]\nalt_svc_max_age = 1234\n"
        + extra
    )


@pytest.fixture(scope="module")
def proxy(pki, origins, tmp_path_factory):
    tls_port = free_port()
    started = Rpxy(tmp_path_factory.mktemp("h3-proxy"), h3_config(pki, origins, tls_port))
    started.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=started.proc)
        wait_for_log(started.system_log, r"\(h3, udp\)")
        yield started
    finally:
        started.stop()
    assert_no_tracebacks(started.system_log())


def client(proxy, pki, name: str = "a.test", **kwargs) -> H3Client:
    return H3Client(proxy.tls_port, name, str(pki.ca_file), **kwargs)


def echo(response) -> dict:
    assert response.status == 200, response
    return json.loads(response.body)


# -- requests and bodies -------------------------------------------------------------------------


def test_get_is_proxied_over_h3(proxy, pki):
    async def go():
        async with client(proxy, pki) as c:
            return await c.get("/echo/hello?x=1")

    response = run(go())
    body = echo(response)
    assert body["origin"] == "a"
    assert body["uri"] == "/echo/hello?x=1"
    assert response.header(b"server") == b"rpxy"
    headers = {name.lower(): value for name, value in body["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["host"] == "a.test"
    assert headers["x-forwarded-port"] == str(proxy.tls_port)
    line = next(line for line in reversed(proxy.access_lines()) if "/echo/hello?x=1" in line)
    assert "GET /echo/hello?x=1 HTTP/3 -- 200 OK -- https://a.test/echo/hello" in line


def test_post_body_up_and_large_body_down(proxy, pki):
    payload = bytes(range(256)) * 4096  # 1 MiB
    chunks = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]

    async def go():
        async with client(proxy, pki) as c:
            up = await c.request("POST", "/echo/upload", body=chunks, headers=[(b"content-type", b"application/octet-stream")])
            down = await c.get("/bytes/3000000")
            return up, down

    up, down = run(go())
    body = echo(up)
    assert body["method"] == "POST"
    assert body["body_length"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert down.status == 200
    assert len(down.body) == 3000000


def test_many_concurrent_streams_on_one_connection(proxy, pki):
    async def go():
        async with client(proxy, pki) as c:
            return await asyncio.gather(*(c.get(f"/echo/{i}") for i in range(50)))

    responses = run(go())
    assert [echo(r)["uri"] for r in responses] == [f"/echo/{i}" for i in range(50)]


def test_many_connections_at_once(proxy, pki):
    async def one(i):
        async with client(proxy, pki, "a.test" if i % 2 else "b.test") as c:
            return await asyncio.gather(*(c.get(f"/echo/{i}/{j}") for j in range(5)))

    async def go():
        return await asyncio.gather(*(one(i) for i in range(20)))

    results = run(go())
    assert [[echo(r)["origin"] for r in rs] for rs in results] == [["a" if i % 2 else "b"] * 5 for i in range(20)]


def test_two_apps_by_sni_each_with_its_certificate(proxy, pki):
    async def go(name):
        async with client(proxy, pki, name) as c:
            return await c.get("/echo/x")

    assert echo(run(go("a.test")))["origin"] == "a"
    assert echo(run(go("b.test")))["origin"] == "b"  # RSA key, PKCS#1 file: verified against the CA


def get_once(proxy, pki, name: str, path: str = "/echo/x", *, authority: str | None = None, **client_kwargs):
    """One GET on a fresh QUIC connection to the app ``name`` (the handshake's SNI)."""

    async def go():
        async with client(proxy, pki, name, **client_kwargs) as c:
            return await c.get(path, authority=authority)

    return run(go(), timeout=20)


@pytest.mark.parametrize(
    "authority",
    ["b.test", "mtls.test"],  # mtls.test over a.test's handshake (no client certificate asked): as on TCP
)
def test_host_other_than_sni_is_421(proxy, pki, authority):
    assert get_once(proxy, pki, "a.test", authority=authority).status == 421


def test_unknown_sni_is_refused_and_logged(proxy, pki):
    with pytest.raises(Exception):
        get_once(proxy, pki, "nobody.test")
    wait_for_log(proxy.system_log, r"QUIC handshake failed: .*sni='?nobody\.test'? category=unknown_sni")


# -- mTLS over QUIC (beyond rpxy, which disables HTTP/3 for these apps) ---------------------------


def test_mtls_app_is_served_over_h3_with_a_client_certificate(proxy, pki):
    cert, key = pki.client("h3-alice", pki.client_ca)

    async def go():
        async with client(proxy, pki, "mtls.test", client_cert=(cert, key)) as c:
            first = await c.get("/echo/mtls")
            second = await c.request("POST", "/echo/up", body=[b"m" * 70_000])
            return first, second

    first, second = run(go())
    assert echo(first)["origin"] == "m"
    assert hashlib.sha256(b"m" * 70_000).hexdigest() == echo(second)["body_sha256"]
    # The certificate is asked for again on every connection (no resumption).
    assert echo(run(go())[0])["origin"] == "m"


def test_mtls_app_refuses_h3_clients_without_a_good_certificate(proxy, pki):
    stranger = pki.client("h3-mallory", pki.foreign_ca)
    with pytest.raises(Exception):
        get_once(proxy, pki, "mtls.test")
    wait_for_log(proxy.system_log, r"QUIC handshake failed: .*sni=mtls\.test category=client_cert: the client sent no certificate")
    with pytest.raises(Exception):
        get_once(proxy, pki, "mtls.test", client_cert=stranger)
    wait_for_log(proxy.system_log, r"QUIC handshake failed: .*sni=mtls\.test category=client_cert: certificate verify failed")


# -- post-quantum key exchange ------------------------------------------------------------------


def test_negotiated_group_is_x25519mlkem768(proxy, pki):
    async def go(groups):
        async with client(proxy, pki, groups=groups) as c:
            response = await c.get("/echo/pq")
            return c.chosen_group, response

    group, response = run(go(None))  # qh3's default offer: X25519MLKEM768 and X25519
    assert group == "X25519MLKEM768"
    assert response.status == 200
    group, response = run(go([X25519MLKEM768]))  # only the hybrid group offered: it must work
    assert (group, response.status) == ("X25519MLKEM768", 200)
    group, response = run(go([X25519]))  # classical clients still work
    assert (group, response.status) == ("X25519", 200)


# -- Alt-Svc over TLS (h1, h2) -----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")
@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_alt_svc_is_advertised_on_tls_responses(proxy, pki, version):
    port = proxy.tls_port
    result = curl(
        version, "-sS", "-D", "-", "-o", "/dev/null", "--cacert", str(pki.ca_file),
        "--resolve", f"a.test:{port}:127.0.0.1", f"https://a.test:{port}/echo/x",
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.decode().splitlines()]
    assert f'alt-svc: h3=":{port}"; ma=1234' in [line.lower() if line.lower().startswith("alt-svc") else line for line in lines]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is required")
def test_no_alt_svc_on_cleartext(proxy):
    result = curl("-sS", "-D", "-", "-o", "/dev/null", "-H", "Host: b.test", f"http://127.0.0.1:{proxy.port}/echo/x")
    assert b"alt-svc" not in result.stdout.lower()


# -- idle timeout --------------------------------------------------------------------------------------


def test_idle_connection_is_closed_and_stream_limits_are_advertised(pki, origins, tmp_path_factory):
    tls_port = free_port()
    config = h3_config(pki, origins, tls_port, "max_idle_timeout = 1\nmax_concurrent_bidistream = 5\nmax_concurrent_unistream = 7\n")
    proxy = Rpxy(tmp_path_factory.mktemp("h3-idle"), config)
    proxy.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=proxy.proc)
        wait_for_log(proxy.system_log, r"\(h3, udp\)")

        async def go():
            async with client(proxy, pki, idle_timeout=60) as c:
                assert (await c.get("/echo/x")).status == 200
                # The QUIC limits the client got: max_concurrent_bidistream / _unistream.
                assert c.protocol._quic._core.stream_limits[:2] == (5, 7)
                return await c.wait_terminated(20)

        terminated = run(go())
        assert terminated is not None
    finally:
        proxy.stop()


# -- gRPC (trailers both ways) over HTTP/3 -------------------------------------------------------------


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _grpc_messages(body: bytes) -> list[bytes]:
    messages = []
    while body:
        size = int.from_bytes(body[1:5], "big")
        messages.append(body[5 : 5 + size])
        body = body[5 + size :]
    return messages


def test_grpc_over_h3_to_an_h2c_upstream(pki, tmp_path_factory):
    """qh3 client -> rpxy (HTTP/3) -> grpcio server (h2c): messages, status and trailing metadata."""
    grpc = pytest.importorskip("grpc")  # noqa: F841
    from tests.support.grpc_server import EchoServer

    server = EchoServer()
    tls_port = free_port()
    site = pki.sites["a"]
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        + tls_app(site, f"127.0.0.1:{server.port}")
        + "[experimental.h3]\n"
    )
    proxy = Rpxy(tmp_path_factory.mktemp("h3-grpc"), config)
    proxy.tls_port = tls_port
    grpc_headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    try:
        wait_for_port(tls_port, proc=proxy.proc)
        wait_for_log(proxy.system_log, r"\(h3, udp\)")

        async def go():
            async with client(proxy, pki) as c:
                unary = await c.request(
                    "POST", "/test.Echo/Unary", body=_grpc_frame(b"hi"),
                    headers=grpc_headers + [(b"x-trailer", b"t1")],
                )
                streamed = await c.request(
                    "POST", "/test.Echo/ClientStream", body=[_grpc_frame(b"a"), _grpc_frame(b"b"), _grpc_frame(b"c")],
                    headers=grpc_headers,
                )
                failed = await c.request("POST", "/test.Echo/Fail", body=_grpc_frame(b"x"), headers=grpc_headers)
                return unary, streamed, failed

        unary, streamed, failed = run(go())
    finally:
        proxy.stop()
        server.stop()
    assert unary.status == 200
    assert _grpc_messages(unary.body) == [b"echo:hi"]
    trailers = dict(unary.trailers or [])
    assert trailers[b"grpc-status"] == b"0"
    assert trailers[b"x-trailer-back"] == b"t1"
    assert _grpc_messages(streamed.body) == [b"a,b,c"]
    assert dict(streamed.trailers or [])[b"grpc-status"] == b"0"
    failure = dict(failed.trailers or failed.headers)
    assert failure[b"grpc-status"] == b"3"  # INVALID_ARGUMENT
    assert failure[b"grpc-message"] == b"bad thing: x"


# -- WebSocket over HTTP/3 (RFC 9220) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_proxy(pki, tmp_path_factory):
    """site_a's /ws goes to an origin whose /ws is a WebSocket echo (HTTP/1.1 Upgrade)."""
    origin = Origin("w")
    tls_port = free_port()
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        + tls_app(pki.sites["a"], origin.location)
        + "[experimental.h3]\n"
    )
    proxy = Rpxy(tmp_path_factory.mktemp("h3-ws"), config)
    proxy.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=proxy.proc)
        wait_for_log(proxy.system_log, r"\(h3, udp\)")
        yield proxy
    finally:
        proxy.stop()
        origin.stop()
    assert_no_tracebacks(proxy.system_log())


def test_websocket_over_h3_echoes_both_ways(ws_proxy, pki):
    from tests.support.h3client import websocket_frame

    big = bytes(range(256)) * 1024  # 256 KiB: crosses QUIC packets and the upstream's reads

    async def go():
        async with client(ws_proxy, pki) as c:
            tunnel = await c.websocket("/ws")
            assert tunnel.status.result() == 200, tunnel.headers
            assert b"sec-websocket-accept" not in dict(tunnel.headers)
            tunnel.send(websocket_frame(1, b"hello over h3"))
            first = await tunnel.read(2 + len(b"hello over h3"))
            tunnel.send(websocket_frame(2, big))
            second = await tunnel.read(10 + len(big), timeout=20)
            tunnel.send(websocket_frame(8, b"\x03\xe8"))  # close
            closing = await tunnel.read(4)
            await tunnel.wait_end()
            plain = await c.get("/echo/after")  # the connection goes on
            return c.peer_settings, first, second, closing, plain

    settings, first, second, closing, plain = run(go())
    assert settings.get(0x8) == 1  # SETTINGS_ENABLE_CONNECT_PROTOCOL
    assert first == b"\x81" + bytes([13]) + b"hello over h3"
    assert second[:2] == b"\x82\x7f" and second[10:] == big
    assert closing == b"\x88\x02\x03\xe8"
    assert plain.status == 200


def test_websocket_over_h3_refusals(ws_proxy, pki):
    async def go():
        async with client(ws_proxy, pki) as c:
            unknown = await c.websocket("/ws", protocol=b"webtransport")
            plain = await c.websocket("/echo/no-upgrade")  # this origin path answers 200 without switching
            await plain.wait_end()
            return unknown, plain

    unknown, plain = run(go())
    assert unknown.status.result() == 501
    # No 101 from the upstream: no tunnel; its answer is relayed as a normal response that ends the stream.
    assert plain.status.result() == 200 and plain.ended
    assert json.loads(plain.buffer)["headers"]  # the origin's echo JSON


# -- backpressure through the real process ---------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_slow_upstream_upload_is_not_buffered(pki, tmp_path_factory):
    """32 MiB over HTTP/3 to an upstream reading 16 MiB/s: the proxy holds the client back."""
    from tests.support.slow_sink import SlowSink

    sink = SlowSink(rate=16 * 1024 * 1024)
    tls_port = free_port()
    config = (
        f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n'
        + tls_app(pki.sites["a"], sink.location)
        + "[experimental.h3]\n"
    )
    proxy = Rpxy(tmp_path_factory.mktemp("h3-slow"), config)
    proxy.tls_port = tls_port
    size = 32 * 1024 * 1024
    chunk = b"\0" * (256 * 1024)
    try:
        wait_for_port(tls_port, proc=proxy.proc)
        wait_for_log(proxy.system_log, r"\(h3, udp\)")
        before = _peak_rss_kib(proxy.proc.pid)

        async def go():
            async with client(proxy, pki) as c:
                return await c.request(
                    "POST", "/upload", body=[chunk] * (size // len(chunk)),
                    headers=[(b"content-length", str(size).encode())], timeout=60,
                )

        response = run(go(), timeout=90)
        grown = _peak_rss_kib(proxy.proc.pid) - before
    finally:
        proxy.stop()
        sink.stop()
    assert response.status == 200 and response.body == str(size).encode()
    assert grown < 24 * 1024, f"peak RSS grew by {grown} KiB for a 32 MiB upload"


def test_graceful_shutdown_lets_http3_requests_finish(pki, origins, tmp_path_factory):
    import signal

    tls_port = free_port()
    proxy = Rpxy(tmp_path_factory.mktemp("h3-stop"), h3_config(pki, origins, tls_port))
    proxy.tls_port = tls_port
    try:
        wait_for_port(tls_port, proc=proxy.proc)
        wait_for_log(proxy.system_log, r"\(h3, udp\)")

        async def go():
            async with client(proxy, pki) as c:
                slow = asyncio.ensure_future(c.get("/slow/1.5"))
                await asyncio.sleep(0.5)
                proxy.proc.send_signal(signal.SIGTERM)
                return await slow

        response = run(go())
        assert (response.status, response.body) == (200, b"slow")
        assert proxy.proc.wait(10) == 0
    finally:
        proxy.stop()
    assert "waiting for 1 HTTP/3 stream(s)" in proxy.system_log()


def test_http3_listeners_follow_reloads(pki, origins, tmp_path):
    # Turned on, moved with the TLS port, turned off: no restart, as for the TCP listeners.
    first, second = free_port(), free_port()
    without = h3_config(pki, origins, first).split("[experimental.h3]")[0]
    proxy = Rpxy(tmp_path, without, extra_args=["--config-poll-interval", "0.2"])

    async def h3_status(port: int) -> int:
        async with H3Client(port, "a.test", str(pki.ca_file)) as h3:
            return (await h3.get("/echo")).status

    def served_over_h3(port: int, timeout: float = 5.0) -> bool:
        try:
            return run(h3_status(port), timeout=timeout) == 200
        except (ConnectionError, asyncio.TimeoutError, OSError):
            return False

    def eventually(predicate, timeout: float = 20.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.3)
        return False

    try:
        wait_for_port(first, proc=proxy.proc)
        assert not served_over_h3(first, timeout=1.5)
        proxy.config_path.write_text(h3_config(pki, origins, first).replace("{port}", str(proxy.port)))
        assert eventually(lambda: served_over_h3(first))
        proxy.config_path.write_text(h3_config(pki, origins, second).replace("{port}", str(proxy.port)))
        assert eventually(lambda: served_over_h3(second))
        assert not served_over_h3(first, timeout=1.5)
        proxy.config_path.write_text(without.replace(str(first), str(second)).replace("{port}", str(proxy.port)))
        assert eventually(lambda: not served_over_h3(second, timeout=1.5))
        log = proxy.system_log()
        assert "reload: closing the HTTP/3 listener on 127.0.0.1:" in log
        assert "restart rpxy" not in log
    finally:
        proxy.stop()
    assert_no_tracebacks(proxy.system_log())
