"""Shared main() for the harnesses: atheris setup, a failure log observer, seed corpus use.

Twisted reports an exception raised in a protocol callback through the log instead of
raising it; the observer turns such a report into a crash the fuzzer records.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from twisted.logger import globalLogPublisher

FAILURES: list[str] = []


def _observe(event: dict) -> None:
    failure = event.get("log_failure")
    if failure is not None:
        FAILURES.append(failure.getTraceback())


globalLogPublisher.addObserver(_observe)


def raise_logged_failures() -> None:
    """Crash on any traceback the proxy logged while handling the last input."""
    if FAILURES:
        traceback = FAILURES[0]
        FAILURES.clear()
        raise AssertionError(f"the proxy logged a failure:\n{traceback}")


def run(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
