"""When to renew and how long to wait after a failure; pure functions of time.

rpxy renews when a third of the certificate's lifetime remains (90-day certificates
at 30 days left). Failures back off exponentially from one minute to one day, so a
CA outage or a misconfiguration neither hammers the CA (rate limits) nor leaves the
proxy waiting a day after a transient error.
"""

from __future__ import annotations

import datetime

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "backoff_delay", "renewal_time"]

BACKOFF_MIN = 60.0
BACKOFF_MAX = 24 * 3600.0


def renewal_time(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    *,
    renew_before: datetime.timedelta | None = None,
) -> datetime.datetime:
    """The moment to renew: when a third of the lifetime remains, or ``renew_before``
    ahead of expiry when configured (``[experimental.acme] renew_before_days``)."""
    if renew_before is not None:
        return not_after - renew_before
    lifetime = not_after - not_before
    return not_after - lifetime / 3


def backoff_delay(failures: int, *, minimum: float = BACKOFF_MIN, maximum: float = BACKOFF_MAX) -> float:
    """Seconds before the next attempt after ``failures`` consecutive failures (>= 1)."""
    if failures < 1:
        return 0.0
    return min(maximum, minimum * 2 ** min(failures - 1, 32))
