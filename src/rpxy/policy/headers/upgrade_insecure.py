"""The ``upgrade_insecure_requests`` option: add ``Upgrade-Insecure-Requests: 1`` if missing.

An existing value from the client is left untouched, as rpxy does.
"""

from __future__ import annotations

__all__ = ["UPGRADE_INSECURE_HEADER", "UPGRADE_INSECURE_REQUESTS"]

UPGRADE_INSECURE_REQUESTS = b"upgrade-insecure-requests"
UPGRADE_INSECURE_HEADER: tuple[bytes, bytes] = (UPGRADE_INSECURE_REQUESTS, b"1")
