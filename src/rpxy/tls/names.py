"""Server names as they arrive in SNI: normalisation and one-label wildcard matching."""

from __future__ import annotations

__all__ = ["display_name", "matches_server_name", "normalize_server_name"]


def normalize_server_name(name: bytes | str | None) -> str | None:
    """Lower-case ASCII without a trailing dot, or None for a missing/empty/non-ASCII name."""
    if name is None:
        return None
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    elif not name.isascii():
        return None
    if name.endswith("."):
        name = name[:-1]
    if not name or "\x00" in name:
        return None
    return name.lower()


def matches_server_name(pattern: str, name: str) -> bool:
    """``name`` (normalised) is ``pattern``, or ``pattern`` is ``*.suffix`` and ``name`` is one label + suffix."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        first, dot, rest = name.partition(".")
        return bool(dot and first and rest == pattern[2:])
    return False


def display_name(raw: bytes | str | None, limit: int = 255) -> str | None:
    """A log-safe rendering of a client-supplied name (non-printables escaped, bounded)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    out = []
    for byte in raw[:limit]:
        if 0x21 <= byte <= 0x7E and byte != 0x5C:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    if len(raw) > limit:
        out.append("...")
    return "".join(out)
