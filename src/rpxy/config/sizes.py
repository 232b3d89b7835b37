"""Byte sizes as users write them in ``config.toml``.

``request_max_body_size`` accepts either a plain integer number of bytes or a
short human form (``"256k"``, ``"10m"``, ``"1g"``, 1024-based, case-insensitive)
or ``"unlimited"``. Keeping the parser here, apart from the loader, lets every
size-valued key share the same rules and the same error wording.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["UNLIMITED", "parse_size"]

#: The value a size parses to when it means "no limit".
UNLIMITED = 0

_MULTIPLIERS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_RE = re.compile(r"([0-9]+)([kmg]?)")

_EXPECTED = 'a byte count (integer >= 0), a size like "256k", "10m" or "1g", or "unlimited"'


def parse_size(value: Any) -> int:
    """Return the number of bytes ``value`` stands for; ``0`` means unlimited.

    Accepts a non-negative ``int`` (``bool`` is rejected: ``true`` is never a
    size), or a string of digits with an optional ``k``/``m``/``g`` suffix
    (1024-based, case-insensitive), or ``"unlimited"``. Anything else raises
    ``ValueError`` whose message says what was expected, so the loader can
    prefix it with the key path and show it to the user unchanged.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be {_EXPECTED}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be {_EXPECTED}, got {value}")
        return value
    if isinstance(value, str):
        text = value.lower()
        if text == "unlimited":
            return UNLIMITED
        match = _SIZE_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"must be {_EXPECTED}, got {value!r}")
        digits, suffix = match.groups()
        return int(digits) * _MULTIPLIERS[suffix]
    raise ValueError(f"must be {_EXPECTED}")
