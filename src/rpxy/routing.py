"""Host -> app and path -> route lookup tables, built once per configuration.

Both tables are immutable after construction and hold no per-request state, so a
runtime state snapshot can share them between every request that uses it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["HostRouter", "PathRouter"]


class HostRouter(Generic[T]):
    """Server name -> value, with one-label wildcards (``*.example.com``).

    Names must be given lower-case and looked up in the normalised form that
    :func:`rpxy.policy.host.request_host` returns (lower-case, no port, no trailing
    dot); ``lookup`` does not normalise again because it runs on every request.

    ``*.example.com`` matches exactly one extra label (``a.example.com``), never
    ``example.com`` itself nor ``a.b.example.com``; an exact name always wins over
    a wildcard. Every lookup costs at most two dict probes.
    """

    __slots__ = ("_exact", "_wildcard")

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        exact: dict[str, T] = {}
        wildcard: dict[str, T] = {}
        for name, value in entries:
            if name.startswith("*."):
                suffix = name[2:]
                if not suffix or "*" in suffix:
                    raise ValueError(f"invalid wildcard server name {name!r}")
                table, key = wildcard, suffix
            else:
                if "*" in name:
                    raise ValueError(f"invalid server name {name!r}")
                table, key = exact, name
            if key in table:
                raise ValueError(f"duplicate server name {name!r}")
            table[key] = value
        self._exact = exact
        self._wildcard = wildcard

    def lookup(self, host: str) -> T | None:
        """The value for ``host`` (already normalised), or None when nothing matches."""
        value = self._exact.get(host)
        if value is not None or not self._wildcard:
            return value
        dot = host.find(".")
        if dot <= 0:
            return None
        return self._wildcard.get(host[dot + 1 :])

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcard)


# Above this many routes a lookup walks the path's segments (dict probes) instead
# of testing every prefix in turn; below it the linear scan is cheaper.
_LINEAR_LIMIT = 8
_MISSING: Any = object()


class PathRouter(Generic[T]):
    """Longest path prefix on segment boundaries -> value (one app's routes).

    ``None`` stands for the default route ``/``, which matches every path. A prefix
    ``/foo`` matches ``/foo``, ``/foo/`` and ``/foo/x`` but never ``/foobar``; a
    prefix written with a trailing slash, ``/foo/``, matches ``/foo/`` and
    ``/foo/x`` but not ``/foo``. Matching is byte-wise and case-sensitive, on the
    raw (not percent-decoded, not dot-segment-normalised) path, exactly like rpxy.
    """

    __slots__ = ("_ordered", "_table")

    def __init__(self, entries: Iterable[tuple[str | None, T]]) -> None:
        table: dict[bytes, T] = {}
        for path, value in entries:
            prefix = b"/" if path is None or path == "" else path.encode("ascii")
            if not prefix.startswith(b"/"):
                raise ValueError(f"route path must start with '/': {path!r}")
            if prefix in table:
                raise ValueError(f"duplicate route path {path!r}")
            table[prefix] = value
        self._table = table
        # Longest first; each carries whether it already ends on a boundary.
        self._ordered: tuple[tuple[bytes, int, bool, T], ...] | None = (
            tuple(
                (p, len(p), p.endswith(b"/"), v)
                for p, v in sorted(table.items(), key=lambda item: len(item[0]), reverse=True)
            )
            if len(table) <= _LINEAR_LIMIT
            else None
        )

    def lookup(self, path: bytes) -> tuple[bytes, T] | None:
        """``(matched prefix, value)`` for ``path`` (no query string), or None (-> 404)."""
        ordered = self._ordered
        if ordered is not None:
            for prefix, size, slash_end, value in ordered:
                if path.startswith(prefix) and (
                    slash_end or len(path) == size or path[size] == 0x2F  # b"/"
                ):
                    return prefix, value
            return None
        return self._walk(path)

    def _walk(self, path: bytes) -> tuple[bytes, T] | None:
        # Candidates longest first: the whole path, then at each '/' from the right
        # the prefix ending with that slash and the prefix ending just before it.
        table = self._table
        value = table.get(path, _MISSING)
        if value is not _MISSING:
            return path, value
        end = len(path)
        while True:
            slash = path.rfind(b"/", 0, end)
            if slash < 0:
                return None
            candidate = path[: slash + 1]
            value = table.get(candidate, _MISSING)
            if value is not _MISSING:
                return candidate, value
            if slash:
                candidate = path[:slash]
                value = table.get(candidate, _MISSING)
                if value is not _MISSING:
                    return candidate, value
            end = slash

    def __len__(self) -> int:
        return len(self._table)
