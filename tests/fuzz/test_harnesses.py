"""Each fuzz harness runs a bounded number of inputs (seed corpus + mutations) with no crash.

``make fuzz`` runs them for minutes; here CI gets a short, count-bounded run of each, so
a change that breaks a property the fuzzers found (or a harness itself) fails the suite.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESSES = ["h1_request", "upstream_response", "h2_request", "paths", "config"]
RUNS = 3000


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris (the test extra) is not installed")
@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_finds_nothing(harness: str, tmp_path: Path) -> None:
    seeds = ROOT / "fuzz" / "corpus" / harness
    assert any(seeds.iterdir()), f"no seed corpus for {harness}"
    (tmp_path / "corpus").mkdir()
    result = subprocess.run(
        [
            sys.executable, "-m", f"fuzz.{harness}",
            f"-atheris_runs={RUNS}", "-seed=1", f"-artifact_prefix={tmp_path}/",
            str(tmp_path / "corpus"), str(seeds),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    assert f"Done {RUNS} runs" in tail or f"Done {RUNS} in" in tail, tail
    assert not list(tmp_path.glob("crash-*")), tail


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris (the test extra) is not installed")
def test_a_broken_property_is_reported_as_a_crash(tmp_path: Path) -> None:
    # The harness machinery itself: an input violating a property must fail the run.
    crash = tmp_path / "bad"
    crash.write_bytes(b"\x00GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    probe = (
        "import fuzz.harness as h\n"
        "original = h.check_client_output\n"
        "def broken(data, **kw):\n"
        "    raise h.Broken('planted')\n"
        "import fuzz.h1_request as m\n"
        "m.check_client_output = broken\n"
        f"m.test_one_input(open({str(crash)!r}, 'rb').read())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "planted" in result.stderr
