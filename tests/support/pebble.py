"""Debian's ``pebble`` ACME test CA (and ``pebble-challtestsrv`` as its DNS) for tests.

``Pebble(tmp_path, http_port=..., tls_port=...)`` starts both on free loopback ports:

* ``pebble-challtestsrv`` serves DNS only, answering every A query with 127.0.0.1 (and
  no AAAA), so pebble's validator reaches the proxy for any test name;
* ``pebble`` with its own config JSON: its validator connects to ``http_port`` for
  HTTP-01 and ``tls_port`` for TLS-ALPN-01 (the proxy's ports), real validation
  (no ``PEBBLE_VA_ALWAYS_VALID``), no sleeps, no nonce rejections, no authorization reuse.

Debian's package does not ship pebble's ``test/certs`` (the certificate of its HTTPS API),
so a throw-away CA made here signs one for ``localhost``; :attr:`api_ca_path` is the
file to trust (the proxy gets it through ``REQUESTS_CA_BUNDLE``). :meth:`root_pem` is
pebble's issuing root, regenerated at every start, fetched from the management API.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.tlsgen import Authority, write_private

__all__ = ["Pebble", "pebble_available"]


def pebble_available() -> bool:
    return shutil.which("pebble") is not None and shutil.which("pebble-challtestsrv") is not None


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{proc.args[0]} is not listening on {port}")


class Pebble:
    """Pebble + its DNS, started at construction; :meth:`stop` ends both."""

    def __init__(self, tmp_path: Path, *, http_port: int, tls_port: int, env: dict[str, str] | None = None) -> None:
        self.dir = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        ca = Authority("pebble API test CA")
        leaf = ca.issue("localhost")
        self.api_ca_path = ca.write_cert(tmp_path / "pebble-api-ca.pem")
        cert_path = tmp_path / "pebble-api.pem"
        cert_path.write_bytes(leaf.cert_pem())
        key_path = tmp_path / "pebble-api.key"
        write_private(key_path, leaf.key_pem())

        self.dns_port = _free_port(socket.SOCK_DGRAM)
        self.port = _free_port()
        self.management_port = _free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(cert_path),
                "privateKey": str(key_path),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        config_path = tmp_path / "pebble-config.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.log_path = tmp_path / "pebble.log"
        self._logs = [open(self.log_path, "wb"), open(tmp_path / "challtestsrv.log", "wb")]
        self.procs: list[subprocess.Popen] = []
        try:
            self.procs.append(
                subprocess.Popen(
                    [
                        "pebble-challtestsrv",
                        "-dns01", f"127.0.0.1:{self.dns_port}",
                        "-http01", "", "-https01", "", "-tlsalpn01", "",
                        "-management", f"127.0.0.1:{_free_port()}",
                        "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                    ],
                    stdout=self._logs[1],
                    stderr=subprocess.STDOUT,
                )
            )
            pebble_env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
            pebble_env.update(env or {})
            pebble = subprocess.Popen(
                ["pebble", "-config", str(config_path), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                cwd=tmp_path,
                env=pebble_env,
                stdout=self._logs[0],
                stderr=subprocess.STDOUT,
            )
            self.procs.append(pebble)
            _wait_tcp(self.port, pebble)
            _wait_tcp(self.management_port, pebble)
        except Exception:
            self.stop()
            raise

    @property
    def dir_url(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def _get(self, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.api_ca_path))
        with urllib.request.urlopen(f"https://localhost:{self.management_port}{path}", context=context, timeout=10) as answer:
            return answer.read()

    def root_pem(self) -> bytes:
        """Pebble's issuing root (new at every pebble start)."""
        return self._get("/roots/0")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
        for handle in self._logs:
            handle.close()
