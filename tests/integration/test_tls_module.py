"""rpxy.tls on a real reactor and real sockets (a subprocess), with independent clients.

The proxy itself is not involved: a small server process listens with
``TlsServerFactory`` in front of an echo protocol, and the tests connect with
Python's ``ssl`` module (the system OpenSSL) and with pyOpenSSL over a socket
(cryptography's OpenSSL, which has ML-KEM).
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from tests.support.tlsgen import Authority

ROOT = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from rpxy.config.model import AppConfig, TlsConfig
    from rpxy.tls import CertificateWatcher, SniContextMap, TlsOptions, TlsServerFactory, tls_info

    spec = json.load(open(sys.argv[1]))
    failures = open(sys.argv[2], "a", buffering=1)

    class Echo(Protocol):
        def dataReceived(self, data):
            info = tls_info(self.transport)
            self.transport.write(json.dumps({
                "data": data.decode(), "app": info.app_name, "sni": info.sni, "group": info.group,
                "version": info.version, "client": info.client_certificate is not None,
            }).encode() + b"\\n")

    apps = [
        AppConfig(name=a["name"], server_name=a["server_name"], reverse_proxy=(),
                  tls=TlsConfig(tls_cert_path=a["cert"], tls_cert_key_path=a["key"],
                                client_ca_cert_path=a.get("client_ca")))
        for a in spec["apps"]
    ]
    contexts = SniContextMap.from_apps(apps, TlsOptions(alpn=(b"http/1.1",)))
    factory = TlsServerFactory(
        contexts, Factory.forProtocol(Echo), reactor=reactor,
        handshake_timeout=spec["handshake_timeout"],
        on_failure=lambda f: failures.write(json.dumps({"category": f.category, "sni": f.sni}) + "\\n"),
    )
    watcher = CertificateWatcher(contexts, reactor, interval=spec["poll"])
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    watcher.startService()
    print("READY", port.getHost().port, flush=True)
    reactor.run()
    """
)


@pytest.fixture
def pki(tmp_path):
    server_ca = Authority("it server CA")
    client_ca = Authority("it client CA")
    apps = []
    for name, server_name, mtls in (("alpha", "alpha.test", False), ("beta", "beta.test", False), ("secure", "secure.test", True)):
        cert, key = server_ca.issue(server_name, kind="rsa" if name == "beta" else "ec").write(tmp_path, name)
        app = {"name": name, "server_name": server_name, "cert": str(cert), "key": str(key)}
        if mtls:
            app["client_ca"] = str(client_ca.write_cert(tmp_path / "clients.pem"))
        apps.append(app)
    ca_file = server_ca.write_cert(tmp_path / "server-ca.pem")
    return {"apps": apps, "server_ca": server_ca, "client_ca": client_ca, "ca_file": ca_file, "dir": tmp_path}


@pytest.fixture
def server(pki, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"apps": pki["apps"], "handshake_timeout": 1.0, "poll": 0.3}))
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    failures = tmp_path / "failures.jsonl"
    failures.touch()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(spec), str(failures)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"TLS test server did not start: {line!r}")
    port = int(line.split()[1])

    def read_failures(count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = failures.read_text().splitlines()
            if len(lines) >= count:
                return [json.loads(x) for x in lines]
            time.sleep(0.05)
        return [json.loads(x) for x in failures.read_text().splitlines()]

    yield port, read_failures
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stdlib_client(pki, *, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
    if cert is not None:
        cert_path, key_path = cert.write(pki["dir"] / "client", "client")
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def ask(port: int, ctx: ssl.SSLContext, sni: str) -> tuple[dict, x509.Certificate]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(b"hello")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
            der = tls.getpeercert(binary_form=True)
    return json.loads(answer), x509.load_der_x509_certificate(der)


def test_certificate_per_sni_over_real_sockets(server, pki):
    port, _ = server
    ctx = stdlib_client(pki)  # verifies the chain and the host name
    for sni, app in (("alpha.test", "alpha"), ("beta.test", "beta")):
        answer, cert = ask(port, ctx, sni)
        assert answer["app"] == app and answer["sni"] == sni and answer["data"] == "hello"
        assert cert.subject.rfc4514_string() == f"CN={sni}"


def test_unknown_and_missing_sni_refused(server, pki):
    port, read_failures = server
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        ask(port, stdlib_client(pki), "nobody.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            ctx.wrap_socket(raw)  # no server_hostname: no SNI
    assert [f["category"] for f in read_failures(2)] == ["unknown_sni", "no_sni"]


def test_mtls_over_real_sockets(server, pki):
    port, read_failures = server
    answer, _ = ask(port, stdlib_client(pki, cert=pki["client_ca"].issue(client=True, common_name="alice")), "secure.test")
    assert answer["client"] is True
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ask(port, stdlib_client(pki), "secure.test")
    assert [f["category"] for f in read_failures(1)] == ["client_cert"]


def test_post_quantum_handshake_with_pyopenssl_over_a_socket(server, pki):
    port, _ = server
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    from rpxy.tls.groups import set_context_groups

    set_context_groups(ctx, "X25519MLKEM768", fallback=None)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(b"alpha.test")
        conn.set_connect_state()
        retry(conn.do_handshake, raw)
        assert conn.get_group_name() == "X25519MLKEM768"
        conn.sendall(b"pq")
        answer = json.loads(retry(lambda: conn.recv(4096), raw))
        assert answer["group"] == "X25519MLKEM768"  # the server's view
        assert answer["version"] == "TLSv1.3"


def retry(operation, sock):
    """Run a pyOpenSSL call on a socket in timeout (non-blocking) mode."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return operation()
        except SSL.WantReadError:
            if time.monotonic() > deadline:
                raise
            select.select([sock], [], [], 0.5)


def test_handshake_timeout_on_a_real_reactor(server, pki):
    port, read_failures = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        started = time.monotonic()
        try:
            assert raw.recv(1) == b""  # closed by the server...
        except ConnectionResetError:
            pass  # ...or aborted (RST)
        assert 0.5 < time.monotonic() - started < 4
    assert [f["category"] for f in read_failures(1)] == ["timeout"]


def test_certificate_reload_without_restart(server, pki):
    port, _ = server
    ctx = stdlib_client(pki)
    _, before = ask(port, ctx, "alpha.test")
    new = pki["server_ca"].issue("alpha.test", "new.alpha.test")
    new.write(pki["dir"], "alpha")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _, cert = ask(port, ctx, "alpha.test")
        if cert != before:
            break
        time.sleep(0.1)
    assert cert == new.cert
