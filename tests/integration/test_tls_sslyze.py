"""``sslyze --mozilla_config=intermediate`` against the running proxy (issue 3's proof).

sslyze pins ``cryptography<47`` while the proxy needs a newer one (its OpenSSL bindings
must expose the group-list call used for X25519MLKEM768), so sslyze cannot live in the
project's virtualenv: ``make test`` installs it into its own virtualenv, ``.venv/sslyze``.
Found, in order: ``$RPXY_SSLYZE`` (an sslyze executable), ``<venv>/sslyze/bin/sslyze``,
``sslyze`` on ``PATH``, or ``python -m sslyze`` in this interpreter. Otherwise the test
is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Origin, Rpxy, free_port, wait_for_port
from tests.support.rawhttp import assert_no_tracebacks
from tests.support.tlssite import Pki, tls_app


def sslyze_command() -> list[str] | None:
    explicit = os.environ.get("RPXY_SSLYZE")
    if explicit:
        return [explicit]
    tool_venv = Path(sys.executable).parent.parent / "sslyze" / "bin" / "sslyze"
    if tool_venv.exists():
        return [str(tool_venv)]
    on_path = shutil.which("sslyze")
    if on_path:
        return [on_path]
    if importlib.util.find_spec("sslyze") is not None:
        return [sys.executable, "-m", "sslyze"]
    return None


SSLYZE = sslyze_command()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("sslyze-pki"))
    origin = Origin("a")
    try:
        apps = (
            tls_app(pki.site("site_ec", "ec.test", kind="ec", key_format="sec1"), origin.location)
            + tls_app(pki.site("site_rsa", "rsa.test", kind="rsa", key_format="pkcs1"), origin.location)
            + tls_app(pki.site("secure", "mtls.test"), origin.location, client_ca=pki.client_ca_file)
        )
        tls_port = free_port()
        proxy = Rpxy(
            tmp_path_factory.mktemp("sslyze-proxy"),
            f'listen_port = {{port}}\nlisten_port_tls = {tls_port}\nlisten_address_v4 = "127.0.0.1"\n{apps}',
        )
        proxy.tls_port = tls_port
        proxy.pki = pki
        try:
            wait_for_port(tls_port, proc=proxy.proc)
            yield proxy
        finally:
            proxy.stop()
        assert_no_tracebacks(proxy.system_log())
    finally:
        origin.stop()


@pytest.mark.skipif(
    SSLYZE is None,
    reason="sslyze not found: run `make test` (installs it into .venv/sslyze), or set RPXY_SSLYZE",
)
def test_sslyze_mozilla_intermediate_compliance(proxy):
    targets = [f"{name}:{proxy.tls_port}{{127.0.0.1}}" for name in ("ec.test", "rsa.test")]
    result = subprocess.run(
        [
            *SSLYZE,
            "--mozilla_config=intermediate",
            # Trust the test CA (otherwise "certificate_path_validation" fails, rightly).
            f"--certinfo_ca_file={proxy.pki.ca_file}",
            *targets,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for target in ("ec.test", "rsa.test"):
        # sslyze exits 0 when it could not connect at all: require the verdict itself.
        assert f"{target}:{proxy.tls_port}: OK - Compliant." in output, output
    assert "ERROR" not in output, output
    # What the scan saw, for the record: only TLS 1.2 and 1.3, forward secrecy, no compression.
    assert "Compression disabled" in output, output
