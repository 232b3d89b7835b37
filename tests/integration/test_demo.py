"""The README's demo command works: `make demo` runs demo/run.py, whose printed commands are run here."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.integration.conftest import ROOT, curl


def test_demo_serves_http1_h2c_tls_h2_h3_and_metrics():
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "demo" / "run.py"), "--seconds", "120"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        printed = ""
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in printed and time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            printed += line
        assert "Press Ctrl-C" in printed, printed
        port = re.search(r"http://localhost:(\d+)/echo ", printed).group(1)
        tls_port = re.search(r"https://localhost:(\d+)/echo", printed).group(1)
        metrics_port = re.search(r"127\.0\.0\.1:(\d+)/metrics", printed).group(1)
        ca = re.search(r"--cacert (\S+)", printed).group(1)

        assert b'"origin"' in curl(f"http://localhost:{port}/echo").stdout
        assert b'"origin-b"' in curl(f"http://localhost:{port}/b/echo").stdout
        assert b'"origin"' in curl("--http2-prior-knowledge", f"http://localhost:{port}/echo").stdout
        tls = curl("--cacert", ca, "-w", "\n%{http_version}", f"https://localhost:{tls_port}/echo")
        assert tls.returncode == 0 and tls.stdout.endswith(b"\n2"), tls.stderr
        head = curl("-sI", "--cacert", ca, f"https://localhost:{tls_port}/echo").stdout.lower()
        assert f'alt-svc: h3=":{tls_port}"'.encode() in head
        h3 = subprocess.run(
            [sys.executable, str(ROOT / "demo" / "h3get.py"), "--cacert", ca, f"https://localhost:{tls_port}/echo"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert h3.returncode == 0 and '"origin"' in h3.stdout, h3.stderr
        assert "HTTP/3 200 (key exchange: X25519MLKEM768)" in h3.stderr
        metrics = curl(f"http://127.0.0.1:{metrics_port}/metrics").stdout.decode()
        assert 'protocol="h3"' in metrics and 'protocol="h2"' in metrics
    finally:
        demo.terminate()
        demo.wait(30)
        demo.stdout.close()
    assert demo.returncode == 0
