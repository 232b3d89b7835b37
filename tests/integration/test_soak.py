"""A short soak (``SOAK_SECONDS``, default 40 s; ``make soak`` runs 10 minutes): mixed HTTP/1.1
and HTTP/2 load with live reloads and upstream restarts through the real proxy."""

from __future__ import annotations

import os

from tests.support.soak import soak

SECONDS = float(os.environ.get("SOAK_SECONDS", "40"))


def test_soak_loses_nothing_beyond_the_injected_faults(tmp_path):
    result = soak(SECONDS, tmp_path)
    assert result.reloads >= SECONDS // 7 - 1 and result.restarts >= 1, result.summary()
    assert result.requests_ok > SECONDS * 20, result.summary()  # the load did run
    assert result.failures == [], result.summary() + "".join(f"\n  {what}" for _, what in result.failures[:10])
    assert (result.rss_end_kib - result.rss_warm_kib) < 20 * 1024, result.summary()
    assert result.fds_after <= result.fds_before, result.summary()
    assert result.log_tracebacks == 0, result.summary()
