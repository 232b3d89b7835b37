"""Process-wide settings of the Python runtime that a long-running proxy wants.

The cyclic garbage collector: at CPython's default (a young collection every 700 net
allocations) a proxy collects several times per millisecond under load, and each
oldest-generation pass walks every object loaded at start (Twisted, qh3, cryptography,
the config). Once the service is built, :func:`tune_garbage_collector` moves what exists
into the permanent generation (``gc.freeze``: never scanned again) and collects the young
generation every :data:`YOUNG_THRESHOLD` allocations. Garbage without cycles is freed by
reference counting as before; cyclic garbage (Deferred chains, closed protocols) waits a
little longer, bounded by the threshold.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune_garbage_collector"]

#: Net allocations between young-generation collections (CPython's default: 700).
YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Freeze what the start-up loaded and make young collections rarer (call once, started)."""
    gc.collect()
    gc.freeze()
    _threshold0, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, threshold1, threshold2)
