"""``make demo``: two demo origins and rpxy in front of them, with TLS, HTTP/2 and HTTP/3.

A throwaway CA and a certificate for ``localhost`` are generated in a temp directory; the
proxy listens on free loopback ports (cleartext HTTP/1.1 + h2c, TLS with ALPN h2/http/1.1,
HTTP/3 over UDP on the TLS port number, Prometheus metrics). Prints the commands to try,
then runs until Ctrl-C (or ``--seconds``) and stops everything it started.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from tests.support.tlsgen import Authority  # noqa: E402


def free_port(preferred: int, kind: int = socket.SOCK_STREAM) -> int:
    for candidate in (preferred, 0):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            # The TLS port number is also used for UDP (HTTP/3): both must be free.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def start_origin(name: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.origin", "--port", "0", "--name", name],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    return proc, int(line.split()[1])


def demo_config(work: Path, port: int, tls_port: int, metrics_port: int, port_a: int, port_b: int) -> Path:
    authority = Authority("rpxy demo CA")
    cert, key = authority.issue("localhost").write(work, "localhost")
    authority.write_cert(work / "ca.pem")
    config = work / "config.toml"
    config.write_text(
        f"""listen_port = {port}
listen_port_tls = {tls_port}
listen_address_v4 = "127.0.0.1"
default_app = "demo"

[apps.demo]
server_name = "localhost"
tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}", https_redirection = false }}

[[apps.demo.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:{port_a}" }}, {{ location = "127.0.0.1:{port_b}" }}]
load_balance = "round_robin"

[[apps.demo.reverse_proxy]]
path = "/b"
replace_path = "/"
upstream = [{{ location = "127.0.0.1:{port_b}" }}]

[experimental.h3]

[experimental.metrics]
listen_port = {metrics_port}
"""
    )
    return config


def wait_for(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"rpxy did not listen on {port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rpxy demo: TLS + HTTP/2 + HTTP/3 in front of two origins")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rpxy-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        a, port_a = start_origin("origin-a")
        b, port_b = start_origin("origin-b")
        procs += [a, b]
        port, tls_port, metrics_port = free_port(8080), free_port(8443), free_port(9100)
        config = demo_config(work, port, tls_port, metrics_port, port_a, port_b)
        proxy = subprocess.Popen([str(BIN / "rpxy"), "--config", str(config), "--log-dir", str(work / "logs")])
        procs.append(proxy)
        wait_for(port)
        wait_for(tls_port)
        ca = work / "ca.pem"
        python = sys.executable
        print(
            f"""
rpxy demo is running (config: {config}, logs: {work / 'logs'}).
Try:
  curl -s http://localhost:{port}/echo                          # HTTP/1.1, round-robin between origin-a and origin-b
  curl -s http://localhost:{port}/b/echo                        # /b routed to origin-b with replace_path = "/"
  curl -s --http2-prior-knowledge http://localhost:{port}/echo  # cleartext HTTP/2 (h2c)
  curl -s --cacert {ca} https://localhost:{tls_port}/echo -w '\\n%{{http_version}}\\n'   # TLS, HTTP/2 by ALPN
  curl -sI --cacert {ca} https://localhost:{tls_port}/echo | grep -i alt-svc     # HTTP/3 advertised
  {python} {ROOT / 'demo' / 'h3get.py'} --cacert {ca} https://localhost:{tls_port}/echo   # HTTP/3 (QUIC, qh3)
  curl -s http://127.0.0.1:{metrics_port}/metrics | grep rpxy_requests_total     # Prometheus metrics
  tail -f {work / 'logs' / 'access.log'}
Edit {config} and save: the proxy reloads it live. Press Ctrl-C to stop.
""",
            flush=True,
        )
        if args.seconds is None:
            proxy.wait()
        else:
            time.sleep(args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
