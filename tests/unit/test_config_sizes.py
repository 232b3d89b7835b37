"""parse_size: the byte sizes users may write in config.toml."""

from __future__ import annotations

from typing import Any

import pytest

from rpxy.config.sizes import parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1, 1),
        (268435456, 268435456),
        ("0", 0),
        ("1024", 1024),
        ("1k", 1024),
        ("256k", 262144),
        ("256K", 262144),
        ("10m", 10 * 1024 * 1024),
        ("10M", 10 * 1024 * 1024),
        ("1g", 1024**3),
        ("2G", 2 * 1024**3),
        ("unlimited", 0),
        ("Unlimited", 0),
    ],
)
def test_valid_sizes(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


EXPECTED = 'must be a byte count (integer >= 0), a size like "256k", "10m" or "1g", or "unlimited"'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, EXPECTED),
        (False, EXPECTED),
        (1.5, EXPECTED),
        (None, EXPECTED),
        ([1], EXPECTED),
        (-1, f"{EXPECTED}, got -1"),
        ("", f"{EXPECTED}, got ''"),
        ("k", f"{EXPECTED}, got 'k'"),
        ("1.5m", f"{EXPECTED}, got '1.5m'"),
        ("10 m", f"{EXPECTED}, got '10 m'"),
        (" 10m", f"{EXPECTED}, got ' 10m'"),
        ("1t", f"{EXPECTED}, got '1t'"),
        ("10kb", f"{EXPECTED}, got '10kb'"),
        ("-1k", f"{EXPECTED}, got '-1k'"),
        ("١٢", f"{EXPECTED}, got '١٢'"),
    ],
)
def test_invalid_sizes(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)
    assert str(caught.value) == message
