"""``make demo``: two demo origins and rpxy in front of them, on free loopback ports.

Prints the curl commands to try, then runs until Ctrl-C and stops everything it started.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port(preferred: int) -> int:
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="rpxy-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        a, port_a = start_origin("origin-a")
        b, port_b = start_origin("origin-b")
        procs += [a, b]
        port = free_port(8080)
        config = work / "config.toml"
        config.write_text(
            f"""listen_port = {port}
listen_address_v4 = "127.0.0.1"
default_app = "demo"

[apps.demo]
server_name = "localhost"

[[apps.demo.reverse_proxy]]
upstream = [{{ location = "127.0.0.1:{port_a}" }}, {{ location = "127.0.0.1:{port_b}" }}]
load_balance = "round_robin"

[[apps.demo.reverse_proxy]]
path = "/b"
replace_path = "/"
upstream = [{{ location = "127.0.0.1:{port_b}" }}]
"""
        )
        proxy = subprocess.Popen([str(BIN / "rpxy"), "--config", str(config), "--log-dir", str(work / "logs")])
        procs.append(proxy)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        print(
            f"""
rpxy demo is running (config: {config}, logs: {work / 'logs'}).
Try:
  curl -s http://localhost:{port}/echo          # round-robin between origin-a and origin-b (see "origin")
  curl -s http://localhost:{port}/b/echo        # /b routed to origin-b with replace_path = "/"
  curl -s http://localhost:{port}/bytes/1000000 -o /dev/null -w '%{{size_download}}\\n'   # streamed body
  tail -f {work / 'logs' / 'access.log'}
Press Ctrl-C to stop.
""",
            flush=True,
        )
        proxy.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
